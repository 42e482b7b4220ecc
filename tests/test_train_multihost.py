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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    port, workdir = free_port(), str(tmp / "run")
    # Process 0 is set up by arguments, process 1 by the usual environment variables.
    workers = [launch.start("multihost.py", "worker", 0, port, workdir, tmp / "params0.npz"),
               launch.start("multihost.py", "worker", 1, "env", workdir, tmp / "params1.npz",
                            env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                 "JAX_PROCESS_ID": "1"})]
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
