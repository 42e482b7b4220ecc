"""The XLA CPU configuration cnnjax runs with: one documented place for the CPU fast path.

XLA reads `XLA_FLAGS` once, when JAX first initialises a backend, so the flags must be in the
environment before that. Entry points (the CLI, experiment scripts) call `configure_cpu()`
before their first JAX computation:

    from cnnjax import xla_flags
    xla_flags.configure_cpu()   # before anything touches jax.devices() / runs a computation

What it sets (`CPU_PRESETS['fast']`, measured in experiments/results/PERFORMANCE.md) and how to
turn it off:
  - `CNNJAX_CPU_FAST=0` in the environment: configure_cpu() leaves XLA_FLAGS alone (XLA's own
    defaults, the 'default' preset).
  - A flag the user already put in XLA_FLAGS wins: configure_cpu() only adds flags whose name the
    user has not set.
The flags only concern XLA's CPU backend; on GPU/TPU hosts they are parsed and ignored.

On a host where JAX will run on its CPU backend it also tunes the C allocator (`tune_malloc()`,
glibc on Linux): XLA CPU allocates each step's temporaries as one block (281 MiB for a ResNet-20
batch-128 train step); glibc serves a block that large with mmap and unmaps it when it is freed,
so every step page-faulted all of it anew (72k faults and 240 ms of kernel time in a 1.05 s step,
PERFORMANCE.md section 8). Tuned, freed memory stays in the process and the next step reuses it:
1.2-1.5x faster steps on one core. CNNJAX_CPU_FAST=0 leaves the allocator alone too. Where a
GPU/TPU plugin is installed it is off by default (not measured there, and one arena could slow
many-threaded input pipelines); `configure_cpu(malloc=True)` tunes it there too,
`configure_cpu(malloc=False)` never (the argument replaces the former CNNJAX_CPU_MALLOC variable).

This module imports nothing from JAX, so importing it never initialises a backend.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import mmap
import os
import platform
import sys
import warnings
from collections.abc import Mapping

ENV_SWITCH = "CNNJAX_CPU_FAST"
# glibc's mallopt() parameters (malloc.h) and the values tune_malloc() sets: no mmap for large
# blocks, never give the top of the heap back, one arena (XLA's block comes from any thread).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_MALLOPTS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))

# Named XLA_FLAGS strings; the benchmark (`python -m cnnjax bench --xla NAME ...`) compares them
# side by side, each in its own process. Measurements and reasons: PERFORMANCE.md.
CPU_PRESETS: Mapping[str, str] = {
    # XLA's own defaults. In jaxlib 0.10 YNNPACK takes convolutions, reductions and single dots
    # (`individual_dot,individual_convolution,reduce`), XNNPACK and oneDNN nothing.
    "default": "",
    # YNNPACK for reductions, element-wise fusions and single dots, never for convolutions: every
    # convolution stays on XLA's Eigen path. YNNPACK ran the filter gradient of the 32x32x16
    # CIFAR layers at about 2.4 GFLOP/s (Eigen: about 20-55), and its element-wise fusions make
    # BatchNorm and ReLU about 1.5x cheaper than XLA's own loops.
    "ynn_no_conv": "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce,eltwise",
    # YNNPACK off altogether.
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    # Tried, not kept (PERFORMANCE.md): no XNNPACK or oneDNN fusion forms on these networks.
    "xnn_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
}
# The configuration configure_cpu() applies.
FAST = "ynn_no_conv"
CPU_PRESETS = {**CPU_PRESETS, "fast": CPU_PRESETS[FAST]}


def flag_name(flag: str) -> str:
    """'--xla_foo=bar' -> 'xla_foo'."""
    return flag.lstrip("-").split("=", 1)[0]


def merge_flags(existing: str, extra: str) -> str:
    """`existing` with each flag of `extra` appended unless `existing` already names it."""
    have = {flag_name(f) for f in existing.split()}
    added = [f for f in extra.split() if flag_name(f) not in have]
    return " ".join(existing.split() + added)


def resolve(config: str) -> str:
    """The XLA_FLAGS string of a preset name, or `config` itself if it is a flag string."""
    if config in CPU_PRESETS:
        return CPU_PRESETS[config]
    if config.strip() == "" or config.lstrip().startswith("--"):
        return config.strip()
    raise ValueError(
        f"unknown XLA configuration {config!r}: give a preset name ({', '.join(CPU_PRESETS)}) "
        "or a flag string starting with '--', e.g. '--xla_cpu_use_onednn=true'"
    )


def enabled(
    environ: Mapping[str, str] | None = None, switch: str = ENV_SWITCH, default: str = "1"
) -> bool:
    """Whether an environment switch (CNNJAX_CPU_FAST by default) is on: 1/true/yes/on or empty,
    0/false/no/off;
    `default` when unset; any other value raises ValueError."""
    value = (os.environ if environ is None else environ).get(switch, default).strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("", "1", "true", "yes", "on"):
        return True
    raise ValueError(
        f"{switch}={value!r}: use 1 (on) or 0 (off; unset means "
        f"{'on' if default == '1' else 'off'})"
    )


def accelerator_expected(environ: Mapping[str, str] | None = None) -> bool:
    """Whether JAX is likely to run on a GPU/TPU here, judged without importing JAX.

    JAX_PLATFORMS decides when set (its first platform); otherwise whether an accelerator plugin
    is installed (a `jax_plugins` entry point or module, e.g. jax-cuda12-plugin, or libtpu).
    """
    env = os.environ if environ is None else environ
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def malloc_wanted(environ: Mapping[str, str] | None = None, malloc: bool | None = None) -> bool:
    """Whether `configure_cpu(malloc=malloc)` tunes the allocator under `environ`: never when
    CNNJAX_CPU_FAST=0; else `malloc` when given (True: on an accelerator host too; False: not at
    all); None: on unless an accelerator is expected (`accelerator_expected`)."""
    if not enabled(environ):
        return False
    return not accelerator_expected(environ) if malloc is None else bool(malloc)


def tune_malloc(
    environ: Mapping[str, str] | None = None, *, malloc: bool | None = None, force: bool = False
) -> bool:
    """Keeps freed memory in the process (glibc: no mmap for large blocks, no trimming, one arena).

    Applied when `force` (whatever the environment) or `malloc_wanted(environ, malloc)`.
    Returns True when applied; False when not, off Linux, or without glibc's mallopt (musl, other
    platforms: nothing is changed). Process-wide and for the process's life: the resident size
    then stays at its peak, which a training process reaches every step anyway. Call it early,
    before threads start (the arena limit applies to threads that have none yet).
    """
    if not (force or malloc_wanted(environ, malloc)):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _MALLOPTS)


@functools.lru_cache(maxsize=None)
def jaxlib_knows(name: str) -> bool:
    """Whether the installed jaxlib defines the XLA flag `name` (its binary contains the name).

    XLA aborts the process on an unknown flag in XLA_FLAGS, so flags from another jaxlib
    version must not be passed blindly. Searches the shared library without importing JAX.
    """
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "libjax_common.so")
        if os.path.exists(path):
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(name.encode()) >= 0
    return False


def unknown_flags(config: str) -> list[str]:
    """The flags of a configuration (a CPU_PRESETS name or a flag string) that the installed jaxlib
    does not define: XLA aborts the process on them."""
    return [f for f in resolve(config).split() if not jaxlib_knows(flag_name(f))]


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this private helper: assume not started
        return False


def configure_cpu(
    config: str = FAST, *, environ: dict[str, str] | None = None, malloc: bool | None = None
) -> str:
    """Adds the CPU fast-path flags to XLA_FLAGS (before JAX initialises its backend).

    Args:
      config: a CPU_PRESETS name or an XLA flag string (default: the measured winner).
      environ: the environment to change (os.environ by default; tests pass a dict).
      malloc: the allocator tuning (`tune_malloc`): None (default) on a CPU host only, True on
        a GPU/TPU host too, False never. CNNJAX_CPU_FAST=0 leaves it off whatever this says.

    Returns:
      The resulting XLA_FLAGS. Does nothing when CNNJAX_CPU_FAST=0; otherwise, for the process's
      own environment, also calls `tune_malloc(malloc=malloc)`. Flags the user already set keep
      the user's value; flags the installed jaxlib does not define are left out, with a warning
      (XLA would abort on them). Warns, and changes nothing, when a JAX backend is
      already running (the flags would be ignored).
    """
    env = os.environ if environ is None else environ
    current = env.get("XLA_FLAGS", "")
    if not enabled(env):
        return current
    # The process's own allocator, not when a caller (a test) passes an environment.
    if environ is None:
        tune_malloc(malloc=malloc)
    flags = resolve(config).split()
    unknown = unknown_flags(config)
    if unknown:
        warnings.warn(
            f"the installed jaxlib does not know {unknown}: not set (re-measure the CPU fast path "
            "for this jaxlib, see experiments/results/PERFORMANCE.md)",
            stacklevel=2,
        )
    merged = merge_flags(current, " ".join(f for f in flags if f not in unknown))
    if merged == current:
        return current
    if environ is None and _backend_started():
        warnings.warn(
            "cnnjax.xla_flags.configure_cpu() was called after JAX initialised its backend; "
            "the CPU flags are ignored. Call it before the first JAX computation.",
            stacklevel=2,
        )
        return current
    env["XLA_FLAGS"] = merged
    return merged
