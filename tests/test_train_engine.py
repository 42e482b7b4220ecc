"""The engine's options (seeds and twins as members of one program, data on the device, many
steps per call) against the runs they must reproduce: one seed alone, one network alone, the
host pipeline stepping once per call. One device here; tests/test_train_parallel.py has four.

The models are well conditioned (LeNet-5 and TinyCNN at a modest rate, CIFAR ResNet-8 at 0.02),
so float32 rounding alone moves their parameters by about 1e-7; members of one seed compared
with runs of another differ by orders of magnitude more, which the tests check too.
"""

import json
import os

import jax
import numpy as np
import pytest

from cnnjax import train
from cnnjax.data import device as device_data
from cnnjax.train.config import TrainConfig

from helpers_train.tiny import TinyCNN, digits_config

TIMING = ("wall_time", "images_per_sec")


def records(workdir):
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in train.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    ]


def member(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def assert_trees_close(got, want, atol=2e-6):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves) > 0
    for g, w in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=atol)


def assert_records_close(got, want):
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        for k in w:
            if isinstance(w[k], float):
                assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (k, g, w)
            else:
                assert g[k] == w[k], (k, g, w)


def tiny(**changes):
    return digits_config(
        num_steps=16,
        learning_rate=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        augment="cifar",
        parallel="none",
        log_every=8,
        eval_every=16,
        checkpoint_every=0,
        rng_impl="threefry2x32",
    ).replace(**changes)


def run(config, workdir, **kwargs):
    return train.train_and_evaluate(config, str(workdir), **kwargs)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """TinyCNN with CIFAR augmentation, per step from the host (the reference) and 3 ways more."""
    tmp = tmp_path_factory.mktemp("engine_tiny")
    out = {}
    for name, changes in {
        "host_1": {},
        "device_1": {"data_on_device": True},
        "host_8": {"steps_per_dispatch": 8},
        "device_8": {"data_on_device": True, "steps_per_dispatch": 8},
    }.items():
        out[name] = run(tiny(**changes), tmp / name, model_fn=TinyCNN), records(tmp / name)
    out["initial"] = train.initial_state(train.build(tiny(), model_fn=TinyCNN))
    return out


@pytest.mark.parametrize("variant", ["device_1", "host_8", "device_8"])
def test_data_on_device_and_steps_per_dispatch_reproduce_the_per_step_host_run(tiny_runs, variant):
    (got, got_records), (want, want_records) = tiny_runs[variant], tiny_runs["host_1"]
    assert got.step == want.step == 16
    assert_trees_close(got.state.params, want.state.params)
    assert_trees_close(got.state.batch_stats, want.state.batch_stats)
    assert_trees_close(got.state.opt_state, want.state.opt_state)
    assert [r["step"] for r in want_records] == [8, 16]
    assert_records_close(got_records, want_records)
    moved = max(
        float(np.abs(a - b).max())
        for a, b in zip(
            jax.tree.leaves(want.state.params), jax.tree.leaves(tiny_runs["initial"].params)
        )
    )
    assert moved > 1e-2  # the runs really trained


@pytest.fixture(scope="module")
def lenet_seeds(tmp_path_factory):
    """LeNet-5 on the digits from the host pipeline: two seeds in one program, and each alone."""
    tmp = tmp_path_factory.mktemp("engine_lenet")
    config = TrainConfig(
        model="lenet5",
        dataset="digits",
        global_batch_size=32,
        num_steps=8,
        learning_rate=0.02,
        momentum=0.9,
        weight_decay=5e-4,
        normalize="scale",
        augment="flip",
        parallel="none",
        log_every=4,
        eval_every=8,
        checkpoint_every=8,
        seed=3,
        progress_bar=False,
    )
    out = {"workdir": tmp / "seeds", "both": run(config.replace(seeds=2), tmp / "seeds")}
    out["records"] = records(tmp / "seeds")
    for s in (3, 4):
        out[s] = run(config.replace(seed=s), tmp / f"seed{s}"), records(tmp / f"seed{s}")
    return out


