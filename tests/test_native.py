"""cnnjax.native: oneDNN convolutions against the NumPy loops of test_functional and XLA's path."""

import importlib.metadata
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_functional import _random_conv_case, np_conv2d, np_conv2d_grads

from cnnjax import functional as F
from cnnjax import native, settings

ONEDNN = native.available()
needs_onednn = pytest.mark.skipif(
    not ONEDNN, reason=f"oneDNN kernels unavailable: {native.unavailable_reason()}"
)


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_onednn_is_available_where_installed():
    # cnnjax depends on oneDNN's pip packages on Linux x86-64; with them and a compiler the kernels
    # must build, so the tests below cannot quietly skip where CI installs cnnjax.
    if not (
        _installed("onednn-cpu-gomp") and _installed("onednn-devel-cpu-gomp") and native._compiler()
    ):
        pytest.skip("oneDNN's pip packages or a C++ compiler are missing here")
    assert ONEDNN, native.unavailable_reason()
    assert native.dnnl_version().startswith("3.")


def _case(seed):
    rng = np.random.default_rng(500 + seed)
    c = _random_conv_case(rng)
    cin, cout = c["cin"] // c["groups"], c["cout"] // c["groups"]  # groups 1
    # Padding wider than the kernel, and strides that leave trailing rows unread, occur among these.
    padding = [c["padding"], ((2, 0), (3, 1)), 4][seed % 3]
    x = rng.standard_normal((3, *c["hw"], cin)).astype(np.float32)
    w = rng.standard_normal((*c["k"], cin, cout)).astype(np.float32)
    return c, padding, x, w, rng


@needs_onednn
@pytest.mark.parametrize("seed", range(12))
def test_onednn_conv_and_gradients_match_loops(seed):
    c, padding, x, w, rng = _case(seed)
    kw = dict(stride=c["stride"], padding=padding, dilation=c["dilation"])
    pads = F.resolve_padding(padding, c["hw"], c["k"], c["stride"], c["dilation"])
    y = jax.jit(lambda x, w: F.conv2d(x, w, backend="onednn", **kw))(x, w)
    np.testing.assert_allclose(
        np.asarray(y),
        np_conv2d(x, w, None, c["stride"], pads, c["dilation"], 1),
        atol=1e-4,
        rtol=1e-4,
    )
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = jax.jit(
        jax.grad(lambda x, w: jnp.sum(F.conv2d(x, w, backend="onednn", **kw) * g), (0, 1))
    )(x, w)
    want_dx, want_dw = np_conv2d_grads(x, w, g, c["stride"], pads, c["dilation"])
    np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), want_dw, atol=1e-4, rtol=1e-4)


def _second_order(backend, x, w, kw):
    def loss(x, w):
        return jnp.sum(jnp.tanh(F.conv2d(x, w, backend=backend, precision="highest", **kw)))

    def penalty(x, w):  # a gradient penalty: differentiates the convolution's own gradients
        gx, gw = jax.grad(loss, (0, 1))(x, w)
        return jnp.sum(gx**2) + jnp.sum(jnp.sin(gw))

    return jax.jit(jax.grad(penalty, (0, 1)))(x, w)


@needs_onednn
@pytest.mark.parametrize("seed", range(3))
def test_onednn_gradients_of_gradients_match_xla(seed):
    c, padding, x, w, _ = _case(seed)
    kw = dict(stride=c["stride"], padding=padding, dilation=c["dilation"])
    for got, want in zip(_second_order("onednn", x, w, kw), _second_order("xla", x, w, kw)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


@needs_onednn
def test_onednn_under_vmap_matches_xla():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 7, 7, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4, 5)).astype(np.float32)

    def per_example(backend):  # one kernel per mapped element, with its gradient
        def f(x, w):
            return jnp.sum(F.conv2d(x, w, stride=2, padding=1, backend=backend) ** 2)

        return jax.vmap(jax.value_and_grad(f, (0, 1)))(x, w)

    for got, want in zip(
        jax.tree.leaves(per_example("onednn")), jax.tree.leaves(per_example("xla"))
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def _conv_jaxpr(x, w, **kw) -> str:
    return str(
        jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(F.conv2d(x, w, padding=1, **kw)), (0, 1)))(
            x, w
        )
    )


