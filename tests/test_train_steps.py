"""The per-device steps on one device: losses, metrics, auxiliary heads, bfloat16, NaN handling,
and a short run on the digits whose loss must fall well below chance."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import train
from cnnjax.train import metrics as metrics_lib
from cnnjax.train.config import TrainConfig

from helpers_train.tiny import TinyCNN, digits_config

SHAPE, CLASSES = (8, 8, 3), 10


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_with_label_smoothing_against_numpy():
    rs = np.random.RandomState(0)
    logits, labels = rs.randn(6, 5).astype(np.float32) * 3, rs.randint(0, 5, 6).astype(np.int32)
    for eps in (0.0, 0.1):
        target = np.eye(5)[labels] * (1 - eps) + eps / 5
        want = -(target * np_log_softmax(logits)).sum(-1)
        np.testing.assert_allclose(
            train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps), want, rtol=1e-5
        )
    with pytest.raises(ValueError, match="logits must be"):
        train.cross_entropy(jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))


def test_top_k_error_against_numpy_sort():
    rs = np.random.RandomState(1)
    logits, labels = rs.randn(50, 10).astype(np.float32), rs.randint(0, 10, 50).astype(np.int32)
    for k in (1, 5):
        top = np.argsort(-logits, axis=-1)[:, :k]
        want = np.array([lab not in row for lab, row in zip(labels, top)], np.float32)
        np.testing.assert_array_equal(
            train.top_k_error(jnp.asarray(logits), jnp.asarray(labels), k), want
        )
    # Fewer than five classes: top-5 error is zero.
    assert (
        float(jnp.sum(train.top_k_error(jnp.asarray(logits[:, :3]), jnp.asarray(labels % 3), 5)))
        == 0
    )


def make(model, lr=0.1, momentum=0.0, weight_decay=0.0, **kw):
    config = TrainConfig(
        model="tiny",
        num_steps=10,
        learning_rate=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule="constant",
        **kw,
    )
    lr_fn = train.create_learning_rate_fn(config, 1)
    tx = train.create_optimizer(config, lr_fn)
    state = train.create_train_state(jax.random.key(0, impl="rbg"), model, tx, SHAPE)
    return config, lr_fn, tx, state


def batch(n=8, seed=0):
    rs = np.random.RandomState(seed)
    return {
        "image": rs.randn(n, *SHAPE).astype(np.float32),
        "label": rs.randint(0, CLASSES, n).astype(np.int32),
    }


@pytest.fixture(scope="module")
def aux_setup():
    model = TinyCNN(CLASSES, aux_head=True)
    return (model, *make(model, aux_weight=0.3))


def test_init_creates_aux_params_and_untouched_batch_stats(aux_setup):
    model, config, lr_fn, tx, state = aux_setup
    assert set(state.params) == {"conv1", "bn1", "conv2", "bn2", "fc", "aux_fc"}
    for stats in state.batch_stats.values():
        np.testing.assert_array_equal(stats["mean"], 0.0)
        np.testing.assert_array_equal(stats["var"], 1.0)
    assert int(state.step) == 0 and state.rng.dtype == jnp.uint32


def test_train_step_is_sgd_on_the_main_plus_weighted_aux_loss(aux_setup):
    model, config, lr_fn, tx, state = aux_setup
    b = batch()
    step = jax.jit(
        train.make_train_step(model, tx, lr_fn, aux_weight=0.3, axis_name=None, rng_impl="rbg")
    )

    def reference_loss(params):  # written from the definitions, with a NumPy-style log-softmax
        (logits, (aux,)), _ = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            b["image"],
            train=True,
            mutable=["batch_stats"],
        )

        def nll(z):
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), b["label"][:, None], 1))

        return nll(logits) + 0.3 * nll(aux), nll(logits)

    grads, main_loss = jax.jit(jax.grad(reference_loss, has_aux=True))(state.params)
    new, metrics = step(state, b)
    for p, g, q in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(grads), jax.tree.leaves(new.params)
    ):
        np.testing.assert_allclose(q, p - 0.1 * g, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(grads["aux_fc"]["kernel"]))) > 0  # the aux head trains
    np.testing.assert_allclose(metrics["loss"], main_loss, rtol=1e-6)
    assert set(metrics) == {"loss", "error", "top5_error", "aux_loss", "lr"}
    assert int(new.step) == 1 and float(metrics["lr"]) == pytest.approx(0.1)
    # BatchNorm statistics moved towards the batch's: 0.9 * 1 + 0.1 * var.
    assert not np.allclose(new.batch_stats["bn1"]["var"], 1.0)
    # Without the aux weight, the aux head receives no gradient.
    step0 = jax.jit(
        train.make_train_step(model, tx, lr_fn, aux_weight=0.0, axis_name=None, rng_impl="rbg")
    )
    new0, _ = step0(state, b)
    np.testing.assert_array_equal(new0.params["aux_fc"]["kernel"], state.params["aux_fc"]["kernel"])


def test_eval_step_masks_padding_against_numpy(aux_setup):
    model, config, lr_fn, tx, state = aux_setup
    b = batch(8, seed=3)
    b["mask"] = np.arange(8) < 5
    sums = jax.jit(train.make_eval_step(model, axis_name=None))(state, b)
    logits = np.asarray(model.apply(state.variables, b["image"][:5], train=False))
    nll = -np_log_softmax(logits)[np.arange(5), b["label"][:5]]
    assert float(sums["count"]) == 5
    np.testing.assert_allclose(sums["loss"], nll.sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["error"], np.sum(logits.argmax(-1) != b["label"][:5]))


def test_bfloat16_compute_keeps_float32_params_and_statistics():
    model32, model16 = TinyCNN(CLASSES), TinyCNN(CLASSES, dtype=jnp.bfloat16)
    _, lr_fn, tx, state = make(model32)
    b = batch()
    new32, m32 = jax.jit(train.make_train_step(model32, tx, lr_fn, axis_name=None, rng_impl="rbg"))(
        state, b
    )
    new16, m16 = jax.jit(train.make_train_step(model16, tx, lr_fn, axis_name=None, rng_impl="rbg"))(
        state, b
    )
    for leaf in jax.tree.leaves((new16.params, new16.batch_stats)):
        assert leaf.dtype == jnp.float32
    assert m16["loss"].dtype == jnp.float32
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # the bfloat16 path really ran


def test_meter_stops_at_the_first_non_finite_loss():
    meter = metrics_lib.Meter()
    meter.add(1, {"loss": np.float32(2.0), "error": np.float32(0.5)})
    meter.add(2, {"loss": np.float32(np.nan), "error": np.float32(0.5)})
    with pytest.raises(train.NonFiniteLossError, match="nan at step 2"):
        meter.flush(lambda tree: tree)


def test_meter_state_is_a_snapshot():
    # The checkpointer writes a step's metadata asynchronously while the next steps are added: the
    # state must not change with them (it did, and a resumed run logged doubled metrics).
    meter = metrics_lib.Meter()
    saved = meter.state()
    meter.add(11, {"loss": np.float32(2.0), "error": np.float32(0.5)})
    meter.flush(lambda tree: tree)
    assert saved == {"sums": {}, "count": 0}
    restored = metrics_lib.Meter.from_state(saved)
    restored.add(11, {"loss": np.float32(2.0), "error": np.float32(0.5)})
    restored.flush(lambda tree: tree)
    assert restored.means() == meter.means() == {"loss": 2.0, "error": 0.5}


def test_checkpoint_metadata_is_snapshotted_at_save(tmp_path):
    meta = {"meter": {"sums": {}, "count": 0}}
    with train.Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        state = {"w": np.ones(3, np.float32)}
        ckpt.save(10, state, meta)
        meta["meter"]["sums"]["loss"] = 99.0  # changed while the save may still be in flight
        ckpt.wait()
        _, restored = ckpt.restore(state, 10)
    assert restored["meter"] == {"sums": {}, "count": 0}


def test_digits_loss_falls_well_below_chance_and_metrics_are_recorded(tmp_path):
    config = digits_config(
        num_steps=300,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        parallel="none",
        log_every=50,
        eval_every=150,
        checkpoint_every=150,
        rng_impl="rbg",
    )
    result = train.train_and_evaluate(config, str(tmp_path), model_fn=TinyCNN)
    chance = math.log(10)
    assert result.step == 300 and not result.preempted and result.resumed_from == 0
    assert result.metrics["test_loss"] < 0.25 * chance, result.metrics
    assert result.metrics["test_error"] < 0.15, result.metrics
    records = train.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in records] == [50, 100, 150, 200, 250, 300]
    assert records[0]["train_loss"] > 0.5 * chance > records[-1]["train_loss"]
    for r in records:
        assert {
            "step",
            "epoch",
            "lr",
            "train_loss",
            "train_error",
            "train_top5_error",
            "images_per_sec",
            "wall_time",
        } <= set(r)
    assert {"test_loss", "test_error", "test_top5_error"} <= set(records[2]) and records[-1][
        "final"
    ]
    assert records[-1]["test_loss"] == result.metrics["test_loss"]
    assert records[0]["epoch"] == pytest.approx(50 / 44)  # 1437 training digits // 32
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert TrainConfig.from_dict(json.load(f)) == config
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["150", "300"]
    # Re-running a finished run trains nothing and reports the same evaluation.
    again = train.train_and_evaluate(config, str(tmp_path), model_fn=TinyCNN)
    assert again.resumed_from == 300 and again.metrics == pytest.approx(result.metrics)
    with pytest.raises(ValueError, match="different config.*learning_rate"):
        train.train_and_evaluate(config.replace(learning_rate=0.2), str(tmp_path), model_fn=TinyCNN)


def test_divergence_stops_before_a_bad_checkpoint(tmp_path):
    # 0.1 for five steps, then 3e38 (finite: an infinite rate is refused) with a weight decay of 10,
    # so that some update passes float32's 3.4e38: step 6's update overflows (its loss, computed
    # before the update, is still finite), and only the parameter check can catch it.
    config = digits_config(
        num_steps=20,
        learning_rate=3e38,
        weight_decay=10.0,
        warmup_steps=5,
        warmup="constant",
        warmup_lr=0.1,
        schedule="constant",
        parallel="none",
        log_every=1,
        checkpoint_every=3,
        rng_impl="rbg",
    )
    with pytest.raises(
        train.NonFiniteLossError, match=r"non-finite at step 6.*last good checkpoint \(step 3\)"
    ):
        train.train_and_evaluate(config, str(tmp_path), model_fn=TinyCNN)
    with train.Checkpointer(os.path.join(tmp_path, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [3]
        state, _ = ckpt.restore(train.initial_state(train.build(config, model_fn=TinyCNN)))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert sum(float(np.abs(x).sum()) for x in jax.tree.leaves(state.params)) > 0
