"""cnnjax.functional against naive NumPy references written from the lecture's definitions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cnnjax import functional as F
from cnnjax import native, settings

# --------------------------------------------------------------------------- NumPy references


def np_pad(x, pads, value=0.0):
    (t, b), (left, r) = pads
    return np.pad(x, ((0, 0), (t, b), (left, r), (0, 0)), constant_values=value)


def np_conv2d(x, w, b, stride, pads, dilation, groups):
    """out(N_i, C_out_j) = bias(C_out_j) + sum_k weight(C_out_j, k) * input(N_i, k), by loops."""
    x = np_pad(x.astype(np.float64), pads)
    n, h, wd, cin = x.shape
    kh, kw, cig, cout = w.shape
    sh, sw = stride
    dh, dw = dilation
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    oh, ow = (h - eh) // sh + 1, (wd - ew) // sw + 1
    cog = cout // groups
    out = np.zeros((n, oh, ow, cout))
    for o in range(cout):
        g = o // cog
        for i in range(oh):
            for j in range(ow):
                patch = x[
                    :, i * sh : i * sh + eh : dh, j * sw : j * sw + ew : dw, g * cig : (g + 1) * cig
                ]
                out[:, i, j, o] = np.einsum("nhwc,hwc->n", patch, w[:, :, :, o])
        if b is not None:
            out[..., o] += b[o]
    return out


def np_pool(x, k, s, pads, op, count_include_pad=True, ceil_mode=False):
    n, h, w, c = x.shape
    (t, bt), (left, r) = pads
    oh = F.output_size(h, k, s, (t, bt), ceil_mode=ceil_mode)
    ow = F.output_size(w, k, s, (left, r), ceil_mode=ceil_mode)
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s - t, j * s - left
            rows = [rr for rr in range(r0, r0 + k)]
            cols = [cc for cc in range(c0, c0 + k)]
            vals, count = [], 0
            for rr, cc in itertools.product(rows, cols):
                inside_pad = -t <= rr < h + bt and -left <= cc < w + r
                if 0 <= rr < h and 0 <= cc < w:
                    vals.append(x[:, rr, cc, :])
                    count += 1
                elif inside_pad and count_include_pad and op == "avg":
                    vals.append(np.zeros((n, c)))
                    count += 1
            stack = np.stack(vals)
            out[:, i, j] = stack.max(0) if op == "max" else stack.sum(0) / count
    return out


# --------------------------------------------------------------------------- convolution


def _random_conv_case(rng):
    groups = int(rng.choice([1, 2, 3]))
    cin = groups * int(rng.integers(1, 4))
    cout = groups * int(rng.integers(1, 4))
    kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    stride = (int(rng.integers(1, 4)), int(rng.integers(1, 3)))
    dilation = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    padding = [0, 1, (1, 2), ((0, 2), (1, 0)), "SAME", "VALID"][int(rng.integers(0, 6))]
    h, w = int(rng.integers(6, 12)), int(rng.integers(6, 12))
    return dict(
        groups=groups,
        cin=cin,
        cout=cout,
        k=(kh, kw),
        stride=stride,
        dilation=dilation,
        padding=padding,
        hw=(h, w),
    )


def np_conv2d_grads(x, w, g, stride, pads, dilation):
    """Gradients of sum(g * conv2d(x, w)) (groups 1) by loops over the definition: every output
    position adds g * w into the input window it read (dx) and g * window into the kernel (dw)."""
    (t, _), (left, _) = pads
    xp = np_pad(x.astype(np.float64), pads)
    dxp, dw = np.zeros_like(xp), np.zeros(w.shape)
    kh, kw = w.shape[:2]
    (sh, sw), (dh, dwl) = stride, dilation
    for i in range(g.shape[1]):
        for j in range(g.shape[2]):
            rows = slice(i * sh, i * sh + (kh - 1) * dh + 1, dh)
            cols = slice(j * sw, j * sw + (kw - 1) * dwl + 1, dwl)
            dxp[:, rows, cols, :] += np.einsum("no,hwco->nhwc", g[:, i, j], w)
            dw += np.einsum("nhwc,no->hwco", xp[:, rows, cols, :], g[:, i, j])
    return dxp[:, t : t + x.shape[1], left : left + x.shape[2]], dw


@pytest.mark.parametrize("seed", range(16))
def test_conv2d_canonical_gradients_match_loops_and_jax_rule(seed):
    # Strides that leave trailing rows unread (r > 0), padding wider than the kernel (negative
    # gradient padding) and dilation all occur among these cases.
    rng = np.random.default_rng(100 + seed)
    c = _random_conv_case(rng)
    cin, cout = c["cin"] // c["groups"], c["cout"] // c["groups"]
    padding = [c["padding"], ((2, 0), (3, 1))][seed % 2]
    x = rng.standard_normal((2, *c["hw"], cin)).astype(np.float32)
    w = rng.standard_normal((*c["k"], cin, cout)).astype(np.float32)
    pads = F.resolve_padding(padding, c["hw"], c["k"], c["stride"], c["dilation"])
    y = F.conv2d(
        jnp.asarray(x), jnp.asarray(w), stride=c["stride"], padding=padding, dilation=c["dilation"]
    )
    g = rng.standard_normal(y.shape).astype(np.float32)

    def grads(vjp):
        def loss(x, w):
            out = F.conv2d(
                x,
                w,
                stride=c["stride"],
                padding=padding,
                dilation=c["dilation"],
                vjp=vjp,
                precision=jax.lax.Precision.HIGHEST,
                backend="xla",
            )
            return jnp.sum(out * g)

        return jax.jit(jax.grad(loss, (0, 1)))(jnp.asarray(x), jnp.asarray(w))

    want_dx, want_dw = np_conv2d_grads(x, w, g, c["stride"], pads, c["dilation"])
    (dx, dw), (ref_dx, ref_dw) = grads("canonical"), grads("xla")
    np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), want_dw, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ref_dx), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(ref_dw), atol=1e-5, rtol=1e-5)


def test_conv2d_vjp_mode_is_traced_in_and_validated():
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))

    def conv_ops(fn, w):  # the gradient paths of XLA's backend (oneDNN's: test_native.py)
        with F.conv2d_backend("xla"):
            jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(fn(x, w)), (0, 1)))(x, w))
        return jaxpr.count("transpose["), jaxpr.count("conv_general_dilated[")

    with F.conv2d_vjp_mode("canonical"):
        canonical = conv_ops(lambda x, w: F.conv2d(x, w, padding=1), w)
    with F.conv2d_vjp_mode("xla"):
        xla = conv_ops(lambda x, w: F.conv2d(x, w, padding=1), w)
    assert canonical[1] == xla[1] == 3  # forward, input gradient, kernel gradient
    # The canonical path transposes explicitly: flipped kernel, x and dy to the kernel-gradient
    # layout, the kernel gradient back.
    assert canonical[0] == 4 and xla[0] < 4
    assert settings.current().conv_vjp == "auto"
    # A grouped convolution takes JAX's rule whatever the mode.
    wg = jnp.ones((3, 3, 1, 4))
    with F.conv2d_vjp_mode("canonical"):
        grouped = conv_ops(lambda x, w: F.conv2d(x, w, padding=1, groups=2), wg)
    with F.conv2d_vjp_mode("xla"):
        assert grouped == conv_ops(lambda x, w: F.conv2d(x, w, padding=1, groups=2), wg)
    with pytest.raises(ValueError, match="vjp must be one of"):
        F.conv2d(x, w, vjp="fast")
    with pytest.raises(ValueError, match="mode must be one of"):
        F.conv2d_vjp_mode("cudnn")


@pytest.mark.parametrize(
    "backend", ["xla", "auto"]
)  # auto: oneDNN for float32 groups=1 where installed
@pytest.mark.parametrize("seed", range(24))
def test_conv2d_matches_naive_formula(seed, backend):
    rng = np.random.default_rng(seed)
    c = _random_conv_case(rng)
    x = rng.standard_normal((2, *c["hw"], c["cin"])).astype(np.float32)
    w = rng.standard_normal((*c["k"], c["cin"] // c["groups"], c["cout"])).astype(np.float32)
    b = rng.standard_normal(c["cout"]).astype(np.float32) if seed % 2 else None
    pads = F.resolve_padding(c["padding"], c["hw"], c["k"], c["stride"], c["dilation"])
    got = F.conv2d(
        jnp.asarray(x),
        jnp.asarray(w),
        None if b is None else jnp.asarray(b),
        stride=c["stride"],
        padding=c["padding"],
        dilation=c["dilation"],
        groups=c["groups"],
        precision=jax.lax.Precision.HIGHEST,
        backend=backend,
    )
    want = np_conv2d(x, w, b, c["stride"], pads, c["dilation"], c["groups"])
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_depthwise_conv_is_per_channel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 5, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 1, 4)).astype(np.float32)
    got = F.conv2d(jnp.asarray(x), jnp.asarray(w), padding=1, groups=4, precision="highest")
    for ch in range(4):
        single = np_conv2d(
            x[..., ch : ch + 1], w[..., ch : ch + 1], None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1
        )
        np.testing.assert_allclose(np.asarray(got[..., ch]), single[..., 0], atol=1e-5)


@pytest.mark.parametrize(
    "size,k,s,p,d,want",
    [
        (32, 3, 1, 1, 1, 32),
        (32, 3, 2, 1, 1, 16),
        (227, 11, 4, 0, 1, 55),
        (224, 7, 2, 3, 1, 112),
        (7, 3, 1, 0, 2, 3),
        (28, 5, 1, 2, 1, 28),
        (10, 3, 3, 0, 1, 3),
        (13, 3, 1, 2, 2, 13),
    ],
)
def test_output_size_formula(size, k, s, p, d, want):
    assert F.output_size(size, k, s, p, d) == want == (size - ((k - 1) * d + 1) + 2 * p) // s + 1
    x = jnp.zeros((1, size, size, 1))
    y = F.conv2d(x, jnp.zeros((k, k, 1, 1)), stride=s, padding=p, dilation=d)
    assert y.shape[1:3] == (want, want)
    assert F.conv_output_shape(x.shape, k, 1, stride=s, padding=p, dilation=d)[1:3] == (want, want)


def test_same_padding_keeps_size_at_stride_one():
    x = jnp.ones((1, 9, 10, 2))
    assert F.conv2d(x, jnp.ones((4, 3, 2, 3)), padding="SAME", dilation=2).shape == (1, 9, 10, 3)


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("op", ["max", "avg"])
@pytest.mark.parametrize(
    "k,s,p,ceil,incl",
    [
        (2, 2, 0, False, True),
        (3, 2, 1, False, True),
        (3, 2, 1, False, False),
        (3, 2, 0, True, True),
        (3, 3, 1, True, False),
        (3, 1, 1, False, True),
    ],
)
def test_pooling_matches_numpy(op, k, s, p, ceil, incl):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 8, 3)).astype(np.float32)
    if op == "max":
        got = F.max_pool(jnp.asarray(x), k, s, p, ceil_mode=ceil)
    else:
        got = F.avg_pool(jnp.asarray(x), k, s, p, ceil_mode=ceil, count_include_pad=incl)
    want = np_pool(x, k, s, ((p, p), (p, p)), op, count_include_pad=incl, ceil_mode=ceil)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_ceil_mode_gives_googlenet_and_zfnet_sizes():
    # GoogLeNet: 112 -> 56 with 3x3/2 ceil pooling; ZFNet: 110 -> 55 and 13 -> 6 (floor) maps.
    assert F.max_pool(jnp.zeros((1, 112, 112, 1)), 3, 2, ceil_mode=True).shape[1] == 56
    assert F.max_pool(jnp.zeros((1, 110, 110, 1)), 3, 2, ceil_mode=True).shape[1] == 55
    assert F.max_pool(jnp.zeros((1, 110, 110, 1)), 3, 2).shape[1] == 54


def test_global_avg_pool():
    x = np.random.default_rng(2).standard_normal((3, 4, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(F.global_avg_pool(jnp.asarray(x))), x.mean((1, 2)), atol=1e-6
    )
    assert F.global_avg_pool(jnp.asarray(x), keepdims=True).shape == (3, 1, 1, 6)


# --------------------------------------------------------------------------- batch norm


def test_batch_norm_train_and_eval_follow_the_formulas():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 3, 3, 5)) * 3 + 2).astype(np.float32)
    gamma, beta = (
        rng.standard_normal(5).astype(np.float32),
        rng.standard_normal(5).astype(np.float32),
    )
    rm, rv = rng.standard_normal(5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)
    y, (nm, nv) = F.batch_norm(
        jnp.asarray(x),
        jnp.asarray(gamma),
        jnp.asarray(beta),
        jnp.asarray(rm),
        jnp.asarray(rv),
        train=True,
        momentum=0.9,
        eps=1e-5,
    )
    mu = x.reshape(-1, 5).mean(0)
    var = x.reshape(-1, 5).var(0)  # biased, as in the lecture's mini-batch variance
    np.testing.assert_allclose(
        np.asarray(y), (x - mu) / np.sqrt(var + 1e-5) * gamma + beta, atol=1e-4
    )
    np.testing.assert_allclose(np.asarray(nm), 0.9 * rm + 0.1 * mu, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nv), 0.9 * rv + 0.1 * var, atol=1e-4)
    y_eval, (em, ev) = F.batch_norm(
        jnp.asarray(x),
        jnp.asarray(gamma),
        jnp.asarray(beta),
        jnp.asarray(rm),
        jnp.asarray(rv),
        train=False,
    )
    np.testing.assert_allclose(
        np.asarray(y_eval), (x - rm) / np.sqrt(rv + 1e-5) * gamma + beta, atol=1e-4
    )
    np.testing.assert_array_equal(np.asarray(em), rm)


def test_batch_norm_on_dense_inputs_and_bf16_statistics_in_float32():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((8, 3)), jnp.bfloat16) * 100 + 1000
    mean, var = F.batch_norm_statistics(x)
    assert mean.dtype == var.dtype == jnp.float32
    x32 = np.asarray(x, np.float32)
    np.testing.assert_allclose(np.asarray(mean), x32.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(var), x32.var(0), rtol=1e-2)
    y, _ = F.batch_norm(x, None, None, jnp.zeros(3), jnp.ones(3), train=True)
    assert y.dtype == jnp.bfloat16


def test_batch_norm_axis_name_gives_global_batch_statistics():
    x = np.random.default_rng(5).standard_normal((1, 8, 2, 2, 3)).astype(np.float32)
    per = jax.vmap(lambda a: F.batch_norm_statistics(a, axis_name="batch"), axis_name="batch")(
        jnp.asarray(x.reshape(4, 2, 2, 2, 3))
    )
    whole = F.batch_norm_statistics(jnp.asarray(x[0]))
    np.testing.assert_allclose(np.asarray(per[0][0]), np.asarray(whole[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(per[1][3]), np.asarray(whole[1]), atol=1e-5)


def test_batch_norm_gradients():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((4, 2, 2, 3)))
    g, b = jnp.asarray(rng.standard_normal(3)), jnp.asarray(rng.standard_normal(3))

    def f(x, g, b):
        return F.batch_norm(x, g, b, jnp.zeros(3), jnp.ones(3), train=True)[0]

    check_grads(f, (x, g, b), order=2, modes=("rev",), atol=5e-2, rtol=5e-2)


def _bn_loss(vjp, affine=True):
    w = jnp.asarray(np.random.default_rng(11).standard_normal((3, 4, 5, 4)), jnp.float32)

    def loss(x, g, b):
        y, (m, v) = F.batch_norm(
            x,
            g if affine else None,
            b if affine else None,
            jnp.zeros(4),
            jnp.ones(4),
            train=True,
            momentum=0.8,
            vjp=vjp,
        )
        y = y.astype(jnp.float32)
        # Through the output and through the returned running statistics (g_mean, g_var != 0).
        return (
            jnp.sum(jnp.sin(y) * w.reshape(-1)[: y.size].reshape(y.shape))
            + jnp.sum(m * jnp.arange(4.0))
            + jnp.sum(v**2)
        )

    return loss


@pytest.mark.parametrize("shape", [(3, 4, 5, 4), (12, 4)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_fused_vjp_equals_autodiff(shape, affine):
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
    g, b = (
        jnp.asarray(rng.standard_normal(4), jnp.float32),
        jnp.asarray(rng.standard_normal(4), jnp.float32),
    )
    vals = {
        vjp: jax.jit(jax.value_and_grad(_bn_loss(vjp, affine), (0, 1, 2)))(x, g, b)
        for vjp in ("fused", "autodiff")
    }
    np.testing.assert_allclose(float(vals["fused"][0]), float(vals["autodiff"][0]), rtol=1e-6)
    for got, want in zip(vals["fused"][1], vals["autodiff"][1]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(vals["fused"][1][0])).max() > 1e-3  # a real gradient was compared


def test_batch_norm_fused_vjp_bfloat16_and_default():
    x = jnp.asarray(np.random.default_rng(13).standard_normal((3, 4, 5, 4)), jnp.bfloat16)
    g, b = jnp.ones(4), jnp.zeros(4)
    grads = {vjp: jax.grad(_bn_loss(vjp), (0, 1, 2))(x, g, b) for vjp in ("fused", "autodiff")}
    assert grads["fused"][0].dtype == jnp.bfloat16 and grads["fused"][1].dtype == jnp.float32
    for got, want in zip(grads["fused"], grads["autodiff"]):
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=5e-2, atol=5e-2
        )

    # 'auto' (the default) is the fused VJP on CPU, JAX's autodiff elsewhere: the fused backward's
    # barrier is in the traced gradient (of XLA's path; the native kernels'
    # backward has no barrier).
    def jaxpr(vjp=None):
        def f(x):
            y = F.batch_norm(
                x, g, b, jnp.zeros(4), jnp.ones(4), train=True, vjp=vjp, backend="xla"
            )[0]
            return jnp.sum(y**2)

        return str(jax.make_jaxpr(jax.grad(f))(x.astype(jnp.float32)))

    assert settings.current().bn_vjp == "auto"
    assert "optimization_barrier" in jaxpr("fused") and "optimization_barrier" not in jaxpr(
        "autodiff"
    )
    assert ("optimization_barrier" in jaxpr()) is (jax.default_backend() == "cpu")
    with F.batch_norm_vjp_mode("autodiff"):
        assert "optimization_barrier" not in jaxpr()
    with pytest.raises(ValueError, match="vjp must be one of"):
        F.batch_norm(x, g, b, jnp.zeros(4), jnp.ones(4), train=True, vjp="cudnn")
    with pytest.raises(ValueError, match="mode must be one of"):
        F.batch_norm_vjp_mode("fast")


_BN_PARALLEL = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from cnnjax import functional as F, native, settings

mesh = jax.make_mesh((4,), ("batch",))
shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(8, 3, 3, 2)) * 2 + 1, jnp.float32)
g, b = jnp.asarray([1.5, -0.5], jnp.float32), jnp.asarray([0.1, 0.2], jnp.float32)
w = jnp.asarray(rng.normal(size=(8, 3, 3, 2)), jnp.float32)


def local_loss(vjp):
    def loss(x, g, b, w):
        y, (m, v) = F.batch_norm(
            x, g, b, jnp.zeros(2), jnp.ones(2), train=True, axis_name="batch", vjp=vjp
        )
        return jnp.mean(jnp.sin(y) * w)

    return loss


def run(backend):
    # read at trace time; every function below is traced anew
    settings.set_defaults(bn_backend=backend)
    out = {}
    for vjp in ("fused", "autodiff"):
        grad = jax.grad(local_loss(vjp), (0, 1, 2))
        pm = jax.pmap(
            lambda *a: jax.lax.pmean(grad(*a)[1:], "batch") + (grad(*a)[0],), axis_name="batch"
        )
        r = pm(
            x.reshape(4, 2, 3, 3, 2),
            jnp.broadcast_to(g, (4, 2)),
            jnp.broadcast_to(b, (4, 2)),
            w.reshape(4, 2, 3, 3, 2),
        )
        out[vjp, "pmap"] = [
            np.asarray(r[0][0]),
            np.asarray(r[1][0]),
            np.asarray(r[2]).reshape(8, 3, 3, 2),
        ]
        for check_vma in (False, True):

            def step(x, g, b, w):
                dx, dg, db = grad(x, g, b, w)
                return dx, jax.lax.pmean(dg, "batch"), jax.lax.pmean(db, "batch")

            f = jax.jit(
                jax.shard_map(
                    step,
                    mesh=mesh,
                    in_specs=(P("batch"), P(), P(), P("batch")),
                    out_specs=(P("batch"), P(), P()),
                    check_vma=check_vma,
                )
            )
            dx, dg, db = f(shard(x, P("batch")), shard(g, P()), shard(b, P()), shard(w, P("batch")))
            out[vjp, check_vma] = [np.asarray(dg), np.asarray(db), np.asarray(dx)]
    return out


# One device on the global batch: the parameters' gradients the data-parallel step must reproduce.
ref = jax.grad(
    lambda x, g, b: jnp.mean(
        jnp.sin(
            F.batch_norm(
                x, g, b, jnp.zeros(2), jnp.ones(2), train=True, vjp="autodiff", backend="xla"
            )[0]
        )
        * w
    ),
    (0, 1, 2),
)(x, g, b)
# 'auto' is the native kernels (cnnjax.native.batch_norm) here, 'xla' XLA's passes.
for backend in ("auto", "xla"):
    out = run(backend)
    # What ran: the kernels' backward pass under 'auto' wherever they are built, never under 'xla'.
    traced = str(
        jax.make_jaxpr(jax.pmap(jax.grad(local_loss("fused")), axis_name="batch"))(
            x.reshape(4, 2, 3, 3, 2),
            jnp.broadcast_to(g, (4, 2)),
            jnp.broadcast_to(b, (4, 2)),
            w.reshape(4, 2, 3, 3, 2),
        )
    )
    assert ("cnnjax_bn_grad_apply" in traced) == (backend == "auto" and native.available()), backend
    for key in (("pmap",), (False,), (True,)):
        for i in range(3):
            np.testing.assert_allclose(
                out[("fused",) + key][i], out[("autodiff",) + key][i], rtol=1e-5, atol=1e-7
            )
    for key in ("pmap", False):
        np.testing.assert_allclose(out["fused", key][0], ref[1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out["fused", key][1], ref[2], rtol=1e-5, atol=1e-7)
        # local mean: 4x the share
        np.testing.assert_allclose(out["fused", key][2], 4 * ref[0], rtol=1e-4, atol=1e-6)
    # check_vma: autodiff already sums a replicated parameter's gradient over the axis
    # (DESIGN.md's trap).
    np.testing.assert_allclose(out["fused", True][0], 4 * ref[1], rtol=1e-5, atol=1e-7)
print("OK")
"""