@needs_onednn
def test_auto_backend_runs_float32_convolutions_on_onednn_and_falls_back_elsewhere():
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))
    assert settings.current().conv_backend == "auto" and jax.default_backend() == "cpu"
    auto = _conv_jaxpr(x, w)
    assert "cnnjax_dnnl_conv_fwd" in auto and "conv_general_dilated" not in auto
    assert (
        auto.count("cnnjax_dnnl_conv_bwd_data") == auto.count("cnnjax_dnnl_conv_bwd_weights") == 1
    )
    with F.conv2d_backend("xla"):
        assert "cnnjax_dnnl" not in _conv_jaxpr(x, w)
    assert "cnnjax_dnnl" not in _conv_jaxpr(x, w, backend="xla")
    # What the kernels do not cover takes XLA's path under 'auto' and 'onednn' alike.
    for backend in ("auto", "onednn"):
        grouped = _conv_jaxpr(x, jnp.ones((3, 3, 1, 4)), groups=2, backend=backend)
        bf16 = _conv_jaxpr(x.astype(jnp.bfloat16), w, backend=backend)
        for jaxpr in (grouped, bf16):
            assert "cnnjax_dnnl" not in jaxpr and "conv_general_dilated" in jaxpr


def test_backend_names_are_validated():
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        F.conv2d(x, w, backend="mkldnn")
    with pytest.raises(ValueError, match="mode must be one of"):
        F.conv2d_backend("cudnn")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """native's load state forgotten for the test and again after it (its environment restored)."""
    monkeypatch.setenv("CNNJAX_CACHE_DIR", str(tmp_path / "cache"))
    native.forget()
    yield monkeypatch
    native.forget()


def test_missing_onednn_is_one_clear_error(fresh_native, tmp_path):
    fresh_native.setenv("CNNJAX_DNNL_ROOT", str(tmp_path / "nowhere"))
    assert not native.available()
    reason = native.unavailable_reason()
    assert "oneDNN 3.x was not found" in reason and "CNNJAX_DNNL_ROOT" in reason
    assert all(package in reason for package in native.DNNL_PACKAGES)
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))
    with pytest.raises(native.NativeUnavailable, match="oneDNN 3.x was not found"):
        F.conv2d(x, w, backend="onednn")
    # 'auto' falls back to XLA without a word.
    assert "cnnjax_dnnl" not in _conv_jaxpr(x, w)


@needs_onednn
def test_failed_build_is_reported_with_the_compiler_output(fresh_native, tmp_path):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx: no such luck' >&2\nexit 3\n")
    fake.chmod(0o755)
    fresh_native.setenv("CXX", str(fake))
    with pytest.warns(RuntimeWarning, match="(?s)XLA's run instead.*fake-cxx: no such luck"):
        assert not native.available()
    assert (
        "failed" in native.unavailable_reason()
        and "fake-cxx: no such luck" in native.unavailable_reason()
    )
    assert not [
        p for p in (tmp_path / "cache").rglob("*") if p.is_file()
    ]  # nothing half-written left


@needs_onednn
def test_build_is_cached_and_written_atomically(fresh_native, tmp_path):
    root, cxx = native.dnnl_root(), native._compiler()
    path = native.build(root, cxx)
    assert path.parent == tmp_path / "cache" / "native" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    mtime = os.stat(path).st_mtime_ns
    assert native.build(root, cxx) == path and os.stat(path).st_mtime_ns == mtime  # not rebuilt
    assert native.available() and native.dnnl_version().startswith("3.")


@needs_onednn
@pytest.mark.parametrize(
    "shape,stride,padding",
    [
        ((2, 8, 8, 3), (1, 2), 0),
        ((2, 8, 8, 3), (2, 2), 0),
        ((2, 6, 7, 3), (2, 1), 0),
        ((1, 7, 9, 3), (3, 2), 1),
    ],
)
def test_onednn_strided_1x1_matches_loops(shape, stride, padding):
    # oneDNN 3.2 computes these filter gradients wrongly when asked for a strided 1x1 convolution;
    # `onednn.convolve` hands it the strided pixels instead.
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((1, 1, shape[-1], 4)).astype(np.float32)

    def f(x, w):
        return F.conv2d(x, w, stride=stride, padding=padding, backend="onednn")

    g = rng.standard_normal(f(x, w).shape).astype(np.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w) * g), (0, 1))(x, w)
    pads = ((padding, padding),) * 2
    np.testing.assert_allclose(
        np.asarray(f(x, w)), np_conv2d(x, w, None, stride, pads, (1, 1), 1), atol=1e-5
    )
    want_dx, want_dw = np_conv2d_grads(x, w, g, stride, pads, (1, 1))
    np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), want_dw, atol=1e-4, rtol=1e-4)


