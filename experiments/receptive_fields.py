"""Receptive fields: the lecture's statements and Araujo et al.'s table, analytic and measured.

`cnnjax.analysis.receptive_field` derives every layer's receptive field, effective stride and
effective padding from the layer geometry (one abstract trace). This script:

1. tabulates the lecture's statements ("a KxK convolution sees KxK", "two stacked 3x3 see 5x5,
   three see 7x7", pooling multiplies the step, dilation widens the kernel) three ways: the
   closed formula (`stacked_receptive_field`), the analytic derivation on a network, and the
   support of a gradient (`empirical_receptive_field`);
2. compares the receptive field of the final feature map of ImageNet networks with Araujo, Norris &
   Sim (Distill 2019): AlexNet 195, VGG-16 pool5 212, ResNet-50 V1 483 (torchvision V1.5: 427),
   ResNet-101/152 V1 1027/1507, Inception-v2 699, Inception-v4 2071, Inception-ResNet-v2 3039;
3. measures, for the networks whose field fits in an affordable input, the input interval seen by
   one unit of the final feature map as the support of a gradient (on a narrow twin of the network
   where the family has width options: channel widths do not change receptive fields), against
   the analytic interval.

  python -m experiments.receptive_fields [--out experiments/results/claims] [--models ...]
                                         [--measure ...]
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import models
from cnnjax import nn as cnn
from cnnjax.analysis import (
    empirical_receptive_field,
    format_receptive_field,
    receptive_field,
    stacked_receptive_field,
)
from cnnjax.reporting import atomic_write, save_figure, write_csv
from cnnjax.reporting import machine as _machine
from experiments._report import claims_parser

NAME = "receptive_fields"
ARAUJO = "Araujo, Norris & Sim 2019 (Distill), TF-slim models"
# (registry name, create() overrides, label, Araujo et al.'s figure for the final feature map).
NETWORKS: dict[str, tuple[str, dict, str, int]] = {
    "alexnet": ("alexnet", {}, "AlexNet (paper, 227) / alexnet_v2", 195),
    "alexnet_torchvision": ("alexnet_torchvision", {}, "AlexNet (torchvision) / alexnet_v2", 195),
    "vgg16": ("vgg16", {}, "VGG-16 pool5 / vgg_16", 212),
    "resnet50_v1": ("resnet50", {"version": "v1"}, "ResNet-50 V1 / resnet_v1_50", 483),
    "resnet50_v1.5": ("resnet50", {"version": "v1.5"}, "ResNet-50 V1.5 (torchvision)", 427),
    "resnet101_v1": ("resnet101", {"version": "v1"}, "ResNet-101 V1 / resnet_v1_101", 1027),
    "resnet152_v1": ("resnet152", {"version": "v1"}, "ResNet-152 V1 / resnet_v1_152", 1507),
    "bn_inception": ("bn_inception", {}, "BN-Inception / inception_v2", 699),
    "inception_v4": ("inception_v4", {}, "Inception-v4 / inception_v4", 2071),
    "inception_resnet_v2": (
        "inception_resnet_v2",
        {},
        "Inception-ResNet-v2 / inception_resnet_v2",
        3039,
    ),
}
DEFAULT_MEASURE = ("alexnet", "vgg16", "resnet50_v1", "resnet50_v1.5", "bn_inception")


class LectureProbe(nn.Module):
    """Independent branches from the input, one per statement of the lecture (see STATEMENTS)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        outs = []
        for k in (1, 3, 5, 7, 11):
            outs.append(cnn.Conv(2, k, padding=k // 2, name=f"single{k}x{k}")(x))
        for n in range(1, 6):
            y = x
            for i in range(n):
                y = jax.nn.relu(cnn.Conv(2, 3, padding=1, name=f"stack{n}_conv{i + 1}")(y))
            outs.append(y)
        y = cnn.MaxPool(2, 2, name="pool_chain_pool")(
            cnn.Conv(2, 3, padding=1, name="pool_chain_conv1")(x)
        )
        outs.append(cnn.Conv(2, 3, padding=1, name="pool_chain_conv2")(y))
        outs.append(cnn.Conv(2, 3, padding=2, dilation=2, name="dilated3x3")(x))
        y = cnn.Conv(2, 7, strides=2, padding=3, name="stem_conv")(x)
        outs.append(cnn.MaxPool(3, 2, padding=1, name="stem_pool")(y))
        return sum(jnp.mean(o, axis=(1, 2, 3)) for o in outs)


# (statement, layer path, kernel sizes, strides, dilations) for the closed formula.
STATEMENTS = [
    *[
        (f"one {k}x{k} conv sees {k}x{k}", f"single{k}x{k}", [k], None, None)
        for k in (1, 3, 5, 7, 11)
    ],
    *[
        (
            f"{n} stacked 3x3 convs see {2 * n + 1}x{2 * n + 1}",
            f"stack{n}_conv{n}",
            [3] * n,
            None,
            None,
        )
        for n in range(1, 6)
    ],
    (
        "3x3 conv, 2x2/2 max pool, 3x3 conv: the pool doubles the step",
        "pool_chain_conv2",
        [3, 2, 3],
        [1, 2, 1],
        None,
    ),
    ("3x3 conv with dilation 2 sees 5x5", "dilated3x3", [3], None, [2]),
    ("ResNet stem: 7x7/2 conv, 3x3/2 max pool", "stem_pool", [7, 3], [2, 2], None),
]


def lecture_rows(size: int = 64) -> list[dict]:
    """Formula, analytic and gradient-measured field of each statement (one compile for all)."""
    probe = LectureProbe()
    by = {r.path: r for r in receptive_field(probe, (size, size, 1))}
    paths = [s[1] for s in STATEMENTS]
    measured = empirical_receptive_field(probe, (size, size, 1), paths)
    rows = []
    for (statement, path, ks, ss, ds), (rows_iv, _) in zip(STATEMENTS, measured):
        r = by[path]
        centre = ((r.output_shape[0] - 1) // 2, (r.output_shape[1] - 1) // 2)
        (lo, hi), _ = r.interval(centre)
        rows.append(
            {
                "statement": statement,
                "layer": path,
                "formula": stacked_receptive_field(ks, ss, ds),
                "analytic": r.size[0],
                "stride": r.stride[0],
                "measured": rows_iv[1] - rows_iv[0] + 1,
                "interval_analytic": (lo, hi),
                "interval_measured": rows_iv,
            }
        )
    return rows


def final_feature(rows):
    """The row of the global pooling or flatten that reads the final feature map."""
    return [r for r in rows if r.input_size is not None and r.type in ("GlobalAvgPool", "Flatten")][
        -1
    ]


def has_narrow_twin(key: str) -> bool:
    """Whether the family has width options for `narrow_twin` (else the network
    itself is measured)."""
    return NETWORKS[key][0].startswith(("alexnet", "vgg", "resnet"))


def narrow_twin(key: str):
    """The network with every channel width divided (about 16x): the same geometry, far cheaper."""
    name, overrides, _, _ = NETWORKS[key]
    if name.startswith("alexnet"):
        from cnnjax.models.alexnet import ALEXNET_CONFIGS

        layers = [
            layer._replace(features=max(2 * layer.groups, layer.features // 16))
            for layer in ALEXNET_CONFIGS[name]
        ]
        return models.create(name, layers=layers, hidden=16, **overrides)
    if name.startswith("vgg"):
        from cnnjax.models.vgg import VGG_CONFIGS

        config = [c // 16 if isinstance(c, int) else c for c in VGG_CONFIGS[int(name[3:5])]]
        return models.create(name, config=config, hidden=16, **overrides)
    if name.startswith("resnet"):
        return models.create(name, stage_widths=(4, 8, 16, 32), stem_width=4, **overrides)
    return models.create(name, **overrides)  # no width option: the network itself


def araujo_rows(keys: Sequence[str]) -> tuple[list[dict], dict]:
    """Analytic final-feature field, stride and padding of each network against Araujo et al."""
    rows, per_layer = [], {}
    for key in keys:
        name, overrides, label, paper = NETWORKS[key]
        shape = models.get_spec(name).input_shape
        layer_rows = receptive_field(models.create(name, **overrides), shape)
        pool = final_feature(layer_rows)
        per_layer[key] = layer_rows
        rows.append(
            {
                "network": key,
                "label": label,
                "input": "x".join(map(str, shape)),
                "final_layer_input_of": pool.path,
                "receptive_field": pool.input_size[0],
                "stride": pool.input_stride[0],
                "padding": pool.input_padding[0],
                "araujo": paper,
                "match": pool.input_size[0] == paper,
            }
        )
    return rows, per_layer


def measure_final_field(key: str) -> dict:
    """Gradient support of one final-map unit of the narrow twin, against the analytic interval."""
    name, overrides, _, _ = NETWORKS[key]
    twin = narrow_twin(key)
    base = models.get_spec(name).input_shape
    full = final_feature(receptive_field(models.create(name, **overrides), base))
    rows = receptive_field(twin, base)
    pool = final_feature(rows)
    if (pool.input_size, pool.input_stride, pool.input_padding) != (
        full.input_size,
        full.input_stride,
        full.input_padding,
    ):
        raise AssertionError(f"{key}: the narrow twin's geometry differs from the network's")
    r, s, p = pool.input_size[0], pool.input_stride[0], pool.input_padding[0]
    # The first unit whose field starts inside the image (not on its border), and an input that
    # holds the whole field with a margin: nothing is clipped.
    unit = math.ceil((p + 1) / s)
    side = 32 * math.ceil((unit * s - p + r + 1) / 32)
    rows = receptive_field(twin, (side, side, 3))
    idx = rows.index(final_feature(rows))
    hw = rows[idx - 1].output_shape[:2]  # the final map: the output of the layer before the pooling
    # The final map is built (adds, concatenations) from the layers of the last stage: the union of
    # their fields at one unit is the final map's field at that unit.
    last = [q.path for q in rows[:idx] if not q.collapsed and q.output_shape[:2] == hw]
    start = time.perf_counter()
    measured = empirical_receptive_field(twin, (side, side, 3), last, unit=(unit, unit))
    lo, hi = min(m[0][0] for m in measured), max(m[0][1] for m in measured)
    analytic = (unit * s - p, unit * s - p + r - 1)
    return {
        "network": key,
        "measured_on": "narrow twin" if has_narrow_twin(key) else "the network",
        "input": side,
        "unit": unit,
        "layers": len(last),
        "analytic": analytic,
        "measured": (lo, hi),
        "size": hi - lo + 1,
        "match": analytic == (lo, hi),
        "seconds": time.perf_counter() - start,
    }


def plot_growth(per_layer: dict, path: Path) -> None:
    """Largest receptive field reached so far against the number of conv / pooling layers called."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, rows in per_layer.items():
        sizes = np.maximum.accumulate(
            [
                r.size[0]
                for r in rows
                if r.type in ("Conv", "MaxPool", "AvgPool") and not r.collapsed
            ]
        )
        ax.plot(range(1, len(sizes) + 1), sizes, label=f"{key} ({sizes[-1]})", linewidth=1.4)
    ax.axhline(224, color="grey", linestyle=":", linewidth=1)
    ax.text(1, 235, "224-pixel input", fontsize=7, color="grey")
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("conv / pooling layers called (branches included)")
    ax.set_ylabel("largest receptive field so far (pixels)")
    ax.set_title("Receptive field growth (cnnjax.analysis.receptive_field)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def report(
    lecture: list[dict],
    araujo: list[dict],
    measured: list[dict],
    vgg_table: str,
    command: str,
    wall_s: float,
) -> str:
    """The Markdown section of RESULTS.md."""
    lines = [
        "## Receptive fields",
        "",
        "Claim: a KxK convolution sees KxK input pixels; stacking 3x3 convolutions grows "
        "the field by 2 per layer (two see 5x5, three 7x7); the final feature maps of "
        "ImageNet networks see hundreds to thousands of pixels (Araujo et al. 2019). "
        "`cnnjax.analysis.receptive_field` derives each layer's field, effective stride "
        "and effective padding from the layer geometry; `empirical_receptive_field` "
        "measures the same interval as the support of a gradient.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}; wall time {wall_s:.1f} s.",
        "",
        "### The lecture's statements (64x64 input, centre unit)",
        "",
        "| statement | closed formula | analytic | gradient support | effective stride |",
        "|---|---|---|---|---|",
    ]
    for r in lecture:
        lines.append(
            f"| {r['statement']} | {r['formula']} | "
            f"{r['analytic']} | {r['measured']} | {r['stride']} |"
        )
    lines += [
        "",
        f"### Final feature map against {ARAUJO}",
        "",
        "| network | input | field of | receptive field | "
        "eff. stride | eff. padding | Araujo et al. | equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in araujo:
        lines.append(
            f"| {r['label']} | {r['input']} | input of `{r['final_layer_input_of']}` | "
            f"{r['receptive_field']} | {r['stride']} | {r['padding']} | {r['araujo']} | "
            f"{'yes' if r['match'] else 'NO'} |"
        )
    if measured:
        lines += [
            "",
            "### Measured: gradient support of one final-map unit",
            "",
            "| network | measured on | input side | unit | "
            "analytic interval | gradient support | size | equal |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in measured:
            lines.append(
                f"| {m['network']} | {m['measured_on']} | {m['input']} | ({m['unit']}, "
                f"{m['unit']}) | {list(m['analytic'])} | {list(m['measured'])} | {m['size']} | "
                f"{'yes' if m['match'] else 'NO'} |"
            )
        lines += [
            "",
            "The unit is the first whose field starts inside the image (not on its border), and "
            "the input holds the whole field with a margin, so the comparison is unclipped. A "
            "narrow twin divides every channel width by 16 (the geometry, checked equal, does not "
            "depend on widths). Weights are positive, pooling is replaced by window sums: every "
            "path contributes, so the support is the whole field.",
        ]
    if vgg_table:
        lines += [
            "",
            "### VGG-16, every layer",
            "",
            f"![receptive field growth]({NAME}.png)",
            "",
            "<details><summary>layer table</summary>",
            "",
            "```",
            vgg_table,
            "```",
            "</details>",
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from cnnjax import xla_flags

    # the measured CPU fast path, before JAX starts (CNNJAX_CPU_FAST=0: off)
    xla_flags.configure_cpu()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = claims_parser(NAME, __doc__)
    parser.add_argument(
        "--models",
        nargs="*",
        default=list(NETWORKS),
        choices=list(NETWORKS),
        help="networks compared with Araujo et al. (default: all)",
    )
    parser.add_argument(
        "--measure",
        nargs="*",
        default=list(DEFAULT_MEASURE),
        choices=list(NETWORKS),
        help="networks whose final field is also measured by gradient (compiles each)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    lecture = lecture_rows()
    araujo, per_layer = araujo_rows(args.models)
    measured = []
    for key in args.measure:
        measured.append(measure_final_field(key))
        print(
            f"[{NAME}] {key}: measured {measured[-1]['measured']} analytic "
            f"{measured[-1]['analytic']} ({measured[-1]['seconds']:.0f} s)",
            flush=True,
        )
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{NAME}.csv", araujo, list(araujo[0]) if araujo else ["network"])
    vgg_table = ""
    if per_layer:
        plot_growth(per_layer, out / f"{NAME}.png")
        if "vgg16" in per_layer:
            vgg_table = format_receptive_field(per_layer["vgg16"])
    command = " ".join(["python -m experiments." + NAME, *map(shlex.quote, argv)])
    text = report(lecture, araujo, measured, vgg_table, command, wall)
    atomic_write(out / f"{NAME}.md", text)
    print(text)
    bad = [r["statement"] for r in lecture if not r["formula"] == r["analytic"] == r["measured"]]
    bad += [r["network"] for r in araujo if not r["match"]] + [
        m["network"] for m in measured if not m["match"]
    ]
    if bad:
        print(f"error: disagreement for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
