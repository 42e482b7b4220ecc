"""What the first layer learns: the first-layer filters of a CIFAR-10 network as an image grid,
at initialisation and after training (the lecture's figure of AlexNet's 96 conv1 filters).

The network has a large first kernel, as AlexNet (11x11/4) and ZFNet (7x7/2) do: conv1 64 filters
7x7 stride 2 on the 32x32x3 image, then BatchNorm-ReLU, a 3x3/2 max pool, a 3x3 conv of 128 and
one of 256 (each BatchNorm-ReLU, 2x2 max pool between), global average pooling and a linear
classifier. It is trained by `cnnjax.train.train_and_evaluate` (workdir default
runs/claims/filters, never committed). Each filter is drawn as an RGB patch, its values mapped
linearly from [min, max] of that filter to [0, 1] (the usual display; the sign and scale of a
filter are not shown).

  python -m experiments.filters --data_dir ../shared/data            # CIFAR-10, a few minutes
  python -m experiments.filters --preset tiny                        # CI: digits, seconds
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from cnnjax import nn as cnn
from cnnjax.reporting import atomic_write, save_figure
from cnnjax.reporting import machine as _machine
from cnnjax.train import TrainConfig, build, initial_state, read_metrics, train_and_evaluate
from experiments._report import claims_parser

NAME = "filters"


class FilterNet(nn.Module):
    """A small CIFAR network with a large first kernel: conv1 KxK/2, max pool,
    two 3x3 convs, GAP, FC.

    Args:
      num_classes: classifier outputs.
      conv1_features: filters of the first layer (drawn by this experiment).
      conv1_kernel: size of the first kernel.
      widths: filters of the two 3x3 convolutions.
      bn_axis_name: mapped axis of the BatchNorm statistics (the trainer's 'batch').
      bn_momentum: running-average momentum (Flax convention).
    """

    num_classes: int
    conv1_features: int = 64
    conv1_kernel: int = 7
    widths: Sequence[int] = (128, 256)
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool):
        def conv_bn_relu(x, features, kernel, stride, name):
            x = cnn.Conv(
                features,
                kernel,
                strides=stride,
                padding=kernel // 2,
                use_bias=False,
                name=f"{name}",
            )(x)
            x = cnn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                axis_name=self.bn_axis_name,
                name=f"{name}_bn",
            )(x)
            return jax.nn.relu(x)

        x = conv_bn_relu(x, self.conv1_features, self.conv1_kernel, 2, "conv1")
        x = cnn.MaxPool(3, 2, padding=1, name="pool1")(x)
        for i, width in enumerate(self.widths):
            if i:
                x = cnn.MaxPool(2, 2, name=f"pool{i + 1}")(x)
            x = conv_bn_relu(x, width, 3, 1, f"conv{i + 2}")
        x = cnn.GlobalAvgPool(name="gap")(x)
        return cnn.Dense(self.num_classes, name="fc")(x)


PRESETS: dict[str, tuple[str, TrainConfig]] = {
    "cifar10": (
        "CIFAR-10 (50k train / 10k test), one epoch (781 steps of 64), SGD Nesterov momentum 0.9, "
        "lr 0.05 cosine to 0, weight decay 5e-4, per-channel standardisation, horizontal flips",
        TrainConfig(
            model="filter_net",
            dataset="cifar10",
            global_batch_size=64,
            num_steps=781,
            optimizer="sgd",
            learning_rate=0.05,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            schedule="cosine",
            normalize="per_channel",
            augment="flip",
            log_every=50,
            eval_every=0,
            checkpoint_every=0,
            keep_checkpoints=1,
            rng_impl="rbg",
            progress_bar=False,
        ),
    ),
    "tiny": (
        "CI smoke run: digits at 16x16x3, 4 steps",
        TrainConfig(
            model="filter_net",
            dataset="digits",
            image_size=16,
            channels=3,
            global_batch_size=32,
            num_steps=4,
            normalize="per_channel",
            log_every=2,
            eval_every=0,
            checkpoint_every=0,
            keep_checkpoints=1,
            rng_impl="rbg",
            progress_bar=False,
        ),
    ),
}


def filter_grid(kernel: np.ndarray, columns: int = 8, zoom: int = 4, gap: int = 1) -> np.ndarray:
    """HWIO first-layer kernel (I = 1 or 3) -> one RGB image of the filters, each min-max scaled."""
    kh, kw, cin, cout = kernel.shape
    if cin not in (1, 3):
        raise ValueError(
            f"filter_grid draws 1- or 3-channel filters, got a kernel of shape {kernel.shape}"
        )
    rows = -(-cout // columns)
    cell_h, cell_w = kh * zoom + gap, kw * zoom + gap
    grid = np.ones((rows * cell_h + gap, columns * cell_w + gap, 3), np.float32)
    for f in range(cout):
        w = kernel[..., f]
        w = (w - w.min()) / max(float(w.max() - w.min()), 1e-12)
        w = np.repeat(np.repeat(w, zoom, 0), zoom, 1)
        r, c = divmod(f, columns)
        grid[
            gap + r * cell_h : gap + r * cell_h + kh * zoom,
            gap + c * cell_w : gap + c * cell_w + kw * zoom,
        ] = w if cin == 3 else w[..., :1]
    return grid


def plot(before: np.ndarray, after: np.ndarray, titles: tuple[str, str], path: Path) -> None:
    """The two filter grids side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, kernel, title in zip(axes, (before, after), titles):
        ax.imshow(filter_grid(kernel), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def filter_statistics(kernel: np.ndarray) -> dict[str, float]:
    """How structured the filters are: mean |correlation| of neighbouring weights (0 for
    white noise), and the mean share of each filter's energy in its channel-mean
    (colour-opponent filters are low)."""
    k = kernel.astype(np.float64)
    k = k - k.mean(axis=(0, 1, 2), keepdims=True)
    horizontal = (k[:, 1:] * k[:, :-1]).sum(axis=(0, 1, 2)) / np.maximum(
        (k**2).sum(axis=(0, 1, 2)), 1e-12
    )
    grey = k.mean(axis=2, keepdims=True)
    grey_share = (
        (grey**2).sum(axis=(0, 1, 2)) * k.shape[2] / np.maximum((k**2).sum(axis=(0, 1, 2)), 1e-12)
    )
    return {
        "neighbour_correlation": float(np.mean(horizontal)),
        "grey_share": float(np.mean(grey_share)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    from cnnjax import xla_flags

    # the measured CPU fast path, before JAX starts (CNNJAX_CPU_FAST=0: off)
    xla_flags.configure_cpu()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = claims_parser(NAME, __doc__)
    parser.add_argument("--preset", default="cifar10", choices=sorted(PRESETS))
    parser.add_argument(
        "--data_dir", default=None, help="directory holding cifar10.npz (or a tfds data_dir)"
    )
    parser.add_argument(
        "--workdir", default=os.path.join("runs", "claims"), help="parent of the run directory"
    )
    args = parser.parse_args(argv)
    description, config = PRESETS[args.preset]
    if args.data_dir is not None and config.dataset != "digits":
        config = config.replace(data_dir=args.data_dir)
    workdir = Path(args.workdir) / f"filters_{args.preset}"
    start = time.perf_counter()
    try:
        before = np.asarray(
            initial_state(build(config, model_fn=FilterNet)).params["conv1"]["kernel"]
        )
        done = workdir / "DONE.json"
        if done.exists():
            info = json.loads(done.read_text())
        else:
            result = train_and_evaluate(config, str(workdir), model_fn=FilterNet)
            if result.preempted:
                print(f"interrupted at step {result.step}; run again to resume", file=sys.stderr)
                return 143
            info = {
                "metrics": result.metrics,
                "step": result.step,
                "wall_s": time.perf_counter() - start,
            }
            tmp = workdir / "conv1_after.npy.tmp"
            with open(tmp, "wb") as f:  # atomically, as the DONE marker after it
                np.save(f, np.asarray(result.state.params["conv1"]["kernel"]))
            os.replace(tmp, workdir / "conv1_after.npy")
            atomic_write(done, json.dumps(info, indent=2))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    after = np.load(workdir / "conv1_after.npy")
    records = read_metrics(str(workdir / "metrics.jsonl"))
    accuracy = 100 * (1 - info["metrics"]["test_error"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    titles = (
        f"conv1 at initialisation (He normal), {before.shape[-1]} filters "
        f"{before.shape[0]}x{before.shape[1]}x{before.shape[2]}",
        f"conv1 after {info['step']} steps on {config.dataset} (test accuracy {accuracy:.1f}%)",
    )
    plot(before, after, titles, out / f"{NAME}.png")
    stats = {"before": filter_statistics(before), "after": filter_statistics(after)}
    command = " ".join(["python -m experiments." + NAME, *map(shlex.quote, argv)])
    lines = [
        "## What first-layer filters learn",
        "",
        "Claim (the lecture's AlexNet conv1 figure): the first layer of a CNN trained on natural "
        "images learns oriented edge and bar detectors at several orientations and frequencies, "
        "and colour blobs or colour-opponent filters; at initialisation the filters are noise.",
        "",
        f"Setup: {FilterNet.__doc__.splitlines()[0]} ({description}).",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}; wall time {info['wall_s'] / 60:.1f} min "
        f"(training loop {records[-1]['wall_time'] / 60:.1f} min).",
        "",
        f"![first-layer filters before and after training]({NAME}.png)",
        "",
        "| conv1 filters | neighbouring-weight correlation | share of energy in the channel mean |",
        "|---|---|---|",
    ]
    for key in ("before", "after"):
        lines.append(
            f"| {'initialisation' if key == 'before' else 'after training'} | "
            f"{stats[key]['neighbour_correlation']:.3f} | {stats[key]['grey_share']:.3f} |"
        )
    lines += [
        "",
        "Neighbouring-weight correlation: mean over filters of the correlation between "
        "horizontally adjacent weights (about 0 for noise, near 1 for smooth patterns such as "
        "edges and blobs). Share of energy in the channel mean: 1 for a grey (colour-blind) "
        "filter, 1/3 on average for noise; lower values mean colour-opponent filters. Final "
        f"test accuracy {accuracy:.1f}% after {info['step']} steps (a short run: the filters, "
        "not the accuracy, are the point).",
        "",
    ]
    text = "\n".join(lines)
    atomic_write(out / f"{NAME}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