@needs_onednn
@pytest.mark.parametrize("batch", [5, 37])
def test_batch_split_over_xla_threads_matches_one_openmp_call(monkeypatch, batch):
    # 'xla' splits the batch over XLA's intra-op threads (the kernel gradient summed over the
    # parts; 5 images make two unequal parts on 2 threads, 37 four parts of 9-10 images for the
    # forward pass and input gradient, up to 8 per thread of at least 8 images); 'omp' is one
    # oneDNN call.
    if len(os.sched_getaffinity(0)) < 2:  # XLA's pool has one thread: nothing would be split
        pytest.skip("one core: the split path does not run")

    rng = np.random.default_rng(3)
    x = rng.standard_normal((batch, 9, 9, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 6, 8)).astype(np.float32)

    f = jax.jit(
        jax.value_and_grad(
            lambda x, w: jnp.sum(jnp.sin(F.conv2d(x, w, stride=2, padding=1, backend="onednn"))),
            (0, 1),
        )
    )

    def run(mode):
        with settings.using(onednn_threads=mode):
            return f(x, w)  # traced anew: the settings are part of jit's cache key

    for got, want in zip(jax.tree.leaves(run("xla")), jax.tree.leaves(run("omp"))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="onednn_threads: mode must be one of"):
        settings.using(onednn_threads="tbb")


def test_direct_filter_gradient_is_built_where_the_cpu_has_avx2_and_fma():
    if not ONEDNN:
        pytest.skip(f"oneDNN kernels unavailable: {native.unavailable_reason()}")
    assert native.direct_conv_weights() is ("-mfma" in native._isa_flags())


# (batch, image, in channels, out channels, kernel, stride, padding, dilation): all but the last
# two take the direct filter gradient (output channels a multiple of 8, at least 8 input
# channels, column stride 1).
DIRECT_CASES = [
    (
        5,
        (9, 9),
        9,
        8,
        (3, 3),
        (1, 1),
        1,
        (1, 1),
    ),  # one 8-wide tile, blocks of 5 and 4; 5 images in two unequal parts
    (
        3,
        (8, 8),
        13,
        40,
        (3, 3),
        (1, 1),
        1,
        (1, 1),
    ),  # input channels in blocks of 5, 4, 4; outputs 16 + 16 + 8
    (
        2,
        (11, 10),
        14,
        24,
        (3, 3),
        (2, 1),
        ((2, 0), (3, 1)),
        (1, 1),
    ),  # asymmetric padding, rows left unread
    (2, (12, 10), 8, 16, (3, 3), (1, 1), 2, (2, 2)),  # dilation
    (2, (3, 3), 8, 8, (3, 3), (1, 1), 2, (3, 3)),  # taps that read only padding
    (
        2,
        (3, 3),
        10,
        8,
        (3, 3),
        (2, 1),
        1,
        (2, 2),
    ),  # a tap whose one row is the one past the image (row stride 2)
    (1, (7, 7), 11, 16, (5, 5), (2, 1), 6, (1, 1)),  # padding wider than the kernel
    (
        3,
        (10, 10),
        8,
        8,
        (7, 3),
        (3, 1),
        ((3, 3), (1, 1)),
        (1, 1),
    ),  # unequal kernel sides and strides
    (2, (9, 9), 12, 32, (1, 1), (1, 1), 0, (1, 1)),  # 1x1
    (
        4,
        (6, 6),
        64,
        64,
        (3, 3),
        (1, 1),
        1,
        (1, 1),
    ),  # a ResNet-56 stage-3 layer's channels (11 blocks)
    (
        3,
        (8, 8),
        3,
        16,
        (3, 3),
        (1, 1),
        1,
        (1, 1),
    ),  # 3 input channels (a first layer): oneDNN's, with direct=1
    (
        3,
        (8, 8),
        16,
        32,
        (3, 3),
        (2, 2),
        1,
        (1, 1),
    ),  # column stride 2 (a ResNet's downsampling): oneDNN's
]


