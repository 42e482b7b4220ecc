"""Inception-v4 and Inception-ResNet-v2: the port's exact parameter counts, the paper's feature-map
sizes and receptive fields, branch pooling against NumPy, residual scaling, and training steps."""

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from cnnjax import models
from cnnjax.analysis.receptive_field import receptive_field
from cnnjax.models.inception_v4 import (
    AVG,
    MAX,
    C,
    ConvBN,
    Fork,
    InceptionBlock,
    InceptionResNetV2,
    InceptionV4,
)
from cnnjax.nn import BatchNorm, Conv

from model_testing import jittered_variables, n_params

# REFERENCE.md (Szegedy et al. 2016 as ported from TF-slim by Cadene pretrainedmodels / timm), exact
# with 1000 classes (not the checkpoints' 1001): bias-free convs + BN with scale and bias, residual
# 1x1 projections with bias, FC with bias, no auxiliary head.
COUNTS = {"inception_v4": 42_679_816, "inception_resnet_v2": 55_843_464}
# Grid sizes and widths of Figures 9 and 15 (Inception-ResNet-v2 with TF-slim's
# 320/1088/2080 widths).
MAPS = {
    "inception_v4": {
        "stem_mixed_5a": (35, 35, 384),
        "inception_a4": (35, 35, 384),
        "reduction_a": (17, 17, 1024),
        "inception_b7": (17, 17, 1024),
        "reduction_b": (8, 8, 1536),
        "inception_c3": (8, 8, 1536),
    },
    "inception_resnet_v2": {
        "stem_mixed_5b": (35, 35, 320),
        "block_a10": (35, 35, 320),
        "reduction_a": (17, 17, 1088),
        "block_b20": (17, 17, 1088),
        "reduction_b": (8, 8, 2080),
        "block_c10": (8, 8, 2080),
        "final_conv": (8, 8, 1536),
    },
}


@lru_cache(maxsize=None)
def _abstract(name, size=None, **overrides):
    """(logits, variables with the captured block outputs) as ShapeDtypeStructs:
    one trace, no compile."""
    spec = models.get_spec(name)
    h, w, c = spec.input_shape
    model = models.create(name, **overrides)
    x = jax.ShapeDtypeStruct((2, size or h, size or w, c), jnp.float32)
    capture = lambda mdl, _: mdl.name in MAPS[name]  # noqa: E731
    return jax.eval_shape(
        lambda x: model.init_with_output(
            jax.random.key(0), x, train=False, capture_intermediates=capture
        ),
        x,
    )


def test_every_model_is_tested():
    assert {n for n in models.list_models() if models.get_spec(n).family == "inception_v4"} == set(
        COUNTS
    )


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_param_count_output_and_feature_map_shapes(name):
    spec = models.get_spec(name)
    logits, variables = _abstract(name)
    assert (
        n_params(variables["params"]) == COUNTS[name] == spec.reference_params
        and spec.params_rtol == 0.0
    )
    assert spec.input_shape == (299, 299, 3) and spec.num_classes == 1000
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    captured = {k: v["__call__"][0].shape for k, v in variables["intermediates"].items()}
    assert captured == {k: (2, *v) for k, v in MAPS[name].items()}
    p = flatten_dict(variables["params"], sep="/")
    assert p["fc/kernel"].shape == (1536, 1000)
    assert p["stem_conv1/conv/kernel"].shape == (3, 3, 3, 32)
    assert all(
        k.endswith("kernel") or "/bn/" in k or k.startswith("fc/") or "proj_conv" in k for k in p
    )


@pytest.mark.parametrize("name,size", [("inception_v4", 2071), ("inception_resnet_v2", 3039)])
def test_receptive_field_of_the_final_features_matches_araujo(name, size):
    # Araujo et al. 2019 (REFERENCE.md), computed on the TF-slim models: receptive field of the last
    # feature map (the input of global pooling) and effective stride 32.
    rows = receptive_field(models.create(name), models.get_spec(name).input_shape)
    pool = [r for r in rows if r.type == "GlobalAvgPool"][-1]
    assert pool.input_size == (size, size) and pool.input_stride == (32, 32)


def test_inception_resnet_v2_residual_projections():
    _, variables = _abstract("inception_resnet_v2")
    p = flatten_dict(variables["params"], sep="/")
    # Concatenated branches 32+32+64, 192+192, 192+256, projected back with a biased 1x1 conv.
    assert p["block_a1/proj_conv/kernel"].shape == (1, 1, 128, 320) and p[
        "block_a1/proj_conv/bias"
    ].shape == (320,)
    assert p["block_b1/proj_conv/kernel"].shape == (1, 1, 384, 1088)
    assert p["block_c10/proj_conv/kernel"].shape == (1, 1, 448, 2080)
    assert "block_a11/proj_conv/kernel" not in p and "block_b20/proj_conv/kernel" in p


def test_minimum_input_size_and_bad_inputs():
    for name, cls in (("inception_v4", InceptionV4), ("inception_resnet_v2", InceptionResNetV2)):
        assert cls.min_input_size() == 75
        logits, _ = _abstract(name, size=75, num_classes=7)
        assert logits.shape == (2, 7)
        with pytest.raises(ValueError, match="at least 75x75"):
            models.create(name).init(jax.random.key(0), jnp.zeros((1, 74, 299, 3)), train=False)
        with pytest.raises(ValueError, match="rank 4"):
            models.create(name).init(jax.random.key(0), jnp.zeros((299, 299, 3)), train=False)


