"""Classic architectures: linear classifier and MLP, LeNet-5, AlexNet (paper and
torchvision), ZFNet, VGG.

Parameter counts and shapes come from `jax.eval_shape` (no compilation); only the small models
run a real forward and backward pass (VGG-11 at 32x32 is marked slow).
"""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.models import create, get_spec, list_models
from cnnjax.models.alexnet import ALEXNET_CONFIGS, feature_map_sizes
from cnnjax.models.vgg import VGG_CONFIGS

from model_testing import (
    KEY,
    abstract_apply,
    abstract_variables,
    fan_in_variables,
    n_params,
    normal,
)

# Published / reference-implementation counts (1000 classes for ImageNet nets), exact:
EXACT_PARAMS = {
    "linear": 3072 * 10 + 10,  # lecture recap: W is 10 x 3072, b is 10
    "mlp": 3072 * 100 + 100 + 100 * 10 + 10,  # 3072 -> 100 -> 10 with biases
    "lenet5": 1_256_080,  # the lecture's LeNet-5 table
    "alexnet": 60_965_224,  # Krizhevsky et al. 2012 (groups=2 on conv2/4/5, biases)
    "alexnet_torchvision": 61_100_840,  # torchvision alexnet
    "zfnet": 62_357_608,  # Zeiler & Fergus 2014, dense convs with biases
    # torchvision vgg*/vgg*_bn (conv bias kept in front of BatchNorm).
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
}


def test_every_classic_model_is_registered_with_its_reference():
    assert set(EXACT_PARAMS) <= set(list_models())
    for name, count in EXACT_PARAMS.items():
        spec = get_spec(name)
        assert spec.reference_params == count and spec.params_rtol == 0.0, name


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_parameter_count_is_exact(name):
    spec = get_spec(name)
    variables = abstract_variables(create(name), spec.input_shape)
    assert n_params(variables["params"]) == EXACT_PARAMS[name]
    # Only the _bn variants keep state.
    assert ("batch_stats" in variables) == name.endswith("_bn")


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_output_shape_and_dtype(name):
    spec = get_spec(name)
    hash(create(name))  # hashable fields, as nn.jit and static arguments need
    out = abstract_apply(create(name, num_classes=7), spec.input_shape)
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    # Low-precision compute still returns float32 logits.
    out = abstract_apply(create(name, num_classes=7, dtype=jnp.bfloat16), spec.input_shape)
    assert out.shape == (2, 7) and out.dtype == jnp.float32


def test_mlp_hidden_widths_are_a_field():
    model = create("mlp", hidden_sizes=(50, 20), num_classes=7)
    params = abstract_variables(model, (32, 32, 3))["params"]
    assert n_params(params) == 3072 * 50 + 50 + 50 * 20 + 20 + 20 * 7 + 7
    assert params["fc1"]["kernel"].shape == (3072, 50) and params["fc3"]["kernel"].shape == (20, 7)
    assert set(abstract_variables(create("linear"), (32, 32, 3))["params"]) == {"fc1"}


def test_lenet5_layers_match_the_lecture_table():
    p = abstract_variables(create("lenet5"), (28, 28, 1))["params"]
    assert p["conv1"]["kernel"].shape == (5, 5, 1, 20) and p["conv2"]["kernel"].shape == (
        5,
        5,
        20,
        50,
    )
    assert p["fc1"]["kernel"].shape == (2450, 500) and p["fc2"]["kernel"].shape == (500, 10)


