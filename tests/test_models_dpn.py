"""Dual Path Networks: the common port's exact parameter counts, the paper's multiply-adds, shapes,
dual-path wiring, and a training step of a tiny DPN."""

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from cnnjax import models
from cnnjax.analysis import summary
from cnnjax.models.dpn import DPN, DPN_CONFIGS, DualPathBlock
from cnnjax.nn import BatchNorm, Conv

from model_testing import jittered_variables, n_params

# REFERENCE.md (Chen et al. 2017, 1000 classes), exact for the common port (Cadene
# pretrainedmodels / timm dpn.py): bias-free convs, BN scale+bias, BN-ReLU-conv units, final
# BN-ReLU on the concatenated paths, 1x1-conv classifier with bias.
# timm's model cards round them to 12.61M, 37.67M, 61.57M, 86.92M and 79.25M.
COUNTS = {
    "dpn68": 12_611_602,
    "dpn92": 37_668_392,
    "dpn98": 61_570_728,
    "dpn107": 86_917_800,
    "dpn131": 79_254_504,
}
# Table 2 of Chen et al. 2017 at 224x224: "FLOPs" 6.5, 11.7 and 16.0 x 10^9, which are
# multiply-adds; DPN-107's 18.3 is the authors' (github.com/cypw/DPNs), not in the paper.
PAPER_GMACS = {"dpn92": 6.5, "dpn98": 11.7, "dpn131": 16.0, "dpn107": 18.3}
# Channels at the end: residual width + dense path, 2 * inc from the projection of stage 5's first
# block and inc from each of its 3 blocks: 2048 + 5 * 128 = 2688; the small DPN-68 512 + 5 * 64.
FINAL_CHANNELS = {"dpn68": 832, "dpn92": 2688, "dpn98": 2688, "dpn107": 2688, "dpn131": 2688}


@lru_cache(maxsize=None)
def _abstract(name, batch=2, size=None, **overrides):
    """(logits, variables) as ShapeDtypeStructs: one trace, no compile."""
    spec = models.get_spec(name)
    h, w, c = spec.input_shape
    x = jax.ShapeDtypeStruct((batch, size or h, size or w, c), jnp.float32)
    model = models.create(name, **overrides)
    return jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)


def test_every_dpn_is_tested():
    assert set(models.list_models("dpn*")) == set(COUNTS)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_param_count_and_output_shape(name):
    spec = models.get_spec(name)
    logits, variables = _abstract(name)
    assert (
        n_params(variables["params"]) == COUNTS[name] == spec.reference_params
        and spec.params_rtol == 0.0
    )
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    p = flatten_dict(variables["params"], sep="/")
    c = FINAL_CHANNELS[name]  # the port's `in_chs`
    assert p["final_bn/scale"].shape == (c,)
    assert p["classifier/kernel"].shape == (1, 1, c, 1000) and p["classifier/bias"].shape == (1000,)
    assert not any(k.endswith("bias") for k in p if "/conv/" in k or k.startswith("stem_conv"))


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_multiply_adds_match_the_paper(name):
    assert round(summary(name).total_macs / 1e9, 1) == PAPER_GMACS[name]


def test_dpn92_stage_layout():
    """Widths of Table 1: bottleneck 96 * 2**s, 32 groups, residual 256 * 2**s,
    dense +16/+32/+24/+128."""
    _, variables = _abstract("dpn92")
    p = flatten_dict(variables["params"], sep="/")
    assert p["stem_conv/kernel"].shape == (7, 7, 3, 64)
    # Stage 2: the stride-1 projection of the 64-channel stem to 256 + 2 * 16.
    assert p["stage2_block1/proj/conv/kernel"].shape == (1, 1, 64, 288)
    # Stage 3 starts from 256 + 3 * 16 + 2 * 16 = 336 channels (after blocks 2-3 of stage 2).
    assert p["stage3_block1/proj/conv/kernel"].shape == (1, 1, 336, 512 + 2 * 32)
    # Grouped 3x3 of stage 4: 384 channels in 32 groups of 12.
    assert p["stage4_block1/conv2/conv/kernel"].shape == (3, 3, 12, 384)
    assert p["stage4_block20/conv3/conv/kernel"].shape == (1, 1, 384, 1024 + 24)
    assert "stage5_block3/conv1/bn/scale" in p and "stage5_block4/conv1/bn/scale" not in p
    assert not any(k.startswith("stage2_block2/proj") for k in p)
    # DPN-98: 96-channel stem, 40 groups of 4 in stage 2's 160-channel 3x3.
    _, v98 = _abstract("dpn98")
    p98 = flatten_dict(v98["params"], sep="/")
    assert p98["stem_conv/kernel"].shape == (7, 7, 3, 96)
    assert p98["stage2_block1/conv2/conv/kernel"].shape == (3, 3, 4, 160)
    assert DPN_CONFIGS[98]["block_sizes"] == (3, 6, 20, 3)


