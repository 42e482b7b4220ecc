"""Train- and eval-step speed of cnnjax next to Flax `nn.Conv` and PyTorch, one run side by side.

    python experiments/bench.py --model resnet20 --batch-size 128
    python experiments/bench.py --model resnet56 --impl cnnjax torch-cl --xla fast default --threads 1
    python experiments/bench.py --model resnet152 --impl cnnjax --rounds 0 --batch-size 2  # compile time only

The same as `python -m cnnjax bench`; see `cnnjax.bench` for what is measured and
experiments/results/PERFORMANCE.md for the figures on this project's machine.
"""

from __future__ import annotations

import sys

from cnnjax import bench

if __name__ == "__main__":
    sys.exit(bench.main())