def test_seeds_rows_equal_the_single_runs_of_each_seed(lenet_seeds):
    both, both_records = lenet_seeds["both"], lenet_seeds["records"]
    assert [m["seed"] for m in both.members] == [3, 4]
    for i, s in enumerate((3, 4)):
        alone, alone_records = lenet_seeds[s]
        assert_records_close([r for r in both_records if r["seed"] == s], alone_records)
        assert_trees_close(member(both.state.params, i), alone.state.params)
        assert both.members[i]["test_error"] == pytest.approx(alone.metrics["test_error"])
    # A row per member and step, in step order; and the members are different runs.
    assert [(r["step"], r["seed"]) for r in both_records] == [(4, 3), (4, 4), (8, 3), (8, 4)]
    assert abs(both_records[0]["train_loss"] - both_records[1]["train_loss"]) > 1e-3
    diff = max(
        float(np.abs(a - b).max())
        for a, b in zip(
            jax.tree.leaves(lenet_seeds[3][0].state.params),
            jax.tree.leaves(lenet_seeds[4][0].state.params),
        )
    )
    assert diff > 1e-2


def test_a_checkpoint_of_several_members_evaluates_each(lenet_seeds, capsys):
    from cnnjax import cli

    # `cnnjax eval` (train.evaluate_checkpoint) restores both members and evaluates each.
    assert cli.main(["eval", "--workdir", str(lenet_seeds["workdir"])]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 8 and [m["seed"] for m in result["members"]] == [3, 4]
    for got, want in zip(result["members"], lenet_seeds["both"].members):
        assert got["test_error"] == pytest.approx(want["test_error"])
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """CIFAR ResNet-8 on 8x8 digits with data on the device: the plain and residual twins in one
    program, against plain-8 and ResNet-8 trained alone (seeds: test_degradation's tiny preset)."""
    tmp = tmp_path_factory.mktemp("engine_twins")
    config = train.get_preset("digits_resnet").replace(
        model="resnet20",
        model_kwargs={"depth": 8},
        image_size=8,
        global_batch_size=32,
        num_steps=4,
        learning_rate=0.02,
        augment="cifar",
        parallel="none",
        log_every=2,
        eval_every=4,
        checkpoint_every=4,
        data_on_device=True,
        steps_per_dispatch=2,
        rng_impl="threefry2x32",
        progress_bar=False,
    )
    out = {"config": config, "twins": run(config.replace(twins=True), tmp / "twins")}
    out["records"] = records(tmp / "twins")
    out["plain8"] = run(config.replace(model="plain20"), tmp / "plain"), records(tmp / "plain")
    out["resnet8"] = run(config, tmp / "resnet"), records(tmp / "resnet")
    return out


def test_twins_train_as_the_plain_and_the_residual_net_alone(twin_runs):
    twins = twin_runs["twins"]
    tags = [(m["network"], m["seed"]) for m in twins.members]
    assert tags == [("plain8", 0), ("resnet8", 0)]
    for i, name, seed in ((0, "plain8", 0), (1, "resnet8", 0)):
        alone, alone_records = twin_runs[name]
        assert_trees_close(member(twins.state.params, i), alone.state.params)
        assert_trees_close(member(twins.state.batch_stats, i), alone.state.batch_stats)
        mine = [
            {k: v for k, v in r.items() if k != "network"}
            for r in twin_runs["records"]
            if r["network"] == name and r["seed"] == seed
        ]
        assert_records_close(mine, alone_records)
    # The plain and residual members of one seed start alike (same parameter tree and init) and
    # end apart: they are different functions.
    start = train.initial_state(train.build(twin_runs["config"].replace(twins=True)))
    assert_trees_close(member(start.params, 0), member(start.params, 1), atol=0)
    assert max(float(np.abs(a[0] - a[1]).max()) for a in jax.tree.leaves(twins.state.params)) > 1e-3


def test_twins_need_residual_nets_with_the_plain_nets_parameters():
    base = train.get_preset("digits_resnet").replace(image_size=8, num_steps=4, twins=True)
    with pytest.raises(
        ValueError, match="twins trains a plain and a residual net of one depth: model 'lenet5'"
    ):
        train.build(base.replace(model="lenet5", image_size=None, channels=None))
    with pytest.raises(ValueError, match="different parameters.*shortcut='B'.*option A"):
        train.build(base.replace(model="resnet20", model_kwargs={"depth": 8, "shortcut": "B"}))


@pytest.mark.parametrize(
    "changes, needle",
    [
        (
            dict(log_every=50, steps_per_dispatch=8),
            r"log_every=50 is not a multiple of steps_per_dispatch=8.*"
            r"log_every=48 or 56",
        ),
        (dict(checkpoint_every=12, steps_per_dispatch=8), "checkpoint_every=12 is not a multiple"),
        (dict(eval_every=4, steps_per_dispatch=3, log_every=3, checkpoint_every=3), "eval_every=4"),
        (dict(seeds=0), "seeds must be a positive int"),
        (dict(steps_per_dispatch=0), "steps_per_dispatch must be a positive int"),
        (dict(seed=2**32 - 2, seeds=3), r"seeds 4294967294..4294967296 pass 2\*\*32 - 1"),
        (
            dict(data_on_device=True, augment="imagenet", model="lenet5"),
            "augment='imagenet' resizes on the host",
        ),
    ],
)
def test_engine_options_are_checked(changes, needle):
    with pytest.raises(ValueError, match=needle):
        tiny(**changes).validate(check_registries=changes.get("model") == "lenet5")


def test_data_too_large_for_the_device_is_refused_naming_the_sizes(monkeypatch, tmp_path):
    # 1437 training digits of 8x8x1 and an int32 label each; 12 test batches of 32 with a mask byte.
    need = 1437 * (64 + 4) + 12 * 32 * (64 + 4 + 1)
    assert (
        device_data.resident_bytes(train.build(tiny(), model_fn=TinyCNN).pipeline, 1, ("test",))
        == need
    )
    monkeypatch.setattr(device_data, "free_memory", lambda device: 150_000)
    with pytest.raises(
        ValueError,
        match=r"digits needs 0.12 MiB per device, more than 50% of the 0.14 MiB free "
        r"on .*use the host pipeline \(data_on_device=False\)",
    ):
        run(tiny(data_on_device=True), tmp_path / "run", model_fn=TinyCNN)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_diverging_member_stops_the_program_naming_the_member(tmp_path):
    # 0.1 for five steps, then 3e38 with a weight decay of 10: step 6's update overflows float32
    # in both members (test_train_steps.py has the single run).
    config = tiny(
        num_steps=20,
        learning_rate=3e38,
        weight_decay=10.0,
        warmup_steps=5,
        warmup="constant",
        warmup_lr=0.1,
        schedule="constant",
        log_every=1,
        eval_every=0,
        checkpoint_every=3,
        seeds=2,
        data_on_device=True,
    )
    with pytest.raises(
        train.NonFiniteLossError,
        match=r"non-finite at step 6 \(member seed 0\).*last good checkpoint \(step 3\)",
    ):
        run(config, tmp_path, model_fn=TinyCNN)
    steps = [(r["step"], r["seed"]) for r in records(tmp_path)]
    assert steps == [(s, seed) for s in range(1, 7) for seed in (0, 1)]


def test_an_evaluation_that_fails_keeps_the_training(tmp_path, monkeypatch):
    # Whatever stops the final evaluation (a device lost, memory), the trained state is saved
    # first and the training metrics are written; re-running resumes at the end.
    def fail(self, state, split=None):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(train.Engine, "evaluate", fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(tiny(num_steps=8, eval_every=0, log_every=4), tmp_path, model_fn=TinyCNN)
    with train.Checkpointer(os.path.join(tmp_path, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [8]  # checkpoint_every=0: only the final one, saved anyway
    assert [r["step"] for r in records(tmp_path)] == [4, 8]
    monkeypatch.undo()
    again = run(tiny(num_steps=8, eval_every=0, log_every=4), tmp_path, model_fn=TinyCNN)
    assert again.resumed_from == 8 and again.metrics["test_error"] < 1
