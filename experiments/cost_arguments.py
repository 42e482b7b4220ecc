"""The lecture's cost arguments for VGG and Inception, computed by `cnnjax.analysis.summary`.

VGG (Simonyan & Zisserman 2015, section 2.3): a stack of three 3x3 convolutions (C channels in
and out) sees 7x7 like one 7x7 convolution, with 3 x 9C^2 = 27C^2 weights instead of 49C^2 and
three ReLUs instead of one; two 3x3 against one 5x5: 18C^2 against 25C^2.
GoogLeNet (Szegedy et al. 2015, Figure 2): the naive Inception module convolves the whole input
with every branch and passes the pooled input on; 1x1 reductions before the 3x3 and 5x5 (and a
projection after the pool) cut its multiply-adds. The lecture's module: 28x28x256 input, 128 1x1,
192 3x3, 96 5x5 filters, reductions of 64. Then every module of GoogLeNet (Table 1), naive
against reduced on the same input, and the two whole networks.

Every number is read from `summary` (abstract tracing, nothing compiled) and checked against the
closed formula; the script writes cost_arguments.md and cost_arguments.csv:

  python -m experiments.cost_arguments [--out experiments/results/claims] [--no_networks]
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax

from cnnjax import nn as cnn
from cnnjax.analysis import receptive_field, summary
from cnnjax.reporting import atomic_write, write_csv
from cnnjax.reporting import machine as _machine
from experiments._report import claims_parser

NAME = "cost_arguments"
VGG_WIDTHS = ((64, 224), (128, 112), (256, 56), (512, 28))  # VGG stage width and its map side
LECTURE_INCEPTION = {"input": (28, 28, 256), "b1x1": 128, "b3x3": 192, "b5x5": 96, "reduce": 64}
# Szegedy et al. 2015, Table 1, "ops" column (millions); 5a's printed 54M disagrees with its own
# widths (51M), as the model tests note.
TABLE1_OPS_M = {
    "3a": 128,
    "3b": 304,
    "4a": 73,
    "4b": 88,
    "4c": 100,
    "4d": 119,
    "4e": 170,
    "5a": 54,
    "5b": 71,
}


class ConvStack(nn.Module):
    """`depth` KxK convolutions of `features` channels, 'same' padding, each followed by ReLU."""

    features: int
    kernel: int
    depth: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.depth):
            x = jax.nn.relu(
                cnn.Conv(
                    self.features,
                    self.kernel,
                    padding=self.kernel // 2,
                    use_bias=self.use_bias,
                    name=f"conv{i + 1}",
                )(x)
            )
        return x


def vgg_rows(widths: Sequence[tuple[int, int]]) -> list[dict]:
    """Stacked 3x3 against one 5x5/7x7 for each (C, map side): params, MACs, field, ReLUs."""
    rows = []
    for c, side in widths:
        for name, kernel, depth, coef in (
            ("3 x conv3x3", 3, 3, 27),
            ("1 x conv7x7", 7, 1, 49),
            ("2 x conv3x3", 3, 2, 18),
            ("1 x conv5x5", 5, 1, 25),
        ):
            model = ConvStack(c, kernel, depth)
            s = summary(model, (side, side, c))
            rf = receptive_field(model, (side, side, c))[-1].size[0]
            if s.total_params != coef * c * c or s.total_macs != coef * c * c * side * side:
                raise AssertionError(
                    f"{name} C={c}: summary gives {s.total_params} params, {s.total_macs} MACs; "
                    f"the formula {coef}C^2 gives {coef * c * c}"
                )
            rows.append(
                {
                    "part": "vgg",
                    "design": name,
                    "C": c,
                    "input": f"{side}x{side}x{c}",
                    "receptive_field": rf,
                    "relus": depth,
                    "params": s.total_params,
                    "formula": f"{coef}C^2",
                    "macs": s.total_macs,
                }
            )
    return rows


def inception_module_costs(
    input_shape: tuple[int, int, int], widths: tuple[int, ...]
) -> dict[str, dict]:
    """Params, MACs and output channels of the naive and reduced module on one
    input (bias included)."""
    from cnnjax.models.googlenet import InceptionModule

    b1, r3, b3, r5, b5, pp = widths
    out = {}
    for block, module in (
        ("naive", InceptionModule(b1x1=b1, b3x3=b3, b5x5=b5, block="naive")),
        ("reduced", InceptionModule(b1, r3, b3, r5, b5, pp)),
    ):
        s = summary(module, input_shape)
        out[block] = {
            "params": s.total_params,
            "macs": s.total_macs,
            "out_channels": s.output_shape[-1],
            "rows": s.rows,
        }
    return out


def lecture_inception_rows() -> tuple[list[dict], str]:
    """The lecture's module: per-branch table and totals, naive against reduced."""
    spec = LECTURE_INCEPTION
    h, w, c = spec["input"]
    red = spec["reduce"]
    costs = inception_module_costs(
        spec["input"], (spec["b1x1"], red, spec["b3x3"], red, spec["b5x5"], red)
    )
    # The closed formulas: multiply-adds = output pixels x kernel size (stride-1
    # 'same' convolutions).
    naive_macs = h * w * c * (spec["b1x1"] + 9 * spec["b3x3"] + 25 * spec["b5x5"])
    reduced_macs = (
        h * w * (c * (spec["b1x1"] + 3 * red) + red * (9 * spec["b3x3"] + 25 * spec["b5x5"]))
    )
    if (costs["naive"]["macs"], costs["reduced"]["macs"]) != (naive_macs, reduced_macs):
        raise AssertionError(
            f"summary MACs {costs['naive']['macs']}, {costs['reduced']['macs']} differ from the "
            f"formulas {naive_macs}, {reduced_macs}"
        )
    lines = ["| module | layer | output | weights | params | MACs |", "|---|---|---|---|---|---|"]
    rows = []
    for block in ("naive", "reduced"):
        for r in costs[block]["rows"]:
            lines.append(
                f"| {block} | {r.path} | {r.output_size} | "
                f"{r.weight_size} | {r.params:,} | {r.macs:,} |"
            )
        total = costs[block]
        lines.append(
            f"| **{block}** | **total** | {h}x{w}x{total['out_channels']} | | "
            f"**{total['params']:,}** | **{total['macs']:,}** |"
        )
        rows.append(
            {
                "part": "inception_lecture",
                "design": block,
                "C": c,
                "input": f"{h}x{w}x{c}",
                "receptive_field": "",
                "relus": "",
                "params": total["params"],
                "formula": "",
                "macs": total["macs"],
            }
        )
    return rows, "\n".join(lines)


