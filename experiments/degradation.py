"""The degradation of plain versus residual networks (He et al. 2016, Figure 6 / Table 6, Figure 4).

Trains plain and residual networks of several depths on the same data with the same recipe,
one resumable workdir each (under --workdir, default runs/degradation_<preset>; never committed),
and writes into the output directory (default experiments/results/degradation_<preset>):

  curves.csv      network, kind, depth, iteration, epoch, train_error, test_error, train_loss
  degradation.png Figure-6 style: plain nets left, ResNets right; training error dashed,
                  test error bold; one colour per depth; iterations on the x axis
  RESULTS.md      Table-6 style: depth, parameters, final train and test error, the paper's figure;
                  the point-by-point check (at how many logged points after the first epoch the
                  deeper net of each kind has the higher training error); NOTES.md of the output
                  directory appended (the hand-written history of what was tried)
  summary.json    the same table and check as data, with the preset and each network's wall time

  python -m experiments.degradation                       # preset 'quick' on the embedded digits
  python -m experiments.degradation --preset cpu --data-dir ../shared/data
  python -m experiments.degradation --preset paper --data-dir DIR   # GPU/TPU: the paper's recipe
  python -m experiments.degradation --preset imagenet --data-dir DIR  # Figure 4 (plain/ResNet-18/34)

An interrupted experiment continues where it stopped: finished networks are skipped and an
unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnjax.train.config import PRESETS as TRAIN_PRESETS
from cnnjax.train.config import TrainConfig
from experiments._report import atomic_write, out_dir, save_figure, write_csv

# He et al. 2016, Table 6 (CIFAR-10 test error %, ResNets, option A) and Table 2 (ImageNet top-1
# error %, 10-crop). Plain CIFAR nets have no table entry in the paper: the figures given are the
# public reproduction nabla0001/resnet (paper recipe, mean of 5 runs).
PAPER_TEST_ERROR = {
    ("resnet", 20): (8.75, "He et al. 2016, Table 6"),
    ("resnet", 32): (7.51, "He et al. 2016, Table 6"),
    ("resnet", 44): (7.17, "He et al. 2016, Table 6"),
    ("resnet", 56): (6.97, "He et al. 2016, Table 6"),
    ("resnet", 110): (6.43, "He et al. 2016, Table 6 (best of 5; mean 6.61)"),
    ("resnet", 1202): (7.93, "He et al. 2016, Table 6"),
    ("plain", 20): (9.78, "nabla0001/resnet reproduction, mean of 5"),
    ("plain", 56): (12.95, "nabla0001/resnet reproduction, mean of 5"),
}
PAPER_IMAGENET_TOP1_ERROR = {
    ("plain", 18): 27.94, ("plain", 34): 28.54, ("resnet", 18): 27.88, ("resnet", 34): 25.03,
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A degradation experiment: one training recipe, the depths of each kind of network."""

    description: str
    config: TrainConfig
    plain_depths: tuple[int, ...]
    resnet_depths: tuple[int, ...]
    # Per-depth config changes (ResNet-110's warm-up).
    per_depth: dict[tuple[str, int], dict[str, Any]] = dataclasses.field(default_factory=dict)
    imagenet: bool = False
    # Model options for every network of a kind ("plain" or "resnet"), e.g. zero_init_residual.
    kind_kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