@needs_onednn
@pytest.mark.parametrize("case", DIRECT_CASES, ids=[str(i) for i in range(len(DIRECT_CASES))])
def test_direct_filter_gradient_matches_loops_and_onednn(monkeypatch, case):
    if not native.direct_conv_weights():
        pytest.skip("this CPU lacks AVX2/FMA: oneDNN computes every filter gradient")
    n, hw, cin, cout, k, stride, padding, dilation = case
    rng = np.random.default_rng(DIRECT_CASES.index(case))
    x = rng.standard_normal((n, *hw, cin)).astype(np.float32)
    w = rng.standard_normal((*k, cin, cout)).astype(np.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation, backend="onednn")
    g = rng.standard_normal(jax.eval_shape(lambda x, w: F.conv2d(x, w, **kw), x, w).shape).astype(
        np.float32
    )

    f = jax.jit(jax.grad(lambda x, w: jnp.sum(F.conv2d(x, w, **kw) * g), (0, 1)))

    def grads(mode):
        with settings.using(conv_weights=mode):  # part of jit's cache key: each mode traces anew
            assert f"direct = {int(mode != 'onednn')} : i64" in f.lower(x, w).as_text()
            return jax.block_until_ready(
                f(x, w)
            )  # ran (dispatch is asynchronous) before the count is read

    calls = native.direct_conv_weights_calls()
    dx, dw = grads("direct")
    direct = cin >= 8 and stride[1] == 1
    assert native.direct_conv_weights_calls() - calls == int(direct)  # the kernel ran, or oneDNN's
    pads = F.resolve_padding(padding, hw, k, stride, dilation)
    want_dx, want_dw = np_conv2d_grads(x, w, g, stride, pads, dilation)
    np.testing.assert_allclose(np.asarray(dw), want_dw, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-4, rtol=1e-4)
    calls = native.direct_conv_weights_calls()
    onednn_dx, onednn_dw = grads("onednn")
    assert native.direct_conv_weights_calls() == calls
    np.testing.assert_array_equal(
        np.asarray(dx), np.asarray(onednn_dx)
    )  # the input gradient is oneDNN's in both
    # Sums in another order: float32 rounding of the largest entries, not of each entry.
    np.testing.assert_allclose(
        np.asarray(dw), np.asarray(onednn_dw), atol=2e-6 * np.abs(want_dw).max(), rtol=1e-5
    )
    for got, want in zip(grads("auto"), (dx, dw)):  # 'auto', the default, is 'direct'
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="conv_weights: mode must be one of"):
        settings.using(conv_weights="brgemm")


def test_install_hint_names_the_packages_pyproject_pins():
    import pathlib
    import tomllib

    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    pinned = [
        dep.split(";")[0].strip()
        for dep in pyproject["project"]["dependencies"]
        if dep.startswith("onednn")
    ]
    assert pinned == list(native.DNNL_PACKAGES)


_LAZY_BUILD = r"""
import sys
from pathlib import Path
import jax, jax.numpy as jnp
from cnnjax import analysis, functional as F, native
cache = Path(sys.argv[1])
built = lambda: [p.name for p in cache.rglob("*.so")]
analysis.summary("lenet5")  # traces the network (jax.eval_shape): no kernel is built
jax.make_jaxpr(lambda x, w: F.conv2d(x, w))(jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4)))
assert built() == [], built()
print("traced:", "cnnjax_dnnl_conv_fwd" in str(jax.make_jaxpr(F.conv2d)(jnp.ones((1, 6, 6, 2)),
                                                                     jnp.ones((3, 3, 2, 4)))))
y = jax.jit(F.conv2d)(jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4)))  # lowered and run: built
assert float(y[0, 0, 0, 0]) == 18.0 and len(built()) == 1, built()
print("OK")
"""


@needs_onednn
def test_tracing_builds_nothing_and_the_first_lowering_builds(tmp_path):
    # `cnnjax summary` only traces; the kernels are compiled when a call to them is first lowered.
    import subprocess
    import sys

    cache = tmp_path / "cache"
    env = dict(os.environ, CNNJAX_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _LAZY_BUILD, str(cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert "traced: True" in proc.stdout  # 'auto' chose oneDNN from cheap facts, unbuilt


@needs_onednn
def test_settings_changed_after_compilation_recompile():
    # The settings are part of jax.jit's cache key: a function compiled under one backend and
    # called under another is traced and compiled anew, never run with the old choice.
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))
    traced = []

    @jax.jit
    def f(x, w):
        traced.append(settings.current().conv_backend)
        return F.conv2d(x, w, padding=1)

    auto = f.lower(x, w).as_text()
    f(x, w)
    with settings.using(conv_backend="xla"):
        assert "cnnjax_dnnl" not in f.lower(x, w).as_text()
        np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(F.conv2d(x, w, padding=1)))
    assert "cnnjax_dnnl_conv_fwd" in auto and "xla" in traced
    n = len(traced)
    f(x, w)  # back under 'auto': the first compilation again, no new trace
    assert len(traced) == n
