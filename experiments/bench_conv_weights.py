"""The filter gradient alone: cnnjax's kernel (native/conv_weights.h) against oneDNN's, one process.

    python experiments/bench_conv_weights.py [--batch_size 128] [--rounds 10] [--threads 0]

For each kind of 3x3 layer of a CIFAR ResNet-56 that the kernel takes (stride 1, padding 1:
16 -> 16 at 32x32, 32 -> 32 at 16x16, 64 -> 64 at 8x8; oneDNN keeps the first and the strided
ones) it compiles `cnnjax.native.onednn.conv_backward_weights`
twice, with `cnnjax.settings` conv_weights 'direct' and 'onednn' (trace time), runs the two
alternately on the same random x and dy, and prints each one's best time and GFLOP/s and the
median of the per-round ratios oneDNN time / kernel time (above 1: the kernel is faster), with
[min-max]. `--threads N` pins the process to N cores first (XLA sizes its pool from that).
PERFORMANCE.md section 12 has what this measured.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from cnnjax.cli import ArgumentParser

LAYERS = (
    (16, 16, 32, 1),
    (32, 32, 16, 1),
    (64, 64, 8, 1),
)  # (in, out channels, input side, stride)
MODES = ("direct", "onednn")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="pin to this many cores (0: all)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.rounds < 1 or args.threads < 0:
        p.error("--batch_size and --rounds must be >= 1, --threads >= 0")
    if args.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    from cnnjax import xla_flags

    xla_flags.configure_cpu()
    import jax
    import numpy as np

    from cnnjax import native, settings
    from cnnjax.native import onednn

    if not native.available():
        print(f"the native kernels are unavailable: {native.unavailable_reason()}", file=sys.stderr)
        return 1
    if not native.direct_conv_weights():
        print(
            "this library was built without AVX2/FMA: oneDNN computes every filter gradient",
            file=sys.stderr,
        )
        return 1
    rng = np.random.default_rng(0)
    print(
        f"batch {args.batch_size}, {len(os.sched_getaffinity(0))} cores, "
        f"oneDNN {native.dnnl_version()}"
    )
    print(
        f"{'layer':>22} {'kernel ms':>10} {'GFLOP/s':>8} "
        f"{'oneDNN ms':>10} {'GFLOP/s':>8}  oneDNN/kernel [min-max]"
    )
    for cin, cout, side, stride in LAYERS:
        out = (side - 1) // stride + 1
        geometry = ((stride, stride), ((1, 1), (1, 1)), (1, 1))
        x = jax.numpy.asarray(rng.standard_normal((args.batch_size, side, side, cin)), np.float32)
        dy = jax.numpy.asarray(rng.standard_normal((args.batch_size, out, out, cout)), np.float32)
        fns = {}
        for mode in MODES:
            with settings.using(conv_weights=mode):  # compiled under it: no retrace outside
                fns[mode] = (
                    jax.jit(
                        lambda x, dy, g=geometry, c=cin, o=cout: onednn.conv_backward_weights(
                            x, dy, g, (3, 3, c, o)
                        )
                    )
                    .lower(x, dy)
                    .compile()
                )
            fns[mode](x, dy).block_until_ready()
        times = {mode: [] for mode in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                start = time.perf_counter()
                fns[mode](x, dy).block_until_ready()
                times[mode].append(time.perf_counter() - start)
        flop = 2 * args.batch_size * out * out * 9 * cin * cout
        ratios = [b / a for a, b in zip(times["direct"], times["onednn"])]
        best = {mode: min(t) for mode, t in times.items()}
        print(
            f"{f'{cin} -> {cout}, {side}x{side}/{stride}':>22} {best['direct'] * 1e3:10.2f} "
            f"{flop / best['direct'] / 1e9:8.1f} {best['onednn'] * 1e3:10.2f} "
            f"{flop / best['onednn'] / 1e9:8.1f}  {statistics.median(ratios):.2f} "
            f"[{min(ratios):.2f}-{max(ratios):.2f}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
