"""BatchNorm helps optimisation: the same network with and without BatchNorm, over learning rates
and two initialisations (the lecture's "advantages of BN": higher learning rates, faster
convergence, less sensitivity to the initialisation).

The network is a plain VGG-style CNN of seven weight layers: three stages of two 3x3 convolutions
(16, 32, 64 filters; 2x2 max pooling between stages), global average pooling and a linear
classifier; with BatchNorm after every convolution (which then has no bias) or without. Its
kernels are initialised either by He et al. (2015: N(0, 2 / fan_in)) or by a fixed N(0, 0.01^2),
the Gaussian of the AlexNet era, which shrinks the signal by about 10x per layer here. Every run
uses SGD with momentum 0.9, a constant learning rate, batch 64, the same batches in the same
order and the same number of steps; a run whose loss becomes NaN or infinite is reported as
diverged at that step.

All the runs of one network (with or without BN) share one compiled `cnnjax.train` step: the
learning rate lives in the optimiser state (`optax.inject_hyperparams`), not in the program.
That is one compilation per network instead of one per run, which on a CPU would cost more than
these short runs themselves. Writes
batchnorm_study.{md,csv,png} and batchnorm_final.png into --out:

  python -m experiments.batchnorm_study                # 16x16 digits, 5 rates x 2 inits x BN/no BN
  python -m experiments.batchnorm_study --preset tiny  # CI smoke run
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import data
from cnnjax import nn as cnn
from cnnjax.reporting import atomic_write, save_figure, write_csv
from cnnjax.reporting import machine as _machine
from cnnjax.train import create_train_state, make_eval_step, make_train_step
from experiments._report import claims_parser

NAME = "batchnorm_study"
INITS = {
    "he": "he_normal_fan_in",
    "gauss0.01": "normal_0.01",
}  # short name -> cnnjax.nn.INITIALIZERS
INIT_LABELS = {"he": "He N(0, 2/fan_in)", "gauss0.01": "N(0, 0.01^2)"}


class StudyCNN(nn.Module):
    """Plain CNN: stages of 3x3 conv [-> BatchNorm] -> ReLU, 2x2 max pool between stages, GAP, FC.

    Args:
      num_classes: classifier outputs.
      widths: filters of each stage.
      convs_per_stage: 3x3 convolutions per stage.
      batch_norm: BatchNorm after every convolution (the convolutions then have no bias).
      weight_init: 'he' (N(0, 2 / fan_in)) or 'gauss0.01' (N(0, 0.01^2)) for every kernel.
      bn_axis_name: mapped axis of the BatchNorm statistics (the trainer's 'batch').
      bn_momentum: running-average momentum (Flax convention).
    """

    num_classes: int
    widths: Sequence[int] = (16, 32, 64)
    convs_per_stage: int = 2
    batch_norm: bool = True
    weight_init: str = "he"
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        if self.weight_init not in INITS:
            raise ValueError(
                f"weight_init must be one of {sorted(INITS)}, got {self.weight_init!r}"
            )
        kernel_init = INITS[self.weight_init]
        for s, width in enumerate(self.widths):
            if s:
                x = cnn.MaxPool(2, 2, name=f"pool{s}")(x)
            for i in range(self.convs_per_stage):
                name = f"stage{s + 1}_conv{i + 1}"
                x = cnn.Conv(
                    width,
                    3,
                    padding=1,
                    use_bias=not self.batch_norm,
                    kernel_init=kernel_init,
                    name=name,
                )(x)
                if self.batch_norm:
                    x = cnn.BatchNorm(
                        use_running_average=not train,
                        momentum=self.bn_momentum,
                        axis_name=self.bn_axis_name,
                        name=f"stage{s + 1}_bn{i + 1}",
                    )(x)
                x = jax.nn.relu(x)
        x = cnn.GlobalAvgPool(name="gap")(x)
        return cnn.Dense(self.num_classes, kernel_init=kernel_init, name="fc")(x)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A sweep: the data, its length, the learning rates, the initialisations and
    the network's shape."""

    description: str
    image_size: int
    steps: int
    learning_rates: tuple[float, ...]
    inits: tuple[str, ...] = ("he", "gauss0.01")
    batch_size: int = 64
    log_every: int = 10
    eval_every: int = 50
    widths: tuple[int, ...] = (16, 32, 64)
    convs_per_stage: int = 2


PRESETS = {
    "digits": Preset(
        "scikit-learn digits at 16x16x1 (1,437 train / 360 test images), "
        "150 steps of 64 (6.7 epochs)",
        16,
        150,
        (0.01, 0.03, 0.1, 0.3, 1.0),
    ),
    "tiny": Preset(
        "CI smoke run: digits at 8x8, 4 steps of 32, He init only, widths 4/8, one conv per stage",
        8,
        4,
        (0.1, 1e12),
        ("he",),
        batch_size=32,
        log_every=2,
        eval_every=2,
        widths=(4, 8),
        convs_per_stage=1,
    ),
}


def sweep(preset: Preset, batch_norm: bool, seed: int = 0) -> list[dict[str, Any]]:
    """Trains every (init, learning rate) of one network with one compiled step; one
    record list per run."""
    ds = data.load_dataset("digits", image_size=preset.image_size, channels=1, seed=seed)
    pipe = data.Pipeline(ds, preset.batch_size, normalize="per_channel", seed=seed)
    stream = pipe.train_stream()
    batches = [next(stream) for _ in range(preset.steps)]  # every run sees these, in this order
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.9)
    shape = {"widths": preset.widths, "convs_per_stage": preset.convs_per_stage}
    model = StudyCNN(
        ds.num_classes, batch_norm=batch_norm, **shape
    )  # the init only matters at initialisation
    train_step = jax.jit(
        make_train_step(model, tx, lambda step: 0.0, axis_name=None, rng_impl="rbg")
    )
    eval_step = jax.jit(make_eval_step(model, axis_name=None))

    def test_error(state) -> float:
        sums = [jax.device_get(eval_step(state, batch)) for batch in pipe.eval_batches("test")]
        return float(sum(x["error"] for x in sums) / sum(x["count"] for x in sums))

    runs = []
    for init in preset.inits:
        # Same key for both inits: they differ only in the scale of the same draws.
        initial = create_train_state(
            jax.random.key(seed, impl="rbg"),
            StudyCNN(ds.num_classes, batch_norm=batch_norm, weight_init=init, **shape),
            tx,
            ds.image_shape,
        )
        for lr in preset.learning_rates:
            hyper = {**initial.opt_state.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)}
            state = initial.replace(opt_state=initial.opt_state._replace(hyperparams=hyper))
            records, window, diverged_at = [], [], None
            for step, batch in enumerate(batches, start=1):
                state, metrics = train_step(state, batch)
                loss, error = float(metrics["loss"]), float(metrics["error"])
                if not np.isfinite(loss):
                    diverged_at = step
                    # A row of its own: a run that diverges before its first log still has one.
                    records.append(
                        {"step": step, "epoch": step / pipe.steps_per_epoch, "train_loss": loss}
                    )
                    break
                window.append((loss, error))
                log = step % preset.log_every == 0 or step == preset.steps
                evaluate = step % preset.eval_every == 0 or step == preset.steps
                if log or evaluate:
                    record = {"step": step, "epoch": step / pipe.steps_per_epoch}
                    if log:
                        record.update(
                            train_loss=float(np.mean([w[0] for w in window])),
                            train_error=float(np.mean([w[1] for w in window])),
                        )
                        window = []
                    if evaluate:
                        record["test_error"] = test_error(state)
                    records.append(record)
            train = [(r["step"], r["train_error"]) for r in records if "train_error" in r]
            runs.append(
                {
                    "run": run_name(batch_norm, init, lr),
                    "batch_norm": batch_norm,
                    "init": init,
                    "lr": lr,
                    "diverged": diverged_at is not None,
                    "diverged_at": diverged_at,
                    "test_error": None if diverged_at else records[-1]["test_error"],
                    "final_train_error": train[-1][1] if train else None,
                    "steps_to_10pct": next((s for s, e in train if e <= 0.10), None),
                    "records": records,
                }
            )
    return runs


