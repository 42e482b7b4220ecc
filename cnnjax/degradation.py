"""The degradation of plain versus residual networks (He et al. 2016, Figure 6 / Table 6, Figure 4).

Trains plain and residual networks of several depths on the same data with the same recipe and
writes into the output directory (default runs/degradation_<preset>; `--out
experiments/results/degradation_<preset>` refreshes the committed reference there):

  curves.csv      network, kind, depth, seed, iteration, epoch, train_error, test_error, train_loss
  degradation.png Figure-6 style: plain nets left, ResNets right; training error dashed,
                  test error bold; one colour per depth (the mean over seeds); iterations on x
  RESULTS.md      Table-6 style: depth, parameters, final train and test error (best and mean +-
                  std over the seeds, as the paper reports ResNet-110), the paper's figure and the
                  public reproductions; the point-by-point check (at how many logged points after
                  the first epoch the deeper net of each kind has the higher training error);
                  NOTES.md of the output directory appended (the hand-written history)
  summary.json    the same as data, with each network's wall time, the whole experiment's, the
                  device and the software versions

The networks train on `cnnjax.train`'s engine as programs (one resumable workdir each, under
--workdir, default runs/degradation_<preset> as well; never committed): with the preset's `twins`
the plain and residual nets of one depth are two members of one program, and --seeds K makes K
seeds of each network members too; the accelerator presets keep the data on the device and run
many steps per call.

  cnnjax degradation                       # preset 'quick' on the embedded digits
  cnnjax degradation --preset cpu --data_dir ../shared/data
  cnnjax degradation --preset paper_headline --data_dir DIR  # one GPU, paper recipe
  cnnjax degradation --preset paper --data_dir DIR --seeds 5  # Figure 6, Table 6
  cnnjax degradation --preset imagenet --data_dir DIR  # Figure 4 (18/34 layers)

(`python -m experiments.degradation ...` in the repository is the same.)

An interrupted experiment continues where it stopped: finished programs are skipped and an
unfinished one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnjax.cli import ArgumentParser
from cnnjax.reporting import atomic_write, out_dir, save_figure, write_csv
from cnnjax.train import metrics as train_metrics
from cnnjax.train.config import PRESETS as TRAIN_PRESETS
from cnnjax.train.config import TrainConfig

# He et al. 2016, Table 6 (CIFAR-10 test error %, ResNets, option A; ResNet-110: best of 5 runs,
# "6.61 +- 0.16" their mean) and Table 2 (ImageNet top-1 error %, 10-crop).
PAPER_TEST_ERROR = {
    ("resnet", 20): 8.75,
    ("resnet", 32): 7.51,
    ("resnet", 44): 7.17,
    ("resnet", 56): 6.97,
    ("resnet", 110): 6.43,
    ("resnet", 1202): 7.93,
}
PAPER_IMAGENET_TOP1_ERROR = {
    ("plain", 18): 27.94,
    ("plain", 34): 28.54,
    ("resnet", 18): 27.88,
    ("resnet", 34): 25.03,
}
# Public reproductions (../shared/REFERENCE.md): CIFAR-10 test error %, (mean, std) or one run.
REPRODUCTIONS = {
    "nabla0001/resnet, paper recipe, 5 runs": {
        ("plain", 20): (9.78, 0.13),
        ("plain", 56): (12.95, 0.22),
        ("resnet", 20): (8.51, 0.22),
        ("resnet", 56): (7.40, 0.27),
        ("resnet", 110): (7.14, 0.20),
    },
    "akamaster, 200 epochs, 1 run": {
        ("resnet", 20): (8.27, None),
        ("resnet", 32): (7.37, None),
        ("resnet", 44): (6.90, None),
        ("resnet", 56): (6.61, None),
        ("resnet", 110): (6.32, None),
        ("resnet", 1202): (6.18, None),
    },
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A degradation experiment: one training recipe, the depths of each kind of network.

    twins: the plain and residual nets of one depth train as two members of one program
    (`TrainConfig.twins`); seeds: the default of --seeds, seeds of each network in one program.
    """

    description: str
    config: TrainConfig
    plain_depths: tuple[int, ...]
    resnet_depths: tuple[int, ...]
    # Per-depth config changes (ResNet-110's warm-up).
    per_depth: dict[tuple[str, int], dict[str, Any]] = dataclasses.field(default_factory=dict)
    imagenet: bool = False
    # Model options for every network of a kind ("plain" or "resnet"), e.g. zero_init_residual.
    kind_kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    twins: bool = False
    seeds: int = 1