def test_alexnet_paper_groups_and_conv1_map():
    model = create("alexnet")
    p = abstract_variables(model, (227, 227, 3))["params"]
    # Two GPUs: conv2, conv4 and conv5 see half of the previous layer's maps.
    assert p["conv1"]["kernel"].shape == (11, 11, 3, 96)
    assert p["conv2"]["kernel"].shape == (5, 5, 48, 256)
    assert p["conv3"]["kernel"].shape == (3, 3, 256, 384)
    assert p["conv4"]["kernel"].shape == (3, 3, 192, 384)
    assert p["conv5"]["kernel"].shape == (3, 3, 192, 256)
    assert p["fc6"]["kernel"].shape == (6 * 6 * 256, 4096)
    _, state = abstract_apply(
        model, (227, 227, 3), capture_intermediates=True, mutable=["intermediates"]
    )
    maps = {k: v["__call__"][0].shape for k, v in state["intermediates"].items() if k != "__call__"}
    assert maps["conv1"] == (2, 55, 55, 96)  # the paper's 55x55 (from 227, not 224)
    assert maps["norm1"] == maps["conv1"] and maps["pool1"] == (2, 27, 27, 96)
    assert maps["pool2"] == (2, 13, 13, 256) and maps["pool5"] == (2, 6, 6, 256)


def test_alexnet_torchvision_is_single_tower_without_lrn():
    model = create("alexnet_torchvision")
    p = abstract_variables(model, (224, 224, 3))["params"]
    widths = [p[f"conv{i}"]["kernel"].shape[-1] for i in range(1, 6)]
    assert widths == [64, 192, 384, 256, 256]
    assert p["conv2"]["kernel"].shape == (5, 5, 64, 192)  # no groups
    _, state = abstract_apply(
        model, (224, 224, 3), capture_intermediates=True, mutable=["intermediates"]
    )
    maps = {k: v["__call__"][0].shape for k, v in state["intermediates"].items() if k != "__call__"}
    assert not any(k.startswith("norm") for k in maps)
    # At 224 the map before the classifier already is torchvision's adaptive-pool size 6x6.
    assert maps["conv1"] == (2, 55, 55, 64) and maps["pool5"] == (2, 6, 6, 256)


def test_zfnet_feature_maps_are_110_55_26_13_6():
    model = create("zfnet")
    p = abstract_variables(model, (224, 224, 3))["params"]
    assert p["conv1"]["kernel"].shape == (7, 7, 3, 96) and p["conv2"]["kernel"].shape == (
        5,
        5,
        96,
        256,
    )
    assert p["conv4"]["kernel"].shape == (3, 3, 384, 384)  # dense, no groups
    _, state = abstract_apply(
        model, (224, 224, 3), capture_intermediates=True, mutable=["intermediates"]
    )
    side = {
        k: v["__call__"][0].shape[1] for k, v in state["intermediates"].items() if k != "__call__"
    }
    assert [side[k] for k in ("conv1", "pool1", "conv2", "pool2", "conv5", "pool5")] == [
        110,
        55,
        26,
        13,
        13,
        6,
    ]
    # ZFNet normalises after pooling.
    assert side["norm1"] == 55 and side["norm2"] == 13
    # The static size walk used for input validation agrees with the traced model.
    assert dict(feature_map_sizes(ALEXNET_CONFIGS["zfnet"], 224, ceil_mode=True)) == {
        k: side[k] for k in ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5")
    }
    # Floor-mode pooling would not give the paper's sizes.
    assert dict(feature_map_sizes(ALEXNET_CONFIGS["zfnet"], 224, ceil_mode=False))["pool1"] == 54


def _lrn_reference(a, size, alpha, beta, k):
    """b_c = a_c / (k + alpha * sum over the `size` channels around c of a^2) **
    beta (NumPy, by loops)."""
    a = np.asarray(a, np.float64)
    out = np.empty_like(a)
    channels = a.shape[-1]
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels - 1, c + size // 2)
        out[..., c] = a[..., c] / (k + alpha * np.sum(a[..., lo : hi + 1] ** 2, axis=-1)) ** beta
    return out


def test_alexnet_lrn_is_the_paper_formula():
    # Small FC layers keep this cheap; the LRN sits between conv1's ReLU and pool1.
    model = create("alexnet", hidden=8, num_classes=3)
    x = 30.0 * normal(1, (1, 67, 67, 3))  # large inputs so alpha matters
    variables = fan_in_variables(model, x, train=False)
    _, state = jax.jit(
        partial(model.apply, train=False, capture_intermediates=True, mutable=["intermediates"])
    )(variables, x)
    a = np.maximum(np.asarray(state["intermediates"]["conv1"]["__call__"][0]), 0.0)
    got = np.asarray(state["intermediates"]["norm1"]["__call__"][0])
    assert np.mean(1e-4 * a**2) > 1e-2  # the squares really do change the denominator
    np.testing.assert_allclose(got, _lrn_reference(a, 5, 1e-4, 0.75, 2.0), rtol=2e-5)
    # Caffe/PyTorch's alpha / n is measurably different here.
    assert not np.allclose(got, _lrn_reference(a, 5, 1e-4 / 5, 0.75, 2.0), rtol=1e-3)


