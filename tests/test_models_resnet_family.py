"""The later ResNet family: pre-activation, stochastic depth, WRN, ResNeXt, ResNet in ResNet."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax import functional as F
from cnnjax.models import create, get_spec, list_models
from cnnjax.models.resnet import (
    STAGE_SIZES,
    BasicBlock,
    BottleneckBlock,
    CifarResNet,
    ResNet,
    scan_variables,
)
from cnnjax.models.resnet_variants import WideResNet
from cnnjax.models.rir import GeneralizedResidualLayer, RiR, RiRBlock
from cnnjax.nn import BatchNorm, Conv

from model_testing import abstract, n_params, normal, numpy_variables

EVAL_NORM = partial(BatchNorm, use_running_average=True)
CONV = partial(Conv, use_bias=False)


def _is_resnet_family(name):
    return get_spec(name).family == "resnet"


# ---------------------------------------------------------------------- counts from the definitions


def preact_count(sizes, block, widths, stem, num_classes, stem_width, stride_first=True):
    """Pre-activation ResNet parameters counted from He et al. 2016b's layout (bare conv stem,
    BN before every conv, 1x1-conv projections where the shape changes, final BN, FC)."""
    total, cin = stem * stem * 3 * stem_width, stem_width
    for s, (n, p) in enumerate(zip(sizes, widths)):
        for b in range(n):
            out = p if block == "basic" else 4 * p
            if block == "basic":
                total += 2 * cin + 9 * cin * p + 2 * p + 9 * p * p
            else:
                total += 2 * cin + cin * p + 2 * p + 9 * p * p + 2 * p + p * out
            if cin != out or (s > 0 and b == 0):
                total += cin * out
            cin = out
    return total + 2 * cin + cin * num_classes + num_classes


def test_preact_imagenet_counts_from_definition():
    for depth in (18, 34, 50, 101, 152, 200):
        block = "basic" if depth < 50 else "bottleneck"
        expected = preact_count(STAGE_SIZES[depth], block, (64, 128, 256, 512), 7, 1000, 64)
        _, v = abstract(
            create(f"preact_resnet{depth}", scan_blocks=depth > 50), (64, 64, 3), batch=1
        )
        assert n_params(v["params"]) == expected, depth
    assert (
        preact_count(STAGE_SIZES[50], "bottleneck", (64, 128, 256, 512), 7, 1000, 64) == 25_549_352
    )


def test_preact_cifar_counts():
    # He et al. 2016b Table 2: ResNet-164 1.7M, ResNet-1001 10.2M (the authors'
    # layout gives 10.33M).
    for name, depth, n in (("preact_resnet164", 164, 18), ("preact_resnet1001", 1001, 111)):
        _, v = abstract(create(name, scan_blocks=True), (32, 32, 3))
        assert n_params(v["params"]) == preact_count(
            (n,) * 3, "bottleneck", (16, 32, 64), 3, 10, 16
        )
    assert preact_count((18,) * 3, "bottleneck", (16, 32, 64), 3, 10, 16) == 1_703_258
    assert preact_count((111,) * 3, "bottleneck", (16, 32, 64), 3, 10, 16) == 10_327_706
    # ResNet-110 with option A: BN moves (bn1 sees the block input; no stem BN, a final BN), the
    # count happens to equal the post-activation 1,727,962.
    _, v = abstract(create("preact_resnet110", scan_blocks=True), (32, 32, 3))
    assert n_params(v["params"]) == 1_727_962
    assert "final_bn" in v["params"] and "stem_bn" not in v["params"]


def rir_count(stage_sizes=(2, 3, 3), widths=(96, 192, 384), stem=96, num_classes=10):
    """ResNet in ResNet: per layer one 3x3 conv of the concatenated streams plus BN."""
    total, cin = 27 * stem + 2 * stem, stem
    for n, w in zip(stage_sizes, widths):
        for _ in range(2 * n):
            total += 9 * cin * w + 2 * w
            cin = w
    return total + cin * num_classes + num_classes


@pytest.mark.parametrize("name", [n for n in list_models() if _is_resnet_family(n)])
def test_every_registered_resnet_family_model(name):
    spec = get_spec(name)
    # Deep nets are traced in the scanned layout (the same parameters; see test_models_resnet.py).
    model = create(name, scan_blocks=True) if isinstance(create(name), ResNet) else create(name)
    logits, v = abstract(model, spec.input_shape)
    assert logits.shape == (2, spec.num_classes) and logits.dtype == jnp.float32
    if spec.reference_params is not None:
        assert n_params(v["params"]) == pytest.approx(
            spec.reference_params, rel=spec.params_rtol, abs=0
        ), spec.params_note
    if name == "rir18_wide":
        assert n_params(v["params"]) == rir_count() == 9_469_930


def test_exact_counts_of_the_later_family():
    # REFERENCE.md: WRN (C10) and CIFAR ResNeXt-29 exact counts; torchvision for the ImageNet ones.
    expected = {
        "wrn28_10": 36_479_194,
        "wrn40_4": 8_949_210,
        "wrn16_8": 10_961_370,
        "resnext29_8x64d": 34_426_698,
        "resnext29_16x64d": 68_155_210,
        "resnext50_32x4d": 25_028_904,
        "resnext101_32x8d": 88_791_336,
        "resnext101_64x4d": 83_455_272,
        "wide_resnet50_2": 68_883_240,
        "wide_resnet101_2": 126_886_696,
    }
    for name, count in expected.items():
        assert get_spec(name).reference_params == count and get_spec(name).params_rtol == 0
    # Unscanned layout for a few of them (the registry sweep uses the scanned one).
    for name in ("wrn16_8", "resnext29_8x64d", "resnext50_32x4d"):
        _, v = abstract(create(name), get_spec(name).input_shape, batch=1)
        assert n_params(v["params"]) == expected[name], name


def test_wrn_depth_rule_and_widths():
    _, v = abstract(WideResNet(depth=16, width=8), (32, 32, 3))
    assert sorted(k for k in v["params"] if k.startswith("stage3")) == [
        "stage3_block1",
        "stage3_block2",
    ]
    assert v["params"]["stage1_block1"]["conv1"]["kernel"].shape == (3, 3, 16, 128)
    assert v["params"]["stage1_block1"]["proj_conv"]["kernel"].shape == (1, 1, 16, 128)
    with pytest.raises(ValueError, match="6n\\+4"):
        abstract(WideResNet(depth=28 + 2, width=2), (32, 32, 3))


# ------------------------------------------------------------------------ blocks against references


def _compare(block, x, reference, seed):
    """Block output and reference from the same random variables, in one compiled function."""
    v = numpy_variables(block, x.shape, seed, random_bn=True)
    got, want = jax.jit(lambda v: (block.apply(v, x, train=False), reference(v)))(v)
    np.testing.assert_allclose(got, want, atol=1e-5)
    return v


def _bn(x, v, name):
    p, s = v["params"][name], v["batch_stats"][name]
    return F.batch_norm_apply(x, s["mean"], s["var"], p["scale"], p["bias"])


def _conv(x, v, name, stride=1, pad=0, groups=1):
    return F.conv2d(x, v["params"][name]["kernel"], stride=stride, padding=pad, groups=groups)


def test_preact_basic_block_matches_reference():
    relu = jax.nn.relu
    x = normal(3, (2, 6, 6, 8))
    block = BasicBlock(features=8, conv=CONV, norm=EVAL_NORM, preact=True)

    def reference(v):
        y = _conv(relu(_bn(x, v, "bn1")), v, "conv1", pad=1)
        return x + _conv(relu(_bn(y, v, "bn2")), v, "conv2", pad=1)

    _compare(block, x, reference, 1)


def test_preact_bottleneck_v1_projection_matches_reference():
    relu = jax.nn.relu
    x = normal(4, (2, 7, 7, 8))
    block = BottleneckBlock(
        features=4,
        conv=CONV,
        norm=EVAL_NORM,
        preact=True,
        strides=2,
        shortcut="B",
        stride_on_3x3=False,
    )

    def reference(v):
        pre = relu(_bn(x, v, "bn1"))
        y = relu(_bn(_conv(pre, v, "conv1", stride=2), v, "bn2"))
        y = relu(_bn(_conv(y, v, "conv2", pad=1), v, "bn3"))
        return _conv(y, v, "conv3") + _conv(pre, v, "proj_conv", stride=2)

    _compare(block, x, reference, 2)


def _preact_basic(v, x, features, strides, shortcut_input):
    """A pre-activation basic unit built by hand; `shortcut_input` 'pre' is relu(bn1(x)) (the
    first unit of a stage in fb.resnet.torch preresnet.lua, 'both_preact'), 'x' the raw input.
    The shortcut is the 1x1 projection when `v` has one, else option A (strided, zero-padded)."""
    relu = jax.nn.relu
    pre = relu(_bn(x, v, "bn1"))
    y = _conv(pre, v, "conv1", stride=strides, pad=1)
    y = _conv(relu(_bn(y, v, "bn2")), v, "conv2", pad=1)
    sc = pre if shortcut_input == "pre" else x
    if "proj_conv" in v["params"]:
        sc = _conv(sc, v, "proj_conv", stride=strides)
    else:
        sc = sc[:, ::strides, ::strides, :]
        sc = jnp.pad(sc, ((0, 0), (0, 0), (0, 0), (0, features - sc.shape[-1])))
    return sc + y


@pytest.mark.parametrize(
    "kw, shortcut_input",
    [
        (dict(first=True), "pre"),  # identity of a stage's first unit
        (dict(), "x"),  # identity of any other unit
        (dict(strides=2, shortcut="A"), "pre"),  # option A: a shape change starts a stage
        (dict(strides=2, shortcut="B"), "pre"),  # option B projection
        (dict(shortcut="C"), "x"),  # option C projection of a later unit
        (dict(first=True, shortcut="C"), "pre"),
    ],
    ids=["identity_first", "identity", "A", "B", "C", "C_first"],
)
def test_preact_shortcut_input_matches_fb_resnet_torch(kw, shortcut_input):
    x = normal(7, (2, 6, 6, 4))
    features = 8 if kw.get("strides") else 4
    block = BasicBlock(features=features, conv=CONV, norm=EVAL_NORM, preact=True, **kw)
    strides = kw.get("strides", 1)
    _compare(block, x, lambda v: _preact_basic(v, x, features, strides, shortcut_input), 8)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_preact_network_first_units_share_bn_relu_with_the_shortcut(scan):
    # A whole pre-activation net against a hand-built forward pass: bare conv stem, the first
    # unit of each stage feeding relu(bn1(x)) to its identity / option A shortcut (He et al.
    # 2016b; fb.resnet.torch preresnet.lua, CIFAR), later units x, final BN-ReLU, pool, FC.
    relu = jax.nn.relu
    x = normal(9, (2, 8, 8, 3))
    kw = dict(
        stem="cifar",
        stage_sizes=(2, 2),
        stage_widths=(8, 16),
        stem_width=8,
        shortcut="A",
        preact=True,
        num_classes=4,
    )
    model = ResNet(**kw)
    v = numpy_variables(model, x.shape, 10, random_bn=True)

    def reference(v):
        sub = lambda name: {c: v[c][name] for c in ("params", "batch_stats")}  # noqa: E731
        h = _conv(x, v, "stem_conv", pad=1)
        for s, features, strides in ((1, 8, 1), (2, 16, 2)):
            h = _preact_basic(sub(f"stage{s}_block1"), h, features, strides, "pre")
            h = _preact_basic(sub(f"stage{s}_block2"), h, features, 1, "x")
        h = relu(_bn(h, v, "final_bn")).mean(axis=(1, 2))
        return h @ v["params"]["fc"]["kernel"] + v["params"]["fc"]["bias"]

    run = ResNet(scan_blocks=True, **kw) if scan else model
    got, want = jax.jit(
        lambda v: (run.apply(scan_variables(v) if scan else v, x, train=False), reference(v))
    )(v)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_resnext_grouped_bottleneck_matches_reference():
    relu = jax.nn.relu
    x = normal(5, (2, 6, 6, 8))
    block = BottleneckBlock(
        features=16, conv=CONV, norm=EVAL_NORM, strides=2, shortcut="B", groups=4, base_width=8
    )

    def reference(v):
        y = relu(_bn(_conv(x, v, "conv1"), v, "bn1"))
        y = relu(_bn(_conv(y, v, "conv2", stride=2, pad=1, groups=4), v, "bn2"))
        return relu(
            _bn(_conv(y, v, "conv3"), v, "bn3")
            + _bn(_conv(x, v, "proj_conv", stride=2), v, "proj_bn")
        )

    v = _compare(block, x, reference, 3)
    # Inner width int(16 * 8 / 64) * 4 = 8 in 4 groups of 2; output 4 * 16.
    assert (
        v["params"]["conv2"]["kernel"].shape == (3, 3, 2, 8)
        and v["params"]["conv3"]["kernel"].shape[-1] == 64
    )


# --------------------------------------------------------------------------- stochastic depth


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_drop_path_block_expectation_equals_test_time_scaling(mode):
    rate, n_keys = 0.3, 400
    x = normal(6, (8, 4, 4, 4))
    block = BasicBlock(features=4, conv=CONV, norm=EVAL_NORM, preact=True, drop_path_mode=mode)
    v = numpy_variables(block, x.shape, random_bn=True)

    @jax.jit
    def outs(keys):
        train = jax.vmap(
            lambda k: block.apply(v, x, train=True, drop_rate=rate, rngs={"dropout": k})
        )(keys)
        full = block.apply(v, x, train=True, drop_rate=None)  # no drop path: x + the whole branch
        return train, full - x, block.apply(v, x, train=False, drop_rate=rate)

    y, branch, test_time = (
        np.asarray(a) for a in outs(jax.random.split(jax.random.key(7, impl="rbg"), n_keys))
    )
    # Every training output keeps or drops the whole branch of a sample (of the
    # batch in 'batch' mode).
    kept = np.all(np.isclose(y, x + branch, atol=1e-5), axis=(2, 3, 4))
    dropped = np.all(np.isclose(y, x, atol=1e-6), axis=(2, 3, 4))
    assert np.all(kept ^ dropped)
    if mode == "batch":
        assert np.all(kept == kept[:, :1])
    else:
        assert 0 < kept[0].sum() < 8 or 0 < kept[1].sum() < 8
    p_hat = kept.mean()
    assert abs(p_hat - (1 - rate)) < 4 * np.sqrt(
        rate * (1 - rate) / (n_keys if mode == "batch" else 8 * n_keys)
    )
    # The mean over keys is x + p_hat * branch; the paper's test-time output is
    # x + (1 - rate) * branch.
    np.testing.assert_allclose(test_time, x + (1 - rate) * branch, atol=1e-5)
    np.testing.assert_allclose(y.mean(0), x + kept.mean(0)[:, None, None, None] * branch, atol=1e-4)


def test_stochastic_depth_network_survival_and_active_blocks():
    model = CifarResNet(depth=14, drop_path_rate=0.5)  # 6 blocks, survival 1 - 0.5 l / 6
    x = normal(8, (1, 4, 4, 3))
    v = numpy_variables(model, x.shape)

    @jax.jit
    def keep_masks(keys):
        def one(k):
            _, state = model.apply(
                v, x, train=True, mutable=["batch_stats", "intermediates"], rngs={"dropout": k}
            )
            inter = state["intermediates"]
            return jnp.stack(
                [
                    inter[f"stage{s}_block{b}"]["drop_path_keep"][0][0]
                    for s in (1, 2, 3)
                    for b in (1, 2)
                ]
            )

        return jax.vmap(one)(keys)

    n_keys = 256
    keep = np.asarray(keep_masks(jax.random.split(jax.random.key(9, impl="rbg"), n_keys)))
    active = keep.sum(1)
    assert len(set(active.tolist())) >= 3  # the number of active blocks varies with the key
    survival = 1 - 0.5 * np.arange(1, 7) / 6
    assert abs(active.mean() - survival.sum()) < 4 * np.sqrt(
        (survival * (1 - survival)).sum() / n_keys
    )
    assert np.all(np.abs(keep.mean(0) - survival) < 4 * np.sqrt(0.25 / n_keys))
    with pytest.raises(Exception, match="dropout"):
        model.apply(v, x, train=True, mutable=["batch_stats"])


def test_stochastic_depth_scanned_rates_align():
    # Test-time scaling uses each block's own survival probability, scanned or not. Stages (1, 3):
    # stage 2 scans two blocks whose rates start at index 2 of 4.
    x = normal(10, (2, 4, 4, 3))
    kw = dict(stem="cifar", stage_sizes=(1, 3), stage_widths=(4, 8), stem_width=4, num_classes=3)
    model, scanned = (
        ResNet(drop_path_rate=0.5, **kw),
        ResNet(drop_path_rate=0.5, scan_blocks=True, **kw),
    )
    v = numpy_variables(model, x.shape, random_bn=True)

    @jax.jit
    def run(v, vs):
        return (
            model.apply(v, x, train=False),
            scanned.apply(vs, x, train=False),
            ResNet(**kw).apply(v, x, train=False),
        )

    plain_scaling, scanned_scaling, no_drop = run(v, scan_variables(v))
    np.testing.assert_allclose(scanned_scaling, plain_scaling, atol=1e-5)
    assert not np.allclose(no_drop, plain_scaling, atol=1e-3)


def test_dropped_blocks_get_no_gradient():
    # Pre-activation bottlenecks (depth 11: one per stage); block l is dropped
    # with probability l / 6.
    model = CifarResNet(
        depth=11, block="bottleneck", preact=True, shortcut="B", version="v1", drop_path_rate=0.5
    )
    x = normal(10, (2, 8, 8, 3))
    v = numpy_variables(model, x.shape)

    def loss_fn(params, key):
        logits, state = model.apply(
            {"params": params, "batch_stats": v["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats", "intermediates"],
            rngs={"dropout": key},
        )
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.array([0, 1])
        ).mean(), state

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    seen = set()
    for seed in range(6):
        (loss, state), grads = grad_fn(v["params"], jax.random.key(seed, impl="rbg"))
        assert np.isfinite(float(loss))
        for name, inter in state["intermediates"].items():
            kept = bool(inter["drop_path_keep"][0][0])
            # The branch of a dropped block gets no gradient; the shortcut's projection and bn1
            # (which pre-activates the projection's input too) always do.
            shared = {"proj_conv", "bn1"} if "proj_conv" in grads[name] else set()
            g = sum(
                float(jnp.abs(a).sum())
                for k, sub in grads[name].items()
                if k not in shared
                for a in jax.tree.leaves(sub)
            )
            assert (g > 0) == kept, (seed, name, kept, g)
            seen.add(kept)
        assert float(jnp.abs(grads["stem_conv"]["kernel"]).sum()) > 0
    assert seen == {True, False}


# --------------------------------------------------------------------------- ResNet in ResNet


def test_generalized_residual_layer_is_four_convolutions():
    relu = jax.nn.relu
    r, t = normal(12, (2, 6, 6, 3)), normal(16, (2, 6, 6, 3))
    layer = GeneralizedResidualLayer(features=5, conv=CONV, norm=EVAL_NORM, strides=2)
    v = numpy_variables(layer, None, 4, random_bn=True, init_args=(r, t))
    k = v["params"]["conv"]["kernel"]
    w_rr, w_tr, w_rt, w_tt = k[:, :, :3, :5], k[:, :, 3:, :5], k[:, :, :3, 5:], k[:, :, 3:, 5:]
    conv = partial(F.conv2d, stride=2, padding=1)
    s, p = v["batch_stats"]["bn"], v["params"]["bn"]
    bn_r = partial(
        F.batch_norm_apply,
        mean=s["mean"][:5],
        var=s["var"][:5],
        scale=p["scale"][:5],
        bias=p["bias"][:5],
    )
    bn_t = partial(
        F.batch_norm_apply,
        mean=s["mean"][5:],
        var=s["var"][5:],
        scale=p["scale"][5:],
        bias=p["bias"][5:],
    )
    shortcut = jnp.pad(r[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (0, 2)))
    r_expected = relu(bn_r(conv(r, w_rr) + conv(t, w_tr) + shortcut))
    t_expected = relu(bn_t(conv(r, w_rt) + conv(t, w_tt)))
    r_out, t_out = jax.jit(layer.apply)(v, r, t)
    np.testing.assert_allclose(r_out, r_expected, atol=1e-5)
    np.testing.assert_allclose(t_out, t_expected, atol=1e-5)


def test_rir_block_outer_shortcut():
    r, t = normal(13, (2, 6, 6, 3)), normal(14, (2, 6, 6, 3))
    with_outer = RiRBlock(features=4, conv=CONV, norm=EVAL_NORM, strides=2)
    without = RiRBlock(features=4, conv=CONV, norm=EVAL_NORM, strides=2, outer_shortcut=False)
    v = numpy_variables(with_outer, None, init_args=(r, t))
    (r1, t1), (r0, t0) = jax.jit(lambda v: (with_outer.apply(v, r, t), without.apply(v, r, t)))(v)
    np.testing.assert_allclose(
        r1 - r0, jnp.pad(r[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (0, 1))), atol=1e-6
    )
    np.testing.assert_array_equal(t1, t0)


def test_rir_validation():
    with pytest.raises(ValueError, match="even"):
        abstract(RiR(stage_widths=(96, 191, 384)), (32, 32, 3))
    with pytest.raises(ValueError, match=">= 4"):
        abstract(RiR(), (2, 2, 3))


# --------------------------------------------------------------------------- forward + backward


def _train_step_checks(model, input_shape):
    # NumPy-made variables: model.init itself is exercised in test_models_resnet.py, and compiling
    # the initialisers would double this test's time.
    x = normal(1, (2, *input_shape))
    v = numpy_variables(model, x.shape)

    def loss_fn(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": v["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(2, impl="rbg")},
        )
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.array([0, 1])
        ).mean(), upd

    (loss, upd), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(v["params"])
    assert np.isfinite(float(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, (
            f"zero or non-finite gradient at {path}"
        )
    assert all(
        jax.tree.leaves(
            jax.tree.map(
                lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                upd["batch_stats"],
                v["batch_stats"],
            )
        )
    )


@pytest.mark.parametrize(
    "model,shape",
    [
        (WideResNet(depth=10, width=2, dropout_rate=0.3), (16, 16, 3)),
        (
            CifarResNet(depth=11, block="bottleneck", groups=4, base_width=4, shortcut="B"),
            (16, 16, 3),
        ),
        (RiR(stage_sizes=(1, 1, 1), stage_widths=(8, 16, 32), stem_width=8), (8, 8, 3)),
    ],
    ids=["wrn10_2_dropout", "resnext11_4x4d", "rir_small"],
)
def test_small_variants_forward_backward(model, shape):
    _train_step_checks(model, shape)


def test_wrn_dropout_is_random_in_training_only():
    x = normal(15, (2, 4, 4, 4))
    block = BasicBlock(features=4, conv=CONV, norm=EVAL_NORM, preact=True, dropout_rate=0.5)
    no_dropout = BasicBlock(features=4, conv=CONV, norm=EVAL_NORM, preact=True)
    v = numpy_variables(block, x.shape)

    @jax.jit
    def run(k1, k2):
        def train(k):
            return block.apply(v, x, train=True, rngs={"dropout": k})

        return (
            train(k1),
            train(k2),
            train(k1),
            block.apply(v, x, train=False),
            no_dropout.apply(v, x, train=False),
        )

    a, b, a_again, test_time, reference = run(
        jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
    )
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a_again)
    np.testing.assert_array_equal(test_time, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["resnext50_32x4d", "wide_resnet50_2", "preact_resnet18", "rir18_wide"]
)
def test_full_size_variants_forward_backward(name):
    _train_step_checks(create(name, num_classes=10), (32, 32, 3))
