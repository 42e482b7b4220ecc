"""The degradation experiment end to end on its tiny CI preset (digits, depths 8 and 14)."""

import csv
import json
import os
import warnings

import jax
import numpy as np
import pytest

from cnnjax import degradation, models

# He et al. 2016, section 4.2, field by field (TrainConfig's names).
PAPER_RECIPE = dict(
    dataset="cifar10",
    global_batch_size=128,
    num_steps=64_000,
    num_epochs=None,
    optimizer="sgd",
    learning_rate=0.1,
    base_batch_size=None,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    wd_mask="all",
    schedule="step",
    boundaries=(32_000, 48_000),
    boundary_epochs=(),
    decay_factor=0.1,
    augment="cifar",
    normalize="per_pixel_mean",
    label_smoothing=0.0,
    dtype="float32",
    validation_size=0,
    eval_split="test",
)


def test_presets_are_valid_and_follow_the_paper():
    for name, preset in degradation.PRESETS.items():
        for prog in degradation.programs(
            degradation.networks(preset), twins=preset.twins, seeds=preset.seeds
        ):
            prog.config.validate()
    for name in ("paper", "paper_headline"):
        preset = degradation.PRESETS[name]
        nets = {n.name: n.config for n in degradation.networks(preset)}
        for net, cfg in nets.items():
            assert {k: getattr(cfg, k) for k in PAPER_RECIPE} == PAPER_RECIPE, (name, net)
            # The paper's init and option A: nothing changes the registry's CIFAR nets.
            assert cfg.model == net and cfg.model_kwargs == {}, (name, net)
            assert (cfg.warmup_steps, cfg.warmup_lr) == (
                (400, 0.01) if net == "resnet110" else (0, 0.0)
            )
            assert cfg.data_on_device and cfg.steps_per_dispatch == 100
            assert (cfg.log_every, cfg.eval_every, cfg.checkpoint_every) == (100, 2_000, 2_000)
        model = models.create("resnet56")
        assert (model.shortcut, model.zero_init_residual, model.bn_momentum) == ("A", False, 0.9)
    assert sorted(nets) == ["plain20", "plain56", "resnet20", "resnet56"]  # paper_headline
    paper = degradation.PRESETS["paper"]
    assert paper.plain_depths == (20, 32, 44, 56) and paper.resnet_depths == (20, 32, 44, 56, 110)
    # Twins of each depth in one program; ResNet-110 (its own warm-up) alone; K seeds as members.
    progs = degradation.programs(degradation.networks(paper), twins=True, seeds=5)
    assert [p.name for p in progs] == [
        "plain20+resnet20",
        "plain32+resnet32",
        "plain44+resnet44",
        "plain56+resnet56",
        "resnet110",
    ]
    assert all(p.config.seeds == 5 for p in progs) and [p.config.twins for p in progs] == [
        True
    ] * 4 + [False]
    assert progs[1].config.model == "resnet32" and progs[-1].config.warmup_steps == 400
    assert [
        p.name for p in degradation.programs(degradation.networks(paper), twins=False, seeds=1)
    ][:2] == ["plain20", "plain32"]
    cpu = degradation.PRESETS["cpu"].config
    # The compressed schedule keeps the paper's proportions (32k/64k and 48k/64k).
    assert [b / cpu.num_steps for b in cpu.boundaries] == [0.5, 0.75]
    nets = {n.name: n.config for n in degradation.networks(degradation.PRESETS["tiny"])}
    assert nets["plain14"].model_kwargs == {"depth": 14} and nets["plain14"].model == "plain20"
    # The short presets zero-initialise the ResNets' residual branches (NOTES.md);
    # the paper's does not.
    for name in ("quick", "cpu"):
        preset = degradation.PRESETS[name]
        nets = {n.name: n.config for n in degradation.networks(preset)}
        assert (
            nets["resnet56"].model_kwargs == {"zero_init_residual": True}
            and nets["plain56"].model_kwargs == {}
        )
        # ... and their twins still share a program (the plain member initialised without it).
        progs = degradation.programs(degradation.networks(preset), twins=True, seeds=1)
        assert [p.name for p in progs] == ["plain20+resnet20", "plain56+resnet56"]
    # --set model_kwargs=... adds to the depth instead of replacing it.
    nets = {
        n.name: n.config
        for n in degradation.networks(
            degradation.PRESETS["tiny"],
            overrides={"model_kwargs": {"zero_init_residual": True}, "num_steps": 4},
        )
    }
    assert nets["resnet14"].model_kwargs == {"depth": 14, "zero_init_residual": True}
    assert nets["resnet14"].num_steps == 4


