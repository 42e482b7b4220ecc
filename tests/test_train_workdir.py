"""A run never loses work (issue 23), through `cnnjax train` and `eval`: damaged checkpoints, two
writers, a missing config.json, another data set on resume, bad data and settings, divergence,
odd workdirs, exit codes. Subprocesses where processes matter (the lock, kill and resume,
SIGTERM, a closed pipe); `cli.main` in this process for the errors raised before training.

The runs train the registry's `linear` classifier on 8x8 digits: compiling it takes a moment.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnjax import cli, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [
    "--model",
    "linear",
    "--dataset",
    "digits",
    "--image_size",
    "8",
    "--channels",
    "1",
    "--global_batch_size",
    "32",
    "--learning_rate",
    "0.05",
    "--schedule",
    "constant",
    "--normalize",
    "per_channel",
    "--parallel",
    "none",
    "--log_every",
    "5",
    "--checkpoint_every",
    "5",
    "--keep_checkpoints",
    "5",
    "--rng_impl",
    "rbg",
    "--progress_bar",
    "false",
]


def argv(workdir, steps, *extra):
    return ["train", "--workdir", str(workdir), *RUN, "--num_steps", str(steps), *map(str, extra)]


def start(args, **kwargs):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "cnnjax", *map(str, args)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run_cli(args):
    return finish(start(args))


def error_of(args, capsys):
    """`cnnjax ARGS` in this process: exits 2; returns the one-line message."""
    capsys.readouterr()  # what earlier calls printed
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def steps_of(workdir):
    return [r["step"] for r in train.read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def checkpoint_state(workdir, step):
    with train.Checkpointer(os.path.join(workdir, "checkpoints"), create=False) as ckpt:
        path = os.path.join(ckpt.directory, str(step), "state")
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(path)


def wait_for(path, proc, timeout=120):
    t = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, finish(proc)
        assert time.time() - t < timeout, f"{path} did not appear"
        time.sleep(0.02)


# -- 1. a damaged newest checkpoint ----------------------------------------------------------------


def damage(workdir, step, how="truncated"):
    """Damages checkpoint `step`: its data files truncated (as a full disk or a crash leaves
    them), its state's _METADATA removed, or its whole state directory removed."""
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    if how == "no_metadata":
        os.remove(os.path.join(state, "_METADATA"))
    elif how == "no_state":
        shutil.rmtree(state)
    for base, _, files in os.walk(state):
        for name in files:
            if os.path.basename(base) == "d":
                with open(os.path.join(base, name), "r+b") as f:
                    f.truncate(10)


@pytest.fixture(scope="module")
def damaged_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damaged")
    ref = tmp / "uninterrupted"
    reference = start(argv(ref, 15))
    out = {"ref": ref}
    assert run_cli(argv(tmp / "base", 10))[0] == 0  # checkpoints 5 and 10
    for how in ("truncated", "no_metadata", "no_state"):
        run = tmp / how
        shutil.copytree(tmp / "base", run)
        damage(run, 10, how)
        out[how] = run, run_cli(argv(run, 15))
    out["reference"] = finish(reference)
    return out


