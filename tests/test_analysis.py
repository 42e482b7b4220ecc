"""cnnjax.analysis: the layer table against the lecture and published MAC counts, receptive fields
against Araujo et al. 2019 and a gradient measurement, BatchNorm folding
against the unfolded net."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import models
from cnnjax import nn as cnn
from cnnjax.analysis import (
    count_params,
    empirical_receptive_field,
    fold_batchnorm,
    format_receptive_field,
    format_summary,
    parameter_count,
    receptive_field,
    stacked_receptive_field,
    summary,
)
from cnnjax.analysis.tracing import subtree

KEY = jax.random.key(0, impl="rbg")


def has_model(name: str) -> bool:
    return name in models.list_models()


def needs(*names):
    return pytest.mark.skipif(not all(map(has_model, names)), reason=f"{names} not registered yet")


class LeNet(nn.Module):
    """The lecture's LeNet-5 built from cnnjax.nn here, independently of cnnjax.models.lenet."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = cnn.MaxPool(2, name="pool1")(jax.nn.relu(cnn.Conv(20, 5, padding=2, name="conv1")(x)))
        x = cnn.MaxPool(2, name="pool2")(jax.nn.relu(cnn.Conv(50, 5, padding=2, name="conv2")(x)))
        x = jax.nn.relu(cnn.Dense(500, name="fc1")(cnn.Flatten(name="flatten")(x)))
        return cnn.Dense(10, name="fc2")(x)


# --------------------------------------------------------------------------- summary


LECTURE_LENET = [  # (type, output size, weight size, bias, params): the lecture's table
    ("Conv", "28x28x20", "5x5x1x20", (20,), 520),
    ("MaxPool", "14x14x20", "", None, 0),
    ("Conv", "14x14x50", "5x5x20x50", (50,), 25_050),
    ("MaxPool", "7x7x50", "", None, 0),
    ("Flatten", "2450", "", None, 0),
    ("Dense", "500", "2450x500", (500,), 1_225_500),
    ("Dense", "10", "500x10", (10,), 5_010),
]


@pytest.mark.parametrize("which", ["built", "registered"])
def test_lenet_summary_reproduces_the_lecture_table(which):
    model = LeNet() if which == "built" else models.create("lenet5")
    s = summary(model, (28, 28, 1))
    got = [(r.type, r.output_size, r.weight_size, r.bias_shape, r.params) for r in s.rows]
    assert got == LECTURE_LENET
    assert s.total_params == 1_256_080 == sum(r.params for r in s.rows)
    # MACs from the definitions: Hout*Wout*KH*KW*Cin*Cout for a conv, in*out for a dense layer.
    expected = [28 * 28 * 5 * 5 * 1 * 20, 0, 14 * 14 * 5 * 5 * 20 * 50, 0, 0, 2450 * 500, 500 * 10]
    assert [r.macs for r in s.rows] == expected and s.total_macs == sum(
        expected
    ) == s.total_flops // 2
    table = format_summary(s)
    assert (
        str(s) == table
        and "1,256,080" in table
        and "5x5x20x50" in table
        and "FLOPs = 2 x MACs" in table
    )


def test_summary_by_registered_name_and_json():
    s = summary("lenet5")
    assert s.input_shape == (28, 28, 1) and s.output_shape == (10,)
    d = json.loads(s.to_json())
    assert (
        d["total_params"] == 1_256_080
        and d["total_macs"] == s.total_macs
        and d["total_flops"] == 2 * s.total_macs
    )
    assert [r["output_shape"] for r in d["rows"]] == [list(r.output_shape) for r in s.rows]
    assert d["rows"][0]["weight_shape"] == [5, 5, 1, 20]


