"""ResNet (He et al. 2016) and its plain twins: counts, shapes, shortcuts, striding, scan layout."""

from __future__ import annotations

import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.models import create, get_spec
from cnnjax.models.resnet import (
    CIFAR_PARAMS,
    TORCHVISION_PARAMS,
    BasicBlock,
    CifarResNet,
    ResNet,
    cifar_resnet,
    scan_variables,
    unscan_variables,
    zero_pad_shortcut,
)
from cnnjax.nn import BatchNorm, Conv

from model_testing import KEY, abstract, n_params, normal, numpy_variables

# ---------------------------------------------------------------------- parameter counts and shapes


@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_imagenet_counts_match_torchvision(depth):
    # Exact torchvision counts: bias-free convs + BN, option B (1x1 conv + BN)
    # projections, FC with bias.
    spec = get_spec(f"resnet{depth}")
    scan = depth > 50  # traced in the scanned layout (same parameters), much faster
    logits, v = abstract(create(f"resnet{depth}", scan_blocks=scan), spec.input_shape)
    assert n_params(v["params"]) == TORCHVISION_PARAMS[depth] == spec.reference_params
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    # The plain twin: the same layers without the projections (He et al. 2016, section 4.1).
    logits_p, vp = abstract(create(f"plain{depth}", scan_blocks=scan), spec.input_shape)
    expansion = 1 if depth < 50 else 4
    cin, proj = 64, 0
    for w in (64, 128, 256, 512):
        if cin != w * expansion or w != 64:
            proj += cin * w * expansion + 2 * w * expansion
        cin = w * expansion
    assert n_params(vp["params"]) == TORCHVISION_PARAMS[depth] - proj
    assert logits_p.shape == (2, 1000)


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS))
def test_cifar_counts_table6(depth):
    # REFERENCE.md Table 6. Deep nets are traced in the scanned layout (the same
    # parameters, stacked: test_scanned_and_unscanned_counts_agree checks ResNet-110
    # unscanned), which traces much faster.
    count_a, count_b = CIFAR_PARAMS[depth]
    scan = depth > 50
    residual = abstract(create(f"resnet{depth}", scan_blocks=scan), (32, 32, 3))
    plain = abstract(create(f"plain{depth}", scan_blocks=scan), (32, 32, 3))
    option_b = abstract(cifar_resnet(depth, shortcut="B", scan_blocks=scan), (32, 32, 3))
    assert n_params(residual[1]["params"]) == count_a == get_spec(f"resnet{depth}").reference_params
    assert n_params(option_b[1]["params"]) == count_b
    # Option A is parameter-free: the plain twin has the very same parameter tree.
    assert jax.tree.structure(plain[1]) == jax.tree.structure(residual[1])
    assert jax.tree.map(lambda a: a.shape, plain[1]) == jax.tree.map(lambda a: a.shape, residual[1])
    assert residual[0].shape == plain[0].shape == option_b[0].shape == (2, 10)


def test_scanned_and_unscanned_counts_agree_and_option_c_projections():
    unscanned = n_params(abstract(CifarResNet(depth=110), (32, 32, 3))[1]["params"])
    scanned = n_params(abstract(CifarResNet(depth=110, scan_blocks=True), (32, 32, 3))[1]["params"])
    assert unscanned == scanned == CIFAR_PARAMS[110][0]
    # Option C: a 1x1 conv + BN on every one of the 3n blocks (n = 3 for depth 20).
    c = n_params(abstract(CifarResNet(depth=20, shortcut="C"), (32, 32, 3))[1]["params"])
    extra, cin = 0, 16
    for w in (16, 32, 64):
        for _ in range(3):
            extra, cin = extra + cin * w + 2 * w, w
    assert c == CIFAR_PARAMS[20][0] + extra == 283_962


