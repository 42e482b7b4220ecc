"""A run killed with SIGKILL, resumed, stopped with SIGTERM and resumed again ends exactly where
an uninterrupted run does: same parameters, optimiser state, BatchNorm statistics and metrics.

Real subprocesses on 8x8 digits (TinyCNN, checkpoints every 10 steps, logs every 5, evaluation
every 20, 40 steps). The signals are sent by each process to itself from a step callback, so the
step they arrive at is fixed. Twice: per step with the host pipeline, and on the engine's
accelerator path (two seeds as members of one program, data on the device, 5 steps per call).
"""

import os
import signal

import numpy as np
import pytest

from cnnjax import train

from helpers_train import launch

STEPS = 40


def records(workdir):
    # Timing fields are the only ones allowed to differ.
    return [
        {k: v for k, v in r.items() if k not in ("wall_time", "images_per_sec")}
        for r in train.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    ]


def checkpoint_steps(workdir):
    with train.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        return ckpt.all_steps()


# Per variant: its extra arguments, the SIGTERM step (a call boundary), records per step.
VARIANTS = {"host": ((), 33, 1), "engine": (("--engine", 2, 5), 35, 2)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def runs(request, tmp_path_factory):
    extra, term_step, per_step = VARIANTS[request.param]
    tmp = tmp_path_factory.mktemp("resume")
    ref, run = str(tmp / "uninterrupted"), str(tmp / "interrupted")
    reference = launch.start("run_digits.py", ref, STEPS, "--save_params", tmp / "ref.npz", *extra)
    out = {"term_step": term_step, "per_step": per_step}
    # 1. SIGKILL at step 25: checkpoint 20 may still be in flight, checkpoint 10 is complete.
    launch.run(
        "run_digits.py", run, STEPS, "--kill", 25, "SIGKILL", *extra, returncode=-signal.SIGKILL
    )
    out["after_kill"] = checkpoint_steps(run)
    out["records_after_kill"] = [r["step"] for r in records(run)]
    # 2. Resume; SIGTERM at step 33 (35) saves a checkpoint there and exits cleanly.
    out["term"] = launch.run("run_digits.py", run, STEPS, "--kill", term_step, "SIGTERM", *extra)
    out["after_term"] = checkpoint_steps(run)
    out["records_after_term"] = [r["step"] for r in records(run)]
    # 3. Resume to the end.
    out["final"] = launch.run("run_digits.py", run, STEPS, "--save_params", tmp / "run.npz", *extra)
    out["reference"] = launch.finish(reference)
    out["state"] = dict(np.load(tmp / "run.npz")), dict(np.load(tmp / "ref.npz"))
    out["records"] = records(run), records(ref)
    return out


def per_member(steps, runs):
    return [s for s in steps for _ in range(runs["per_step"])]


def test_sigkill_leaves_only_complete_checkpoints(runs):
    assert runs["after_kill"] in ([10], [10, 20])
    # The callback of step 25 runs before that step's record is written.
    assert runs["records_after_kill"] == per_member([5, 10, 15, 20], runs)


def test_sigterm_checkpoints_and_exits_cleanly(runs):
    term = runs["term"]
    assert term["preempted"] and term["step"] == runs["term_step"] and term["metrics"] == {}
    assert term["resumed_from"] == runs["after_kill"][-1]
    assert runs["after_term"][-1] == runs["term_step"]
    # Records the killed run wrote after its checkpoint were dropped and rewritten once.
    expected = [5, 10, 15, 20, 25, 30] + ([35] if runs["term_step"] == 35 else [])
    assert runs["records_after_term"] == per_member(expected, runs)


def test_resumed_run_equals_uninterrupted_run(runs):
    final, reference = runs["final"], runs["reference"]
    assert final["resumed_from"] == runs["term_step"]
    assert final["step"] == reference["step"] == STEPS
    assert final["metrics"] == reference["metrics"]
    got, want = runs["state"]
    assert (
        sorted(got) == sorted(want)
        and any("batch_stats" in k for k in got)
        and any("opt_state" in k for k in got)
    )
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    got_records, want_records = runs["records"]
    assert [r["step"] for r in want_records] == per_member(range(5, STEPS + 1, 5), runs)
    assert got_records == want_records
    if runs["per_step"] > 1:  # the two members are different runs
        assert {r["seed"] for r in want_records} == {0, 1}
        assert want_records[0]["train_loss"] != want_records[1]["train_loss"]
