"""What every claim script's result files share (the rest is `cnnjax.reporting`)."""

from __future__ import annotations

import argparse
import os

from cnnjax.cli import ArgumentParser
from cnnjax.reporting import out_dir


def claims_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The command line of a claim script: `python -m experiments.<name>`, described by the first
    paragraph of its docstring, with --out (default experiments/results/claims)."""
    parser = ArgumentParser(prog=f"python -m experiments.{name}", description=doc.split("\n\n")[0])
    parser.add_argument(
        "--out",
        default=os.path.join("experiments", "results", "claims"),
        type=out_dir,
        help="output directory",
    )
    return parser