class Odd(nn.Module):
    """Grouped, dilated and strided convs, a shared layer called twice, a module's own parameter."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = cnn.Conv(8, 3, strides=2, padding=1, name="stem")(x)
        x = cnn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = cnn.Conv(16, 3, groups=4, dilation=2, padding=2, use_bias=False, name="grouped")(x)
        shared = cnn.Conv(16, 1, name="shared")
        x = shared(shared(x))
        gain = self.param("gain", nn.initializers.ones, (16,))
        y = cnn.Dense(6, name="fc")(x)  # a dense layer on every position (a 1x1 conv)
        return cnn.GlobalAvgPool(name="pool")(y * gain[:6])


def test_summary_counts_from_definitions_shared_and_own_params():
    s = summary(Odd(), (20, 20, 3), batch_size=3)
    rows = {(r.path, r.shared): r for r in s.rows}
    assert rows[("stem", False)].macs == 10 * 10 * 3 * 3 * 3 * 8
    assert rows[("grouped", False)].macs == 10 * 10 * 3 * 3 * (8 // 4) * 16
    assert (
        rows[("grouped", False)].params == 3 * 3 * 2 * 16
        and rows[("grouped", False)].bias_shape is None
    )
    assert rows[("shared", False)].params == 16 * 16 + 16 and rows[("shared", True)].params == 0
    assert rows[("shared", True)].macs == rows[("shared", False)].macs == 10 * 10 * 16 * 16
    assert rows[("fc", False)].macs == 10 * 10 * 16 * 6
    assert rows[("", False)].type == "Odd (own params)" and rows[("", False)].params == 16
    assert rows[("bn", False)].params == 16 and s.total_state == 16
    variables = jax.eval_shape(lambda: Odd().init(KEY, jnp.zeros((1, 20, 20, 3)), train=False))
    assert s.total_params == count_params(variables) == sum(r.params for r in s.rows)
    assert s.total_macs == sum(r.macs for r in s.rows)
    # MACs are per image whatever the traced batch.
    assert summary(Odd(), (20, 20, 3)).total_macs == s.total_macs


def test_count_params_and_parameter_count():
    variables = jax.eval_shape(lambda: LeNet().init(KEY, jnp.zeros((1, 28, 28, 1)), train=False))
    assert count_params(variables) == count_params(variables["params"]) == 1_256_080
    assert parameter_count(LeNet(), (28, 28, 1)) == 1_256_080
    assert count_params({"params": {"a": np.zeros((2, 3))}, "batch_stats": {"m": np.zeros(7)}}) == 6
    with pytest.raises(ValueError, match="variables dict"):
        count_params([np.zeros(3)])


def test_summary_validates_its_arguments():
    with pytest.raises(ValueError, match="input_shape"):
        summary(LeNet(), (28, -1, 1))
    with pytest.raises(ValueError, match="input_shape is required"):
        summary(LeNet())
    with pytest.raises(ValueError, match="batch_size"):
        summary(LeNet(), (28, 28, 1), batch_size=0)
    with pytest.raises(ValueError, match="flax.linen.Module"):
        summary(object(), (28, 28, 1))
    with pytest.raises(ValueError, match="unknown model"):
        summary("lenet6")
    with pytest.raises(ValueError, match="no `train` argument"):
        summary(cnn.Conv(4), (8, 8, 3), train=True)
    with pytest.raises(ValueError, match="input_shape"):
        parameter_count(LeNet(), 28)
    with pytest.raises(ValueError, match=r"without the batch axis.*drop the leading 1"):
        summary(LeNet(), (1, 28, 28, 1))  # once said "add a batch axis", the opposite of the fix


# He et al. 2016, Table 1 (V1: stride on the first 1x1 conv). The paper's figures are within
# 0.07 G of the exact counts (3.858 -> "3.8", 3.664 -> "3.6", 7.570 -> "7.6"): neither rounded nor
# truncated consistently, so the tolerance is 0.07 G.
PAPER_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}
# torchvision's metadata ("GFLOPS" there are MACs), V1.5 striding, 224x224, conv + fc only.
TORCHVISION_GMACS = {
    "resnet18": 1.814,
    "resnet34": 3.664,
    "resnet50": 4.089,
    "resnet101": 7.801,
    "resnet152": 11.514,
    "vgg16": 15.470,
    "vgg19": 19.632,
    "alexnet_torchvision": 0.714,
    "googlenet_torchvision": 1.498,
    "densenet121": 2.834,
    "resnext50_32x4d": 4.230,
}


@needs("resnet50")
@pytest.mark.parametrize("depth", sorted(PAPER_GMACS))
def test_resnet_macs_paper_v1_and_torchvision_v1_5(depth):
    # Deep nets in the scanned layout (same layers; summary multiplies the scanned rows).
    v1 = summary(
        models.create(f"resnet{depth}", version="v1", scan_blocks=depth > 50), (224, 224, 3)
    )
    assert abs(v1.total_macs / 1e9 - PAPER_GMACS[depth]) <= 0.07
    v15 = summary(
        models.create(f"resnet{depth}", version="v1.5", scan_blocks=depth > 50), (224, 224, 3)
    )
    assert round(v15.total_macs / 1e9, 3) == TORCHVISION_GMACS[f"resnet{depth}"]
    assert v1.total_params == v15.total_params == models.get_spec(f"resnet{depth}").reference_params
    if depth < 50:
        assert v1.total_macs == v15.total_macs  # basic blocks have no 1x1 conv to stride


@pytest.mark.parametrize(
    "name",
    [
        "vgg16",
        "vgg19",
        "alexnet_torchvision",
        "googlenet_torchvision",
        "densenet121",
        "resnext50_32x4d",
    ],
)
def test_macs_match_torchvision(name):
    if not has_model(name):
        pytest.skip(f"{name} not registered yet")
    s = summary(name)
    assert round(s.total_macs / 1e9, 3) == TORCHVISION_GMACS[name]
    assert s.total_params == models.get_spec(name).reference_params == sum(r.params for r in s.rows)


@needs("resnet20")
def test_scan_invariant_pass_is_found_on_the_call_stack():
    # flax's nn.scan traces its body twice; the analyses keep the second trace. Flax 0.12.10 runs
    # the first as an ordinary trace (no JaxprTracer to tell it by), so the call stack decides:
    # on this flax both tests must mark exactly the same calls, the first pass's.
    from cnnjax.analysis import tracing

    marks = []

    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and tracing.is_layer(ctx.module):
            marks.append(
                (
                    tracing.module_path(ctx.module),
                    tracing.in_scan_invariant_pass(),
                    tracing.is_discarded_trace(args[0]),
                )
            )
        return next_fun(*args, **kwargs)

    model = models.create("resnet20", scan_blocks=True)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((1, 32, 32, 3))
        )
    scanned = [m for m in marks if m[0].split("/")[0].endswith("_blocks")]
    assert (
        len(scanned) == 3 * 2 * 4
    )  # 3 stages, 2 traces of the body, 4 layers (conv, BN, conv, BN)
    assert [m[1] for m in scanned] == [m[2] for m in scanned] and sum(m[1] for m in scanned) == 12
    assert not any(m[1] or m[2] for m in marks if m not in scanned)


@needs("resnet20")
def test_scanned_rows_count_every_iteration():
    plain, scanned = (
        summary("resnet20"),
        summary(models.create("resnet20", scan_blocks=True), (32, 32, 3)),
    )
    assert (
        scanned.total_params == plain.total_params == sum(r.params for r in scanned.rows) == 269_722
    )
    assert scanned.total_macs == plain.total_macs
    assert len(scanned.rows) < len(plain.rows) and any(r.repeats == 2 for r in scanned.rows)


# --------------------------------------------------------------------------- receptive fields


def test_stacked_receptive_field_lecture_statements():
    assert stacked_receptive_field([3, 3]) == 5 and stacked_receptive_field([3, 3, 3]) == 7
    assert stacked_receptive_field([7, 3], [2, 2]) == 11  # ResNet stem: 7x7/2 conv, 3x3/2 max pool
    assert stacked_receptive_field([3], dilations=[2]) == 5
    assert stacked_receptive_field([11, 3, 5], [4, 2, 1]) == 11 + 2 * 4 + 4 * 8
    with pytest.raises(ValueError, match="one entry per layer"):
        stacked_receptive_field([3, 3], [1])
    with pytest.raises(ValueError, match="positive"):
        stacked_receptive_field([0])


class MultiPath(nn.Module):
    """Inception-like branches of different paddings, a strided projection, option-A slicing,
    a ceil-mode average pool and a dilated conv: every rule of the interpreter."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = cnn.Conv(4, 7, strides=2, padding=3, name="stem")(x)
        x = cnn.MaxPool(3, 2, 1, name="pool")(x)
        a = cnn.Conv(4, 1, name="b1")(x)
        b = cnn.Conv(4, 5, padding=2, name="b2")(x)
        c = cnn.Conv(4, 3, padding=(0, 1), name="b3")(x)
        c = jnp.pad(c, ((0, 0), (1, 1), (0, 0), (0, 0)))
        y = jax.nn.relu(jnp.concatenate([a, b, c], -1))
        s = cnn.Conv(12, 3, strides=2, padding=1, name="s")(y)
        r = cnn.Conv(12, 1, strides=2, name="proj")(y) + y[:, ::2, ::2, :]
        z = cnn.AvgPool(3, 2, ceil_mode=True, name="avg")(jax.nn.relu(s + r))
        z = cnn.Conv(12, 3, dilation=2, padding=2, name="dil")(z)
        return cnn.Dense(3, name="fc")(cnn.Flatten(name="flat")(z))


