"""What an experiment's result files share: where and on what it ran, and files written whole.

Used by the degradation experiment (`cnnjax.degradation`) and the scripts in experiments/.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
from typing import Any

from cnnjax._files import atomic_write

__all__ = ["atomic_write", "device", "machine", "out_dir", "save_figure", "software", "write_csv"]


def machine() -> str:
    """CPU model, cores and JAX backend, for the provenance line of the results."""
    import jax  # here, not at import: entry points set XLA_FLAGS before JAX starts

    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    backend = f"JAX {jax.__version__} on {jax.default_backend()}"
    return f"{cpu or platform.machine()}, {os.cpu_count()} cores; {backend}"


def software() -> dict[str, str]:
    """The versions a result depends on (cnnjax with its git commit where there is one)."""
    import importlib.metadata
    import subprocess

    versions = {}
    for name in ("cnnjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=here,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if commit:
        versions["cnnjax"] += f" (commit {commit})"
    return versions


def device() -> str:
    """The JAX devices a result ran on: '1 x NVIDIA H200 (gpu)'."""
    import jax

    devices = jax.devices()
    d = devices[0]
    return f"{len(devices)} x {getattr(d, 'device_kind', d.platform)} ({d.platform})"


def write_csv(
    path: str | os.PathLike, rows: list[dict[str, Any]], fields: list[str] | None = None
) -> None:
    """`rows` as a CSV file with a header (`fields`, default the first row's keys), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields if fields is not None else list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
    """A matplotlib figure as PNG, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write(path, buf.getvalue())


def out_dir(path: str) -> str:
    """argparse type of --out: refused at once if it names an existing file (the results come
    last)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path!r} is a file: give a directory (made if missing)")
    return path