_PAPER = TRAIN_PRESETS["cifar_resnet"]
_WARMUP_110 = {"warmup_steps": 400, "warmup": "constant", "warmup_lr": 0.01}

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "Embedded scikit-learn digits at 16x16x3 (1,500 training images), 240 iterations at lr 0.1: the "
        "whole picture (plain-56 stuck, ResNet-56 fine) in under ten minutes on a 2-core CPU. The ResNets "
        "start each residual branch's last BN at gamma 0 (Goyal et al. 2017; the paper does not): with "
        "the paper's init ResNet-56 lags ResNet-20 at every logged point of so short a run (NOTES.md).",
        TRAIN_PRESETS["digits_resnet"].replace(num_steps=240, log_every=20, eval_every=40, checkpoint_every=120,
                                                rng_impl="rbg"),
        plain_depths=(20, 56), resnet_depths=(20, 56),
        kind_kwargs={"resnet": {"zero_init_residual": True}},
    ),
    "cpu": Preset(
        "Real CIFAR-10 (full 50k training set) with the paper's recipe compressed for a 2-core CPU: "
        "1,000 iterations (2.6 epochs), lr 0.1 divided by 10 at 500 and 750 (the paper's 32k/48k "
        "of 64k, scaled), depths 20 and 56; about an hour for the 56-layer pair on 2 cores. The "
        "ResNets start each residual branch's last BN at gamma 0 (Goyal et al. 2017; the paper does "
        "not): with the paper's init ResNet-56 lags ResNet-20 at every logged point of so short a "
        "run (NOTES.md).",
        _PAPER.replace(num_steps=1_000, boundaries=(500, 750), log_every=25, eval_every=200,
                       checkpoint_every=200, rng_impl="rbg"),
        plain_depths=(20, 56), resnet_depths=(20, 56),
        kind_kwargs={"resnet": {"zero_init_residual": True}},
    ),
    "paper": Preset(
        "He et al. 2016, section 4.2 exactly: 64k iterations, batch 128, lr 0.1 /10 at 32k and 48k, "
        "weight decay 1e-4, momentum 0.9, option A, pad-crop-flip, per-pixel mean; for GPU/TPU.",
        _PAPER,
        plain_depths=(20, 32, 44, 56), resnet_depths=(20, 32, 44, 56, 110),
        per_depth={("resnet", 110): _WARMUP_110},
    ),
    "imagenet": Preset(
        "He et al. 2016, Figure 4 / Table 2: plain-18/34 versus ResNet-18/34 on ImageNet (option A in "
        "the paper; torchvision-style projections here, option B); for a TPU/GPU cluster.",
        TRAIN_PRESETS["imagenet_resnet"].replace(dtype="bfloat16"),
        plain_depths=(18, 34), resnet_depths=(18, 34), imagenet=True,
    ),
    # What CI runs: seconds, every code path.
    "tiny": Preset(
        "CI smoke test: digits at 8x8x3, depths 8 and 14, a few iterations.",
        TRAIN_PRESETS["digits_resnet"].replace(image_size=8, num_steps=6, log_every=2, eval_every=3,
                                                checkpoint_every=3, global_batch_size=32, progress_bar=False,
                                                rng_impl="rbg"),
        plain_depths=(8, 14), resnet_depths=(8, 14),
    ),
}


class Interrupted(RuntimeError):
    """A network's run was preempted (SIGTERM); rerunning resumes it."""


@dataclasses.dataclass(frozen=True)
class Network:
    kind: str  # 'plain' or 'resnet'
    depth: int
    config: TrainConfig

    @property
    def name(self) -> str:
        return f"{self.kind}{self.depth}"


def networks(preset: Preset, *, overrides: dict[str, Any] | None = None) -> list[Network]:
    """The networks of a preset, each with its full training config."""
    from cnnjax import models

    overrides = dict(overrides or {})
    extra_kwargs = overrides.pop("model_kwargs", {})  # merged with the depth, not replacing it
    nets = []
    for kind, depths in (("plain", preset.plain_depths), ("resnet", preset.resnet_depths)):
        for depth in depths:
            name = f"{kind}{depth}"
            kwargs: dict[str, Any] = {}
            if name not in models.list_models():
                if preset.imagenet:
                    raise ValueError(f"no registered ImageNet model {name!r}; choose depths among 18/34/50/101/152")
                # Any CIFAR depth 6n+2: the generic CIFAR net with its depth overridden.
                name, kwargs = f"{kind}20", {"depth": depth}
            cfg = preset.config.replace(model=name,
                                        model_kwargs={**preset.config.model_kwargs, **preset.kind_kwargs.get(kind, {}),
                                                      **kwargs, **extra_kwargs},
                                        **preset.per_depth.get((kind, depth), {}), **overrides)
            nets.append(Network(kind, depth, cfg))
    return nets


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a torn last line from a killed run is ignored)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def curves(net: Network, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per logged step: training error and loss, and the test error where evaluated."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        row = by_step.setdefault(int(r["step"]), {"network": net.name, "kind": net.kind, "depth": net.depth,
                                                  "iteration": int(r["step"]), "epoch": r.get("epoch"),
                                                  "train_error": None, "test_error": None, "train_loss": None})
        for key in ("train_error", "test_error", "train_loss"):
            if r.get(key) is not None:
                row[key] = r[key]
        if r.get("epoch") is not None:
            row["epoch"] = r["epoch"]
    return [by_step[s] for s in sorted(by_step)]


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return values[-1] if values else None


