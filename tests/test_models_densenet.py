"""DenseNet: published parameter counts and multiply-adds, shapes, channel bookkeeping,
memory-efficient equivalence, and one real training step of a tiny DenseNet-BC."""

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from cnnjax import models
from cnnjax.analysis import summary
from cnnjax.models.densenet import DenseBlock, DenseLayer, DenseNet, cifar_bc_block_sizes
from cnnjax.nn import BatchNorm, Conv

# torchvision 0.29 densenet.py (REFERENCE.md): bias-free convs, BatchNorm with scale and bias,
# final Linear with bias, 1000 classes. Exact. DenseNet-264 (Table 1; torchvision has no builder
# for it) is counted from torchvision's DenseNet(32, (6, 12, 64, 48), 64).
TORCHVISION_COUNTS = {
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "densenet161": 28_681_000,
    "densenet264": 33_337_704,
}
# Huang et al. 2017, Table 2 (C10). 100-12 exact for the common PyTorch implementation (3x3 stem
# of 2k channels without BN, FC with bias); the others as printed, to the paper's 0.05M rounding.
CIFAR_BC_COUNTS = {
    "densenet_bc_100_12": (769_162, 0),
    "densenet_bc_250_24": (15_300_000, 50_000),
    "densenet_bc_190_40": (25_600_000, 50_000),
}
# torchvision's metadata at 224x224 ("GFLOPS" there are multiply-accumulates); densenet121's 2.834
# is checked in test_analysis.py.
TORCHVISION_GMACS = {"densenet169": 3.360, "densenet201": 4.291, "densenet161": 7.728}
# Width of the final feature map, torchvision's `classifier.in_features`; 342 for BC-100-12.
# DenseNet-264: (64 + 6k) / 2 = 128, (128 + 12k) / 2 = 256, (256 + 64k) / 2 = 1152, 1152 + 48k.
FINAL_CHANNELS = {
    "densenet121": 1024,
    "densenet169": 1664,
    "densenet201": 1920,
    "densenet161": 2208,
    "densenet264": 2688,
    "densenet_bc_100_12": 342,
}