def test_tiny_preset_writes_everything_and_resume_skips_finished(tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    results = degradation.run("tiny", out, runs_dir=runs)
    assert [r["network"] for r in results] == ["plain8", "resnet8", "plain14", "resnet14"]
    assert [r["program"] for r in results] == ["plain8+resnet8"] * 2 + ["plain14+resnet14"] * 2
    # Option A: plain and residual twins have the same parameters.
    params = {r["network"]: r["params"] for r in results}
    assert (
        params["plain8"] == params["resnet8"]
        and params["plain14"] == params["resnet14"] > params["plain8"]
    )
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["network"] for r in rows} == {"plain8", "plain14", "resnet8", "resnet14"}
    steps = sorted(
        {(int(r["seed"]), int(r["iteration"])) for r in rows if r["network"] == "resnet14"}
    )
    assert steps == [
        (s, i) for s in (0, 1) for i in (2, 4, 6)
    ]  # two seeds; log_every=2, eval_every=4
    assert all(0.0 <= float(r["train_error"]) <= 1.0 for r in rows if r["train_error"])
    assert any(r["test_error"] for r in rows)
    for r in results:  # Table 6's statistics over the two seeds
        tests = [s["test_error"] for s in r["per_seed"]]
        assert [s["seed"] for s in r["per_seed"]] == [0, 1] and tests[0] != tests[1]
        assert r["test_error"] == pytest.approx(np.mean(tests)) and r["test_error_best"] == min(
            tests
        )
        assert r["test_error_std"] == pytest.approx(np.std(tests, ddof=1))
    png = (out / "degradation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "RESULTS.md").read_text()
    assert (
        "best (mean ± std of 2)" in table
        and "| resnet14 | 14 |" in table
        and "| plain8 | 8 |" in table
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "tiny" and len(summary["results"]) == 4 and summary["seeds"] == 2
    assert [p["program"] for p in summary["programs"]] == ["plain8+resnet8", "plain14+resnet14"]
    assert summary["total_wall_s"] >= sum(p["wall_s"] for p in summary["programs"]) > 0
    assert {"device", "versions", "command"} <= set(summary["provenance"])
    assert summary["provenance"]["versions"]["jax"] == jax.__version__
    assert summary["check"] == {}  # 6 iterations of 32 images never reach the first epoch

    stamp = (runs / "plain8+resnet8" / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    again = degradation.run("tiny", out, runs_dir=runs)
    assert "skipped" in capsys.readouterr().out
    assert (runs / "plain8+resnet8" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert [r["test_error"] for r in again] == [r["test_error"] for r in results]


def _row(kind, depth, iteration, train_error, epoch):
    return {
        "network": f"{kind}{depth}",
        "kind": kind,
        "depth": depth,
        "iteration": iteration,
        "epoch": epoch,
        "train_error": train_error,
        "test_error": None,
        "train_loss": None,
    }


def test_degradation_check_counts_the_points_after_the_first_epoch():
    rows = [
        # plain: the deeper net is worse at iterations 20 and 40, better at 30;
        # iteration 10 is epoch 0.5.
        _row("plain", 20, 10, 0.9, 0.5),
        _row("plain", 56, 10, 0.1, 0.5),
        _row("plain", 20, 20, 0.5, 1.0),
        _row("plain", 56, 20, 0.7, 1.0),
        _row("plain", 20, 30, 0.4, 1.5),
        _row("plain", 56, 30, 0.3, 1.5),
        _row("plain", 20, 40, 0.3, 2.0),
        _row("plain", 56, 40, 0.6, 2.0),
        _row("plain", 32, 40, 0.9, 2.0),  # a middle depth is not compared
        _row("resnet", 20, 20, 0.4, 1.0),
        _row("resnet", 56, 20, 0.4, 1.0),  # a tie is not "worse"
        _row("resnet", 56, 30, 0.1, 1.5),  # logged by one net only
        _row("resnet", 20, 40, None, 2.0),
        _row("resnet", 56, 40, 0.2, 2.0),
    ]
    check = degradation.degradation_check(rows)
    assert check["plain"] == {
        "shallow": 20,
        "deep": 56,
        "points": 3,
        "deeper_worse": 2,
        "first": (20, 0.5, 0.7),
        "last": (40, 0.3, 0.6),
    }
    assert check["resnet"]["points"] == 1 and check["resnet"]["deeper_worse"] == 0
    text = degradation.check_markdown(check)
    assert "plain-56 has higher training error than plain-20 at **2 of 3** logged points" in text
    assert "ResNet-56 has higher training error than ResNet-20 at **0 of 1**" in text
    assert degradation.degradation_check([r for r in rows if r["depth"] == 20]) == {}
    assert degradation.degradation_check(rows, after_epoch=0.0)["plain"]["points"] == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        degradation.run("huge", "/tmp/never")
    with pytest.raises(ValueError, match="not in preset 'tiny'"):
        degradation.run("tiny", "/tmp/never", only=["plain99"])


def test_cli_rejects_unknown_override(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        degradation.main(["--preset", "tiny", "--set", "num_step=3"])
    assert info.value.code == 2
    assert "num_step=3" in capsys.readouterr().err
    # A value that does not parse, and an --out that is a file, exit 2 too (the
    # first was a traceback).
    (tmp := tmp_path / "a_file").write_text("")
    for argv, message in (
        (["--set", "num_steps=abc"], "num_steps=abc"),
        (["--out", str(tmp)], "is a file"),
    ):
        with pytest.raises(SystemExit) as info:
            degradation.main(["--preset", "tiny", *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err, argv


def test_longer_run_resumes_a_finished_network_and_report_only_marks_the_rest(tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    with pytest.raises(ValueError, match="nothing to report: no metrics under"):
        degradation.run("tiny", out, runs_dir=runs, only=["plain8"], report_only=True)
    assert not out.exists()  # an empty report overwrites nothing
    degradation.run("tiny", out, runs_dir=runs, only=["resnet8"], seeds=1)
    capsys.readouterr()
    # Raising num_steps continues from the final checkpoint instead of skipping or restarting.
    degradation.run(
        "tiny", out, runs_dir=runs, only=["resnet8"], seeds=1, overrides={"num_steps": 8}
    )
    assert "skipped" not in capsys.readouterr().out
    steps = [r["step"] for r in degradation.read_metrics(runs / "resnet8")]
    assert steps == sorted(steps) and steps[-1] == 8 and steps.count(6) == 1
    results = degradation.run(
        "tiny",
        out,
        runs_dir=runs,
        only=["plain8", "resnet8"],
        seeds=1,
        twins=False,
        overrides={"num_steps": 8},
        report_only=True,
    )
    assert [r["network"] for r in results] == ["plain8 (unfinished)", "resnet8"]
    assert results[0]["train_error"] is None and results[1]["train_error"] is not None
    assert results[0]["params"] == 75_290  # CIFAR ResNet-8 under option A (eval_shape, no training)
    assert not (runs / "plain8" / "metrics.jsonl").exists()
    assert "plain8 (unfinished)" in (out / "RESULTS.md").read_text()


def test_plot_labels_what_it_has_and_says_when_a_panel_is_empty(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rows = [
        {"kind": "plain", "depth": 8, "iteration": i, "train_error": 0.5 / i, "test_error": None}
        for i in (1, 2)
    ]  # training curve only: no test evaluation logged yet
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when legend() finds no labelled curve
        degradation.plot(rows, tmp_path / "curves.png", "title")
    plain, resnet = figures[0].axes
    assert [t.get_text() for t in plain.get_legend().get_texts()] == ["plain-8"]
    assert resnet.get_legend() is None and [t.get_text() for t in resnet.texts] == [
        "no results yet"
    ]
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_main_job_writes_under_a_run_directory(tmp_path, monkeypatch):
    """The README's main job must leave a fresh clone clean: results under runs/, and the
    committed reference only when --out names it."""
    calls = []
    monkeypatch.setattr(degradation, "run", lambda *a, **k: calls.append((a, k)) or [])
    monkeypatch.setattr(degradation, "table", lambda *a, **k: "")
    monkeypatch.chdir(tmp_path)
    assert degradation.main([]) == 0
    (preset, out), kwargs = calls[-1]
    assert (preset, out) == ("quick", os.path.join("runs", "degradation_quick"))
    assert kwargs["runs_dir"] == os.path.join("runs", "degradation_quick")
    assert kwargs["command"] == "cnnjax degradation"
    ref = os.path.join("experiments", "results", "degradation_quick")
    assert degradation.main(["--out", ref, "--data-dir", "d"]) == 0  # the alias spelling too
    (_, out), kwargs = calls[-1]
    assert out == ref and kwargs["data_dir"] == "d"


def test_the_library_never_imports_the_experiments():
    import pathlib
    import re

    root = pathlib.Path(degradation.__file__).parent
    offenders = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"^\s*(from|import) experiments\b", p.read_text(), re.M)
    ]
    assert offenders == []