def degradation_check(rows: list[dict[str, Any]], *, after_epoch: float = 1.0) -> dict[str, dict[str, Any]]:
    """The lecture's claim, point by point: for each kind, the deepest against the shallowest net's
    training error at every iteration both logged after `after_epoch` epochs.

    Returns {kind: {"shallow", "deep", "points", "deeper_worse", "first", "last"}} where
    "deeper_worse" counts the points at which the deeper net's training error is higher, and
    "first"/"last" are (iteration, shallow error, deep error) at the ends; a kind with fewer than
    two finished depths is left out.
    """
    check = {}
    for kind in ("plain", "resnet"):
        depths = sorted({r["depth"] for r in rows if r["kind"] == kind})
        if len(depths) < 2:
            continue
        shallow, deep = depths[0], depths[-1]
        err = {d: {r["iteration"]: r["train_error"] for r in rows
                   if r["kind"] == kind and r["depth"] == d and r["train_error"] is not None
                   and (r["epoch"] or 0) >= after_epoch} for d in (shallow, deep)}
        its = sorted(set(err[shallow]) & set(err[deep]))
        if not its:
            continue
        pts = [(i, err[shallow][i], err[deep][i]) for i in its]
        check[kind] = {"shallow": shallow, "deep": deep, "points": len(pts),
                       "deeper_worse": sum(d > s for _, s, d in pts), "first": pts[0], "last": pts[-1]}
    return check


