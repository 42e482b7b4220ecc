"""BatchNorm costs nothing at test time: fold it into the convolution before it, then time both.

In evaluation a BatchNorm is an affine map per channel, so BN(conv(x)) is one convolution with
kernel W * g and bias (b - mean) * g + beta, g = gamma / sqrt(var + eps).
`cnnjax.analysis.fold_batchnorm(model, variables, input_shape)` does this for every BatchNorm of
a whole network that directly follows a Conv or Dense (pre-activation BatchNorms, as in DenseNet,
stay and are listed). This script:

1. folds several zoo networks with random weights, random BatchNorm scales and shifts, and running
   statistics calibrated on a random batch (as a trained network's are on its data: every
   BatchNorm then really normalises), and compares the logits of the folded network with the
   original's in evaluation mode (max absolute difference; the claim: equal to 1e-4);
2. times evaluation (jit, batch 128, CIFAR-10 input) of CIFAR ResNets with and without folding,
   in the same process, alternating the two over several repetitions (the machine is shared:
   the ratio of each repetition is reported, and the median).

  python -m experiments.bn_folding [--out experiments/results/claims] [--models ...] [--time ...]
"""

from __future__ import annotations

import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import models
from cnnjax.analysis import count_params, fold_batchnorm
from cnnjax.reporting import atomic_write, write_csv
from cnnjax.reporting import machine as _machine
from experiments._report import claims_parser

NAME = "bn_folding"
DEFAULT_MODELS = ("resnet20", "resnet56", "resnet50", "vgg11_bn", "bn_inception", "densenet121")
DEFAULT_TIMED = ("resnet20", "resnet56")
# the claim: |folded - original| <= TOL + TOL * |original| for every logit (as np.allclose)
TOL = 1e-4


def random_variables(model, input_shape: Sequence[int], seed: int = 0) -> dict:
    """Variables of the model's shapes filled by NumPy (no compile): He-scaled kernels,
    small biases, BatchNorm scale U(0.5, 1.5), shift N(0, 0.1), running mean N(0, 0.1),
    running var U(0.5, 2)."""
    abstract = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, *input_shape), jnp.float32),
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        collection, name = names[0], names[-1]
        shape = leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))  # HWIO conv or (in, out) dense
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif collection == "batch_stats":
            value = rng.normal(0.0, 0.1, shape) if name == "mean" else rng.uniform(0.5, 2.0, shape)
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def calibrated_variables(name: str, seed: int = 0, batch: int = 4) -> dict:
    """`random_variables` with each BatchNorm's running statistics set to those of a
    random N(0, 1) batch.

    One training-mode forward pass of the network built with BatchNorm momentum 0 (running
    statistics := batch statistics); without it, random statistics do not normalise and the
    activations of deep residual networks grow by orders of magnitude.
    """
    shape = models.get_spec(name).input_shape
    variables = random_variables(models.create(name), shape, seed)
    calibrate = models.create(name, bn_momentum=0.0)
    x = jax.random.normal(jax.random.key(seed + 2), (batch, *shape))
    _, updates = jax.jit(
        lambda v, x: calibrate.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}
        )
    )(variables, x)
    return {**variables, "batch_stats": updates["batch_stats"]}


_APPLY: dict[str, tuple] = {}


def apply_fns(name: str, model, folded) -> tuple:
    """Jitted evaluation of the original and the folded network, made once per model name: the
    equality check and the timing share their compilations when their batch sizes agree (every
    fold of one network has the same pairs, so any of them serves)."""
    if name not in _APPLY:
        _APPLY[name] = (
            jax.jit(lambda v, x: model.apply(v, x, train=False)),
            jax.jit(lambda v, x: folded.apply(v, x)),
        )
    return _APPLY[name]


