"""cnnjax.native.batch_norm: the BatchNorm kernels against NumPy loops written from their
definitions, and functional.batch_norm's native path against its XLA path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import functional as F
from cnnjax import native, settings
from cnnjax.native import batch_norm as B

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)

# Shapes: channel counts off the kernels' 8- and 4-wide paths, row counts off their 8- and 64-row
# blocks, one tensor large enough to be split over threads, and an empty batch.
SHAPES = [(2, 3, 5, 7), (130, 12), (4, 9, 9, 20), (64, 32, 32, 16), (0, 4)]


def _rows(a):
    return np.asarray(a, np.float64).reshape(-1, a.shape[-1])


def loops(name, *args):
    """The kernels' definitions, element by element (float64)."""
    if name == "sums":
        (x,) = args
        r = _rows(x)
        return np.stack(
            [
                [sum(r[:, j]) for j in range(r.shape[1])],
                [sum(r[:, j] ** 2) for j in range(r.shape[1])],
            ]
        )
    if name == "apply":
        relu, x, coef, res = args
        r, out = _rows(x), np.empty(_rows(x).shape)
        for i in range(r.shape[0]):
            for j in range(r.shape[1]):
                z = r[i, j] * coef[0, j] + coef[1, j] + (0.0 if res is None else _rows(res)[i, j])
                out[i, j] = max(z, 0.0) if relu else z
        return out.reshape(x.shape)
    if name == "grad_sums":
        relu, gy, x, coef = args
        g, r = _rows(gy), _rows(x)
        keep = (r * coef[0] + coef[1] > 0) if relu else np.ones_like(r, bool)
        return np.stack(
            [
                [sum(g[i, j] for i in range(r.shape[0]) if keep[i, j]) for j in range(r.shape[1])],
                [
                    sum(g[i, j] * r[i, j] for i in range(r.shape[0]) if keep[i, j])
                    for j in range(r.shape[1])
                ],
            ]
        )
    if name == "grad_sums_masked":
        gy, y, x = args
        g = np.where(_rows(y) > 0, _rows(gy), 0.0)
        return loops("grad_sums", False, g.reshape(x.shape), x, None), g.reshape(x.shape)
    if name == "grad_apply":
        relu, g, x, coef = args
        gr, r = _rows(g), _rows(x)
        if relu:
            gr = np.where(r * coef[3] + coef[4] > 0, gr, 0.0)
        return (gr * coef[0] + r * coef[1] + coef[2]).reshape(x.shape)
    raise KeyError(name)


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    other = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    coef = rng.standard_normal((5, c)).astype(np.float32)
    return x, other[0], other[1], coef