def check_markdown(check: dict[str, dict[str, Any]]) -> str:
    """One line per kind: at how many logged points after the first epoch the deeper net is worse."""
    if not check:
        return ""
    lines = ["Training error after the first epoch, point by point (the lecture: the deeper plain net is "
             "worse at every point, the deeper ResNet is not):\n"]
    for kind, c in check.items():
        name = "plain" if kind == "plain" else "ResNet"
        (i0, s0, d0), (i1, s1, d1) = c["first"], c["last"]
        lines.append(f"- {name}-{c['deep']} has higher training error than {name}-{c['shallow']} at "
                     f"**{c['deeper_worse']} of {c['points']}** logged points (iteration {i0}: {100 * d0:.1f}% vs "
                     f"{100 * s0:.1f}%; iteration {i1}: {100 * d1:.1f}% vs {100 * s1:.1f}%)")
    return "\n".join(lines) + "\n\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Figure 6 of the paper: plain nets left, ResNets right, train dashed, test bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in rows})
    colours = dict(zip(depths, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind, label in ((axes[0], "plain", "plain"), (axes[1], "resnet", "ResNet")):
        for depth in depths:
            mine = [r for r in rows if r["kind"] == kind and r["depth"] == depth]
            train = [(r["iteration"], 100 * r["train_error"]) for r in mine if r["train_error"] is not None]
            test = [(r["iteration"], 100 * r["test_error"]) for r in mine if r["test_error"] is not None]
            name = f"{label}-{depth}"  # on the bold test curve, or on the training curve without one
            if train:
                ax.plot(*zip(*train), "--", color=colours[depth], linewidth=1, label=None if test else name)
            if test:
                ax.plot(*zip(*test), "-", color=colours[depth], linewidth=2.2, label=name)
        ax.set_title(f"{label} networks")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes, color="grey")
    axes[0].set_ylabel("error (%)   dashed: training, bold: test")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def table(results: list[dict[str, Any]], *, imagenet: bool) -> str:
    """Table 6 (or Table 2) of the paper next to ours."""
    paper_col = "paper ImageNet top-1 error %" if imagenet else "paper CIFAR-10 test error %"
    lines = [f"| network | depth | parameters | final train error % | final test error % | {paper_col} | wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if imagenet:
            paper = PAPER_IMAGENET_TOP1_ERROR.get((r["kind"], r["depth"]))
            paper_txt = "" if paper is None else f"{paper:.2f}"
        else:
            paper = PAPER_TEST_ERROR.get((r["kind"], r["depth"]))
            paper_txt = "" if paper is None else f"{paper[0]:.2f} ({paper[1]})"
        fmt = lambda v: "–" if v is None else f"{100 * v:.2f}"
        lines.append(f"| {r['network']} | {r['depth']} | {r['params']:,} | {fmt(r['train_error'])} | "
                     f"{fmt(r['test_error'])} | {paper_txt} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def run(preset_name: str, out_dir: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None,
        data_dir: str | None = None, overrides: dict[str, Any] | None = None,
        only: Sequence[str] | None = None, report_only: bool = False) -> list[dict[str, Any]]:
    """Trains (or resumes) every network of the preset and writes curves, plot and table.

    Args:
      preset_name: a key of PRESETS.
      out_dir: where curves.csv, degradation.png, RESULTS.md and summary.json are written.
      runs_dir: parent of the per-network workdirs (checkpoints, metrics); default out_dir/runs.
      data_dir: the data set's directory (a `<name>.npz` directory or a tfds data_dir).
      overrides: TrainConfig fields changed for every network.
      only: train only these networks (names like 'plain56').
      report_only: train nothing; write the outputs from whatever the workdirs hold (a running or
        interrupted experiment), unfinished networks marked as such.
    """
    import jax

    from cnnjax.train import train_and_evaluate

    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; valid choices: {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    overrides = dict(overrides or {})
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    nets = networks(preset, overrides=overrides)
    if only:
        unknown = sorted(set(only) - {n.name for n in nets})
        if unknown:
            raise ValueError(f"--only {unknown}: not in preset {preset_name!r}; its networks are {[n.name for n in nets]}")
        nets = [n for n in nets if n.name in only]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, all_rows = [], []
    for net in nets:
        workdir = Path(runs_dir or out / "runs") / net.name
        done = workdir / "DONE.json"
        info = json.loads(done.read_text()) if done.exists() else None
        # A finished run is skipped only for the same config; a longer one (num_steps raised) resumes.
        if info is not None and info.get("config") == net.config.to_dict():
            print(f"[degradation] {net.name}: finished earlier ({info['wall_s']:.0f} s), skipped", flush=True)
        elif report_only:
            wall = workdir / "WALL.json"
            info = {"wall_s": json.loads(wall.read_text())["wall_s"] if wall.exists() else 0.0,
                    "params": _param_count(net.config), "unfinished": True}
        else:
            print(f"[degradation] {net.name}: training {net.config.model} {net.config.model_kwargs or ''} "
                  f"for {net.config.num_steps or net.config.num_epochs} {'steps' if net.config.num_steps else 'epochs'}",
                  flush=True)
            start = time.time()
            previous = json.loads((workdir / "WALL.json").read_text())["wall_s"] if (workdir / "WALL.json").exists() else 0.0
            try:
                result = train_and_evaluate(net.config, str(workdir))  # makes the workdir once the run can start
            finally:
                if workdir.is_dir():  # not when the config failed before anything was written
                    atomic_write(workdir / "WALL.json", json.dumps({"wall_s": previous + time.time() - start}))
            if result.preempted:
                raise Interrupted(f"{net.name} stopped at step {result.step} by SIGTERM; run the same command "
                                  "again to resume")
            params = sum(int(x.size) for x in jax.tree.leaves(result.state.params))
            info = {"wall_s": previous + time.time() - start, "params": params, "step": result.step,
                    "config": net.config.to_dict()}
            atomic_write(done, json.dumps(info))
        rows = curves(net, read_metrics(workdir))
        all_rows.extend(rows)
        results.append({"network": net.name + (" (unfinished)" if info.get("unfinished") else ""), "kind": net.kind, "depth": net.depth, "model": net.config.model,
                        "model_kwargs": net.config.model_kwargs,
                        "params": info["params"],
                        "train_error": _last(rows, "train_error"), "test_error": _last(rows, "test_error"),
                        "wall_s": info["wall_s"]})
    _write_outputs(out, preset_name, preset, nets, results, all_rows)
    return results


def _write_outputs(out: Path, preset_name: str, preset: Preset, nets: list[Network],
                   results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    write_csv(out / "curves.csv", rows,
              ["network", "kind", "depth", "iteration", "epoch", "train_error", "test_error", "train_loss"])
    cfg = nets[0].config
    title = (f"{cfg.dataset}, preset '{preset_name}': {cfg.num_steps or cfg.num_epochs} "
             f"{'iterations' if cfg.num_steps else 'epochs'}, batch {cfg.global_batch_size}, lr {cfg.learning_rate}")
    plot(rows, out / "degradation.png", title)
    prov = provenance()
    prov["total_wall_min"] = round(sum(r["wall_s"] for r in results) / 60, 1)
    md = (f"# Degradation: plain versus residual networks (preset `{preset_name}`)\n\n{preset.description}\n\n"
          f"{table(results, imagenet=preset.imagenet)}\n"
          "Training error is the mean over the last logging interval of the per-batch training error "
          "(dashed in the plot); test error is measured on the whole test split (bold).\n\n"
          f"{check_markdown(degradation_check(rows))}"
          "![curves](degradation.png)\n\n"
          f"- command: `{prov['command']}`\n- machine: {prov['machine']}\n"
          f"- XLA_FLAGS: `{prov['xla_flags']}`\n- written: {prov['date']}\n"
          f"- training wall time, all networks: {prov['total_wall_min']} min (sum of the per-network times "
          "above, which include compilation and evaluation)\n")
    notes = out / "NOTES.md"  # hand-written history of the run (what was tried), kept across re-writes
    if notes.exists():
        md += "\n" + notes.read_text()
    atomic_write(out / "RESULTS.md", md)
    atomic_write(out / "summary.json", json.dumps({"preset": preset_name, "config": cfg.to_dict(),
                                                    "results": results, "check": degradation_check(rows),
                                                    "provenance": prov}, indent=2, default=str))


def _param_count(cfg: TrainConfig) -> int:
    """Parameters of a network's model at its input shape (eval_shape: no compile)."""
    from cnnjax import analysis, models

    spec = models.get_spec(cfg.model)
    h, w, c = spec.input_shape
    shape = (cfg.image_size or h, cfg.image_size or w, cfg.channels or c)
    return analysis.parameter_count(models.create(cfg.model, **cfg.model_kwargs), shape)


def provenance() -> dict[str, str]:
    """What a result file should say about how it was made."""
    from experiments._report import machine

    return {
        "command": " ".join(["python -m experiments.degradation", *sys.argv[1:]]) if sys.argv[0].endswith(
            "degradation.py") else " ".join(sys.argv),
        "machine": machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    from cnnjax import xla_flags

    xla_flags.configure_cpu()  # the measured CPU fast path, before JAX starts (CNNJAX_CPU_FAST=0: off)
    parser = argparse.ArgumentParser(prog="python -m experiments.degradation", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="experiment preset (default quick)")
    parser.add_argument("--out", default=None, type=out_dir,
                        help="output directory (default experiments/results/degradation_<preset>)")
    parser.add_argument("--workdir", default=None,
                        help="parent of the per-network run directories (default runs/degradation_<preset>)")
    parser.add_argument("--data-dir", default=None, help="directory with <dataset>.npz, or a tfds data_dir")
    parser.add_argument("--only", nargs="*", default=None, help="train only these networks (e.g. plain20 resnet56)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write curves, plot and table from the runs so far")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override TrainConfig fields for every network (e.g. num_steps=500)")
    args = parser.parse_args(argv)
    from cnnjax.train.config import parse_field, field_names

    overrides = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or field not in field_names():
            parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {field_names()}")
        try:
            overrides[field] = parse_field(field, value)
        except ValueError as e:
            parser.error(f"--set {item!r}: {e}")
    out = args.out or os.path.join("experiments", "results", f"degradation_{args.preset}")
    try:
        results = run(args.preset, out, runs_dir=args.workdir or os.path.join("runs", f"degradation_{args.preset}"),
                      data_dir=args.data_dir, overrides=overrides, only=args.only, report_only=args.report_only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 143
    print(table(results, imagenet=PRESETS[args.preset].imagenet))
    print(f"wrote {out}/curves.csv, degradation.png, RESULTS.md, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