@lru_cache(maxsize=None)
def _abstract(name, batch=2, **overrides):
    """(logits, variables) of a registered model as ShapeDtypeStructs: one trace, no compile."""
    spec = models.get_spec(name)
    model = models.create(name, **overrides)
    x = jax.ShapeDtypeStruct((batch, *spec.input_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)


def _count(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _random_variables(model, x, seed=0, **kwargs):
    """Variables of the right structure filled from NumPy (compiling the truncated-normal
    initialisers costs seconds per shape on CPU; the initialisers are not under test here)."""
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)
    rng = np.random.default_rng(seed)

    def fill(path, a):
        leaf = jax.tree_util.keystr(path)
        if "batch_stats" in leaf:
            return jnp.zeros(a.shape) if "mean" in leaf else jnp.ones(a.shape)
        fan_in = int(np.prod(a.shape[:-1])) if a.ndim > 1 else 1
        scale = 1.0 if "scale" in leaf else (0.1 if a.ndim == 1 else np.sqrt(2.0 / fan_in))
        base = 1.0 if "scale" in leaf else 0.0
        return jnp.asarray(base + scale * rng.standard_normal(a.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def test_every_densenet_is_tested():
    assert set(models.list_models("densenet*")) == set(TORCHVISION_COUNTS) | set(CIFAR_BC_COUNTS)


@pytest.mark.parametrize("name", sorted(TORCHVISION_COUNTS))
def test_imagenet_param_count_and_shape_match_torchvision(name):
    spec = models.get_spec(name)
    out, variables = _abstract(name)
    assert _count(variables["params"]) == TORCHVISION_COUNTS[name] == spec.reference_params
    assert spec.params_rtol == 0.0 and spec.input_shape == (224, 224, 3)
    assert out.shape == (2, 1000) and out.dtype == jnp.float32
    params = flatten_dict(variables["params"], sep="/")
    assert params["final_bn/scale"].shape == (FINAL_CHANNELS[name],)
    assert params["fc/kernel"].shape == (FINAL_CHANNELS[name], 1000)


@pytest.mark.parametrize("name", sorted(CIFAR_BC_COUNTS))
def test_cifar_bc_param_count_and_shape_match_paper(name):
    ref, tol = CIFAR_BC_COUNTS[name]
    spec = models.get_spec(name)
    out, variables = _abstract(name)
    n = _count(variables["params"])
    assert abs(n - ref) <= tol, (name, n, ref)
    assert spec.reference_params == ref and abs(spec.params_rtol * ref - tol) < 1
    assert out.shape == (2, 10) and out.dtype == jnp.float32
    assert spec.input_shape == (32, 32, 3)


def test_densenet121_channel_bookkeeping():
    """Block widths of torchvision's DenseNet-121: 64 + 6*32 = 256 -> 128, 128 +
    12*32 = 512 -> 256, ..."""
    _, variables = _abstract("densenet121")
    p = flatten_dict(variables["params"], sep="/")
    assert p["stem_conv/kernel"].shape == (7, 7, 3, 64)
    assert p["transition1/conv/kernel"].shape == (1, 1, 256, 128)
    assert p["transition2/conv/kernel"].shape == (1, 1, 512, 256)
    assert p["transition3/conv/kernel"].shape == (1, 1, 1024, 512)
    # Layer 16 of block 4 sees 512 + 15 * 32 channels; bottleneck 4k = 128, growth 32.
    assert p["block4/layer16/conv1/kernel"].shape == (1, 1, 992, 128)
    assert p["block4/layer16/conv2/kernel"].shape == (3, 3, 128, 32)
    assert "stem_bn/scale" in p and not any(k.endswith("bias") and "conv" in k for k in p)


def test_densenet264_layout():
    """Table 1's DenseNet-264: blocks of 6, 12, 64 and 48 layers with k = 32."""
    _, variables = _abstract("densenet264", batch=1)
    p = flatten_dict(variables["params"], sep="/")
    assert "block3/layer64/conv2/kernel" in p and "block3/layer65/conv2/kernel" not in p
    assert "block4/layer48/conv2/kernel" in p and "block4/layer49/conv2/kernel" not in p
    assert p["transition3/conv/kernel"].shape == (1, 1, 2304, 1152)
    assert p["block4/layer48/conv1/kernel"].shape == (1, 1, 1152 + 47 * 32, 128)


@pytest.mark.parametrize("name", sorted(TORCHVISION_GMACS))
def test_imagenet_macs_match_torchvision(name):
    assert round(summary(name).total_macs / 1e9, 3) == TORCHVISION_GMACS[name]


def test_cifar_bc_layout():
    assert cifar_bc_block_sizes(100) == (16, 16, 16)
    assert cifar_bc_block_sizes(250) == (41, 41, 41)
    assert cifar_bc_block_sizes(190) == (31, 31, 31)
    _, variables = _abstract("densenet_bc_100_12")
    p = flatten_dict(variables["params"], sep="/")
    assert p["stem_conv/kernel"].shape == (3, 3, 3, 24)
    assert not any(k.startswith("stem_bn") for k in p)  # no BN in the CIFAR stem
    # 24 + 16 * 12 = 216 -> 108; 108 + 192 = 300 -> 150; 150 + 192 = 342.
    assert p["transition1/conv/kernel"].shape == (1, 1, 216, 108)
    assert p["transition2/conv/kernel"].shape == (1, 1, 300, 150)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        cifar_bc_block_sizes(101)


def test_dense_block_concatenates_its_input_unchanged():
    block = DenseBlock(
        num_layers=3,
        growth_rate=2,
        bn_size=2,
        drop_rate=0.0,
        conv=partial(Conv, use_bias=False),
        norm=partial(BatchNorm, use_running_average=True),
        act=jax.nn.relu,
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 4)), jnp.float32)
    variables = _random_variables(block, x, train=False)
    y = jax.jit(partial(block.apply, train=False))(variables, x)
    assert y.shape == (2, 5, 5, 4 + 3 * 2)
    np.testing.assert_array_equal(np.asarray(y[..., :4]), np.asarray(x))


def test_minimum_input_size_and_bad_inputs():
    model = models.create("densenet121")
    assert model.min_input_size() == 29
    # The minimum depends only on the stem and the number of transitions: trace a
    # narrow twin at 29x29.
    narrow = DenseNet(num_classes=5, block_sizes=(1, 1, 1, 1), growth_rate=4)
    assert narrow.min_input_size() == 29
    smallest = jax.ShapeDtypeStruct((1, 29, 29, 3), jnp.float32)
    assert jax.eval_shape(
        lambda x: narrow.init_with_output(jax.random.key(0), x, train=False)[0], smallest
    ).shape == (1, 5)
    with pytest.raises(ValueError, match="at least 29x29"):
        model.init(jax.random.key(0), jnp.zeros((1, 28, 40, 3)), train=False)
    with pytest.raises(ValueError, match="rank 4"):
        model.init(jax.random.key(0), jnp.zeros((32, 32, 3)), train=False)
    cifar = models.create("densenet_bc_100_12")
    assert cifar.min_input_size() == 4
    with pytest.raises(ValueError, match="at least 4x4"):
        cifar.init(jax.random.key(0), jnp.zeros((1, 3, 3, 3)), train=False)
    with pytest.raises(ValueError, match="stem"):
        DenseNet(num_classes=2, stem="resnet").init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
        )