def _close(got, want, scale=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = scale if scale is not None else max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, atol=2e-6 * scale, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("shape", SHAPES[:3] + SHAPES[4:])
def test_kernels_match_their_definitions(shape):
    x, gy, r, coef = _data(shape)
    _close(B.sums(x), loops("sums", x), scale=float(np.abs(loops("sums", x)).max(initial=1.0)))
    for relu in (False, True):
        for res in (None, r):
            _close(B.apply(x, coef[:2], res, relu=relu), loops("apply", relu, x, coef, res))
        _close(B.grad_sums(gy, x, coef[:2], relu=relu), loops("grad_sums", relu, gy, x, coef))
        _close(B.grad_apply(gy, x, coef, relu=relu), loops("grad_apply", relu, gy, x, coef))
    y = np.maximum(x - 0.5, 0).astype(np.float32)
    sums, g = B.grad_sums_masked(gy, y, x)
    want_sums, want_g = loops("grad_sums_masked", gy, y, x)
    _close(sums, want_sums)
    np.testing.assert_array_equal(np.asarray(g), want_g.astype(np.float32))


@needs_native
def test_kernels_on_a_tensor_split_over_threads_match_numpy():
    # 64 x 32 x 32 x 16: split over XLA's threads and summed in blocks (NumPy, not
    # the loops: 1M values).
    x, gy, r, coef = _data(SHAPES[3], seed=1)
    xr, gr = _rows(x), _rows(gy)
    _close(B.sums(x), np.stack([xr.sum(0), (xr**2).sum(0)]), scale=float((xr**2).sum(0).max()))
    keep = xr * coef[0] + coef[1] > 0
    g = np.where(keep, gr, 0.0)
    _close(
        B.grad_sums(gy, x, coef[:2], relu=True), np.stack([g.sum(0), (g * xr).sum(0)]), scale=1e4
    )
    z = xr * coef[0] + coef[1] + _rows(r)
    _close(B.apply(x, coef[:2], r, relu=True), np.maximum(z, 0).reshape(x.shape))
    g = np.where(xr * coef[3] + coef[4] > 0, gr, 0.0)  # grad_apply's mask has its own coefficients
    _close(
        B.grad_apply(gy, x, coef, relu=True),
        (g * coef[0] + xr * coef[1] + coef[2]).reshape(x.shape),
    )


@needs_native
def test_sums_are_accurate_where_the_mean_is_large():
    # The statistics subtract E[x]^2 from E[x^2], so the sums must be right to float32's
    # precision however many rows they add: 2^17 rows of mean 50 against the float64 sums of the
    # same float32 inputs. (A running float32 sum of these rows is off by 7e-6, of their squares
    # by 1.2e-5, measured with NumPy; the 64-row float32 blocks of the first version were within
    # 3e-9 here, so the network test below is what catches those.)
    rng = np.random.default_rng(2)
    x = (50 + rng.standard_normal((1 << 17, 8))).astype(np.float32)
    want = np.stack([x.astype(np.float64).sum(0), (x.astype(np.float64) ** 2).sum(0)])
    np.testing.assert_allclose(np.asarray(B.sums(x), np.float64), want, rtol=3e-7)


@needs_native
def test_kernel_arguments_are_checked():
    x = jnp.ones((2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"coef must have shape \(2, 4\)"):
        B.apply(x, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="residual must be float32 of the activations' shape"):
        B.apply(x, jnp.ones((2, 4)), jnp.ones((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="float32 activations"):
        B.sums(x.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"coef must have shape \(5, 4\)"):
        B.grad_apply(x, x, jnp.ones((2, 4)))


def _bn(backend, x, scale, bias, residual, activation, train, vjp=None, axis_name=None):
    y, stats = F.batch_norm(
        x,
        scale,
        bias,
        jnp.full(x.shape[-1], 0.1),
        jnp.full(x.shape[-1], 2.0),
        train=train,
        momentum=0.8,
        residual=residual,
        activation=activation,
        backend=backend,
        vjp=vjp,
        axis_name=axis_name,
    )
    return y, stats


def _loss(backend, activation, train, vjp=None, has_residual=True, affine=True):
    def loss(x, scale, bias, residual):
        y, (m, v) = _bn(
            backend,
            x,
            scale if affine else None,
            bias if affine else None,
            residual if has_residual else None,
            activation,
            train,
            vjp,
        )
        w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        # Through the output and the running statistics (nonzero mean and variance cotangents).
        return jnp.sum(y * w) + jnp.sum(m * jnp.arange(m.size)) + jnp.sum(v**2)

    return loss


@needs_native
@pytest.mark.parametrize("activation", [None, "relu", "tanh"])
@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("vjp", ["fused", "autodiff"])
def test_native_batch_norm_matches_xla(activation, has_residual, vjp):
    x, r, _, coef = _data((3, 5, 4, 6), seed=3)
    scale, bias = coef[0], coef[1]
    for train in (True, False):
        args = (x, scale, bias, r)
        want = jax.jit(
            jax.value_and_grad(_loss("xla", activation, train, vjp, has_residual), (0, 1, 2, 3))
        )(*args)
        jaxpr = str(jax.make_jaxpr(_loss("native", activation, train, vjp, has_residual))(*args))
        assert "cnnjax_bn_apply" in jaxpr  # the native path ran
        got = jax.jit(
            jax.value_and_grad(_loss("native", activation, train, vjp, has_residual), (0, 1, 2, 3))
        )(*args)
        np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
        for g, w in zip(got[1], want[1]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
        assert np.abs(np.asarray(got[1][0])).max() > 1e-2  # a real gradient was compared


@needs_native
def test_native_batch_norm_without_scale_and_bias_matches_xla():
    x, r, _, _ = _data((4, 3, 3, 5), seed=4)
    ones = jnp.ones(5)
    got = jax.grad(_loss("native", "relu", True, affine=False), (0, 3))(x, ones, ones, r)
    want = jax.grad(_loss("xla", "relu", True, affine=False), (0, 3))(x, ones, ones, r)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


@needs_native
def test_native_batch_norm_gradients_of_gradients_and_vmap_match_xla():
    x, r, _, coef = _data((2, 3, 3, 4), seed=5)

    def penalty(
        backend,
    ):  # differentiates the BatchNorm's own gradient (the kernels' reference JVPs)
        loss = _loss(backend, "relu", True, "fused")
        return lambda x, s, b, r: jnp.sum(jax.grad(loss)(x, s, b, r) ** 2)

    for backend_result in zip(
        jax.grad(penalty("native"), (0, 1))(x, coef[0], coef[1], r),
        jax.grad(penalty("xla"), (0, 1))(x, coef[0], coef[1], r),
    ):
        np.testing.assert_allclose(*map(np.asarray, backend_result), rtol=1e-3, atol=1e-3)
    xs = np.stack([x, 2 * x + 1])
    per = {
        b: jax.vmap(lambda x: _bn(b, x, coef[0], coef[1], None, "relu", True)[0])(xs)
        for b in ("native", "xla")
    }
    np.testing.assert_allclose(
        np.asarray(per["native"]), np.asarray(per["xla"]), rtol=1e-5, atol=1e-5
    )


def _bn_jaxpr(x, **kw):
    def f(x):
        return jnp.sum(
            F.batch_norm(
                x,
                None,
                None,
                jnp.zeros(x.shape[-1]),
                jnp.ones(x.shape[-1]),
                train=True,
                activation="relu",
                **kw,
            )[0]
        )

    return str(jax.make_jaxpr(jax.grad(f))(x))


@needs_native
def test_auto_backend_picks_native_for_float32_on_the_cpu_with_switches_back():
    x = jnp.ones((2, 3, 3, 4))
    assert settings.current().bn_backend == "auto" and jax.default_backend() == "cpu"
    auto = _bn_jaxpr(x)
    for target in (
        "cnnjax_bn_sums",
        "cnnjax_bn_apply",
        "cnnjax_bn_grad_sums",
        "cnnjax_bn_grad_apply",
    ):
        assert re.search(target + r"\b", auto), target  # \b: not the _masked or _residual variants
    assert "cnnjax_bn" not in _bn_jaxpr(x, backend="xla")
    with F.batch_norm_backend("xla"):
        assert "cnnjax_bn" not in _bn_jaxpr(x)
    for backend in ("auto", "native"):  # bfloat16 takes XLA's path under both
        assert "cnnjax_bn" not in _bn_jaxpr(x.astype(jnp.bfloat16), backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        _bn_jaxpr(x, backend="cudnn")
    with pytest.raises(ValueError, match="mode must be one of"):
        F.batch_norm_backend("mkl")


def test_residual_and_activation_are_validated():
    x = jnp.ones((2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"residual must have x's shape \(2, 3, 3, 4\)"):
        F.batch_norm(
            x, None, None, jnp.zeros(4), jnp.ones(4), train=True, residual=jnp.ones((2, 3, 3, 3))
        )
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        F.batch_norm(x, None, None, jnp.zeros(4), jnp.ones(4), train=True, activation="swishy")
    with pytest.raises(TypeError, match="activation must be None, a name"):
        F.batch_norm(x, None, None, jnp.zeros(4), jnp.ones(4), train=True, activation=3)


@needs_native  # elsewhere 'auto' is XLA's path, and this would compare it with itself
@pytest.mark.parametrize("name", ["resnet20", "plain20"])
def test_networks_train_alike_on_either_backend(name):
    # The blocks hand BatchNorm its ReLU and shortcut (fused natively); gradients and running
    # statistics agree with XLA's path, and with float64 (plain nets amplify the statistics'
    # rounding: float32 partial sums over 64 rows moved these gradients by 1.6%).
    import cnnjax.models as M

    model = M.create(name)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x, train=False)

    def grads(backend, dtype):
        def loss(p, x):
            with (
                F.batch_norm_backend(backend),
                F.conv2d_backend("auto" if dtype == jnp.float32 else "xla"),
            ):
                out, st = model.apply(
                    {"params": p, "batch_stats": v["batch_stats"]},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
            return jnp.sum(out.astype(jnp.float32) ** 2), st

        p = jax.tree.map(lambda a: a.astype(dtype), v["params"])
        return jax.jit(jax.grad(loss, has_aux=True))(p, x.astype(dtype))

    got, want = grads("auto", jnp.float32), grads("xla", jnp.float32)

    def rel(a, b):
        return float(
            np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max()
        )

    assert max(rel(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))) < 1e-3
    with jax.enable_x64(True):
        exact = grads("xla", jnp.float64)
    assert max(rel(a, b) for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(exact[0]))) < 2e-3
