"""cnnjax.nn: the linen modules own the right parameters and call the functional core."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import functional as F
from cnnjax import nn as cnn


def _init(module, x, **kw):
    return module.init(jax.random.key(0), x, **kw)


def test_conv_parameters_and_equivalence_with_functional():
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 6))
    conv = cnn.Conv(8, (3, 5), strides=2, padding=((1, 1), (2, 2)), groups=2)
    v = _init(conv, x)
    assert v["params"]["kernel"].shape == (3, 5, 3, 8) and v["params"]["bias"].shape == (8,)
    want = F.conv2d(
        x, v["params"]["kernel"], v["params"]["bias"], stride=2, padding=((1, 1), (2, 2)), groups=2
    )
    np.testing.assert_allclose(np.asarray(conv.apply(v, x)), np.asarray(want), atol=1e-6)
    assert "bias" not in _init(cnn.Conv(8, 3, use_bias=False), x)["params"]


def test_conv_default_init_is_he_fan_out():
    # ResNet paper / torchvision: std = sqrt(2 / (k * k * C_out)).
    v = _init(cnn.Conv(256, 3), jnp.zeros((1, 8, 8, 64)))
    std = float(np.std(np.asarray(v["params"]["kernel"])))
    assert abs(std - np.sqrt(2 / (9 * 256))) / np.sqrt(2 / (9 * 256)) < 0.02
    v = _init(cnn.Conv(256, 3, kernel_init="he_normal_fan_in"), jnp.zeros((1, 8, 8, 64)))
    assert abs(
        float(np.std(np.asarray(v["params"]["kernel"]))) - np.sqrt(2 / (9 * 64))
    ) < 0.02 * np.sqrt(2 / (9 * 64))


def test_dense_and_flatten():
    x = jax.random.normal(jax.random.key(2), (3, 2, 2, 5))
    model = nn.Sequential([cnn.Flatten(), cnn.Dense(7)])
    v = _init(model, x)
    assert v["params"]["layers_1"]["kernel"].shape == (20, 7)
    p = v["params"]["layers_1"]
    np.testing.assert_allclose(
        np.asarray(model.apply(v, x)),
        np.asarray(x.reshape(3, 20) @ p["kernel"] + p["bias"]),
        atol=1e-5,
    )


def test_batchnorm_module_train_updates_stats_eval_uses_them():
    x = jax.random.normal(jax.random.key(3), (16, 4, 4, 3)) * 2 + 5
    bn = cnn.BatchNorm()
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    assert set(v["batch_stats"]) == {"mean", "var"} and set(v["params"]) == {"scale", "bias"}
    # Initialisation must not move the running averages.
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["mean"]), 0)
    y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    xn = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * xn.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(upd["batch_stats"]["var"]), 0.9 + 0.1 * xn.var(0), rtol=1e-4
    )
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3).mean(0), 0, atol=1e-4)
    v2 = {"params": v["params"], "batch_stats": upd["batch_stats"]}
    y_eval = bn.apply(v2, x, use_running_average=True)
    rm, rv = upd["batch_stats"]["mean"], upd["batch_stats"]["var"]
    np.testing.assert_allclose(
        np.asarray(y_eval), np.asarray((x - rm) / jnp.sqrt(rv + 1e-5)), atol=1e-4
    )
    with pytest.raises(ValueError):
        bn.apply(v, x)  # train mode must be explicit


def test_batchnorm_axis_name_syncs_statistics_across_devices():
    x = jax.random.normal(jax.random.key(4), (8, 2, 2, 3))
    bn = cnn.BatchNorm(axis_name="batch")
    v = bn.init(jax.random.key(0), x, use_running_average=False)

    def f(xs):
        return bn.apply(v, xs, use_running_average=False, mutable=["batch_stats"])

    y_sync, upd = jax.vmap(f, axis_name="batch")(x.reshape(4, 2, 2, 2, 3))
    y_one, upd_one = cnn.BatchNorm().apply(v, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y_sync).reshape(8, 2, 2, 3), np.asarray(y_one), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(upd["batch_stats"]["mean"][2]),
        np.asarray(upd_one["batch_stats"]["mean"]),
        atol=1e-6,
    )
    # Without the axis, each shard normalises by its own statistics: different outputs.
    y_local, _ = jax.vmap(
        lambda xs: cnn.BatchNorm().apply(v, xs, use_running_average=False, mutable=["batch_stats"])
    )(x.reshape(4, 2, 2, 2, 3))
    assert np.abs(np.asarray(y_local).reshape(8, 2, 2, 3) - np.asarray(y_one)).max() > 1e-2


def test_batchnorm_bf16_compute_keeps_float32_state():
    x = jnp.ones((4, 2, 2, 3), jnp.bfloat16)
    bn = cnn.BatchNorm(dtype=jnp.bfloat16)
    v = bn.init(jax.random.key(0), x, use_running_average=False)
    y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and upd["batch_stats"]["mean"].dtype == jnp.float32


def test_dropout_module_uses_dropout_rng():
    x = jnp.ones((4, 100))
    d = cnn.Dropout(0.5)
    y1 = d.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    y2 = d.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.array_equal(np.asarray(y1), np.asarray(y2))
    assert np.array_equal(np.asarray(d.apply({}, x, deterministic=True)), np.asarray(x))


def test_pool_and_lrn_modules_match_functional():
    x = jax.random.normal(jax.random.key(5), (2, 7, 7, 6))
    np.testing.assert_array_equal(
        np.asarray(cnn.MaxPool(3, 2, ceil_mode=True).apply({}, x)),
        np.asarray(F.max_pool(x, 3, 2, ceil_mode=True)),
    )
    np.testing.assert_array_equal(
        np.asarray(cnn.AvgPool(3, 1, 1, count_include_pad=False).apply({}, x)),
        np.asarray(F.avg_pool(x, 3, 1, 1, count_include_pad=False)),
    )
    assert cnn.GlobalAvgPool().apply({}, x).shape == (2, 6)
    np.testing.assert_array_equal(
        np.asarray(cnn.LocalResponseNorm().apply({}, x)),
        np.asarray(F.local_response_norm(x, 5, 1e-4, 0.75, 2.0)),
    )


@pytest.mark.parametrize(
    "module,x,words",
    [
        (cnn.Conv(4, 3), jnp.zeros((8, 8, 3)), ["rank 4"]),
        (cnn.Conv(4, 3, groups=2), jnp.zeros((1, 8, 8, 3)), ["groups=2", "input channels 3"]),
        (cnn.Conv(4, 9), jnp.zeros((1, 4, 4, 3)), ["kernel", "larger"]),
        (
            cnn.Conv(4, 3, kernel_init="he_weird"),
            jnp.zeros((1, 4, 4, 3)),
            ["he_weird", "he_normal_fan_out"],
        ),
    ],
)
def test_bad_module_input(module, x, words):
    with pytest.raises(ValueError) as info:
        module.init(jax.random.key(0), x)
    for w in words:
        assert w in str(info.value)


def test_conv_channel_mismatch_at_apply_is_reported():
    conv = cnn.Conv(4, 3)
    v = conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(Exception) as info:
        conv.apply(v, jnp.zeros((1, 8, 8, 5)))
    assert "kernel" in str(info.value)


@pytest.mark.parametrize(
    "module,x,kw,words",
    [
        (cnn.Conv(4, groups="1"), jnp.zeros((1, 6, 6, 3)), {}, ["groups", "positive int", "'1'"]),
        (cnn.Conv(4, groups=1.0), jnp.zeros((1, 6, 6, 3)), {}, ["groups", "positive int", "1.0"]),
        (cnn.Conv(4, groups=True), jnp.zeros((1, 6, 6, 3)), {}, ["groups", "positive int"]),
        (cnn.Conv(True), jnp.zeros((1, 6, 6, 3)), {}, ["features", "positive int"]),
        (cnn.Dense(0), jnp.zeros((2, 3)), {}, ["features", "positive int", "0"]),
        (cnn.Dense(-1), jnp.zeros((2, 3)), {}, ["features", "positive int", "-1"]),
        (cnn.Dense(2.5), jnp.zeros((2, 3)), {}, ["features", "positive int", "2.5"]),
        (
            cnn.BatchNorm(epsilon=-5),
            jnp.zeros((2, 3)),
            {"use_running_average": False},
            ["epsilon", "> 0", "-5"],
        ),
        (
            cnn.BatchNorm(epsilon=-5),
            jnp.zeros((2, 3)),
            {"use_running_average": True},
            ["epsilon", "> 0"],
        ),
        (cnn.BatchNorm(use_running_average=True), jnp.float32(1.0), {}, ["x", "(N, C)", "()"]),
        (cnn.BatchNorm(use_running_average=False), jnp.zeros(3), {}, ["x", "(N, C)", "(3,)"]),
        (cnn.Dropout("0.5"), jnp.zeros((2, 3)), {"deterministic": False}, ["rate", "'0.5'"]),
        (cnn.LocalResponseNorm(k=0.0), jnp.zeros((1, 2, 2, 3)), {}, ["k", "> 0"]),
    ],
)
def test_audit_bad_module_arguments_raise_one_clear_value_error(module, x, kw, words):
    with pytest.raises(ValueError) as info:
        module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, **kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_numpy_integer_module_arguments_are_accepted():
    x = jnp.ones((1, 6, 6, 4))
    v = cnn.Conv(np.int64(4), 3, groups=np.int64(2)).init(jax.random.key(0), x)
    assert v["params"]["kernel"].shape == (3, 3, 2, 4)
    assert cnn.Dense(np.int32(3)).init(jax.random.key(0), jnp.ones((2, 5)))["params"][
        "kernel"
    ].shape == (5, 3)
