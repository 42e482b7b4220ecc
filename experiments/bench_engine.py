"""Images/s of the training engine's options side by side, in one process (issue 19).

    python experiments/bench_engine.py --model resnet20 resnet56
    python experiments/bench_engine.py --model resnet56 --dtype float32 bfloat16 --data_dir DIR \\
        --steps_per_dispatch 50 --seeds 2 4 8 --json OUT.json          # on a GPU

Every variant trains the same thing, the paper's CIFAR recipe (batch 128, pad-crop-flip,
per-pixel mean), through `cnnjax.train.Engine`, the code `cnnjax train` runs:

  host        today's engine: the host pipeline feeds one compiled step at a time
  device      data_on_device: the training split resident, each batch made inside the step
  host_xN     steps_per_dispatch N, fed by the host
  device_xN   both
  seeds_K     K seeds as members of one program, on device_xN (K from --seeds), the members
              mapped as member_map 'auto' does; seeds_K_vmap / seeds_K_loop with --member_maps

Each variant is built and compiled first (the compile and first call are timed), then all are
timed in interleaved rounds with the order rotating, so that a noisy machine loads them alike.
A round trains `--steps` steps of every variant, each ended by waiting for its state. Images/s
count every member's images; the ratio to 'host' is taken per round and its median quoted.
Data: CIFAR-10 from --data_dir (`cifar10.npz` or a tfds directory), else the embedded digits at
32x32x3 (the host pipeline's work per batch does not depend on the set's size).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnnjax import xla_flags  # noqa: E402
from cnnjax.cli import ArgumentParser


def variants(
    steps_per_dispatch: int, seeds: list[int], member_maps: list[str]
) -> dict[str, dict[str, Any]]:
    """Variant name -> TrainConfig changes."""
    n = steps_per_dispatch
    out = {
        "host": {},
        "device": {"data_on_device": True},
        f"host_x{n}": {"steps_per_dispatch": n},
        f"device_x{n}": {"data_on_device": True, "steps_per_dispatch": n},
    }
    for k in seeds:
        if k > 1:
            out[f"seeds_{k}"] = {"data_on_device": True, "steps_per_dispatch": n, "seeds": k}
            for m in member_maps:
                out[f"seeds_{k}_{m}"] = {**out[f"seeds_{k}"], "member_map": m}
    return out


class Variant:
    """One engine, its state and how far it has trained."""

    def __init__(self, name: str, config):
        from cnnjax import train

        self.name, self.config = name, config
        t = time.perf_counter()
        setup = train.build(config)
        self.engine = train.Engine(setup)
        self.state = self.engine.place(train.initial_state(setup))
        self.members = len(setup.members)
        self.step = 0
        self.build_s = time.perf_counter() - t
        t = time.perf_counter()
        self.advance(config.steps_per_dispatch)  # compiles
        self.first_call_s = time.perf_counter() - t

    def advance(self, steps: int) -> float:
        """Trains `steps` more steps; returns the seconds it took, until the state was ready."""
        import jax

        t = time.perf_counter()
        state = self.state
        for _, state, _ in self.engine.run(self.state, self.step, self.step + steps):
            pass
        jax.block_until_ready(state)
        self.state, self.step = state, self.step + steps
        return time.perf_counter() - t


def bench(model: str, dtype: str, args) -> dict[str, Any]:
    from cnnjax import train

    # The engine is driven directly: nothing is logged, evaluated or saved.
    base = train.get_preset("cifar_resnet").replace(
        model=model,
        dtype=dtype,
        progress_bar=False,
        parallel=args.parallel,
        log_every=args.steps_per_dispatch,
        eval_every=0,
        checkpoint_every=0,
        global_batch_size=args.batch_size,
    )
    base = (
        base.replace(dataset="cifar10", data_dir=args.data_dir)
        if args.data_dir
        else base.replace(dataset="digits", image_size=32, channels=3)
    )
    steps = args.steps or 2 * args.steps_per_dispatch
    if steps % args.steps_per_dispatch:
        raise SystemExit(
            f"--steps {steps} must be a multiple of --steps_per_dispatch {args.steps_per_dispatch}"
        )
    table = variants(args.steps_per_dispatch, args.seeds, args.member_maps)
    if args.variants:
        table = {k: v for k, v in table.items() if k in args.variants or k == "host"}
    runs = {}
    for name, changes in table.items():
        print(
            f"[bench_engine] {model} {dtype} {name}: building and compiling",
            file=sys.stderr,
            flush=True,
        )
        runs[name] = Variant(name, base.replace(**changes))
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(runs[name].advance(steps))
    batch = base.global_batch_size
    rate = {
        name: [runs[name].members * batch * steps / t for t in ts] for name, ts in times.items()
    }
    out = {}
    for name, v in runs.items():
        ratios = [a / b for a, b in zip(rate[name], rate["host"])]
        out[name] = {
            "members": v.members,
            "member_map": v.engine.member_map,
            "images_per_s": statistics.median(rate[name]),
            "images_per_s_per_member": statistics.median(rate[name]) / v.members,
            "ms_per_step": 1000 * statistics.median(times[name]) / steps,
            "ratio_to_host": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "rounds_s": times[name],
            "build_s": v.build_s,
            "first_call_s": v.first_call_s,
        }
    return {
        "model": model,
        "dtype": dtype,
        "batch_size": batch,
        "steps_per_round": steps,
        "rounds": args.rounds,
        "steps_per_dispatch": args.steps_per_dispatch,
        "dataset": base.dataset,
        "variants": out,
    }


def provenance() -> dict[str, Any]:
    from cnnjax.reporting import device, machine, software

    return {
        "device": device(),
        "machine": machine(),
        "versions": software(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main(argv=None) -> int:
    xla_flags.configure_cpu()
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["resnet20", "resnet56"])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps_per_dispatch", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument(
        "--member_maps",
        nargs="*",
        default=[],
        choices=["vmap", "loop"],
        help="also time the seeds variants with these member maps",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="steps per round (default 2 x steps-per-dispatch)"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", nargs="*", help="only these (and 'host', the baseline)")
    p.add_argument("--parallel", default="shard_map", choices=["shard_map", "pmap", "none"])
    p.add_argument("--data_dir", default=None, help="directory with cifar10.npz or a tfds data_dir")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    results = {
        "provenance": provenance(),
        "runs": [bench(m, d, args) for m in args.model for d in args.dtype],
    }
    for run in results["runs"]:
        device = results["provenance"]["device"]
        print(
            f"\n{run['model']} {run['dtype']}, batch {run['batch_size']}, "
            f"{run['steps_per_round']} steps x {run['rounds']} rounds, {device}"
        )
        head = ("variant", "members", "img/s", "/member", "ms/step", "x host", "range", "compile")
        print("{:12s} {:>7s} {:>9s} {:>9s} {:>8s} {:>7s} {:>13s} {:>8s}".format(*head))
        for name, v in run["variants"].items():
            lo, hi = v["ratio_range"]
            print(
                f"{name:12s} {v['members']:7d} {v['images_per_s']:9.0f} "
                f"{v['images_per_s_per_member']:9.0f} {v['ms_per_step']:8.1f} "
                f"{v['ratio_to_host']:7.3f} {f'[{lo:.3f}-{hi:.3f}]':>13s} "
                f"{v['first_call_s']:7.1f}s"
            )
    if args.json:
        from cnnjax.train.metrics import write_json_atomic

        write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