@pytest.mark.parametrize("how", ["truncated", "no_metadata", "no_state"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
    damaged_runs, how
):
    run, (code, out, err) = damaged_runs[how]
    assert code == 0, err
    assert "checkpoint 10 cannot be read" in err and "resuming from checkpoint 5" in err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    assert os.path.isdir(run / "checkpoints" / "10.damaged")  # renamed, not deleted
    assert steps_of(run) == [5, 10, 15]  # the records after checkpoint 5 were written again
    # ... and the run ends exactly where the uninterrupted one does.
    assert damaged_runs["reference"][0] == 0
    got, want = (dict(_leaves(checkpoint_state(d, 15))) for d in (run, damaged_runs["ref"]))
    assert got.keys() == want.keys() and any("opt_state" in k for k in want) and len(want) >= 4
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _leaves(tree):
    import jax

    return [
        (jax.tree_util.keystr(k), np.asarray(v))
        for k, v in jax.tree_util.tree_leaves_with_path(tree)
    ]


def test_when_every_checkpoint_is_damaged_one_error_and_nothing_changes(tmp_path, capsys):
    assert run_cli(argv(tmp_path, 10))[0] == 0
    damage(tmp_path, 5), damage(tmp_path, 10)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    err = error_of(argv(tmp_path, 15), capsys)
    assert (
        "no checkpoint in" in err
        and "5: " in err
        and "10: " in err
        and "nothing was changed" in err
    )
    assert "move" in err and "new workdir" in err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before == ["10", "5"]
    # `cnnjax eval` says the same, and changes nothing either.
    assert "no checkpoint in" in error_of(["eval", "--workdir", tmp_path], capsys)


# -- 2. two writers --------------------------------------------------------------------------------


def test_a_second_writer_exits_at_once_naming_the_first(tmp_path):
    first = start(argv(tmp_path, 30))
    wait_for(tmp_path / "dataset.json", first)  # written under the lock, before training
    os.kill(first.pid, signal.SIGSTOP)  # the first writer holds the lock while the second starts
    try:
        t = time.time()
        code, _, err = run_cli(argv(tmp_path, 30))
        elapsed = time.time() - t
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert code == 2 and f"is in use by another run (PID {first.pid})" in err, err
    assert "Traceback" not in err and elapsed < 60
    assert finish(first)[0] == 0
    steps = steps_of(tmp_path)
    assert steps == sorted(set(steps)) == [5, 10, 15, 20, 25, 30]
    # Reading is allowed while a run writes: `cnnjax eval` takes no lock.
    assert run_cli(["eval", "--workdir", tmp_path])[0] == 0


# -- 3, 4, 9. the run's identity -------------------------------------------------------------------


def write_npz(path, n_train=64, n_test=16, labels=None, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n_train) % 10) if labels is None else labels
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, 8, 8, 1), dtype=np.uint8),
        y_train=y,
        x_test=rng.integers(0, 256, (n_test, 8, 8, 1), dtype=np.uint8),
        y_test=np.arange(n_test) % 10,
    )


def test_an_empty_test_split_is_refused_before_anything_is_written(tmp_path, capsys):
    write_npz(tmp_path / "mini.npz", n_test=0)
    args = argv(tmp_path / "run", 5, "--dataset", "mini", "--data_dir", tmp_path)
    err = error_of(args, capsys)
    assert (
        "the test split of mini" in err and "is empty" in err and "eval_split='validation'" in err
    )
    assert not (tmp_path / "run").exists()


def test_a_missing_config_json_is_an_error_and_config_restores_it(tmp_path, capsys):
    assert run_cli(argv(tmp_path, 5))[0] == 0
    saved = tmp_path / "saved.json"
    os.replace(tmp_path / "config.json", saved)
    for extra in ((), ("--learning_rate", "0.01"), ("--model", "mlp")):
        err = error_of(argv(tmp_path, 10, *extra), capsys)
        assert "holds checkpoints but no config.json" in err and "--config" in err
        assert not (tmp_path / "config.json").exists()  # never rewritten by a refused command
    assert (
        cli.main(["train", "--workdir", str(tmp_path), "--config", str(saved), "--num_steps", "10"])
        == 0
    )
    assert json.loads((tmp_path / "config.json").read_text())["num_steps"] == 10
    assert steps_of(tmp_path) == [5, 10]


def test_resuming_on_other_data_is_refused(tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 1)):
        os.makedirs(tmp_path / name)
        write_npz(tmp_path / name / "mini.npz", seed=seed)
    run = tmp_path / "run"
    assert cli.main(argv(run, 5, "--dataset", "mini", "--data_dir", tmp_path / "a")) == 0
    err = error_of(argv(run, 10, "--dataset", "mini", "--data_dir", tmp_path / "b"), capsys)
    assert "holds a run on other data (fingerprint:" in err
    assert cli.main(argv(run, 10, "--dataset", "mini", "--data_dir", tmp_path / "a")) == 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (
            ("--model_kwargs", '{"num_classes": 5}'),
            "model_kwargs num_classes=5, but digits has 10 classes",
        ),
        (("--model_kwargs", '{"dtype": "float16"}'), "the trainer sets dtype"),
        (("--learning_rate", "inf"), "learning_rate=inf is not a rate float32 can hold"),
        (("--learning_rate", "1e-50"), "learning_rate=1e-50 is not a rate float32 can hold"),
        (("--model", "lenet"), "did you mean lenet5"),
    ],
)
def test_settings_that_would_be_ignored_or_wrong_are_refused(tmp_path, capsys, extra, needle):
    assert needle in error_of(argv(tmp_path / "run", 5, *extra), capsys)
    assert not (tmp_path / "run").exists()


