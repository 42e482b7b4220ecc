"""BatchNorm costs nothing at test time: fold it into the convolution before it, then time both.

In evaluation a BatchNorm is an affine map per channel, so BN(conv(x)) is one convolution with
kernel W * g and bias (b - mean) * g + beta, g = gamma / sqrt(var + eps).
`cnnjax.analysis.fold_batchnorm(model, variables, input_shape)` does this for every BatchNorm of
a whole network that directly follows a Conv or Dense (pre-activation BatchNorms, as in DenseNet,
stay and are listed). This script:

1. folds several zoo networks with random weights and random, non-trivial BatchNorm statistics
   and parameters, and compares the logits of the folded network with the original's in
   evaluation mode (max absolute difference; the claim: equal to 1e-4);
2. times evaluation (jit, batch 128, CIFAR-10 input) of CIFAR ResNets with and without folding,
   in the same process, alternating the two over several repetitions (the machine is shared:
   the ratio of each repetition is reported, and the median).

  python -m experiments.bn_folding [--out experiments/results/claims] [--models ...] [--time ...]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
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

NAME = "bn_folding"
DEFAULT_MODELS = ("resnet20", "resnet56", "resnet50", "vgg11_bn", "bn_inception", "densenet121")
DEFAULT_TIMED = ("resnet20", "resnet56")
ATOL = 1e-4


def random_variables(model, input_shape: Sequence[int], seed: int = 0) -> dict:
    """Variables of the model's shapes filled by NumPy (no compile): He-scaled kernels, small biases,
    BatchNorm scale U(0.5, 1.5), shift N(0, 0.1), running mean N(0, 0.1), running var U(0.5, 2)."""
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                              jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
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


def equality_row(name: str, batch: int = 2, seed: int = 0) -> dict:
    """Folds one registered network and compares its evaluation logits with the original's."""
    model = models.create(name)
    shape = models.get_spec(name).input_shape
    variables = random_variables(model, shape, seed)
    start = time.perf_counter()
    folded, folded_vars = fold_batchnorm(model, variables, shape)
    fold_s = time.perf_counter() - start
    x = jax.random.normal(jax.random.key(seed + 1), (batch, *shape))
    original = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    new = np.asarray(jax.jit(lambda v, x: folded.apply(v, x))(folded_vars, x))
    n_bn = len(folded.pairs) + len(folded.unfolded)
    reasons = sorted(set(folded.unfolded.values()))
    return {"model": name, "input": "x".join(map(str, shape)), "batchnorms": n_bn, "folded": len(folded.pairs),
            "unfolded": len(folded.unfolded), "unfolded_reason": "; ".join(reasons),
            "params_before": count_params(variables),
            "state_before": sum(int(a.size) for a in jax.tree.leaves(variables.get("batch_stats", {}))),
            "params_after": count_params(folded_vars),
            "state_after": sum(int(a.size) for a in jax.tree.leaves(folded_vars.get("batch_stats", {}))),
            "max_abs_logit": float(np.abs(original).max()), "max_abs_diff": float(np.abs(original - new).max()),
            "fold_s": fold_s}