_PAPER = TRAIN_PRESETS["cifar_resnet"]
_WARMUP_110 = {"warmup_steps": 400, "warmup": "constant", "warmup_lr": 0.01}
# The accelerator engine (cnnjax.train.engine): the split on the device, 100 steps per call.
_ENGINE = {"data_on_device": True, "steps_per_dispatch": 100}
_PAPER_TEXT = (
    "He et al. 2016, section 4.2: 64k iterations, batch 128, lr 0.1 /10 at 32k and 48k, weight "
    "decay 1e-4, momentum 0.9, option A, pad-crop-flip, per-pixel mean, He initialisation with "
    "every BN at gamma 1; ResNet-110 at lr 0.01 for its first 400 iterations. The full 50k "
    "images train (the paper fixed its schedule on a 45k/5k split). On the accelerator engine: "
    "data on the device, 100 steps per call, the plain and residual net of each depth as two "
    "members of one program."
)

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        "Embedded scikit-learn digits at 16x16x3 (1,500 training images), 240 iterations at lr "
        "0.1: the whole picture (plain-56 stuck, ResNet-56 fine) in under ten minutes on a 2-core "
        "CPU. The ResNets start each residual branch's last BN at gamma 0 (Goyal et al. 2017; the "
        "paper does not): with the paper's init ResNet-56 lags ResNet-20 at every logged point of "
        "so short a run (NOTES.md).",
        TRAIN_PRESETS["digits_resnet"].replace(
            num_steps=240,
            log_every=20,
            eval_every=40,
            checkpoint_every=120,
            rng_impl="rbg",
            data_on_device=True,
            steps_per_dispatch=20,
        ),
        plain_depths=(20, 56),
        resnet_depths=(20, 56),
        kind_kwargs={"resnet": {"zero_init_residual": True}},
        twins=True,
    ),
    "cpu": Preset(
        "Real CIFAR-10 (full 50k training set) with the paper's recipe compressed for a 2-core "
        "CPU: 1,000 iterations (2.6 epochs), lr 0.1 divided by 10 at 500 and 750 (the paper's "
        "32k/48k of 64k, scaled), depths 20 and 56; about an hour for the 56-layer pair on 2 "
        "cores. The ResNets start each residual branch's last BN at gamma 0 (Goyal et al. 2017; "
        "the paper does not): with the paper's init ResNet-56 lags ResNet-20 at every logged "
        "point of so short a run (NOTES.md).",
        _PAPER.replace(
            num_steps=1_000,
            boundaries=(500, 750),
            log_every=25,
            eval_every=200,
            checkpoint_every=200,
            rng_impl="rbg",
            data_on_device=True,
            steps_per_dispatch=25,
        ),
        plain_depths=(20, 56),
        resnet_depths=(20, 56),
        kind_kwargs={"resnet": {"zero_init_residual": True}},
        twins=True,
    ),
    "paper": Preset(
        "Figure 6 and Table 6 at the paper's recipe. " + _PAPER_TEXT,
        _PAPER.replace(**_ENGINE),
        plain_depths=(20, 32, 44, 56),
        resnet_depths=(20, 32, 44, 56, 110),
        per_depth={("resnet", 110): _WARMUP_110},
        twins=True,
    ),
    "paper_headline": Preset(
        "The headline four of Figure 6 (plain-20/56, ResNet-20/56) at the paper's recipe. "
        + _PAPER_TEXT,
        _PAPER.replace(**_ENGINE),
        plain_depths=(20, 56),
        resnet_depths=(20, 56),
        twins=True,
    ),
    "imagenet": Preset(
        "He et al. 2016, Figure 4 / Table 2: plain-18/34 versus ResNet-18/34 on ImageNet (option "
        "A in the paper; torchvision-style projections here, option B); for a TPU/GPU cluster.",
        TRAIN_PRESETS["imagenet_resnet"].replace(dtype="bfloat16"),
        plain_depths=(18, 34),
        resnet_depths=(18, 34),
        imagenet=True,
    ),
    # What CI runs: seconds, every code path (twins, two seeds in one program, data on the device).
    "tiny": Preset(
        "CI smoke test: digits at 8x8x3, depths 8 and 14, a few iterations, two seeds.",
        TRAIN_PRESETS["digits_resnet"].replace(
            image_size=8,
            num_steps=6,
            log_every=2,
            eval_every=4,
            checkpoint_every=4,
            global_batch_size=32,
            progress_bar=False,
            rng_impl="rbg",
            augment="cifar",
            data_on_device=True,
            steps_per_dispatch=2,
        ),
        plain_depths=(8, 14),
        resnet_depths=(8, 14),
        twins=True,
        seeds=2,
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


@dataclasses.dataclass(frozen=True)
class Program:
    """Networks trained together in one run of the engine: their members share one workdir."""

    config: TrainConfig
    networks: tuple[Network, ...]

    @property
    def name(self) -> str:
        return "+".join(n.name for n in self.networks)


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
                    raise ValueError(
                        f"no registered ImageNet model {name!r}; choose depths among "
                        "18/34/50/101/152"
                    )
                # Any CIFAR depth 6n+2: the generic CIFAR net with its depth overridden.
                name, kwargs = f"{kind}20", {"depth": depth}
            cfg = preset.config.override(
                model=name,
                model_kwargs={
                    **preset.config.model_kwargs,
                    **preset.kind_kwargs.get(kind, {}),
                    **kwargs,
                    **extra_kwargs,
                },
                **preset.per_depth.get((kind, depth), {}),
                **overrides,
            )
            nets.append(Network(kind, depth, cfg))
    return nets


def programs(nets: Sequence[Network], *, twins: bool, seeds: int) -> list[Program]:
    """The programs that train `nets`, `seeds` seeds of each: with `twins`, the plain and residual
    net of one depth in one program wherever their configs differ only in the model (the plain
    net without the ResNet's zero_init_residual); every other network alone."""
    progs, paired = [], set()
    for plain in nets:
        if not twins or plain.kind != "plain":
            continue
        res = next((n for n in nets if n.kind == "resnet" and n.depth == plain.depth), None)
        if res is None:
            continue
        plain_kwargs = {
            k: v for k, v in res.config.model_kwargs.items() if k != "zero_init_residual"
        }
        if (
            plain.config.replace(model=res.config.model, model_kwargs=res.config.model_kwargs)
            != res.config
            or plain.config.model_kwargs != plain_kwargs
        ):
            continue
        progs.append(Program(res.config.replace(twins=True, seeds=seeds), (plain, res)))
        paired.update((plain.name, res.name))
    progs += [Program(n.config.replace(seeds=seeds), (n,)) for n in nets if n.name not in paired]
    order = [n.name for n in nets]
    return sorted(progs, key=lambda p: order.index(p.networks[0].name))


def read_metrics(workdir: Path) -> list[dict[str, Any]]:
    """The records of a program's metrics.jsonl (`cnnjax.train.read_metrics`)."""
    return train_metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))