def equality_row(name: str, batch: int = 2, seed: int = 0) -> dict:
    """Folds one registered network and compares its evaluation logits with the original's."""
    model = models.create(name)
    shape = models.get_spec(name).input_shape
    variables = calibrated_variables(name, seed)
    start = time.perf_counter()
    folded, folded_vars = fold_batchnorm(model, variables, shape)
    fold_s = time.perf_counter() - start
    x = jax.random.normal(jax.random.key(seed + 1), (batch, *shape))
    original_fn, folded_fn = apply_fns(name, model, folded)
    original, new = np.asarray(original_fn(variables, x)), np.asarray(folded_fn(folded_vars, x))
    n_bn = len(folded.pairs) + len(folded.unfolded)
    reasons = sorted(set(folded.unfolded.values()))
    return {
        "model": name,
        "input": "x".join(map(str, shape)),
        "batchnorms": n_bn,
        "folded": len(folded.pairs),
        "unfolded": len(folded.unfolded),
        "unfolded_reason": "; ".join(reasons),
        "params_before": count_params(variables),
        "state_before": sum(int(a.size) for a in jax.tree.leaves(variables.get("batch_stats", {}))),
        "params_after": count_params(folded_vars),
        "state_after": sum(
            int(a.size) for a in jax.tree.leaves(folded_vars.get("batch_stats", {}))
        ),
        "max_abs_logit": float(np.abs(original).max()),
        "max_abs_diff": float(np.abs(original - new).max()),
        "allclose": bool(np.allclose(new, original, rtol=TOL, atol=TOL)),
        "fold_s": fold_s,
    }


def timing_row(name: str, batch: int, repeats: int, calls: int, seed: int = 0) -> dict:
    """Evaluation time per batch of the original and the folded network, alternating repetitions."""
    model = models.create(name)
    shape = models.get_spec(name).input_shape
    variables = random_variables(model, shape, seed)  # timing does not depend on the values
    folded, folded_vars = fold_batchnorm(model, variables, shape)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, *shape))
    original_fn, folded_fn = apply_fns(name, model, folded)
    runs = {"original": (original_fn, variables), "folded": (folded_fn, folded_vars)}
    for fn, v in runs.values():  # compile and warm up
        fn(v, x).block_until_ready()
        fn(v, x).block_until_ready()
    times: dict[str, list[float]] = {"original": [], "folded": []}
    for rep in range(repeats):
        order = ("original", "folded") if rep % 2 == 0 else ("folded", "original")
        for key in order:
            fn, v = runs[key]
            start = time.perf_counter()
            for _ in range(calls):
                out = fn(v, x)
            out.block_until_ready()
            times[key].append((time.perf_counter() - start) / calls)
    ratios = [o / f for o, f in zip(times["original"], times["folded"])]
    return {
        "model": name,
        "batch": batch,
        "repeats": repeats,
        "calls": calls,
        "original_ms": 1e3 * statistics.median(times["original"]),
        "folded_ms": 1e3 * statistics.median(times["folded"]),
        "original_best_ms": 1e3 * min(times["original"]),
        "folded_best_ms": 1e3 * min(times["folded"]),
        "speedup_best": min(times["original"]) / min(times["folded"]),
        "speedup_median": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
        "ratios": [round(r, 3) for r in ratios],
    }