def _naive_pool(x, k, s, pad, op):
    """3x3 pooling from the definition; padded cells are excluded (max: -inf;
    average: not counted)."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=np.nan)
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    out = np.zeros((n, ho, wo, c), np.float32)
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = op(xp[:, i * s : i * s + k, j * s : j * s + k], axis=(1, 2))
    return out


def _block(branches, **kw):
    conv = partial(Conv, use_bias=False)
    norm = partial(BatchNorm, use_running_average=True)
    return InceptionBlock(
        branches,
        conv_bn=partial(ConvBN, conv=conv, norm=norm, act=jax.nn.relu),
        conv=conv,
        act=jax.nn.relu,
        **kw,
    )


def test_branch_pools_and_concatenation_order_match_numpy():
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3)).astype(np.float32)
    # Mixed-3a-like: [3x3/2 max pool | 3x3/2 conv], then an average-pool branch
    # (padding not counted).
    block = _block(((MAX,), (C(4, 3, 2),)))
    y = block.apply(jittered_variables(block, x), x)
    assert y.shape == (2, 3, 3, 3 + 4)
    np.testing.assert_allclose(y[..., :3], _naive_pool(x, 3, 2, 0, np.nanmax), rtol=1e-6)
    avg = _block(((AVG,), (AVG,)))
    np.testing.assert_allclose(
        avg.apply({}, x),
        np.concatenate([_naive_pool(x, 3, 1, 1, np.nanmean)] * 2, -1),
        rtol=1e-5,
        atol=1e-6,
    )
    fork = _block(((C(2, 1), Fork((C(3, (1, 3), 1, (0, 1)),), (C(5, (3, 1), 1, (1, 0)),))),))
    v = jittered_variables(fork, x)
    assert fork.apply(v, x).shape == (2, 7, 7, 8)
    assert set(v["params"]) == {"branch0_0", "branch0_1a_0", "branch0_1b_0"}


def test_residual_block_scales_the_projected_branches():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 5, 6)), jnp.float32)
    branches = ((C(4, 1),), (C(3, 1), C(4, 3, 1, 1)))
    linear = {s: _block(branches, residual_scale=s, activate=False) for s in (0.0, 0.17, 1.0)}
    v = jittered_variables(linear[1.0], x)
    assert v["params"]["proj_conv"]["kernel"].shape == (1, 1, 8, 6)
    out = {s: m.apply(v, x) for s, m in linear.items()}
    np.testing.assert_array_equal(out[0.0], x)
    np.testing.assert_allclose(out[0.17] - x, 0.17 * (out[1.0] - x), rtol=1e-5, atol=1e-6)
    relu = _block(branches, residual_scale=0.17).apply(v, x)
    np.testing.assert_allclose(relu, np.maximum(out[0.17], 0.0), rtol=1e-6)


def test_residual_block_forward_backward():
    block = _block(
        ((C(4, 1),), (C(3, 1), C(4, (1, 3), 1, (0, 1)), C(4, (3, 1), 1, (1, 0)))),
        residual_scale=0.2,
    )
    block = block.clone(
        conv_bn=partial(
            ConvBN,
            conv=partial(Conv, use_bias=False),
            norm=partial(BatchNorm, use_running_average=False),
            act=jax.nn.relu,
        )
    )
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 5, 6)), jnp.float32)
    v = jittered_variables(block, x)

    @jax.jit
    def grads(params):
        def loss_fn(p):
            y, updates = block.apply(
                {"params": p, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"]
            )
            return jnp.mean(jnp.square(y - 1.0)), updates

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, updates), g = grads(v["params"])
    assert np.isfinite(float(loss))
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        assert np.all(np.isfinite(a)) and np.any(np.asarray(a) != 0), jax.tree_util.keystr(path)
    assert not np.allclose(flatten_dict(updates)[("batch_stats", "branch0_0", "bn", "mean")], 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [InceptionV4, InceptionResNetV2])
def test_one_block_per_stage_trains_at_75(cls):
    # Every block type once, at the smallest valid resolution: the named models' code at a
    # fraction of the compile.
    model = cls(num_classes=3, num_blocks=(1, 1, 1))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 75, 75, 3)), jnp.float32)
    y = jnp.array([0, 2])
    v = jittered_variables(model, x, train=False)

    @jax.jit
    def step(params, key):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": v["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (
                logits,
                updates,
            )

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, (logits, updates)), g = step(v["params"], jax.random.key(0))
    assert np.isfinite(float(loss)) and logits.shape == (2, 3) and logits.dtype == jnp.float32
    for path, a in jax.tree_util.tree_leaves_with_path(g):
        assert np.all(np.isfinite(a)) and np.any(np.asarray(a) != 0), jax.tree_util.keystr(path)
    old, new = flatten_dict(v["batch_stats"]), flatten_dict(updates["batch_stats"])
    assert old.keys() == new.keys() and all(not np.allclose(old[k], new[k]) for k in old)