CURVE_FIELDS = [
    "network",
    "kind",
    "depth",
    "seed",
    "iteration",
    "epoch",
    "train_error",
    "test_error",
    "train_loss",
]


def curves(net: Network, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per seed and logged step of `net` (its records in a program's metrics.jsonl):
    training error and loss, and the test error where evaluated."""
    by_key: dict[tuple[int, int], dict[str, Any]] = {}
    for r in records:
        if r.get("network", net.name) != net.name:
            continue
        seed, step = int(r.get("seed", net.config.seed)), int(r["step"])
        row = by_key.setdefault(
            (seed, step),
            {
                "network": net.name,
                "kind": net.kind,
                "depth": net.depth,
                "seed": seed,
                "iteration": step,
                "epoch": r.get("epoch"),
                "train_error": None,
                "test_error": None,
                "train_loss": None,
            },
        )
        for key in ("train_error", "test_error", "train_loss"):
            if r.get(key) is not None:
                row[key] = r[key]
        if r.get("epoch") is not None:
            row["epoch"] = r["epoch"]
    return [by_key[k] for k in sorted(by_key)]


def mean_curves(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curves averaged over the seeds: one row per network and iteration."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["network"], r["iteration"]), []).append(r)
    out = []
    for (_, _), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        row = {k: rs[0][k] for k in ("network", "kind", "depth", "iteration", "epoch")}
        for key in ("train_error", "test_error", "train_loss"):
            values = [r[key] for r in rs if r[key] is not None]
            row[key] = statistics.fmean(values) if values else None
        out.append(row)
    return out


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return values[-1] if values else None


def degradation_check(
    rows: list[dict[str, Any]], *, after_epoch: float = 1.0
) -> dict[str, dict[str, Any]]:
    """The lecture's claim, point by point: for each kind, the deepest against the shallowest net's
    training error at every iteration both logged after `after_epoch` epochs (rows of one seed, or
    `mean_curves`).

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
        err = {
            d: {
                r["iteration"]: r["train_error"]
                for r in rows
                if r["kind"] == kind
                and r["depth"] == d
                and r["train_error"] is not None
                and (r["epoch"] or 0) >= after_epoch
            }
            for d in (shallow, deep)
        }
        its = sorted(set(err[shallow]) & set(err[deep]))
        if not its:
            continue
        pts = [(i, err[shallow][i], err[deep][i]) for i in its]
        check[kind] = {
            "shallow": shallow,
            "deep": deep,
            "points": len(pts),
            "deeper_worse": sum(d > s for _, s, d in pts),
            "first": pts[0],
            "last": pts[-1],
        }
    return check


def check_markdown(check: dict[str, dict[str, Any]]) -> str:
    """A line per kind: at how many logged points after the first epoch the deeper net is worse."""
    if not check:
        return ""
    lines = [
        "Training error after the first epoch, point by point (the lecture: the deeper plain net "
        "is worse at every point, the deeper ResNet is not):\n"
    ]
    for kind, c in check.items():
        name = "plain" if kind == "plain" else "ResNet"
        (i0, s0, d0), (i1, s1, d1) = c["first"], c["last"]
        lines.append(
            f"- {name}-{c['deep']} has higher training error than {name}-{c['shallow']} at "
            f"**{c['deeper_worse']} of {c['points']}** logged points (iteration {i0}: "
            f"{100 * d0:.1f}% vs {100 * s0:.1f}%; iteration {i1}: {100 * d1:.1f}% vs "
            f"{100 * s1:.1f}%)"
        )
    return "\n".join(lines) + "\n\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Figure 6 of the paper: plain nets left, ResNets right, train dashed, test bold (rows of one
    seed, or `mean_curves`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in rows})
    colours = dict(zip(depths, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, kind, label in ((axes[0], "plain", "plain"), (axes[1], "resnet", "ResNet")):
        for depth in depths:
            mine = [r for r in rows if r["kind"] == kind and r["depth"] == depth]
            train = [
                (r["iteration"], 100 * r["train_error"])
                for r in mine
                if r["train_error"] is not None
            ]
            test = [
                (r["iteration"], 100 * r["test_error"]) for r in mine if r["test_error"] is not None
            ]
            name = (
                f"{label}-{depth}"  # on the bold test curve, or on the training curve without one
            )
            if train:
                ax.plot(
                    *zip(*train),
                    "--",
                    color=colours[depth],
                    linewidth=1,
                    label=None if test else name,
                )
            if test:
                ax.plot(*zip(*test), "-", color=colours[depth], linewidth=2.2, label=name)
        ax.set_title(f"{label} networks")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
        else:
            ax.text(
                0.5,
                0.5,
                "no results yet",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
    axes[0].set_ylabel("error (%)   dashed: training, bold: test")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if std is None else f"{v:.2f} ± {std:.2f}"


def table(results: list[dict[str, Any]], *, imagenet: bool) -> str:
    """Table 6 (or Table 2) of the paper next to ours: the final test error, best and mean +- std
    over the seeds (as the paper gives ResNet-110's), with the public reproductions."""
    seeds = max((len(r["per_seed"]) for r in results), default=1)
    ours = (
        "final test error %" if seeds == 1 else f"final test error %, best (mean ± std of {seeds})"
    )
    if imagenet:
        head, refs = ["paper ImageNet top-1 error %"], []
    else:
        head, refs = ["paper (Table 6)"], list(REPRODUCTIONS)
    lines = [
        "| network | depth | parameters | final train error % | "
        + " | ".join([ours, *head, *refs])
        + " | wall time |",
        "|---" * (6 + len(head) + len(refs)) + "|",
    ]
    for r in results:
        key = (r["kind"], r["depth"])
        paper = (PAPER_IMAGENET_TOP1_ERROR if imagenet else PAPER_TEST_ERROR).get(key)
        cells = [_pct(paper)] + [
            _pct(*REPRODUCTIONS[name][key]) if key in REPRODUCTIONS[name] else "" for name in refs
        ]
        pct = lambda v: None if v is None else 100 * v  # noqa: E731
        test = _pct(pct(r["test_error"]))
        if len(r["per_seed"]) > 1:
            mean = _pct(pct(r["test_error"]), pct(r["test_error_std"]))
            test = f"{_pct(pct(r['test_error_best']))} ({mean})"
        train = _pct(pct(r["train_error"]))
        row = [r["network"], str(r["depth"]), f"{r['params']:,}", train, test, *cells]
        lines.append("| " + " | ".join(row) + f" | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def network_result(
    net: Network,
    rows: list[dict[str, Any]],
    params: int,
    wall_s: float,
    program: str,
    unfinished: bool = False,
) -> dict[str, Any]:
    """A network's row of the table: final errors per seed, their mean, std and best."""
    per_seed = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        per_seed.append(
            {
                "seed": seed,
                "train_error": _last(mine, "train_error"),
                "test_error": _last(mine, "test_error"),
            }
        )
    tests = [s["test_error"] for s in per_seed if s["test_error"] is not None]
    trains = [s["train_error"] for s in per_seed if s["train_error"] is not None]
    return {
        "network": net.name + (" (unfinished)" if unfinished else ""),
        "kind": net.kind,
        "depth": net.depth,
        "model": net.config.model,
        "model_kwargs": net.config.model_kwargs,
        "params": params,
        "train_error": statistics.fmean(trains) if trains else None,
        "test_error": statistics.fmean(tests) if tests else None,
        "test_error_best": min(tests) if tests else None,
        "test_error_std": statistics.stdev(tests) if len(tests) > 1 else None,
        "per_seed": per_seed,
        "wall_s": wall_s,
        "program": program,
    }


def run(
    preset_name: str,
    out_dir: str | os.PathLike,
    *,
    runs_dir: str | os.PathLike | None = None,
    data_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
    report_only: bool = False,
    seeds: int | None = None,
    twins: bool | None = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Trains (or resumes) every network of the preset and writes curves, plot and table.

    Args:
      preset_name: a key of PRESETS.
      out_dir: where curves.csv, degradation.png, RESULTS.md and summary.json are written.
      runs_dir: parent of the per-program workdirs (checkpoints, metrics); default out_dir/runs.
      data_dir: the data set's directory (a `<name>.npz` directory or a tfds data_dir).
      overrides: TrainConfig fields changed for every network.
      only: train only these networks (names like 'plain56').
      report_only: train nothing; write the outputs from whatever the workdirs hold (a running or
        interrupted experiment), unfinished networks marked as such. With nothing to report,
        ValueError, and the output directory is left as it is.
      seeds: seeds of each network (default: the preset's), members of its program.
      twins: train the plain and residual net of a depth in one program (default: the preset's).
      command: the command line to record in the results (default: this process's).
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; valid choices: {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    seeds = preset.seeds if seeds is None else seeds
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    overrides = dict(overrides or {})
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    nets = networks(preset, overrides=overrides)
    if only:
        unknown = sorted(set(only) - {n.name for n in nets})
        if unknown:
            names = [n.name for n in nets]
            raise ValueError(
                f"--only {unknown}: not in preset {preset_name!r}; its networks are {names}"
            )
        nets = [n for n in nets if n.name in only]
    progs = programs(nets, twins=preset.twins if twins is None else twins, seeds=seeds)
    for prog in progs:
        prog.config.validate()
    out, runs = Path(out_dir), Path(runs_dir or Path(out_dir) / "runs")
    t_start, trained = time.time(), False
    results, all_rows, infos = [], [], []
    for prog in progs:
        workdir = runs / prog.name
        info = _train(prog, workdir, report_only)
        trained |= bool(info.pop("trained", False))
        infos.append({"program": prog.name, "networks": [n.name for n in prog.networks], **info})
        records = read_metrics(workdir)
        for net in prog.networks:
            rows = curves(net, records)
            all_rows.extend(rows)
            results.append(
                network_result(
                    net,
                    rows,
                    _param_count(net.config),
                    info["wall_s"],
                    prog.name,
                    unfinished=info.get("unfinished", False),
                )
            )
    if report_only and not all_rows:
        raise ValueError(
            f"nothing to report: no metrics under {runs} (train first, or give --workdir); "
            f"{out} is left as it is"
        )
    out.mkdir(parents=True, exist_ok=True)
    total = _total_wall(runs, time.time() - t_start if trained else 0.0, infos)
    _write_outputs(out, preset_name, preset, progs, results, all_rows, infos, total, command)
    return results


def _train(prog: Program, workdir: Path, report_only: bool) -> dict[str, Any]:
    """Trains a program (or finds it done); returns its wall time and state."""
    from cnnjax.train import train_and_evaluate

    done, wall = workdir / "DONE.json", workdir / "WALL.json"
    info = json.loads(done.read_text()) if done.exists() else None
    previous = json.loads(wall.read_text())["wall_s"] if wall.exists() else 0.0
    # A finished program is skipped only for the same config; a longer one (more steps) resumes.
    if info is not None and info.get("config") == prog.config.to_dict():
        print(
            f"[degradation] {prog.name}: finished earlier ({info['wall_s']:.0f} s), skipped",
            flush=True,
        )
        return {"wall_s": info["wall_s"]}
    if report_only:
        return {"wall_s": previous, "unfinished": True}
    cfg = prog.config
    print(
        f"[degradation] {prog.name}: training {cfg.model} {cfg.model_kwargs or ''}"
        f"{' as twins' if cfg.twins else ''}, {cfg.seeds} seed(s), for "
        f"{cfg.num_steps or cfg.num_epochs} {'steps' if cfg.num_steps else 'epochs'}",
        flush=True,
    )
    start = time.time()
    try:
        result = train_and_evaluate(cfg, str(workdir))  # makes the workdir once the run can start
    finally:
        if workdir.is_dir():  # not when the config failed before anything was written
            atomic_write(wall, json.dumps({"wall_s": previous + time.time() - start}))
    if result.preempted:
        raise Interrupted(
            f"{prog.name} stopped at step {result.step} by SIGTERM; run the same command "
            "again to resume"
        )
    info = {"wall_s": previous + time.time() - start, "step": result.step, "config": cfg.to_dict()}
    atomic_write(done, json.dumps(info))
    return {"wall_s": info["wall_s"], "trained": True}


def _total_wall(runs: Path, elapsed: float, infos: list[dict[str, Any]]) -> float:
    """The experiment's wall time from start to last result, over all the invocations that trained
    (kept in runs/EXPERIMENT.json); without that record, the programs' own times."""
    path = runs / "EXPERIMENT.json"
    if path.exists():
        total = json.loads(path.read_text())["total_wall_s"] + elapsed
    else:
        total = elapsed or sum(i["wall_s"] for i in infos)
    if elapsed and runs.is_dir():
        atomic_write(path, json.dumps({"total_wall_s": total}))
    return total


def _write_outputs(
    out: Path,
    preset_name: str,
    preset: Preset,
    progs: list[Program],
    results: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    infos: list[dict[str, Any]],
    total_wall_s: float,
    command: str | None,
) -> None:
    write_csv(out / "curves.csv", rows, CURVE_FIELDS)
    cfg = progs[0].config
    mean = mean_curves(rows)
    seeds = cfg.seeds
    length = f"{cfg.num_steps} iterations" if cfg.num_steps else f"{cfg.num_epochs} epochs"
    title = (
        f"{cfg.dataset}, preset '{preset_name}': {length}, batch {cfg.global_batch_size}, "
        f"lr {cfg.learning_rate}" + (f", mean of {seeds} seeds" if seeds > 1 else "")
    )
    plot(mean, out / "degradation.png", title)
    prov = provenance(command)
    check = degradation_check(mean)
    mean_note = (
        f"; curves and the check below are the means over {seeds} seeds" if seeds > 1 else ""
    )
    software = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    md = (
        f"# Degradation: plain versus residual networks (preset `{preset_name}`)\n\n"
        f"{preset.description}\n\n{table(results, imagenet=preset.imagenet)}\n"
        "Training error is the mean over the last logging interval of the per-batch training error "
        f"(dashed in the plot); test error is measured on the whole test split (bold){mean_note}. "
        f"Networks of one program ({', '.join(f'`{p.name}`' for p in progs)}) trained together: "
        "the wall time is the program's.\n\n"
        f"{check_markdown(check)}"
        "![curves](degradation.png)\n\n"
        f"- command: `{prov['command']}`\n- machine: {prov['machine']}\n"
        f"- device: {prov['device']}\n- software: {software}\n"
        f"- XLA_FLAGS: `{prov['xla_flags']}`\n- written: {prov['date']}\n"
        "- wall time of the whole experiment, from start to last result: "
        f"{total_wall_s / 60:.1f} min (data loading, compilation, training and evaluation)\n"
    )
    notes = out / "NOTES.md"  # the hand-written history (what was tried), kept across re-writes
    if notes.exists():
        md += "\n" + notes.read_text()
    atomic_write(out / "RESULTS.md", md)
    atomic_write(
        out / "summary.json",
        json.dumps(
            {
                "preset": preset_name,
                "config": cfg.to_dict(),
                "seeds": seeds,
                "programs": infos,
                "results": results,
                "check": check,
                "total_wall_s": total_wall_s,
                "provenance": prov,
            },
            indent=2,
            default=str,
        ),
    )


def _param_count(cfg: TrainConfig) -> int:
    """Parameters of a network's model at its input shape (eval_shape: no compile)."""
    from cnnjax import analysis, models

    spec = models.get_spec(cfg.model)
    h, w, c = spec.input_shape
    shape = (cfg.image_size or h, cfg.image_size or w, cfg.channels or c)
    return analysis.parameter_count(models.create(cfg.model, **cfg.model_kwargs), shape)


def provenance(command: str | None = None) -> dict[str, Any]:
    """What a result file should say about how it was made: command, machine, device, versions."""
    from cnnjax.reporting import device, machine, software

    return {
        "command": command or " ".join(sys.argv),
        "machine": machine(),
        "device": device(),
        "versions": software(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv: Sequence[str] | None = None, prog: str = "cnnjax degradation") -> int:
    from cnnjax import xla_flags

    xla_flags.configure_cpu()  # the measured CPU fast path, before JAX starts (CNNJAX_CPU_FAST=0)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default="quick",
        choices=sorted(PRESETS),
        help="experiment preset (default quick)",
    )
    parser.add_argument(
        "--out",
        default=None,
        type=out_dir,
        help="output directory (default runs/degradation_<preset>; the committed reference is "
        "experiments/results/degradation_<preset>)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="parent of the per-program run directories (default runs/degradation_<preset>)",
    )
    parser.add_argument(
        "--data_dir",
        dest="data_dir",
        default=None,
        help="directory with <dataset>.npz, or a tfds data_dir",
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="train only these networks (e.g. plain20 resnet56)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds of each network, members of its program; Table 6 gives best and mean +- std "
        "(default: the preset's)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype of every network (default: the preset's, float32)",
    )
    parser.add_argument(
        "--no_twins",
        dest="twins",
        action="store_false",
        default=None,
        help="train each network in a program of its own, not the plain and residual net of "
        "a depth together",
    )
    parser.add_argument(
        "--report_only",
        dest="report_only",
        action="store_true",
        help="train nothing: write curves, plot and table from the runs so far",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override TrainConfig fields for every network (e.g. num_steps=500)",
    )
    args = parser.parse_args(argv)
    from cnnjax.train.config import field_names, parse_field

    overrides = {} if args.dtype is None else {"dtype": args.dtype}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep or field not in field_names():
            parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {field_names()}")
        try:
            overrides[field] = parse_field(field, value)
        except ValueError as e:
            parser.error(f"--set {item!r}: {e}")
    out = args.out or os.path.join("runs", f"degradation_{args.preset}")
    try:
        results = run(
            args.preset,
            out,
            runs_dir=args.workdir or os.path.join("runs", f"degradation_{args.preset}"),
            data_dir=args.data_dir,
            overrides=overrides,
            only=args.only,
            report_only=args.report_only,
            seeds=args.seeds,
            twins=args.twins,
            command=" ".join([prog, *argv]),
        )
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