def clipped(interval, n):
    return tuple((max(0, lo), min(n - 1, hi)) for lo, hi in interval)


def test_receptive_fields_equal_gradient_support_multipath():
    n = 176  # large enough for the deepest layer's field to fit around the centre unit
    rows = receptive_field(MultiPath(), (n, n, 3))
    by = {r.path: r for r in rows}
    # Hand-derived: the union of the branches keeps the widest (b2: 11 + 4*4 = 27).
    assert by["b2"].size == (27, 27) and by["b1"].size == (11, 11) and by["pool"].stride == (4, 4)
    assert by["b3"].padding == (5, 9) and by["s"].size == (35, 35)
    spatial = [r for r in rows if not r.collapsed]
    assert [r.path for r in rows if r.collapsed] == ["flat", "fc"] and all(
        r.stride is None for r in rows[-2:]
    )
    expected = [
        r.interval(((r.output_shape[0] - 1) // 2, (r.output_shape[1] - 1) // 2)) for r in spatial
    ]
    assert all(
        lo >= 0 and hi < n for e in expected for lo, hi in e
    )  # every field fits: an unclipped check
    assert empirical_receptive_field(MultiPath(), (n, n, 3), [r.path for r in spatial]) == expected
    assert by["fc"].collapsed and by["fc"].size[0] > by["dil"].size[0]
    assert "receptive field" in format_receptive_field(rows)


@needs("vgg16")
def test_vgg16_receptive_field_araujo():
    by = {r.path: r for r in receptive_field(models.create("vgg16"), (224, 224, 3))}
    assert by["conv5_3"].size == (196, 196) and by["pool5"].size == (212, 212)
    assert (
        by["pool5"].stride == (32, 32)
        and by["conv1_2"].size == (5, 5)
        and by["conv3_3"].size == (40, 40)
    )


def final_feature_rf(name, **overrides):
    rows = receptive_field(models.create(name, **overrides), models.get_spec(name).input_shape)
    pool = [r for r in rows if r.input_size is not None and r.type in ("GlobalAvgPool", "Flatten")][
        -1
    ]
    return pool.input_size[0], pool.input_stride[0]


@needs("resnet50")
def test_resnet_receptive_fields_araujo():
    # Araujo et al. 2019: resnet_v1_50 483, torchvision (V1.5) 427; resnet_v1_101 1027.
    # Effective stride 32.
    assert final_feature_rf("resnet50", version="v1") == (483, 32)
    assert final_feature_rf("resnet50", version="v1.5") == (427, 32)
    assert final_feature_rf("resnet101", version="v1", scan_blocks=True) == (1027, 32)


@needs("bn_inception")
def test_bn_inception_receptive_field_araujo():
    assert final_feature_rf("bn_inception") == (699, 32)  # Araujo's inception_v2


@pytest.mark.slow
@needs("inception_resnet_v2", "inception_v4")
def test_inception_v4_receptive_fields_araujo():
    assert final_feature_rf("inception_v4") == (2071, 32)
    assert final_feature_rf("inception_resnet_v2") == (3039, 32)


@needs("alexnet", "resnet20")
def test_alexnet_and_cifar_resnet_rf_and_gradient():
    # Our AlexNet (the 2012 paper's layers) has the 195-pixel field Araujo et al. give for TF-slim's
    # alexnet_v2 although the layers differ (pool5's effective padding: 64 here).
    assert final_feature_rf("alexnet")[0] == 195
    model = models.create("resnet20")
    rows = {r.path: r for r in receptive_field(model, (96, 96, 3))}
    assert rows["stage3_block3/bn2"].size == (81, 81) and rows["stage3_block3/bn2"].stride == (4, 4)
    layers = [
        "stem_conv",
        "stage2_block1/conv1",
        "stage2_block3/bn2",
        "stage3_block3/bn2",
    ]  # option-A shortcuts
    expected = [
        clipped(rows[k].interval(((rows[k].output_shape[0] - 1) // 2,) * 2), 96) for k in layers
    ]
    assert empirical_receptive_field(model, (96, 96, 3), layers) == expected
    assert expected[-1] == ((4, 84), (4, 84))  # centre unit 11 of 24: 11 * 4 - 40 = 4, + 81 - 1
    scanned = receptive_field(models.create("resnet20", scan_blocks=True), (96, 96, 3))
    assert scanned[-1] == list(rows.values())[-1]


def test_receptive_field_refuses_what_it_cannot_follow():
    class Flip(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return cnn.Conv(2, 3, name="c")(jnp.flip(x, 1))

    with pytest.raises(NotImplementedError, match="rev"):
        receptive_field(Flip(), (8, 8, 1))
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        receptive_field(LeNet(), (28, 28))
    collapsed = receptive_field(LeNet(), (28, 28, 1))[-1]
    with pytest.raises(ValueError, match="no spatial receptive field"):
        collapsed.interval((0, 0))


# --------------------------------------------------------------------------- BatchNorm folding


def random_stats(variables, seed=1):
    """Non-trivial running statistics and BN affine parameters, so that folding has work to do."""
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = str(path[-1].key)
        if name == "var":
            return jnp.asarray(rng.uniform(0.3, 3.0, a.shape), jnp.float32)
        if name in ("mean", "bias"):
            return jnp.asarray(rng.normal(0, 0.5, a.shape), jnp.float32)
        if name == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32)
        return jnp.asarray(rng.normal(0, 0.2, a.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, variables)


class ConvBN(nn.Module):
    """Foldable pairs (conv with and without bias, dense + BN) and three BNs that are not."""

    @nn.compact
    def __call__(self, x, train: bool):
        def norm(name):
            return cnn.BatchNorm(use_running_average=not train, epsilon=1e-3, name=name)

        y = jax.nn.relu(norm("bn1")(cnn.Conv(6, 3, padding=1, name="conv1")(x)))
        y = norm("bn2")(cnn.Conv(6, 3, strides=2, use_bias=False, name="conv2")(y))
        z = cnn.Conv(6, 1, name="conv3")(y)
        z = norm("bn3")(z) + z  # conv3's output is also used by the add: not foldable
        z = norm("bn4")(jax.nn.relu(z))  # after a ReLU: not foldable
        h = cnn.Dense(5, name="fc1")(cnn.Flatten(name="flat")(z))
        return cnn.Dense(3, name="fc2")(jax.nn.relu(norm("bn5")(h)))


def test_fold_batchnorm_small_net_exact_pairs_and_values():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 3)), jnp.float32)
    variables = random_stats(jax.eval_shape(lambda: ConvBN().init(KEY, x, train=False)))
    folded, fv = fold_batchnorm(ConvBN(), variables, (8, 8, 3))
    assert folded.pairs == (("conv1", "bn1"), ("conv2", "bn2"), ("fc1", "bn5"))
    assert set(folded.unfolded) == {"bn3", "bn4"} and "also used" in folded.unfolded["bn3"]
    assert set(fv["params"]) == {"conv1", "conv2", "conv3", "bn3", "bn4", "fc1", "fc2"}
    assert set(fv["batch_stats"]) == {"bn3", "bn4"}
    # The folded kernel from the definition: W * gamma / sqrt(var + eps), bias (0 - mean) g + beta.
    p, s = variables["params"], variables["batch_stats"]
    g = np.asarray(p["bn2"]["scale"]) / np.sqrt(np.asarray(s["bn2"]["var"]) + 1e-3)
    np.testing.assert_allclose(
        fv["params"]["conv2"]["kernel"], np.asarray(p["conv2"]["kernel"]) * g, rtol=1e-6
    )
    np.testing.assert_allclose(
        fv["params"]["conv2"]["bias"],
        -np.asarray(s["bn2"]["mean"]) * g + np.asarray(p["bn2"]["bias"]),
        rtol=1e-5,
        atol=1e-6,
    )
    want = jax.jit(lambda v, x: ConvBN().apply(v, x, train=False))(variables, x)
    got = jax.jit(folded.apply)(fv, x)
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="inference only"):
        folded.apply(fv, x, train=True)


def test_fold_batchnorm_validates():
    with pytest.raises(ValueError, match="'params' collection"):
        fold_batchnorm(ConvBN(), {"batch_stats": {}}, (8, 8, 3))
    with pytest.raises(ValueError, match="flax.linen.Module"):
        fold_batchnorm(None, {"params": {}}, (8, 8, 3))


@needs("resnet20")
@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fold_batchnorm_cifar_resnet20(scan):
    model = models.create("resnet20", scan_blocks=scan)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = random_stats(jax.eval_shape(lambda: model.init(KEY, x, train=False)))
    folded, fv = fold_batchnorm(model, variables, (32, 32, 3))
    assert not folded.unfolded and len(folded.pairs) == (19 if not scan else 13)
    assert (
        "batch_stats" not in fv
    )  # the folded network has no BatchNorm left (and apply reads none)
    # Each pair trades BN's scale and shift (2C) for a conv bias (C): the convs had none.
    added = sum(subtree(fv["params"], conv)["bias"].size for conv, _ in folded.pairs)
    assert all(subtree(variables["params"], conv).get("bias") is None for conv, _ in folded.pairs)
    assert count_params(fv) == count_params(variables) - added
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    got = jax.jit(folded.apply)(fv, x)
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
