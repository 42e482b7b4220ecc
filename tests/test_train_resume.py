"""A run killed with SIGKILL, resumed, stopped with SIGTERM and resumed again ends exactly where
an uninterrupted run does: same parameters, optimiser state, BatchNorm statistics and metrics.

Real subprocesses on 8x8 digits (TinyCNN, checkpoints every 10 steps, logs every 5, evaluation
every 20, 40 steps). The signals are sent by each process to itself from a step callback, so the
step they arrive at is fixed.
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
    return [{k: v for k, v in r.items() if k not in ("wall_time", "images_per_sec")}
            for r in train.read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def checkpoint_steps(workdir):
    with train.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        return ckpt.all_steps()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    ref, run = str(tmp / "uninterrupted"), str(tmp / "interrupted")
    reference = launch.start("run_digits.py", ref, STEPS, "--save_params", tmp / "ref.npz")
    out = {}
    # 1. SIGKILL at step 25: checkpoint 20 may still be in flight, checkpoint 10 is complete.
    launch.run("run_digits.py", run, STEPS, "--kill", 25, "SIGKILL", returncode=-signal.SIGKILL)
    out["after_kill"] = checkpoint_steps(run)
    out["records_after_kill"] = [r["step"] for r in records(run)]
    # 2. Resume; SIGTERM at step 33 saves a checkpoint there and exits cleanly.
    out["term"] = launch.run("run_digits.py", run, STEPS, "--kill", 33, "SIGTERM")
    out["after_term"] = checkpoint_steps(run)
    out["records_after_term"] = [r["step"] for r in records(run)]
    # 3. Resume to the end.
    out["final"] = launch.run("run_digits.py", run, STEPS, "--save_params", tmp / "run.npz")
    out["reference"] = launch.finish(reference)
    out["state"] = dict(np.load(tmp / "run.npz")), dict(np.load(tmp / "ref.npz"))
    out["records"] = records(run), records(ref)
    return out


def test_sigkill_leaves_only_complete_checkpoints(runs):
    assert runs["after_kill"] in ([10], [10, 20])
    # The callback of step 25 runs before that step's record is written.
    assert runs["records_after_kill"] == [5, 10, 15, 20]


def test_sigterm_checkpoints_and_exits_cleanly(runs):
    term = runs["term"]
    assert term["preempted"] and term["step"] == 33 and term["metrics"] == {}
    assert term["resumed_from"] == runs["after_kill"][-1]
    assert runs["after_term"][-1] == 33
    # Records the killed run wrote after its checkpoint were dropped and rewritten once.
    assert runs["records_after_term"] == [5, 10, 15, 20, 25, 30]


def test_resumed_run_equals_uninterrupted_run(runs):
    final, reference = runs["final"], runs["reference"]
    assert final["resumed_from"] == 33 and final["step"] == reference["step"] == STEPS
    assert final["metrics"] == reference["metrics"]
    got, want = runs["state"]
    assert sorted(got) == sorted(want) and any("batch_stats" in k for k in got) and any("opt_state" in k for k in got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    got_records, want_records = runs["records"]
    assert [r["step"] for r in want_records] == list(range(5, STEPS + 1, 5))
    assert got_records == want_records