def report(equal: list[dict], timed: list[dict], command: str, wall_s: float) -> str:
    """The Markdown section of RESULTS.md."""
    lines = [
        "## BatchNorm folding: BN costs nothing at test time",
        "",
        "Claim: at test time a BatchNorm after a convolution is a fixed affine map and can be "
        "folded into the convolution's kernel and bias, leaving a network without BatchNorm that "
        "computes the same function. `cnnjax.analysis.fold_batchnorm(model, variables, "
        "input_shape)` folds every such BatchNorm of a whole network. Weights and BatchNorm scales "
        "and shifts are random, the running statistics calibrated on a random batch (so that every "
        "BatchNorm normalises, as in a trained network), inputs N(0, 1), float32.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}; wall time {wall_s:.1f} s.",
        "",
        "### Folded logits against the original (evaluation mode)",
        "",
        "| model | input | BatchNorms | folded | left (pre-activation) | "
        "params before -> after | BN state before -> after | max abs logit "
        "| max abs difference | relative to max abs logit | equal to 1e-4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in equal:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['batchnorms']} | {r['folded']} | {r['unfolded']} "
            f"| {r['params_before']:,} -> {r['params_after']:,} | {r['state_before']:,} -> "
            f"{r['state_after']:,} | {r['max_abs_logit']:.3g} | {r['max_abs_diff']:.2e} | "
            f"{r['max_abs_diff'] / r['max_abs_logit']:.1e} | {'yes' if r['allclose'] else 'NO'} |"
        )
    lines += [
        "",
        "Equal to 1e-4: every logit within 1e-4 + 1e-4 x |logit| of the original's (`np.allclose` "
        "with rtol = atol = 1e-4). The differences are float32 rounding: the folded network "
        "multiplies the kernel by gamma / sqrt(var + eps) before the convolution instead of after "
        "it, and the rounding errors of some fifty layers add up, amplified where a channel's "
        "variance is small (large gamma / sqrt(var + eps)).",
    ]
    reasons = sorted({r["unfolded_reason"] for r in equal if r["unfolded_reason"]})
    if reasons:
        lines += [
            "",
            "BatchNorms left in place: "
            + "; ".join(reasons)
            + (
                " (DenseNet's BN-ReLU-conv order: they could only be folded into the *next* "
                "convolution when no ReLU lies between, which is not the case)."
            ),
        ]
    if timed:
        lines += [
            "",
            "### Evaluation time, original against folded (jit, same process, alternating)",
            "",
            "| model | batch | ms / batch, original (best, median) | folded (best, median) | "
            "speed-up of the best times | median ratio (min - max) | ratio per repetition |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in timed:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['original_best_ms']:.0f}, "
                f"{r['original_ms']:.0f} | {r['folded_best_ms']:.0f}, {r['folded_ms']:.0f} | "
                f"{r['speedup_best']:.3f}x | {r['speedup_median']:.3f}x ({r['speedup_min']:.2f} - "
                f"{r['speedup_max']:.2f}) | {', '.join(f'{x:.2f}' for x in r['ratios'])} |"
            )
        r0 = timed[0]
        lines += [
            "",
            f"Each repetition times {r0['calls']} calls of each network, the two networks in "
            f"alternating order; {r0['repeats']} repetitions. The machine is shared with "
            "other jobs: the best (minimum) time of each network is the least disturbed "
            "estimate, the per-repetition ratios show the noise. Folding removes the "
            "per-channel affine pass after every convolution but no multiply-adds, and XLA "
            "already fuses that pass with the ReLU and residual add that follow, so on a CPU, "
            "where the convolutions dominate, the gain is small.",
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
        "--models", nargs="*", default=list(DEFAULT_MODELS), help="networks folded and compared"
    )
    parser.add_argument(
        "--time", nargs="*", default=list(DEFAULT_TIMED), help="networks timed, original vs folded"
    )
    parser.add_argument(
        "--batch_size", type=int, default=128, help="evaluation batch of the timing"
    )
    parser.add_argument("--repeats", type=int, default=9, help="timing repetitions (alternating)")
    parser.add_argument("--calls", type=int, default=3, help="calls per repetition")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models + args.time) - set(models.list_models()))
    if unknown:
        parser.error(f"unknown models {unknown}; see cnnjax.models.list_models()")
    if min(args.batch_size, args.repeats, args.calls) < 1:
        parser.error("--batch_size, --repeats and --calls must be positive")
    start = time.perf_counter()
    equal = []
    for name in args.models:
        equal.append(equality_row(name))
        print(
            f"[{NAME}] {name}: {equal[-1]['folded']} folded, "
            f"max |diff| {equal[-1]['max_abs_diff']:.2e}",
            flush=True,
        )
    timed = []
    for name in args.time:
        timed.append(timing_row(name, args.batch_size, args.repeats, args.calls))
        print(
            f"[{NAME}] {name}: speed-up {timed[-1]['speedup_median']:.3f}x {timed[-1]['ratios']}",
            flush=True,
        )
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, rows in (("", equal), ("_timing", timed)):
        if rows:
            write_csv(out / f"{NAME}{suffix}.csv", rows)
    command = " ".join(["python -m experiments." + NAME, *map(shlex.quote, argv)])
    text = report(equal, timed, command, wall)
    atomic_write(out / f"{NAME}.md", text)
    print(text)
    bad = [r["model"] for r in equal if not r["allclose"]]
    if bad:
        print(f"error: folded logits not equal to rtol = atol = {TOL} for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