def test_small_depths_and_width_are_fields():
    # Depths 8 and 14 (one and two blocks per stage) drive the CI degradation experiment.
    for depth, n in ((8, 1), (14, 2)):
        _, v = abstract(CifarResNet(depth=depth), (32, 32, 3))
        assert {k for k in v["params"] if k.startswith("stage")} == {
            f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(1, n + 1)
        }
    _, v = abstract(CifarResNet(depth=8, width=2), (16, 16, 3))
    assert v["params"]["stage3_block1"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert v["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 16)


@pytest.mark.parametrize("bad", [21, 7, 0, 2, 30.0])
def test_cifar_depth_must_be_6n_plus_2(bad):
    with pytest.raises(ValueError, match="depth"):
        abstract(CifarResNet(depth=bad), (32, 32, 3))
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(bad)


def test_input_and_config_validation():
    with pytest.raises(ValueError, match="rank 4"):
        jax.eval_shape(lambda: CifarResNet(depth=8).init(KEY, jnp.zeros((32, 32, 3)), train=False))
    with pytest.raises(ValueError, match="at least 32x32 pixels .*total stride"):
        abstract(create("resnet18"), (16, 16, 3))
    with pytest.raises(ValueError, match="shortcut"):
        abstract(CifarResNet(depth=8, shortcut="D"), (32, 32, 3))
    with pytest.raises(ValueError, match="version"):
        abstract(create("resnet50", version="v2"), (32, 32, 3))
    with pytest.raises(ValueError, match="plain"):
        abstract(CifarResNet(depth=8, plain=True, drop_path_rate=0.1), (32, 32, 3))
    with pytest.raises(ValueError, match="stage_sizes"):
        abstract(CifarResNet(depth=8, stage_sizes=(1, 1, 1)), (32, 32, 3))
    with pytest.raises(ValueError, match="options"):
        create("resnet20", no_such_field=1)


def test_bfloat16_compute_keeps_float32_params_stats_and_logits():
    model = CifarResNet(depth=8, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

    def run(x):
        v = model.init(KEY, x, train=False)
        inter = model.apply(
            v,
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda m, _: isinstance(m, Conv),
        )
        return v, inter

    v, (logits, state) = jax.eval_shape(run, x)
    assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
    assert {a.dtype for a in jax.tree.leaves(state["batch_stats"])} == {jnp.dtype(jnp.float32)}
    assert logits.dtype == jnp.float32
    assert state["intermediates"]["stage2_block1"]["conv1"]["__call__"][0].dtype == jnp.bfloat16


def test_registry_overrides_num_classes():
    _, v = abstract(create("resnet50", num_classes=10), (32, 32, 3))
    assert n_params(v["params"]) == TORCHVISION_PARAMS[50] - 2049 * 990
    spec = get_spec("plain56")
    assert spec.input_shape == (32, 32, 3) and spec.num_classes == 10 and spec.dataset == "cifar10"


# ------------------------------------------------------------------------ shortcuts, striding, init


def test_zero_pad_shortcut_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
    expected = np.concatenate([x[:, ::2, ::2, :], np.zeros((2, 3, 3, 5), np.float32)], axis=-1)
    np.testing.assert_array_equal(np.asarray(zero_pad_shortcut(jnp.asarray(x), 8, 2)), expected)
    np.testing.assert_array_equal(np.asarray(zero_pad_shortcut(jnp.asarray(x), 3, 1)), x)
    with pytest.raises(ValueError, match="reduce"):
        zero_pad_shortcut(jnp.asarray(x), 2, 1)


def _block(**kw):
    return BasicBlock(
        conv=partial(Conv, use_bias=False), norm=partial(BatchNorm, use_running_average=True), **kw
    )


def test_option_a_block_wiring_numpy():
    # With conv2 = 0 the branch is BN(0) = 0, so the block is relu(option A
    # shortcut) (odd input size 5).
    x = np.random.default_rng(1).normal(size=(2, 5, 5, 4)).astype(np.float32)
    block = _block(features=8, strides=2, shortcut="A")
    v = block.init(KEY, jnp.asarray(x), train=False)
    v = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if "conv2" in str(p) else a, v
    )
    expected = np.maximum(np.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (0, 4))), 0)
    np.testing.assert_allclose(
        np.asarray(block.apply(v, jnp.asarray(x), train=False)), expected, atol=1e-6
    )


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_residual_minus_plain_is_the_shortcut(shortcut):
    # Pre-activation blocks have no ReLU after the addition: residual - plain = shortcut exactly.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    res, plain = (
        _block(features=8, strides=2, shortcut=shortcut, preact=True, plain=p)
        for p in (False, True)
    )
    v = res.init(KEY, jnp.asarray(x), train=False)
    diff = np.asarray(res.apply(v, jnp.asarray(x), train=False)) - np.asarray(
        plain.apply(
            {
                "params": {k: a for k, a in v["params"].items() if k != "proj_conv"},
                "batch_stats": v["batch_stats"],
            },
            jnp.asarray(x),
            train=False,
        )
    )
    # A strided unit starts a stage: both shortcuts take the activated input relu(bn1(x)).
    pre = np.maximum(x / np.sqrt(1 + 1e-5), 0)  # bn1 at init: gamma 1, beta 0, mean 0, var 1
    if shortcut == "A":
        expected = np.pad(pre[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (0, 4)))
    else:
        expected = pre[:, ::2, ::2, :] @ np.asarray(v["params"]["proj_conv"]["kernel"])[0, 0]
    np.testing.assert_allclose(diff, expected, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_shortcut_scale_zero_is_the_plain_twin_and_one_the_resnet(scan):
    # One network computes both twins (TrainConfig.twins): the scale is a traced argument.
    x = normal(3, (2, 8, 8, 3))
    res, plain = (CifarResNet(depth=14, plain=p, scan_blocks=scan) for p in (False, True))
    v = numpy_variables(res, x.shape, random_bn=True)

    @partial(jax.jit, static_argnums=0)
    def both(m, scale):
        kw = {} if scale is None else {"shortcut_scale": scale}
        logits, upd = m.apply(v, x, train=True, mutable=["batch_stats"], **kw)
        return m.apply(v, x, train=False, **kw), logits, upd

    for scale, model in ((0.0, plain), (1.0, res)):
        got, want = both(res, jnp.float32(scale)), both(model, None)
        jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6), got, want)
    assert float(np.abs(both(res, jnp.float32(0.0))[0] - both(res, None)[0]).max()) > 1e-3
    with pytest.raises(ValueError, match="a plain net \\(plain=True\\) has none"):
        plain.apply(v, x, train=False, shortcut_scale=0.0)