def test_dpn68_small_layout():
    """timm's small DPN-68: a 10-channel 3x3/2 stem, residual 64 * 2**s, bottleneck 128 * 2**s in
    32 groups, dense +16/+32/+32/+64."""
    _, variables = _abstract("dpn68", batch=1)
    p = flatten_dict(variables["params"], sep="/")
    assert p["stem_conv/kernel"].shape == (3, 3, 3, 10)
    assert p["stage2_block1/proj/conv/kernel"].shape == (1, 1, 10, 64 + 2 * 16)
    assert p["stage2_block1/conv2/conv/kernel"].shape == (3, 3, 4, 128)
    # Stage 5 starts from 256 + 3 * 32 + 11 * 32 channels, projected to 512 + 2 * 64.
    assert p["stage5_block1/proj/conv/kernel"].shape == (1, 1, 256 + 14 * 32, 512 + 2 * 64)
    assert p["stage5_block3/conv3/conv/kernel"].shape == (1, 1, 1024, 512 + 64)
    assert "stage4_block12/conv1/bn/scale" in p and "stage4_block13/conv1/bn/scale" not in p
    with pytest.raises(ValueError, match="stem_kernel must be odd"):
        DPN(num_classes=2, stem_kernel=4).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False
        )


def test_dual_path_block_adds_the_residual_path_and_extends_the_dense_path():
    """Non-projecting block: residual_out = residual_in + y[:, :C], dense_out =
    [dense_in, y[:, C:]]."""
    block = DualPathBlock(
        bottleneck=8,
        out_features=6,
        inc=3,
        groups=2,
        conv=partial(Conv, use_bias=False),
        norm=partial(BatchNorm, use_running_average=True),
        act=jax.nn.relu,
    )
    rng = np.random.default_rng(0)
    resid = jnp.asarray(rng.standard_normal((2, 5, 5, 6)), jnp.float32)
    dense = jnp.asarray(rng.standard_normal((2, 5, 5, 4)), jnp.float32)
    variables = jittered_variables(block, (resid, dense))
    apply = jax.jit(block.apply)
    r_out, d_out = apply(variables, (resid, dense))
    assert r_out.shape == (2, 5, 5, 6) and d_out.shape == (2, 5, 5, 7)
    np.testing.assert_array_equal(np.asarray(d_out[..., :4]), np.asarray(dense))
    # With the last conv zeroed, the residual path is the identity and the new dense channels are 0.
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, a: (
            jnp.zeros_like(a) if [k.key for k in path][-3:] == ["conv3", "conv", "kernel"] else a
        ),
        variables,
    )
    r0, d0 = apply(zeroed, (resid, dense))
    np.testing.assert_array_equal(np.asarray(r0), np.asarray(resid))
    np.testing.assert_array_equal(np.asarray(d0[..., 4:]), 0.0)
    assert not np.allclose(r_out, resid)


def _tiny():
    # The large-DPN layout with small widths: 8-channel stem, k_r 8 in 2 groups, residual 8 * 2**s.
    return DPN(
        num_classes=3,
        num_init_features=8,
        k_r=8,
        groups=2,
        block_sizes=(1, 2, 1, 1),
        increments=(2, 2, 2, 2),
        base_width=8,
        drop_rate=0.0,
    )


def test_tiny_dpn_trains_one_step():
    model = _tiny()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 3)), jnp.float32)
    y = jnp.array([0, 2])
    variables = jittered_variables(model, x, train=False)

    @jax.jit
    def step(params):
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

    (loss, (logits, updates)), grads = step(variables["params"])
    assert np.isfinite(float(loss)) and logits.shape == (2, 3) and logits.dtype == jnp.float32
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)
    old, new = (
        flatten_dict(variables["batch_stats"], sep="/"),
        flatten_dict(updates["batch_stats"], sep="/"),
    )
    assert old.keys() == new.keys() and all(not np.allclose(old[k], new[k]) for k in old)


def test_bad_inputs():
    model = models.create("dpn92")
    assert model.min_input_size() == 1
    with pytest.raises(ValueError, match="at least 1x1 pixels"):
        model.init(jax.random.key(0), jnp.zeros((1, 0, 8, 3)), train=False)
    with pytest.raises(ValueError, match="rank 4"):
        model.init(jax.random.key(0), jnp.zeros((224, 224, 3)), train=False)
    with pytest.raises(ValueError, match="4 entries"):
        DPN(num_classes=2, block_sizes=(1, 1, 1)).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False
        )


def test_tiny_resolution_and_bfloat16():
    # 32x32 leaves a 1x1 map at stride 32; bf16 compute keeps float32 parameters, stats and logits.
    logits, variables = _abstract("dpn92", size=32, dtype=jnp.bfloat16)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_dpn92_forward_backward_at_32():
    model = models.create("dpn92", num_classes=4)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)
    variables = jittered_variables(model, x, train=False)

    @jax.jit
    def grads(params):
        def loss_fn(p):
            logits, _ = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 3])).mean()

        return jax.value_and_grad(loss_fn)(params)

    loss, g = grads(variables["params"])
    assert np.isfinite(float(loss))
    assert all(np.any(np.asarray(a) != 0) for a in jax.tree.leaves(g))