def test_bfloat16_compute_keeps_float32_params_and_logits():
    out, variables = _abstract("densenet_bc_100_12", dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert out.dtype == jnp.float32


def _tiny(**kw):
    # DenseNet-BC with L = 16 (two bottleneck layers per block), k = 4: the same code
    # as the named models.
    return DenseNet(
        num_classes=3, block_sizes=cifar_bc_block_sizes(16), growth_rate=4, stem="cifar", **kw
    )


def test_tiny_densenet_bc_trains_one_step_and_memory_efficient_matches():
    plain, remat = _tiny(), _tiny(memory_efficient=True)
    x = jnp.asarray(
        np.random.default_rng(1).standard_normal((2, 4, 4, 3)), jnp.float32
    )  # smallest valid size
    y = jnp.array([0, 2])
    variables = _random_variables(plain, x, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(
        _random_variables(remat, x, train=False)
    )

    def loss_and_grads(model, params):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (
                logits,
                updates,
            )

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    @jax.jit
    def both(params):
        return loss_and_grads(plain, params), loss_and_grads(remat, params)

    ((loss, (logits, updates)), grads), ((loss_r, _), grads_r) = both(variables["params"])
    assert np.isfinite(float(loss)) and logits.shape == (2, 3) and logits.dtype == jnp.float32
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)
    old, new = (
        flatten_dict(variables["batch_stats"], sep="/"),
        flatten_dict(updates["batch_stats"], sep="/"),
    )
    assert old.keys() == new.keys()
    for k in old:
        assert not np.allclose(old[k], new[k]), k
    # Rematerialisation recomputes the same function: same loss and gradients.
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):  # float32, differently fused
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_dense_layer_dropout():
    """Training mode zeroes outputs with the 'dropout' rng and scales
    survivors by 1 / (1 - rate)."""
    layer = DenseLayer(
        growth_rate=16,
        bn_size=2,
        drop_rate=0.5,
        conv=partial(Conv, use_bias=False),
        norm=partial(BatchNorm, use_running_average=True),
        act=jax.nn.relu,
    )
    inputs = [
        jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 3, c)), jnp.float32)
        for c in (4, 2)
    ]
    variables = _random_variables(layer, inputs, train=False)
    run = jax.jit(lambda key: layer.apply(variables, inputs, train=True, rngs={"dropout": key}))
    clean = np.asarray(layer.apply(variables, inputs, train=False))  # no rng needed in evaluation
    a, b = np.asarray(run(jax.random.key(0))), np.asarray(run(jax.random.key(1)))
    assert np.any(clean != 0)
    for out in (a, b):
        kept = out != 0
        np.testing.assert_allclose(out[kept], 2.0 * clean[kept], rtol=1e-4, atol=1e-6)
        assert 0.3 < kept[clean != 0].mean() < 0.7
    assert np.any((a != 0) != (b != 0))