def test_alexnet_dropout_only_in_training():
    model = create("alexnet_torchvision", hidden=32, num_classes=5)
    x = normal(3, (2, 63, 63, 3))
    variables = fan_in_variables(model, x, train=False)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_out = apply(variables, x, train=False)
    np.testing.assert_array_equal(
        np.asarray(eval_out), np.asarray(apply(variables, x, train=False))
    )
    t1 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    t2 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(np.asarray(t1), np.asarray(t2))


@pytest.mark.parametrize("depth,convs", [(11, 8), (13, 10), (16, 13), (19, 16)])
def test_vgg_configurations_of_table_1(depth, convs):
    assert sum(1 for v in VGG_CONFIGS[depth] if v != "M") == convs
    variables = abstract_variables(create(f"vgg{depth}_bn"), (224, 224, 3))
    kernels = [k for k, v in variables["params"].items() if "kernel" in v]
    assert len(kernels) == depth  # weight layers: convs + fc6, fc7, fc8
    assert sum(1 for k in variables["params"] if k.startswith("bn")) == convs
    assert variables["params"]["fc6"]["kernel"].shape == (7 * 7 * 512, 4096)
    assert set(variables["batch_stats"]["bn1_1"]) == {"mean", "var"}


@pytest.mark.parametrize(
    "name,side,pooled", [("vgg11", 32, 7), ("vgg19_bn", 100, 7), ("alexnet_torchvision", 63, 6)]
)
def test_torchvision_adaptive_pool_keeps_the_classifier_at_every_size(name, side, pooled):
    # torchvision's AdaptiveAvgPool2d before FC6: same parameters (and weights) at any input size.
    variables = abstract_variables(create(name), (side, side, 3))
    assert n_params(variables["params"]) == EXACT_PARAMS[name]
    c = 256 if name.startswith("alexnet") else 512
    assert variables["params"]["fc6"]["kernel"].shape == (pooled * pooled * c, 4096)
    # Without it FC6 reads the last map as it is (1x1 at the smallest input, 3x3 at 100).
    unpooled = abstract_variables(create(name, adaptive_pool=None), (side, side, 3))["params"]
    last = {"vgg11": 1, "vgg19_bn": 3, "alexnet_torchvision": 1}[name]
    assert unpooled["fc6"]["kernel"].shape == (last * last * c, 4096)


