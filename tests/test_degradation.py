"""The degradation experiment end to end on its tiny CI preset (digits, depths 8 and 14)."""

import csv
import json
import warnings

import pytest

from experiments import degradation


def test_presets_are_valid_and_follow_the_paper():
    for name, preset in degradation.PRESETS.items():
        for net in degradation.networks(preset):
            net.config.validate()
    paper = degradation.PRESETS["paper"]
    cfg = paper.config
    assert (cfg.global_batch_size, cfg.learning_rate, cfg.boundaries, cfg.num_steps) == (128, 0.1, (32_000, 48_000), 64_000)
    assert (cfg.weight_decay, cfg.momentum, cfg.augment, cfg.normalize) == (1e-4, 0.9, "cifar", "per_pixel_mean")
    assert paper.plain_depths == (20, 32, 44, 56) and paper.resnet_depths == (20, 32, 44, 56, 110)
    r110 = [n for n in degradation.networks(paper) if n.name == "resnet110"][0].config
    assert (r110.warmup_steps, r110.warmup_lr) == (400, 0.01)
    cpu = degradation.PRESETS["cpu"].config
    # The compressed schedule keeps the paper's proportions (32k/64k and 48k/64k).
    assert [b / cpu.num_steps for b in cpu.boundaries] == [0.5, 0.75]
    nets = {n.name: n.config for n in degradation.networks(degradation.PRESETS["tiny"])}
    assert nets["plain14"].model_kwargs == {"depth": 14} and nets["plain14"].model == "plain20"
    # The short presets zero-initialise the ResNets' residual branches (NOTES.md); the paper's does not.
    for name in ("quick", "cpu"):
        nets = {n.name: n.config for n in degradation.networks(degradation.PRESETS[name])}
        assert nets["resnet56"].model_kwargs == {"zero_init_residual": True} and nets["plain56"].model_kwargs == {}
    assert all("zero_init_residual" not in n.config.model_kwargs for n in degradation.networks(paper))
    # --set model_kwargs=... adds to the depth instead of replacing it.
    nets = {n.name: n.config for n in degradation.networks(
        degradation.PRESETS["tiny"], overrides={"model_kwargs": {"zero_init_residual": True}, "num_steps": 4})}
    assert nets["resnet14"].model_kwargs == {"depth": 14, "zero_init_residual": True}
    assert nets["resnet14"].num_steps == 4


def test_tiny_preset_writes_everything_and_resume_skips_finished(tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    results = degradation.run("tiny", out, runs_dir=runs)
    assert [r["network"] for r in results] == ["plain8", "plain14", "resnet8", "resnet14"]
    # Option A: plain and residual twins have the same parameters.
    params = {r["network"]: r["params"] for r in results}
    assert params["plain8"] == params["resnet8"] and params["plain14"] == params["resnet14"] > params["plain8"]
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["network"] for r in rows} == {"plain8", "plain14", "resnet8", "resnet14"}
    steps = sorted({int(r["iteration"]) for r in rows if r["network"] == "resnet14"})
    assert steps == [2, 3, 4, 6]  # log_every=2, eval_every=3, final step 6
    assert all(0.0 <= float(r["train_error"]) <= 1.0 for r in rows if r["train_error"])
    assert any(r["test_error"] for r in rows)
    png = (out / "degradation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "RESULTS.md").read_text()
    assert "| resnet14 | 14 |" in table and "| plain8 | 8 |" in table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "tiny" and len(summary["results"]) == 4
    assert summary["check"] == {}  # 6 iterations of 32 images never reach the first epoch

    stamp = (runs / "resnet8" / "metrics.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    again = degradation.run("tiny", out, runs_dir=runs)
    assert "skipped" in capsys.readouterr().out
    assert (runs / "resnet8" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert [r["test_error"] for r in again] == [r["test_error"] for r in results]


def _row(kind, depth, iteration, train_error, epoch):
    return {"network": f"{kind}{depth}", "kind": kind, "depth": depth, "iteration": iteration, "epoch": epoch,
            "train_error": train_error, "test_error": None, "train_loss": None}


def test_degradation_check_counts_the_points_after_the_first_epoch():
    rows = [
        # plain: the deeper net is worse at iterations 20 and 40, better at 30; iteration 10 is epoch 0.5.
        _row("plain", 20, 10, 0.9, 0.5), _row("plain", 56, 10, 0.1, 0.5),
        _row("plain", 20, 20, 0.5, 1.0), _row("plain", 56, 20, 0.7, 1.0),
        _row("plain", 20, 30, 0.4, 1.5), _row("plain", 56, 30, 0.3, 1.5),
        _row("plain", 20, 40, 0.3, 2.0), _row("plain", 56, 40, 0.6, 2.0),
        _row("plain", 32, 40, 0.9, 2.0),  # a middle depth is not compared
        _row("resnet", 20, 20, 0.4, 1.0), _row("resnet", 56, 20, 0.4, 1.0),  # a tie is not "worse"
        _row("resnet", 56, 30, 0.1, 1.5),  # logged by one net only
        _row("resnet", 20, 40, None, 2.0), _row("resnet", 56, 40, 0.2, 2.0),
    ]
    check = degradation.degradation_check(rows)
    assert check["plain"] == {"shallow": 20, "deep": 56, "points": 3, "deeper_worse": 2,
                              "first": (20, 0.5, 0.7), "last": (40, 0.3, 0.6)}
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
    # A value that does not parse, and an --out that is a file, exit 2 too (the first was a traceback).
    (tmp := tmp_path / "a_file").write_text("")
    for argv, message in ((["--set", "num_steps=abc"], "num_steps=abc"), (["--out", str(tmp)], "is a file")):
        with pytest.raises(SystemExit) as info:
            degradation.main(["--preset", "tiny", *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err, argv


def test_longer_run_resumes_a_finished_network(tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    degradation.run("tiny", out, runs_dir=runs, only=["resnet8"])
    capsys.readouterr()
    # Raising num_steps continues from the final checkpoint instead of skipping or restarting.
    degradation.run("tiny", out, runs_dir=runs, only=["resnet8"], overrides={"num_steps": 8})
    assert "skipped" not in capsys.readouterr().out
    steps = [r["step"] for r in degradation.read_metrics(runs / "resnet8")]
    assert steps == sorted(steps) and steps[-1] == 8 and steps.count(6) == 1


def test_report_only_trains_nothing_and_marks_unfinished(tmp_path):
    results = degradation.run("tiny", tmp_path / "out", runs_dir=tmp_path / "runs", only=["plain8"], report_only=True)
    assert results[0]["network"] == "plain8 (unfinished)" and results[0]["train_error"] is None
    assert results[0]["params"] == 75_290  # CIFAR ResNet-8 under option A (eval_shape, no training)
    assert not (tmp_path / "runs" / "plain8" / "metrics.jsonl").exists()
    assert "plain8 (unfinished)" in (tmp_path / "out" / "RESULTS.md").read_text()


def test_plot_labels_what_it_has_and_says_when_a_panel_is_empty(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    rows = [{"kind": "plain", "depth": 8, "iteration": i, "train_error": 0.5 / i, "test_error": None}
            for i in (1, 2)]  # training curve only: no test evaluation logged yet
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when legend() finds no labelled curve
        degradation.plot(rows, tmp_path / "curves.png", "title")
    plain, resnet = figures[0].axes
    assert [t.get_text() for t in plain.get_legend().get_texts()] == ["plain-8"]
    assert resnet.get_legend() is None and [t.get_text() for t in resnet.texts] == ["no results yet"]
    assert (tmp_path / "curves.png").stat().st_size > 0