def run_name(batch_norm: bool, init: str, lr: float) -> str:
    return f"{'bn' if batch_norm else 'nobn'}_{init}_lr{lr:g}"


def plot_curves(runs: list[dict], path: Path, steps: int) -> None:
    """Training error against steps: one panel per (init, learning rate); BN solid, no BN dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inits = sorted({r["init"] for r in runs}, key=list(INITS).index)
    lrs = sorted({r["lr"] for r in runs})
    fig, axes = plt.subplots(
        len(inits),
        len(lrs),
        figsize=(2.9 * len(lrs), 2.5 * len(inits)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, init in enumerate(inits):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            for r in runs:
                if r["init"] != init or r["lr"] != lr:
                    continue
                curve = [
                    (x["step"], 100 * x["train_error"]) for x in r["records"] if "train_error" in x
                ]
                style = (
                    dict(color="tab:blue", linestyle="-")
                    if r["batch_norm"]
                    else dict(color="tab:red", linestyle="--")
                )
                label = "with BN" if r["batch_norm"] else "without BN"
                if curve:
                    ax.plot(*zip(*curve), label=label, linewidth=1.6, **style)
                if r["diverged"]:
                    x = r["diverged_at"]
                    ax.plot([x], [100], "x", color=style["color"], markersize=9, mew=2)
                    ax.annotate(
                        "diverged",
                        (x, 100),
                        xytext=(3, -12),
                        textcoords="offset points",
                        fontsize=7,
                        color=style["color"],
                    )
            ax.set_title(f"{INIT_LABELS[init]}, lr {lr:g}", fontsize=8)
            ax.set_ylim(-2, 105)
            ax.set_xlim(0, steps)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("training error (%)")
            if i == len(inits) - 1:
                ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


def plot_final(runs: list[dict], path: Path) -> None:
    """Final test error against the learning rate; diverged runs drawn as crosses at 100%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    colours = {
        (True, "he"): "tab:blue",
        (True, "gauss0.01"): "tab:cyan",
        (False, "he"): "tab:red",
        (False, "gauss0.01"): "tab:orange",
    }
    for init, marker in zip(INITS, ("o", "s")):
        for batch_norm, style in ((True, "-"), (False, "--")):
            colour = colours[batch_norm, init]
            mine = sorted(
                (r for r in runs if r["init"] == init and r["batch_norm"] == batch_norm),
                key=lambda r: r["lr"],
            )
            if not mine:
                continue
            label = f"{'BN' if batch_norm else 'no BN'}, {INIT_LABELS[init]}"
            ok = [(r["lr"], 100 * r["test_error"]) for r in mine if not r["diverged"]]
            if ok:
                ax.plot(*zip(*ok), style, marker=marker, color=colour, label=label, alpha=0.85)
            bad = [r["lr"] for r in mine if r["diverged"]]
            if bad:
                ax.plot(
                    bad,
                    [100] * len(bad),
                    "x",
                    color=colour,
                    markersize=8,
                    mew=2,
                    label=None if ok else label + " (diverged)",
                )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD, momentum 0.9)")
    ax.set_ylabel("final test error (%); x = diverged")
    ax.set_ylim(-2, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _cell(r: dict, key: str) -> str:
    if r["diverged"]:
        return f"diverged (step {r['diverged_at']})"
    if key == "steps_to_10pct":
        return "never" if r[key] is None else str(r[key])
    return f"{100 * r[key]:.1f}"


def report(preset_name: str, preset: Preset, runs: list[dict], command: str, wall_s: float) -> str:
    """The Markdown section of RESULTS.md: final test error and steps to 10% training error."""
    lrs = sorted({r["lr"] for r in runs})
    header = "| init | BatchNorm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"
    rule = "|---|---|" + "---|" * len(lrs)
    lines = [
        "## BatchNorm helps optimisation",
        "",
        "Claim (the lecture's advantages of BN): with BatchNorm the same network trains at higher "
        "learning rates, converges faster, and is far less sensitive to its initialisation.",
        "",
        f"Setup: {StudyCNN.__doc__.splitlines()[0]} Widths {'/'.join(map(str, preset.widths))}, "
        f"{preset.convs_per_stage} convolution(s) per stage: "
        f"{len(preset.widths) * preset.convs_per_stage + 1} weight layers. {preset.description}; "
        "SGD momentum 0.9, constant learning rate, no weight decay, inputs standardised per "
        "channel, the same batches in the same order for every run; both initialisations scale the "
        "same draws. A run is diverged at the first step whose loss is not finite.",
        "",
        f"Command: `{command}` (preset `{preset_name}`)  ",
        f"Machine: {_machine()}; wall time {wall_s / 60:.1f} min for {len(runs)} runs.",
        "",
        f"![training curves]({NAME}.png)",
        "",
        "![final test error](batchnorm_final.png)",
        "",
        "### Final test error (%)",
        "",
        "About 90% is chance level (the network answers one class whatever the input).",
        "",
    ]
    for key, heading in (
        ("test_error", None),
        (
            "steps_to_10pct",
            "### First logged step with training error "
            f"<= 10% (batch mean over {preset.log_every} steps)",
        ),
    ):
        lines += ([heading, ""] if heading else []) + [header, rule]
        for init in INITS:
            for batch_norm in (True, False):
                mine = {
                    r["lr"]: r for r in runs if r["init"] == init and r["batch_norm"] == batch_norm
                }
                if mine:
                    lines.append(
                        f"| {INIT_LABELS[init]} | {'yes' if batch_norm else 'no'} | "
                        + " | ".join(_cell(mine[lr], key) if lr in mine else "" for lr in lrs)
                        + " |"
                    )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from cnnjax import xla_flags

    # the measured CPU fast path, before JAX starts (CNNJAX_CPU_FAST=0: off)
    xla_flags.configure_cpu()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = claims_parser(NAME, __doc__)
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    start = time.perf_counter()
    runs = []
    for batch_norm in (True, False):
        t0 = time.perf_counter()
        runs += sweep(preset, batch_norm)
        print(
            f"[{NAME}] {'with' if batch_norm else 'without'} BN: "
            f"{len(runs) // (1 + (not batch_norm))} runs in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(
        out / f"{NAME}.csv",
        [
            {
                "run": r["run"],
                "batch_norm": r["batch_norm"],
                "init": r["init"],
                "lr": r["lr"],
                "step": x["step"],
                "train_loss": x.get("train_loss"),
                "train_error": x.get("train_error"),
                "test_error": x.get("test_error"),
            }
            for r in runs
            for x in r["records"]
        ],
    )
    plot_curves(runs, out / f"{NAME}.png", preset.steps)
    plot_final(runs, out / "batchnorm_final.png")
    command = " ".join(["python -m experiments." + NAME, *map(shlex.quote, argv)])
    text = report(args.preset, preset, runs, command, wall)
    atomic_write(out / f"{NAME}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