def test_adaptive_pool_averages_torchvisions_overlapping_bins():
    from cnnjax.functional import adaptive_avg_pool

    x = normal(2, (2, 3, 7, 4))
    got = np.asarray(adaptive_avg_pool(x, 7))  # H 3 -> 7, W already 7
    # Bin i of 7 over 3 rows covers rows floor(3i / 7) .. ceil(3(i + 1) / 7) - 1 (torch's bins).
    rows = [(0, 1), (0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 3)]
    a = np.asarray(x)
    want = np.concatenate([a[:, lo:hi].mean(axis=1, keepdims=True) for lo, hi in rows], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert adaptive_avg_pool(got, 7) is got  # nothing is added at the native size


@pytest.mark.parametrize(
    "name,min_size",
    [
        ("lenet5", 4),
        ("alexnet", 67),
        ("alexnet_torchvision", 63),
        ("zfnet", 63),
        ("vgg11", 32),
        ("vgg19_bn", 32),
    ],
)
def test_smallest_input_works_and_one_less_raises(name, min_size):
    spec = get_spec(name)
    model = create(name, num_classes=4)
    assert model.min_input_size() == min_size
    c = spec.input_shape[-1]
    assert abstract_apply(model, (min_size, min_size, c)).shape == (2, 4)
    with pytest.raises(ValueError, match=f"at least {min_size}x{min_size}"):
        abstract_apply(model, (min_size - 1, min_size + 5, c))


@pytest.mark.parametrize("name", ["linear", "lenet5", "alexnet", "zfnet", "vgg11"])
def test_wrong_channels_or_rank_raise(name):
    spec = get_spec(name)
    h, w, c = spec.input_shape
    model = create(name)
    with pytest.raises(ValueError, match=f"expects {c} input channel"):
        abstract_apply(model, (h, w, c + 2))
    with pytest.raises(ValueError, match=r"rank 4.*add a batch axis with x\[None\]"):
        jax.eval_shape(
            partial(model.init, train=False), KEY, jax.ShapeDtypeStruct((h, w, c), jnp.float32)
        )
    with pytest.raises(
        ValueError, match=r"rank 4.*give one batch of images"
    ):  # not "add a batch axis"
        jax.eval_shape(
            partial(model.init, train=False),
            KEY,
            jax.ShapeDtypeStruct((1, 2, h, w, c), jnp.float32),
        )
    # The documented override accepts other channel counts.
    assert abstract_apply(create(name, in_channels=c + 2), (h, w, c + 2)).shape == (
        2,
        spec.num_classes,
    )


def _train_step_check(model, x, labels):
    variables = fan_in_variables(model, x, train=False)
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p):
        logits, updates = model.apply(
            {"params": p, **state},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(7)},
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert np.isfinite(float(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).sum() > 0, (
            f"zero or non-finite gradient at {path}"
        )
    return state, updates


@pytest.mark.parametrize(
    "name,shape", [("lenet5", (28, 28, 1)), ("mlp", (32, 32, 3)), ("linear", (32, 32, 3))]
)
def test_forward_backward_small_models(name, shape):
    x = normal(1, (2, *shape))
    _train_step_check(create(name), x, jnp.array([3, 7]))


@pytest.mark.slow
def test_forward_backward_vgg11_bn_at_32():
    x = normal(1, (2, 32, 32, 3))
    state, updates = _train_step_check(create("vgg11_bn", num_classes=10), x, jnp.array([3, 7]))
    before, after = state["batch_stats"]["bn1_1"]["mean"], updates["batch_stats"]["bn1_1"]["mean"]
    assert not np.allclose(np.asarray(before), np.asarray(after))


@pytest.mark.parametrize(
    "name, options, message",
    [
        (
            "lenet5",
            dict(features=20),
            "LeNet5: features must be a sequence",
        ),  # was: len() of an int
        (
            "lenet5",
            dict(hidden=0),
            "LeNet5: hidden must be a positive int",
        ),  # was: ZeroDivisionError in the init
        ("mlp", dict(hidden_sizes=100), "MLP: hidden_sizes must be a possibly empty sequence"),
        ("mlp", dict(hidden_sizes=(100, 0)), "MLP: hidden_sizes must be"),
        (
            "vgg11",
            dict(config=(64, "X", 128)),
            "VGG: config must be a sequence of positive ints or 'M'",
        ),
        ("vgg11", dict(hidden=0), "VGG: hidden must be a positive int"),
        (
            "rir18_wide",
            dict(layers_per_block=0),
            "RiR: layers_per_block must be a positive int",
        ),  # was: a shape error
        ("alexnet", dict(hidden=0), "AlexNet: hidden must be a positive int"),
        (
            "densenet_bc_100_12",
            dict(growth_rate="12"),
            "DenseNet: growth_rate must be a positive int",
        ),
        (
            "densenet_bc_100_12",
            dict(block_sizes=(16, 0, 16)),
            "DenseNet: block_sizes must be a sequence",
        ),
        ("dpn92", dict(k_r=0), "DPN: k_r must be a positive int"),
        ("dpn92", dict(increments=16), "DPN: increments must be a sequence"),
    ],
)
def test_bad_model_options_are_named(name, options, message):
    model = create(name, **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        abstract_apply(model, get_spec(name).input_shape)