def timing_row(name: str, batch: int, repeats: int, calls: int, seed: int = 0) -> dict:
    """Evaluation time per batch of the original and the folded network, alternating repetitions."""
    model = models.create(name)
    shape = models.get_spec(name).input_shape
    variables = random_variables(model, shape, seed)
    folded, folded_vars = fold_batchnorm(model, variables, shape)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, *shape))
    runs = {"original": (jax.jit(lambda v, x: model.apply(v, x, train=False)), variables),
            "folded": (jax.jit(lambda v, x: folded.apply(v, x)), folded_vars)}
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
    return {"model": name, "batch": batch, "repeats": repeats, "calls": calls,
            "original_ms": 1e3 * statistics.median(times["original"]),
            "folded_ms": 1e3 * statistics.median(times["folded"]),
            "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "ratios": [round(r, 3) for r in ratios]}


def _machine() -> str:
    """CPU model, cores and JAX backend, for the provenance line of the results."""
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{cpu or platform.machine()}, {os.cpu_count()} cores; JAX {jax.__version__} on {jax.default_backend()}"


def report(equal: list[dict], timed: list[dict], command: str, wall_s: float) -> str:
    """The Markdown section of RESULTS.md."""
    lines = ["## BatchNorm folding: BN costs nothing at test time", "",
             "Claim: at test time a BatchNorm after a convolution is a fixed affine map and can be folded into "
             "the convolution's kernel and bias, leaving a network without BatchNorm that computes the same "
             "function. `cnnjax.analysis.fold_batchnorm(model, variables, input_shape)` folds every such "
             "BatchNorm of a whole network. Weights and every BatchNorm's statistics and parameters are random "
             "(non-trivial), inputs N(0, 1), float32.", "",
             f"Command: `{command}`  ", f"Machine: {_machine()}; wall time {wall_s:.1f} s.", "",
             "### Folded logits against the original (evaluation mode)", "",
             "| model | input | BatchNorms | folded | left (pre-activation) | params before -> after | "
             "BN state before -> after | max abs logit | max abs difference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in equal:
        lines.append(f"| {r['model']} | {r['input']} | {r['batchnorms']} | {r['folded']} | {r['unfolded']} | "
                     f"{r['params_before']:,} -> {r['params_after']:,} | {r['state_before']:,} -> {r['state_after']:,} | "
                     f"{r['max_abs_logit']:.3g} | {r['max_abs_diff']:.2e} |")
    reasons = sorted({r["unfolded_reason"] for r in equal if r["unfolded_reason"]})
    if reasons:
        lines += ["", "BatchNorms left in place: " + "; ".join(reasons) + " (DenseNet's BN-ReLU-conv order: they "
                  "could only be folded into the *next* convolution when no ReLU lies between, which is not the "
                  "case)."]
    if timed:
        lines += ["", "### Evaluation time, original against folded (jit, same process, alternating)", "",
                  "| model | batch | original ms / batch | folded ms / batch | speed-up (median) | min - max | "
                  "per repetition |", "|---|---|---|---|---|---|---|"]
        for r in timed:
            lines.append(f"| {r['model']} | {r['batch']} | {r['original_ms']:.1f} | {r['folded_ms']:.1f} | "
                         f"{r['speedup_median']:.3f}x | {r['speedup_min']:.3f} - {r['speedup_max']:.3f} | "
                         f"{', '.join(f'{x:.2f}' for x in r['ratios'])} |")
        r0 = timed[0]
        lines += ["", f"Each repetition times {r0['calls']} calls of each network; the median of {r0['repeats']} "
                  "repetitions is shown. The machine is shared with other jobs, so single repetitions are noisy."]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("experiments", "results", "claims"), help="output directory")
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), help="networks folded and compared")
    parser.add_argument("--time", nargs="*", default=list(DEFAULT_TIMED), help="networks timed, original vs folded")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch of the timing")
    parser.add_argument("--repeats", type=int, default=7, help="timing repetitions (alternating)")
    parser.add_argument("--calls", type=int, default=5, help="calls per repetition")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models + args.time) - set(models.list_models()))
    if unknown:
        parser.error(f"unknown models {unknown}; see cnnjax.models.list_models()")
    if min(args.batch_size, args.repeats, args.calls) < 1:
        parser.error("--batch-size, --repeats and --calls must be positive")
    start = time.perf_counter()
    equal = []
    for name in args.models:
        equal.append(equality_row(name))
        print(f"[{NAME}] {name}: {equal[-1]['folded']} folded, max |diff| {equal[-1]['max_abs_diff']:.2e}", flush=True)
    timed = []
    for name in args.time:
        timed.append(timing_row(name, args.batch_size, args.repeats, args.calls))
        print(f"[{NAME}] {name}: speed-up {timed[-1]['speedup_median']:.3f}x {timed[-1]['ratios']}", flush=True)
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, rows in (("", equal), ("_timing", timed)):
        if rows:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            (out / f"{NAME}{suffix}.csv").write_text(buf.getvalue())
    command = " ".join(["python -m experiments." + NAME, *map(shlex.quote, argv)])
    text = report(equal, timed, command, wall)
    (out / f"{NAME}.md").write_text(text)
    print(text)
    bad = [r["model"] for r in equal if not r["max_abs_diff"] <= ATOL * max(1.0, r["max_abs_logit"])]
    if bad:
        print(f"error: folded logits differ by more than {ATOL} (relative to the logits' scale) for {bad}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
