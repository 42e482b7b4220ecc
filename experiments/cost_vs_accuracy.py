"""Cost against accuracy for every ImageNet model of the zoo (the lecture's "top-1 vs operations,
size / parameters" figure, after Canziani, Paszke & Culurciello 2016).

Multiply-adds (MACs) and parameters come from `cnnjax.analysis.summary` at each model's default
input (abstract tracing, nothing compiled); top-1 accuracies are published figures, each with its
source (shared/REFERENCE.md): torchvision's V1 weights where the zoo has the torchvision
architecture, the paper otherwise. Models without a published top-1 there are tabulated but not
plotted. Writes cost_vs_accuracy.{md,csv,png}:

  python -m experiments.cost_vs_accuracy [--out experiments/results/claims]
                                         [--models resnet18 vgg16]
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from cnnjax import models
from cnnjax.analysis import summary
from cnnjax.reporting import atomic_write, save_figure, write_csv
from cnnjax.reporting import machine as _machine
from experiments._report import claims_parser

NAME = "cost_vs_accuracy"
TV = "torchvision V1 weights [tv]"
TV_NOTE = (
    "[tv] torchvision 0.29 `Weights` metadata of the V1 (original) weights: ImageNet validation "
    "set, one 224x224 centre crop of the image resized to 256."
)
# (top-1 %, source, published GMACs or None). torchvision's "GFLOPS" are multiply-accumulates.
TOP1: dict[str, tuple[float, str, float | None]] = {
    "alexnet_torchvision": (56.522, TV, 0.714),
    "vgg11": (69.020, TV, 7.609),
    "vgg11_bn": (70.370, TV, 7.609),
    "vgg13": (69.928, TV, 11.308),
    "vgg13_bn": (71.586, TV, 11.308),
    "vgg16": (71.592, TV, 15.470),
    "vgg16_bn": (73.360, TV, 15.470),
    "vgg19": (72.376, TV, 19.632),
    "vgg19_bn": (74.218, TV, 19.632),
    "googlenet_torchvision": (69.778, TV, 1.498),
    "resnet18": (69.758, TV, 1.814),
    "resnet34": (73.314, TV, 3.664),
    "resnet50": (76.130, TV, 4.089),
    "resnet101": (77.374, TV, 7.801),
    "resnet152": (78.312, TV, 11.514),
    "resnext50_32x4d": (77.618, TV, 4.230),
    "resnext101_32x8d": (79.312, TV, 16.414),
    "wide_resnet50_2": (78.468, TV, 11.398),
    "wide_resnet101_2": (78.848, TV, 22.753),
    "densenet121": (74.434, TV, 2.834),
    "densenet169": (75.600, TV, 3.360),
    "densenet201": (76.896, TV, 4.291),
    "densenet161": (77.138, TV, 7.728),
    "bn_inception": (
        100 - 25.2,
        "Ioffe & Szegedy 2015, BN-Inception single crop (top-1 error 25.2%)",
        None,
    ),
    "inception_v4": (80.2, "Szegedy et al. 2017, Inception-v4 single crop (299x299)", None),
    "inception_resnet_v2": (
        80.4,
        "Szegedy et al. 2017, Inception-ResNet-v2 single crop (299x299)",
        None,
    ),
    "dpn92": (
        100 - 20.73,
        "Chen et al. 2017, DPN-92 (top-1 error 20.73%; 6.5 G published 'FLOPs' = MACs)",
        6.5,
    ),
    "dpn98": (
        100 - 20.15,
        "Chen et al. 2017, DPN-98 (top-1 error 20.15%; 11.7 G published 'FLOPs' = MACs)",
        11.7,
    ),
}


# Label placement in the crowded corners: (dx, dy) offset in points; dx < 0 puts the label left.
LABEL_NUDGE = {
    "googlenet_torchvision": (0, -9),
    "resnet18": (0, 5),
    "resnet152": (0, -9),
    "wide_resnet50_2": (-1, 2),
    "densenet161": (0, -7),
    "resnet101": (0, 6),
    "dpn98": (-1, 4),
    "inception_v4": (-1, 9),
    "inception_resnet_v2": (0, 2),
    "bn_inception": (0, 4),
    "densenet121": (0, -4),
    "resnet50": (0, -3),
    "densenet201": (0, 2),
    "vgg11": (0, -3),
    "vgg13": (0, -3),
}


def imagenet_models() -> list[str]:
    """Registered models whose default configuration is for ImageNet."""
    return [n for n in models.list_models() if models.get_spec(n).dataset == "imagenet"]


def measure(names: Sequence[str]) -> list[dict]:
    """One row per model: family, input, params, MACs, published top-1 and its source."""
    rows = []
    for name in names:
        spec = models.get_spec(name)
        s = summary(name)
        top1, source, gmacs = TOP1.get(name, (None, "", None))
        rows.append(
            {
                "model": name,
                "family": spec.family,
                "input": "x".join(map(str, spec.input_shape)),
                "params": s.total_params,
                "macs": s.total_macs,
                "top1": top1,
                "published_gmacs": gmacs,
                "source": source,
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Top-1 against GMACs, bubble area proportional to parameters, one colour per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["top1"] is not None]
    families = sorted({r["family"] for r in shown})
    colours = dict(zip(families, plt.get_cmap("tab10").colors))
    scale = 6.0  # points^2 per million parameters
    fig, ax = plt.subplots(figsize=(10, 6.2))
    for r in shown:
        area = scale * r["params"] / 1e6
        ax.scatter(
            r["macs"] / 1e9,
            r["top1"],
            s=area,
            color=colours[r["family"]],
            alpha=0.45,
            edgecolors="k",
            linewidths=0.5,
        )
        # Labels right of the bubble; a few crowded ones moved (offsets in points).
        dx, dy = LABEL_NUDGE.get(r["model"], (0, 0))
        gap = 0.6 * area**0.5 + 2
        ax.annotate(
            r["model"],
            (r["macs"] / 1e9, r["top1"]),
            xytext=(gap + dx if dx >= 0 else -gap, dy),
            textcoords="offset points",
            fontsize=7,
            ha="left" if dx >= 0 else "right",
            va="center",
        )
    for family in families:
        ax.scatter([], [], s=40, color=colours[family], alpha=0.6, label=family)
    for n in (5, 50, 150):
        ax.scatter(
            [],
            [],
            s=scale * n,
            facecolors="none",
            edgecolors="k",
            linewidths=0.5,
            label=f"{n} M params",
        )
    ax.set_xlim(left=0, right=1.15 * max(r["macs"] / 1e9 for r in shown))
    ax.set_xlabel("multiply-adds per image (G MACs, computed by cnnjax.analysis.summary)")
    ax.set_ylabel("published top-1 accuracy on ImageNet (%)")
    ax.set_title("Top-1 against operations; bubble area = parameters", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, ncol=2, labelspacing=1.3, borderpad=1.0)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def report(rows: list[dict], command: str, wall_s: float) -> str:
    """The Markdown section of RESULTS.md: plotted models by top-1, then the others."""
    lines = [
        "## Cost against accuracy",
        "",
        'Claim (the lecture\'s "top-1 vs operations, size / parameters" figure): accuracy is '
        "not bought by operations or parameters alone; later architectures (ResNet, DenseNet, "
        "Inception) sit above and left of VGG. MACs and parameters are computed by "
        "`cnnjax.analysis.summary` at each model's default input; top-1 figures are published "
        "ones (source per row).",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}; wall time {wall_s:.1f} s.",
        "",
        f"![cost vs accuracy]({NAME}.png)",
        "",
        "| model | input | params | G MACs | published G MACs | top-1 % | source |",
        "|---|---|---|---|---|---|---|",
    ]
    shown = sorted((r for r in rows if r["top1"] is not None), key=lambda r: -r["top1"])
    for r in shown:
        published = "" if r["published_gmacs"] is None else f"{r['published_gmacs']:.3f}"
        lines.append(
            f"| {r['model']} | {r['input']} | {r['params']:,} | {r['macs'] / 1e9:.3f} | "
            f"{published} | {r['top1']:.2f} | {r['source']} |"
        )
    others = [r for r in rows if r["top1"] is None]
    if others:
        lines += [
            "",
            "Zoo models without a published single-model "
            "top-1 in shared/REFERENCE.md (not plotted):",
            "",
            "| model | input | params | G MACs |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['input']} | {r['params']:,} | {r['macs'] / 1e9:.3f} |"
            for r in others
        ]
    lines += [
        "",
        "MACs: multiply-adds of the Conv and Dense kernels per image (FLOPs = 2 "
        "x MACs). Protocols differ between sources (torchvision: one 224 crop; "
        "the Inception-v4 paper: one 299 crop): compare within a source first.",
        "",
        TV_NOTE,
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from cnnjax import xla_flags

    # the measured CPU fast path, before JAX starts (CNNJAX_CPU_FAST=0: off)
    xla_flags.configure_cpu()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = claims_parser(NAME, __doc__)
    parser.add_argument(
        "--models", nargs="*", default=None, help="registry names (default: every ImageNet model)"
    )
    args = parser.parse_args(argv)
    names = imagenet_models() if args.models is None else args.models
    if not names:
        parser.error(
            "--models: give at least one name, or leave --models out for every ImageNet model"
        )
    unknown = [n for n in names if n not in models.list_models()]
    if unknown:
        parser.error(f"--models {unknown}: not registered; ImageNet models are {imagenet_models()}")
    start = time.perf_counter()
    rows = measure(names)
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{NAME}.csv", rows)
    plot(rows, out / f"{NAME}.png")
    command = " ".join(["python -m experiments." + NAME, *map(shlex.quote, argv)])
    text = report(rows, command, wall)
    atomic_write(out / f"{NAME}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
