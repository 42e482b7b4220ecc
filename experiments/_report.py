"""What every experiment's result file says about the machine it ran on."""

import os
import platform

import jax


def machine() -> str:
    """CPU model, cores and JAX backend, for the provenance line of the results."""
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{cpu or platform.machine()}, {os.cpu_count()} cores; JAX {jax.__version__} on {jax.default_backend()}"
