"""Two processes (jax.distributed on 127.0.0.1, gloo CPU collectives) train like one process.

Each worker reads only its own shard of the digits and the global batch is assembled across
processes; the reference is one process and one device stepping on the concatenated batches.
"""

import os
import socket

import numpy as np
import pytest

from cnnjax import train

from helpers_train import launch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(tmp, workdir, *sigterm_step, env=None):
    port = free_port()
    # Process 0 is set up by arguments, process 1 by the usual environment variables.
    return [
        launch.start("multihost.py", "worker", 0, port, workdir, tmp / "params0.npz", env=env),
        launch.start(
            "multihost.py",
            "worker",
            1,
            "env",
            workdir,
            tmp / "params1.npz",
            *sigterm_step,
            env={
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "1",
                **(env or {}),
            },
        ),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    workdir = str(tmp / "run")
    workers = start_workers(tmp, workdir)
    reference = launch.start("multihost.py", "reference", tmp / "reference", tmp / "reference.npz")
    outputs = [launch.finish(p, timeout=400) for p in workers]
    launch.finish(reference)
    params = [dict(np.load(tmp / f"{name}.npz")) for name in ("params0", "params1", "reference")]
    return outputs, params, workdir


def test_two_processes_see_two_devices_and_agree(runs):
    outputs, _, _ = runs
    assert sorted(o["process"] for o in outputs) == [0, 1]
    assert all(o["processes"] == 2 and o["devices"] == 2 and o["step"] == 6 for o in outputs)
    assert outputs[0]["metrics"] == outputs[1]["metrics"]  # the evaluation is a global one


def test_two_processes_end_with_the_params_of_one_process_on_the_same_global_batches(runs):
    _, (p0, p1, ref), _ = runs
    assert sorted(p0) == sorted(ref) and len(ref) == 8
    for key in ref:
        np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
        np.testing.assert_allclose(p0[key], ref[key], rtol=0, atol=1e-6, err_msg=key)
    # ... and the comparison is not vacuous: the parameters moved.
    assert max(np.abs(ref[k]).max() for k in ref) > 0


def test_one_process_writes_metrics_and_checkpoints_are_complete(runs):
    _, _, workdir = runs
    steps = [r["step"] for r in train.read_metrics(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [2, 4, 6]  # not duplicated by the second process
    with train.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [3, 6]


def test_two_processes_with_data_on_the_devices_and_two_seeds_match_one_process(tmp_path):
    # The training split sharded over the two processes' devices, each batch gathered across them.
    reference = launch.start(
        "multihost.py", "reference", tmp_path / "reference", tmp_path / "reference.npz"
    )
    workdir = str(tmp_path / "run")
    workers = start_workers(tmp_path, workdir, env={"CNNJAX_TEST_ENGINE": "1"})
    outputs = [launch.finish(p, timeout=400) for p in workers]
    launch.finish(reference)
    assert all(o["step"] == 6 and o["devices"] == 2 for o in outputs)
    # The final evaluation, of the test split resident on both processes' devices, is a global one.
    assert (
        outputs[0]["metrics"] == outputs[1]["metrics"] and outputs[0]["metrics"]["test_error"] < 1
    )
    params, ref = dict(np.load(tmp_path / "params0.npz")), dict(np.load(tmp_path / "reference.npz"))
    for key in ref:
        assert params[key].shape == (2, *ref[key].shape)
        # seed 0:
        np.testing.assert_allclose(params[key][0], ref[key], rtol=0, atol=1e-6, err_msg=key)
    assert max(np.abs(params[k][1] - ref[k]).max() for k in ref) > 1e-3  # seed 1 is another run
    records = train.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [(r["step"], r["seed"]) for r in records] == [(3, 0), (3, 1), (6, 0), (6, 1)]


@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_both_and_the_resumed_run_matches(tmp_path):
    # JAX's preemption service (started by jax.distributed.initialize) sees the signal and both
    # processes stop at the same later step, after a collective checkpoint. The steps sleep a
    # little so that the notice reaches process 0 before the run ends.
    steps = 30
    env = {"CNNJAX_TEST_NUM_STEPS": str(steps), "CNNJAX_TEST_STEP_SLEEP": "0.2"}
    reference = launch.start(
        "multihost.py", "reference", tmp_path / "reference", tmp_path / "reference.npz", env=env
    )
    workdir = str(tmp_path / "run")
    outputs = [launch.finish(p, timeout=400) for p in start_workers(tmp_path, workdir, 2, env=env)]
    stopped = {o["step"] for o in outputs}
    assert (
        all(o["preempted"] for o in outputs) and len(stopped) == 1 and 2 < min(stopped) < steps
    ), outputs
    with train.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        assert ckpt.latest_step() == min(stopped)
    env["CNNJAX_TEST_STEP_SLEEP"] = "0"
    outputs = [launch.finish(p, timeout=400) for p in start_workers(tmp_path, workdir, env=env)]
    assert all(
        o["step"] == steps and not o["preempted"] and o["resumed_from"] == min(stopped)
        for o in outputs
    )
    launch.finish(reference)
    params, reference = (
        dict(np.load(tmp_path / "params0.npz")),
        dict(np.load(tmp_path / "reference.npz")),
    )
    for key in reference:
        np.testing.assert_allclose(params[key], reference[key], rtol=0, atol=1e-5, err_msg=key)