def test_batch_norm_fused_vjp_data_parallel_matches_autodiff():
    # SyncBN's backward: the input gradient needs the global sums, the parameters' gradients are
    # each device's own (as JAX's differentiation gives them) under pmap and shard_map, with and
    # without check_vma. Four fake CPU devices, in a subprocess.
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _BN_PARALLEL], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_fold_batch_norm_equals_conv_then_eval_bn(kind):
    rng = np.random.default_rng(7)
    if kind == "conv":
        x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)

        def layer(w, b):
            return F.conv2d(x, w, b, padding=1, stride=2, precision="highest")
    else:
        x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)

        def layer(w, b):
            return F.dense(x, w, b, precision="highest")

    b = jnp.asarray(rng.standard_normal(5), jnp.float32)
    gamma, beta = (
        jnp.asarray(rng.standard_normal(5), jnp.float32),
        jnp.asarray(rng.standard_normal(5), jnp.float32),
    )
    mean, var = (
        jnp.asarray(rng.standard_normal(5), jnp.float32),
        jnp.asarray(rng.uniform(0.2, 3, 5), jnp.float32),
    )
    ref, _ = F.batch_norm(layer(w, b), gamma, beta, mean, var, train=False)
    fw, fb = F.fold_batch_norm(w, b, gamma, beta, mean, var)
    np.testing.assert_allclose(np.asarray(layer(fw, fb)), np.asarray(ref), atol=1e-5, rtol=1e-5)
    fw0, fb0 = F.fold_batch_norm(w, None, gamma, beta, mean, var)
    ref0, _ = F.batch_norm(layer(w, None), gamma, beta, mean, var, train=False)
    np.testing.assert_allclose(np.asarray(layer(fw0, fb0)), np.asarray(ref0), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- LRN, dropout


@pytest.mark.parametrize("alpha_over_n", [False, True])
def test_local_response_norm_matches_paper_formula(alpha_over_n):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 3, 7)).astype(np.float32) * 5
    n, alpha, beta, k = 5, 1e-2, 0.75, 2.0
    a = alpha / n if alpha_over_n else alpha
    want = np.empty_like(x)
    for c in range(7):
        lo, hi = max(0, c - n // 2), min(6, c + n // 2)
        want[..., c] = x[..., c] / (k + a * (x[..., lo : hi + 1] ** 2).sum(-1)) ** beta
    got = F.local_response_norm(jnp.asarray(x), n, alpha, beta, k, alpha_over_n=alpha_over_n)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_dropout_scales_survivors_and_is_identity_when_deterministic():
    x = jnp.ones((1000, 10))
    y = F.dropout(x, 0.3, jax.random.key(0), deterministic=False)
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.7, rtol=1e-6)
    assert abs(kept.mean() - 0.7) < 0.02
    assert F.dropout(x, 0.3, None, deterministic=True) is x


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,words",
    [
        (
            lambda: F.conv2d(jnp.zeros((4, 4, 3)), jnp.zeros((3, 3, 3, 2))),
            ["x", "rank 4", "(4, 4, 3)"],
        ),
        (lambda: F.conv2d(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 4, 2))), ["channel", "3", "4"]),
        (
            lambda: F.conv2d(jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 2, 3)), groups=2),
            ["groups=2", "output channels 3"],
        ),
        (
            lambda: F.conv2d(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 1, 4)), groups=2),
            ["groups=2", "input channels 3"],
        ),
        (
            lambda: F.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((7, 7, 1, 1)), padding=1),
            ["kernel", "larger", "padded"],
        ),
        (
            lambda: F.conv2d(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 1)), stride=0),
            ["stride", ">= 1"],
        ),
        (
            lambda: F.conv2d(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 1)), dilation=(1, -1)),
            ["dilation"],
        ),
        (
            lambda: F.conv2d(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 1)), padding="FULL"),
            ["padding", "SAME", "VALID"],
        ),
        (
            lambda: F.conv2d(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 1)), padding=-1),
            ["padding", "non-negative"],
        ),
        (lambda: F.max_pool(jnp.zeros((1, 2, 2, 1)), 3), ["kernel_size", "larger"]),
        (lambda: F.max_pool(jnp.zeros((1, 8, 8, 1)), 2, padding=2), ["padding", "half"]),
        (lambda: F.avg_pool(jnp.zeros((8, 8)), 2), ["x", "rank 4"]),
        (lambda: F.dense(jnp.zeros((2, 5)), jnp.zeros((4, 3))), ["5 features", "4"]),
        (lambda: F.dropout(jnp.zeros(3), 1.0, None, deterministic=False), ["rate"]),
        (lambda: F.dropout(jnp.zeros(3), 0.5, None, deterministic=False), ["rng", "dropout"]),
        (
            lambda: F.batch_norm(
                jnp.zeros((2, 3)), None, None, jnp.zeros(3), jnp.ones(3), train=True, momentum=1.5
            ),
            ["momentum"],
        ),
        (lambda: F.get_activation("swishy"), ["swishy", "relu"]),
    ],
)
def test_bad_input_raises_clear_value_error(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.mark.parametrize(
    "pool",
    [
        lambda x: F.max_pool(x, 3, 2, 1),
        lambda x: F.avg_pool(x, 3, 2, 1, ceil_mode=True),
        lambda x: F.avg_pool(x, 2, count_include_pad=False),
    ],
)
def test_pooling_is_differentiable_under_jit(pool):
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 6, 6, 3)), jnp.float32)
    g = jax.jit(jax.grad(lambda x: jnp.sum(pool(x) ** 2)))(x)
    g_ref = jax.grad(lambda x: jnp.sum(pool(x) ** 2))(x)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