def test_v1_and_v1_5_same_params_different_strided_conv():
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    shapes = {}
    for version in ("v1", "v1.5"):
        model = create("resnet50", version=version)
        _, state = jax.eval_shape(
            lambda x: model.init_with_output(
                KEY, x, train=False, capture_intermediates=lambda m, _: isinstance(m, Conv)
            ),
            x,
        )
        inter = state["intermediates"]["stage2_block1"]
        shapes[version] = (
            inter["conv1"]["__call__"][0].shape,
            inter["conv2"]["__call__"][0].shape,
            jax.tree.map(lambda a: a.shape, state["params"]),
        )
    # stage 2 input is 16x16 (64 / 4): V1 halves it in conv1 (1x1), V1.5 in conv2 (3x3).
    assert shapes["v1"][0][1:3] == (8, 8) and shapes["v1"][1][1:3] == (8, 8)
    assert shapes["v1.5"][0][1:3] == (16, 16) and shapes["v1.5"][1][1:3] == (8, 8)
    assert shapes["v1"][2] == shapes["v1.5"][2]


def test_zero_init_residual_and_he_fan_out_init():
    x = jnp.zeros((1, 8, 8, 3))
    v = jax.jit(partial(CifarResNet(depth=8, zero_init_residual=True).init, train=False))(KEY, x)[
        "params"
    ]
    for s in (1, 2, 3):
        np.testing.assert_array_equal(v[f"stage{s}_block1"]["bn2"]["scale"], 0.0)
        np.testing.assert_array_equal(v[f"stage{s}_block1"]["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(v["stem_bn"]["scale"], 1.0)
    # He et al. 2015 fan-out: std sqrt(2 / (9 * 64)) for the 3x3 64->64 conv.
    assert np.std(np.asarray(v["stage3_block1"]["conv2"]["kernel"])) == pytest.approx(
        np.sqrt(2 / 576), rel=0.05
    )
    with pytest.raises(ValueError, match="zero_init_residual"):
        abstract(CifarResNet(depth=8, zero_init_residual=True, preact=True), (32, 32, 3))


# --------------------------------------------------------------------------- scanned layout


def test_scan_layout_conversion_gives_identical_logits():
    # Stages of 2 and 3 blocks: 1 and 2 scanned blocks (CIFAR stem, option A; a small compile).
    x = normal(1, (2, 8, 8, 3))
    kw = dict(
        stem="cifar",
        stage_sizes=(2, 3),
        stage_widths=(8, 16),
        stem_width=8,
        shortcut="A",
        num_classes=4,
    )
    model, scanned = ResNet(**kw), ResNet(scan_blocks=True, **kw)
    v = numpy_variables(model, x.shape, random_bn=True)
    vs = scan_variables(v)
    assert vs["params"]["stage1_blocks"]["conv1"]["kernel"].shape == (1, 3, 3, 8, 8)
    assert vs["params"]["stage2_blocks"]["conv1"]["kernel"].shape == (2, 3, 3, 16, 16)
    assert "stage2_block1" in vs["params"] and "stage2_block2" not in vs["params"]
    jax.tree.map(np.testing.assert_array_equal, unscan_variables(vs), v)

    @partial(jax.jit, static_argnums=0)
    def run(m, variables):
        logits, upd = m.apply(variables, x, train=True, mutable=["batch_stats"])
        return m.apply(variables, x, train=False), logits, upd

    eval_u, train_u, upd_u = run(model, v)
    eval_s, train_s, upd_s = run(scanned, vs)
    np.testing.assert_allclose(eval_s, eval_u, atol=1e-5)
    np.testing.assert_allclose(train_s, train_u, atol=1e-5)
    jax.tree.map(partial(np.testing.assert_allclose, atol=1e-5), unscan_variables(upd_s), upd_u)


@pytest.mark.parametrize(
    "kw",
    [dict(depth=20, shortcut="C"), dict(depth=29, block="bottleneck", preact=True, shortcut="B")],
    ids=["C", "preact_bottleneck"],
)
def test_scan_layout_conversion_tree_matches_scanned_init(kw):
    # The converted tree is exactly the tree that the scanned model initialises.
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    v = jax.eval_shape(lambda x: CifarResNet(**kw).init(KEY, x, train=False), x)
    vs = jax.eval_shape(lambda x: CifarResNet(scan_blocks=True, **kw).init(KEY, x, train=False), x)
    assert jax.tree.map(lambda a: a.shape, jax.eval_shape(scan_variables, v)) == jax.tree.map(
        lambda a: a.shape, vs
    )
    assert jax.tree.map(lambda a: a.shape, jax.eval_shape(unscan_variables, vs)) == jax.tree.map(
        lambda a: a.shape, v
    )


# --------------------------------------------------------------------------- forward + backward


def _train_step_checks(model, input_shape, real_init=False):
    x = normal(1, (2, *input_shape))
    y = jnp.array([0, 1])
    # model.init compiles every initialiser (slow on CPU): done once, the other
    # nets get NumPy values.
    v = (
        jax.jit(partial(model.init, train=False))(KEY, x)
        if real_init
        else numpy_variables(model, x.shape)
    )

    def loss_fn(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": v["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2, impl="rbg")},
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (loss, upd), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(v["params"])
    assert np.isfinite(float(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, (
            f"zero or non-finite gradient at {path}"
        )
    changed = jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
        upd["batch_stats"],
        v["batch_stats"],
    )
    assert all(jax.tree.leaves(changed))
    return loss


@pytest.mark.parametrize(
    "model",
    [CifarResNet(depth=8), CifarResNet(depth=8, plain=True, shortcut="B")],
    ids=["resnet8_A", "plain8_B"],
)
def test_cifar_depth8_forward_backward(model):
    _train_step_checks(model, (32, 32, 3), real_init=not model.plain)


def test_resnet18_tiny_resolution_forward_backward():
    _train_step_checks(create("resnet18", num_classes=10), (32, 32, 3))


@pytest.mark.slow
def test_resnet50_v1_and_plain34_forward_backward():
    _train_step_checks(create("resnet50", num_classes=10, version="v1"), (32, 32, 3))
    _train_step_checks(create("plain34", num_classes=10), (32, 32, 3))


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("resnet110", (32, 32, 3)), ("resnet152", (64, 64, 3))])
def test_deep_scanned_train_step_compiles(name, shape):
    # Issue 9: scanned deep nets compile in seconds (unscanned ResNet-110 takes over a minute here).
    t0 = time.perf_counter()
    _train_step_checks(create(name, num_classes=10, scan_blocks=True), shape)
    assert time.perf_counter() - t0 < 120