# -- 7. one stray label ----------------------------------------------------------------------------


def test_a_stray_label_is_named_instead_of_a_million_classes(tmp_path, capsys):
    labels = np.arange(64) % 10
    labels[17] = 1_000_000
    write_npz(tmp_path / "mini.npz", labels=labels)
    err = error_of(argv(tmp_path / "run", 5, "--dataset", "mini", "--data_dir", tmp_path), capsys)
    assert "the labels imply 1000001 classes (y_train[17] = 1000000), but only 11 distinct" in err


# -- 8. divergence ---------------------------------------------------------------------------------


def test_the_divergence_message_says_what_works_and_it_does(tmp_path, capsys):
    # 0.1 for five steps, then 1e30: the loss is NaN a few steps later; checkpoint 5 is sane.
    diverging = argv(
        tmp_path,
        20,
        "--learning_rate",
        "1e30",
        "--warmup_steps",
        "5",
        "--warmup",
        "constant",
        "--warmup_lr",
        "0.1",
    )
    assert cli.main(diverging) == 1
    err = capsys.readouterr().err
    assert "last good checkpoint (step 5)" in err and "--allow_change learning_rate" in err, err
    assert "--learning_rate 1e+29" in err  # its example; the run below takes a rate that trains
    # Doing what it says: the same workdir, a lower rate, the change allowed.
    assert cli.main([*diverging, "--learning_rate", "0.1", "--allow_change", "learning_rate"]) == 0
    history = [
        json.loads(line) for line in (tmp_path / "config_history.jsonl").read_text().splitlines()
    ]
    assert history == [{"step": 5, "changed": {"learning_rate": {"from": 1e30, "to": 0.1}}}]
    records = train.read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in records] == [5, 10, 15, 20] and records[-1]["final"]
    assert all(np.isfinite(r["train_loss"]) for r in records)
    # Changing it without saying so is still refused, naming the way to allow it.
    assert "--allow_change learning_rate" in error_of(
        argv(tmp_path, 25, "--learning_rate", "0.2"), capsys
    )


def test_without_a_checkpoint_the_divergence_message_does_not_offer_one(tmp_path, capsys):
    assert cli.main(argv(tmp_path, 20, "--learning_rate", "1e30", "--checkpoint_every", "0")) == 1
    err = capsys.readouterr().err
    assert "no checkpoint was written before it" in err and "step None" not in err


# -- 10. odd workdirs, pipes, exit codes -----------------------------------------------------------


@pytest.mark.parametrize("name, make", [("checkpoints", "file"), ("metrics.jsonl", "dir")])
def test_a_workdir_entry_of_the_wrong_kind_is_refused_at_once(tmp_path, capsys, name, make):
    os.makedirs(tmp_path / "run")
    path = tmp_path / "run" / name
    path.write_text("") if make == "file" else os.makedirs(path)
    err = error_of(argv(tmp_path / "run", 5), capsys)
    assert f"{path} is a {'file' if make == 'file' else 'directory'}" in err


def test_a_closed_pipe_is_quiet():
    proc = start(["models"])
    proc.stdout.close()  # as `| head -1` does, before the listing is written
    code = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert code == cli.EXIT_BROKEN_PIPE and err == "", err


def test_sigterm_saves_and_exits_with_the_preempted_code(tmp_path):
    proc = start(argv(tmp_path, 100_000, "--log_every", "5", "--checkpoint_every", "1000"))
    wait_for(tmp_path / "metrics.jsonl", proc)  # training: past the first logged step
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == cli.EXIT_PREEMPTED == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    with train.Checkpointer(os.path.join(tmp_path, "checkpoints"), create=False) as ckpt:
        assert ckpt.latest_step() is not None and ckpt.latest_step() >= 5
