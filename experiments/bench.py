"""Train- and eval-step speed of cnnjax next to Flax `nn.Conv` and PyTorch, one run side by side.

    python -m experiments.bench --model resnet20 --batch_size 128
    python -m experiments.bench --model resnet56 --impl cnnjax torch-cl --xla fast default
    python -m experiments.bench --model resnet20 --impl cnnjax flax torch-cl torch-nchw --rounds 3

`python -m cnnjax bench` with the reference twins of the CIFAR nets registered (`TWINS`, defined
in experiments/bench_twins.py): `flax`, `torch-cl`, `torch-nchw`; the same harness and flags.
See `cnnjax.bench` for what is measured and experiments/results/PERFORMANCE.md for the figures on
this project's machine. Run it from the repository root (experiments/ is not installed); the
workers find experiments/ through PYTHONPATH (`cnnjax.bench.worker_env`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a file: the repository root, for `experiments`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cnnjax import bench  # noqa: E402

# name -> (runner import path, compared by default)
TWINS: dict[str, tuple[str, bool]] = {
    "flax": ("experiments.bench_twins:FlaxTwinRunner", True),
    "torch-cl": ("experiments.bench_twins:TorchRunner", True),
    "torch-nchw": ("experiments.bench_twins:TorchNCHWRunner", False),
}


def register_twins() -> None:
    """Registers the twins with `cnnjax.bench.register` (again: no change)."""
    for name, (runner, default) in TWINS.items():
        bench.register(name, runner, default=default)


def main(argv: Sequence[str] | None = None) -> int:
    register_twins()
    return bench.main(
        argv, prog="python -m experiments.bench", description=__doc__.split("\n\n")[0]
    )


if __name__ == "__main__":
    sys.exit(main())