def googlenet_rows(with_networks: bool) -> tuple[list[dict], str]:
    """Each GoogLeNet module (Table 1 widths) naive vs reduced on its real input; whole networks."""
    from cnnjax.models.googlenet import GOOGLENET_MODULES

    if not with_networks:
        return [], ""
    net = summary("googlenet")
    inputs = {
        r.path.split("/")[0][len("inception") :]: r.input_shape
        for r in net.rows
        if r.path.endswith("/pool")
    }
    lines = [
        "| module | input | naive params | naive MACs | reduced "
        "params | reduced MACs | Table 1 ops | MACs saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for key, widths in GOOGLENET_MODULES.items():
        shape = inputs[key]
        costs = inception_module_costs(shape, widths)
        n, r = costs["naive"], costs["reduced"]
        lines.append(
            f"| inception({key}) | {'x'.join(map(str, shape))} | {n['params']:,} | "
            f"{n['macs'] / 1e6:,.1f} M | {r['params']:,} | {r['macs'] / 1e6:,.1f} M | "
            f"{TABLE1_OPS_M[key]} M | {1 - r['macs'] / n['macs']:.0%} |"
        )
        for block in ("naive", "reduced"):
            rows.append(
                {
                    "part": "googlenet_module",
                    "design": f"inception{key} {block}",
                    "C": shape[-1],
                    "input": "x".join(map(str, shape)),
                    "receptive_field": "",
                    "relus": "",
                    "params": costs[block]["params"],
                    "formula": "",
                    "macs": costs[block]["macs"],
                }
            )
    naive_net = summary("googlenet_naive")
    lines += ["", "| network (224x224x3) | params | MACs |", "|---|---|---|"]
    for name, s in (
        ("googlenet (Table 1, reduced modules)", net),
        ("googlenet_naive (Figure 2a modules)", naive_net),
    ):
        lines.append(f"| {name} | {s.total_params:,} | {s.total_macs / 1e9:.3f} G |")
        rows.append(
            {
                "part": "network",
                "design": name.split(" ")[0],
                "C": 3,
                "input": "224x224x3",
                "receptive_field": "",
                "relus": "",
                "params": s.total_params,
                "formula": "",
                "macs": s.total_macs,
            }
        )
    return rows, "\n".join(lines)


def report(
    vgg: list[dict], inception_table: str, googlenet_table: str, command: str, wall_s: float
) -> str:
    """The Markdown section of RESULTS.md."""
    lines = [
        "## VGG and Inception cost arguments",
        "",
        "Claim: three stacked 3x3 convolutions see 7x7 like one 7x7 convolution with 27C^2 instead "
        "of 49C^2 weights (and three non-linearities instead of one); 1x1 reductions make the "
        "Inception module affordable. Parameters and multiply-adds (MACs) from "
        "`cnnjax.analysis.summary`, receptive fields from `cnnjax.analysis.receptive_field`; every "
        "figure is checked against the closed formula by the script.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}; wall time {wall_s:.1f} s.",
        "",
        "### Stacked 3x3 against one large kernel (C channels in and out, no bias)",
        "",
        "| design | C | input | receptive field | ReLUs | params | = | MACs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in vgg:
        lines.append(
            f"| {r['design']} | {r['C']} | {r['input']} | "
            f"{r['receptive_field']}x{r['receptive_field']} | {r['relus']} | {r['params']:,} | "
            f"{r['formula']} | {r['macs'] / 1e9:.3f} G |"
        )
    lines += [
        "",
        "Three 3x3 layers: 27/49 = 55% of the weights and multiply-adds of one 7x7 (45% saved); "
        "two 3x3 layers: 18/25 = 72% of one 5x5. The receptive fields are equal. The MACs do not "
        "change from stage to stage: VGG halves the map side where it doubles C.",
        "",
        "### The lecture's Inception module (28x28x256 input; "
        "128 1x1, 192 3x3, 96 5x5; reductions 64)",
        "",
        inception_table,
        "",
        "These are the sizes of GoogLeNet's inception(3b) input and branches; "
        "GoogLeNet itself reduces to 128 and 32 channels there (304 M MACs, "
        "next table) where the lecture's example uses 64 and 64.",
        "",
    ]
    if googlenet_table:
        lines += [
            "### Every GoogLeNet module, naive against reduced on the same input (Table 1 widths, "
            "biases included)",
            "",
            googlenet_table,
            "",
            "The naive network's modules also pass their whole pooled input on, so its channels "
            "grow with depth: the whole-network gap is larger than any one module's.",
            "",
        ]
    lines += [
        "MACs: multiply-adds of the convolution kernels per image (bias, "
        "pooling and ReLU not counted); FLOPs = 2 x MACs.",
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
        "--no_networks",
        action="store_true",
        help="skip the per-module GoogLeNet table and the whole networks (faster)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    vgg = vgg_rows(VGG_WIDTHS)
    inception, inception_table = lecture_inception_rows()
    googlenet, googlenet_table = googlenet_rows(not args.no_networks)
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / f"{NAME}.csv", vgg + inception + googlenet, list(vgg[0]))
    command = " ".join(["python -m experiments." + NAME, *map(shlex.quote, argv)])
    text = report(vgg, inception_table, googlenet_table, command, wall)
    atomic_write(out / f"{NAME}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