_SHARD_MAP_VJP = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P, NamedSharding
from cnnjax import functional as F

mesh = jax.make_mesh((2,), ("batch",))
rng = np.random.default_rng(0)
x = jax.device_put(
    jnp.asarray(rng.normal(size=(4, 6, 6, 2)), jnp.float32), NamedSharding(mesh, P("batch"))
)
k = jax.device_put(
    jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32), NamedSharding(mesh, P())
)
from cnnjax import native

out = {}
modes = {"canonical": dict(backend="xla", vjp="canonical"), "xla": dict(backend="xla", vjp="xla")}
if native.available():
    modes["onednn"] = dict(backend="onednn")
for mode, kw in modes.items():
    for check_vma in (False, True):

        def step(k, x):
            g = jax.grad(lambda k: jnp.sum(jnp.sin(F.conv2d(x, k, stride=2, padding=1, **kw))))(k)
            return jax.lax.pmean(g, "batch")

        f = jax.jit(
            jax.shard_map(
                step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P(), check_vma=check_vma
            )
        )
        out[mode, check_vma] = np.asarray(f(k, x))
for mode, check_vma in out:
    np.testing.assert_allclose(out[mode, check_vma], out["xla", check_vma], rtol=1e-5, atol=1e-6)
print("modes", sorted(modes))
# With check_vma the replicated kernel's gradient is summed over the axis by autodiff
# (then pmean'd).
np.testing.assert_allclose(out["xla", True], 2 * out["xla", False], rtol=1e-5)
print("OK")
"""


def test_canonical_vjp_under_shard_map_has_jax_rule_semantics():
    # A replicated kernel meets a batch-varying input: with check_vma the canonical VJP
    # (and oneDNN's) must mark the kernel varying as JAX's rule does, or its kernel
    # gradient has the wrong type (a real failure the data-parallel trainer hit). Two fake
    # CPU devices, in a subprocess.
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SHARD_MAP_VJP], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert ("'onednn'" in proc.stdout) == native.available(), proc.stdout


# ---------------------------------------------------------------------- argument validation (audit)

_X, _K = jnp.ones((1, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
_XB = jnp.ones((2, 3))


def _bn(x=_XB, rm=jnp.zeros(3), rv=jnp.ones(3), **kw):
    kw.setdefault("train", True)
    return F.batch_norm(x, None, None, rm, rv, **kw)


@pytest.mark.parametrize(
    "call,words",
    [
        # 1. stride / padding / groups: no truncated floats, no iterated
        # strings, the argument named.
        (lambda: F.conv2d(_X, _K, stride=(1.7, 2)), ["stride", "(1.7, 2)", "int"]),
        (lambda: F.conv2d(_X, _K, stride=1.5), ["stride", "1.5"]),
        (lambda: F.conv2d(_X, _K, padding=((1.7, 1), (1, 1))), ["padding", "1.7", "int"]),
        (lambda: F.conv2d(_X, _K, padding=(1.0, 2)), ["padding", "int"]),
        (lambda: F.conv2d(_X, _K, padding=1.5), ["padding", "1.5"]),
        (lambda: F.conv2d(_X, _K, stride="22"), ["stride", "'22'"]),
        (lambda: F.conv2d(_X, _K, stride=("a", 1)), ["stride", "('a', 1)"]),
        (lambda: F.conv2d(_X, _K, dilation=True), ["dilation", "True"]),
        (lambda: F.conv2d(_X, _K, groups=True), ["groups", "positive int", "True"]),
        (lambda: F.conv2d(_X, _K, groups=1.0), ["groups", "positive int"]),
        (lambda: F.resolve_padding(b"\x01\x01", (6, 6), (3, 3), (1, 1)), ["padding"]),
        # 2. conv2d: zero-size kernel, zero input channels, inputs that are not arrays.
        (lambda: F.conv2d(_X, jnp.ones((0, 3, 3, 4))), ["kernel", "zero-size", "(0, 3, 3, 4)"]),
        (lambda: F.conv2d(_X, jnp.ones((3, 3, 3, 0))), ["kernel", "zero-size"]),
        (lambda: F.conv2d(jnp.ones((1, 6, 6, 0)), jnp.ones((3, 3, 0, 4))), ["x", "0 channels"]),
        (lambda: F.conv2d("abc", _K), ["x", "array"]),
        # 3. dense: the bias shape, a scalar x.
        (
            lambda: F.dense(jnp.ones((2, 5)), jnp.ones((5, 4)), jnp.ones(3)),
            ["bias", "(4,)", "(3,)"],
        ),
        (
            lambda: F.dense(jnp.ones((2, 5)), jnp.ones((5, 4)), jnp.ones(1)),
            ["bias", "(4,)", "(1,)"],
        ),
        (
            lambda: F.dense(jnp.ones((2, 5)), jnp.ones((5, 4)), jnp.ones((2, 4))),
            ["bias", "(4,)", "(2, 4)"],
        ),
        (lambda: F.dense(jnp.float32(1), jnp.ones((5, 4))), ["x", "feature axis", "scalar"]),
        # 4. batch_norm: running-stat shapes in training, the rank in evaluation, vjp in both modes.
        (lambda: _bn(rm=jnp.zeros(4)), ["running_mean", "(3,)", "(4,)"]),
        (lambda: _bn(rm=jnp.zeros(1)), ["running_mean", "(3,)", "(1,)"]),
        (lambda: _bn(rm=jnp.zeros((5, 3))), ["running_mean", "(5, 3)"]),
        (lambda: _bn(rv=jnp.ones(4)), ["running_var", "(3,)", "(4,)"]),
        (lambda: _bn(rv=jnp.ones(4), vjp="autodiff"), ["running_var", "(3,)", "(4,)"]),
        (lambda: _bn(jnp.ones(3), train=False), ["x", "(N, C)", "(3,)"]),
        (lambda: _bn(jnp.float32(1), train=False), ["x", "(N, C)", "()"]),
        (lambda: _bn(train=False, vjp="fast"), ["vjp", "fast"]),
        (lambda: _bn(train="no"), ["train", "True or False"]),
        # 5. hyper-parameters that give NaN: eps, LRN's k and alpha; empty global pools.
        (lambda: _bn(eps=-2.0), ["eps", "> 0", "-2.0"]),
        (lambda: _bn(eps=0.0, train=False), ["eps", "> 0"]),
        (lambda: _bn(eps=float("nan")), ["eps", "finite"]),
        (
            lambda: F.batch_norm_apply(_XB, jnp.zeros(3), jnp.ones(3), None, None, eps=-1e-3),
            ["eps", "> 0"],
        ),
        (
            lambda: F.fold_batch_norm(
                jnp.ones((3, 4)), None, None, None, jnp.zeros(4), jnp.ones(4), eps=-1
            ),
            ["eps", "> 0"],
        ),
        (lambda: F.local_response_norm(_X, k=0.0), ["k", "> 0"]),
        (lambda: F.local_response_norm(_X, k=-1.0), ["k", "> 0"]),
        (lambda: F.local_response_norm(_X, alpha=-1.0), ["alpha", ">= 0"]),
        (lambda: F.local_response_norm(_X, size=True), ["size", "positive int"]),
        (lambda: F.global_avg_pool(jnp.ones((1, 0, 0, 3))), ["x", "empty spatial", "(1, 0, 0, 3)"]),
        (lambda: F.global_max_pool(jnp.ones((1, 0, 0, 3))), ["x", "empty spatial", "(1, 0, 0, 3)"]),
        (lambda: F.global_max_pool(jnp.ones((1, 4, 0, 3))), ["x", "empty spatial"]),
        # 6. dropout: rate and rng of the wrong kind.
        (
            lambda: F.dropout(_XB, "0.5", jax.random.key(0), deterministic=False),
            ["rate", "number", "'0.5'"],
        ),
        (lambda: F.dropout(_XB, None, jax.random.key(0), deterministic=False), ["rate", "None"]),
        (lambda: F.dropout(_XB, 0.5, 0, deterministic=False), ["rng", "jax.random.key"]),
        (
            lambda: F.dropout(
                _XB, 0.5, jax.random.split(jax.random.key(0), 3), deterministic=False
            ),
            ["rng", "single PRNG key", "(3,)"],
        ),
        # 7. conv_output_shape and output_size validate like conv2d.
        (lambda: F.conv_output_shape((1, 5, 5, 3), 7, 8), ["kernel_size", "larger", "5"]),
        (lambda: F.conv_output_shape((5, 5, 3), 3, 8), ["input_shape", "NHWC", "(5, 5, 3)"]),
        (lambda: F.conv_output_shape((1, 5, 5, 3), 3, 0), ["features", "positive int"]),
        (lambda: F.conv_output_shape((1, 5, 5, 3), 3, 8, stride=1.5), ["stride", "1.5"]),
        (lambda: F.output_size(5, 3, 0), ["stride", "positive int", "0"]),
        (lambda: F.output_size(5, 0), ["window", "positive int"]),
        (lambda: F.output_size(5, 3, 1, -1), ["pad", "non-negative"]),
        (lambda: F.output_size(5, 3, 1.5), ["stride", "1.5"]),
        # 8. pooling dtypes it cannot handle are named.
        (lambda: F.max_pool(jnp.ones((1, 4, 4, 1), jnp.complex64), 2), ["max_pool", "complex64"]),
        (lambda: F.avg_pool(jnp.ones((1, 4, 4, 1), bool), 2), ["avg_pool", "bool", "astype"]),
    ],
)
def test_audit_bad_arguments_raise_one_clear_value_error(call, words):
    with pytest.raises(ValueError) as info:
        call()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_numpy_integers_are_accepted_for_stride_padding_and_groups():
    x = jnp.asarray(np.random.default_rng(10).standard_normal((1, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(11).standard_normal((3, 3, 2, 4)), jnp.float32)
    want = F.conv2d(x, w, stride=2, padding=((1, 0), (1, 1)), dilation=1, groups=2)
    got = F.conv2d(
        x,
        w,
        stride=np.int64(2),
        padding=((np.int64(1), np.int32(0)), (1, 1)),
        dilation=np.int32(1),
        groups=np.int64(2),
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    got = F.conv2d(
        x, w, stride=np.array([2, 2]), padding=np.array([[1, 0], [1, 1]]), groups=np.int64(2)
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert F.resolve_padding(np.int64(2), (8, 8), (3, 3), (1, 1)) == ((2, 2), (2, 2))
    assert F.output_size(np.int64(32), np.int64(3), np.int64(2), np.int64(1)) == 16
    assert F.conv_output_shape(
        np.array([1, 8, 8, 4]), np.int64(3), np.int64(5), padding=np.int64(1)
    ) == (1, 8, 8, 5)


def test_non_array_inputs_are_converted():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    w = np.ones((3, 3, 1, 2), np.float32)
    np.testing.assert_array_equal(
        np.asarray(F.conv2d(x.tolist(), w.tolist(), [1.0, 2.0])),
        np.asarray(F.conv2d(jnp.asarray(x), jnp.asarray(w), jnp.asarray([1.0, 2.0]))),
    )
    np.testing.assert_array_equal(np.asarray(F.dense([[1.0, 2.0]], [[1.0], [1.0]], [0.5])), [[3.5]])


def test_output_size_is_zero_where_the_window_does_not_fit():
    # The models search for their minimum input size with it (GoogLeNet.min_input_size): kept.
    assert F.output_size(2, 3, 2) == 0
    assert F.output_size(0, 1) == 0


def test_max_pool_on_bools_is_a_logical_or():
    x = np.zeros((1, 4, 4, 2), bool)
    x[0, 0, 1, 0] = x[0, 3, 3, 1] = True
    got = F.max_pool(jnp.asarray(x), 2)
    assert got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got), x.reshape(1, 2, 2, 2, 2, 2).any(axis=(2, 4)))
    got = F.max_pool(jnp.asarray(x), 3, 1, 1)  # padding (False) never wins
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(F.max_pool(jnp.asarray(x, jnp.float32), 3, 1, 1)) > 0
    )


def test_traced_hyper_parameters_are_rejected_clearly_or_keep_working():
    key = jax.random.key(0)
    # dropout's rate decides what is traced: a traced rate is refused with the fix, not a
    # TracerBoolConversionError.
    with pytest.raises(ValueError, match="rate must be a concrete number"):
        jax.jit(lambda r: F.dropout(_XB, r, key, deterministic=False))(0.5)
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        jax.jit(lambda d: F.dropout(_XB, 0.5, key, deterministic=d))(True)
    # A traced eps cannot be checked but still works where it did (it is only arithmetic).
    rm, rv = jnp.zeros(3), jnp.ones(3)
    x = jnp.asarray(np.random.default_rng(12).standard_normal((4, 3)), jnp.float32)
    want = F.batch_norm(x, None, None, rm, rv, train=False, eps=1e-3)[0]
    got = jax.jit(lambda e: F.batch_norm(x, None, None, rm, rv, train=False, eps=e)[0])(1e-3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    got = jax.jit(
        lambda e: F.batch_norm(x, None, None, rm, rv, train=True, eps=e, vjp="autodiff")[0]
    )(1e-3)
    np.testing.assert_allclose(
        np.asarray(got),
        np.asarray(F.batch_norm(x, None, None, rm, rv, train=True)[0]),
        rtol=1e-3,
        atol=1e-3,
    )
    with pytest.raises(ValueError, match="eps must be a concrete number"):
        jax.jit(lambda e: F.batch_norm(x, None, None, rm, rv, train=True, eps=e, vjp="fused")[0])(
            1e-3
        )
    got = jax.jit(lambda k: F.local_response_norm(_X, k=k))(2.0)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(F.local_response_norm(_X, k=2.0)), rtol=1e-6
    )
    # Static geometry given as a traced value is named, not a raw tracer error.
    with pytest.raises(ValueError, match="stride must be an int or a pair of ints"):
        jax.jit(lambda s: F.conv2d(_X, _K, stride=s))(2)


def test_valid_hyper_parameter_edges_still_work():
    # NumPy scalars and legacy raw keys are accepted; a negative LRN beta is finite (base > 0).
    y = F.dropout(jnp.ones((100, 10)), np.float32(0.5), jax.random.PRNGKey(0), deterministic=False)
    assert set(np.unique(np.asarray(y))) <= {0.0, 2.0}
    assert F.dropout(_XB, 0.5, None, deterministic=True) is _XB
    lrn = F.local_response_norm(
        jnp.asarray(np.random.default_rng(13).standard_normal((1, 3, 3, 5)), jnp.float32),
        beta=-0.5,
        alpha=0.0,
        k=1.0,
    )
    assert np.isfinite(np.asarray(lrn)).all()
    out, (m, v) = F.batch_norm(
        _XB,
        None,
        None,
        jnp.zeros(3),
        jnp.ones(3),
        train=True,
        momentum=np.float64(0.5),
        eps=np.float32(1e-3),
    )
    assert out.shape == (2, 3) and m.shape == v.shape == (3,)


def test_integer_inputs_give_the_float_results():
    # Issue 23's cases: each layer promotes integer inputs to float32 instead of casting down.
    x = np.full((1, 3, 3, 1), 10, np.int8)
    kernel = np.full((3, 3, 1, 1), 0.4, np.float32)
    assert float(F.conv2d(x, kernel)[0, 0, 0, 0]) == pytest.approx(36.0)  # not int8(0.4) = 0
    sums = F.conv2d(np.full((1, 3, 3, 1), 200, np.uint8), np.ones((3, 3, 1, 1), np.uint8))
    assert sums.dtype == jnp.float32 and float(sums[0, 0, 0, 0]) == 1800.0  # not 1800 % 256
    pooled = F.avg_pool(np.full((1, 4, 4, 1), 255, np.uint8), 2, 2)
    assert pooled.dtype == jnp.float32 and float(pooled.min()) == 255.0
    assert float(F.global_avg_pool(np.full((1, 4, 4, 1), 255, np.uint8))[0, 0]) == 255.0
    quarter = np.full((4, 1), 0.25, np.float32)
    assert float(F.dense(np.full((1, 4), 3, np.int8), quarter)[0, 0]) == 3.0
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 5, 5, 3)).astype(np.uint8)
    floats = images.astype(np.float32)
    w = (0.1 * rng.standard_normal((3, 3, 3, 2))).astype(np.float32)
    np.testing.assert_array_equal(F.conv2d(images, w, padding=1), F.conv2d(floats, w, padding=1))
    np.testing.assert_array_equal(F.local_response_norm(images), F.local_response_norm(floats))
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    for train in (True, False):
        got, got_stats = F.batch_norm(images, ones, zeros, zeros, ones, train=train)
        want, want_stats = F.batch_norm(floats, ones, zeros, zeros, ones, train=train)
        assert got.dtype == jnp.float32 and np.abs(np.asarray(got)).max() > 0.5
        np.testing.assert_array_equal(got, want)
        jax.tree.map(np.testing.assert_array_equal, got_stats, want_stats)
    # The max pools stay exact in the input's own dtype (bools: a logical or).
    assert F.max_pool(images, 2, 2).dtype == jnp.uint8
    with pytest.raises(ValueError, match=r"at least one value per channel, got x of shape \(0, 5"):
        F.batch_norm(floats[:0], ones, zeros, zeros, ones, train=True)


def test_modules_compute_integer_inputs_in_float32():
    from cnnjax import nn as cnn

    images = np.random.default_rng(1).integers(0, 256, (2, 5, 5, 3)).astype(np.uint8)
    modules = (cnn.Conv(4, 3, padding=1), cnn.Dense(4), cnn.BatchNorm(use_running_average=False))
    for module in modules:
        variables = module.init(jax.random.key(0), images.astype(np.float32))
        got = module.apply(variables, images, mutable=["batch_stats"])[0]
        want = module.apply(variables, images.astype(np.float32), mutable=["batch_stats"])[0]
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)
