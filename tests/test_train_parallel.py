"""pmap, shard_map and one device give the same training step (4 fake CPU devices, subprocess)."""

import pytest

from helpers_train import launch

STEPS = 3


@pytest.fixture(scope="module")
def diffs():
    return launch.run("parallel_equivalence.py", STEPS)


def test_the_run_is_meaningful(diffs):
    assert diffs["devices"] == 4 and diffs["steps"] == STEPS
    assert diffs["param_change"] > 1e-2  # the parameters really moved


@pytest.mark.parametrize("wrapper", ["pmap", "shard_map"])
def test_wrapper_matches_one_device_on_the_global_batch(diffs, wrapper):
    d = diffs[wrapper]
    assert d["step"] == STEPS
    # float32 rounding only: the per-device partial sums are added in a different order.
    assert d["params"] < 1e-6, d
    assert d["batch_stats"] < 1e-5, d
    assert d["opt_state"] < 1e-6, d
    assert d["loss"] < 1e-6, d


def test_without_batchnorm_sync_the_result_differs(diffs):
    # Each device normalises with its own quarter of the batch: not the global-batch step.
    assert diffs["shard_map_no_bn_sync"]["params"] > 1e-3
    assert diffs["shard_map_no_bn_sync"]["batch_stats"] > 1e-2


def test_shard_map_with_check_vma_and_pmean_differs(diffs):
    # DESIGN.md's trap: with check_vma=True autodiff already sums the gradient of replicated
    # parameters over the axis, and the step's pmean keeps that sum (4x too large).
    assert diffs["shard_map_check_vma"]["params"] > 1e-2


def test_a_batch_that_does_not_split_over_the_devices_is_refused(diffs):
    assert "global_batch_size=18 is not divisible by the 4 devices" in diffs["batch_error"]


@pytest.fixture(scope="module")
def engine():
    return launch.run("engine_parallel.py")


@pytest.mark.parametrize(
    "variant", ["shard_map_host", "shard_map_device", "pmap_host", "pmap_device"]
)
def test_engine_members_on_four_devices_match_one_device(engine, variant):
    # Two seeds in one program, 4 steps per call, from the host or from data sharded over devices.
    d = engine[variant]
    assert engine["devices"] == 4 and d["step"] == 8
    assert d["params"] < 1e-6 and d["batch_stats"] < 1e-5, d
    assert d["test_error"] == pytest.approx([m["test_error"] for m in engine["members"]])
    assert [m["seed"] for m in engine["members"]] == [0, 1]


def test_batches_gathered_across_devices_are_the_host_pipelines(engine):
    assert engine["gather"] == {"rows_per_device": 360, "same": [True, True, True]}
