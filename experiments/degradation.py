"""The degradation experiment (He et al. 2016, Figure 6 / Table 6, Figure 4) from the repository:
`python -m experiments.degradation` is `cnnjax degradation` (the engine is `cnnjax.degradation`).

    python -m experiments.degradation                # the README's main job: runs/degradation_quick
    python -m experiments.degradation --out experiments/results/degradation_quick  # the reference
"""

import sys

from cnnjax.degradation import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.degradation"))
