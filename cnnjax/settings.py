"""Every process-wide choice cnnjax makes, in one place.

Two kinds:

* Trace-time choices of the layers (`Settings`): which library computes `conv2d` and
  `batch_norm` on the CPU, their gradient paths, and two oneDNN details. The layers read
  `current()` while they are traced. The value is a `jax.make_user_context`, part of every
  `jax.jit` cache key, so a function compiled under one choice and called under another is
  traced and compiled anew (never silently run with the old choice). `using(...)` changes them
  for a `with` block in the calling thread only; `set_defaults(...)` for the whole process (the
  benchmark's workers). Nothing reads the environment for these.

      with cnnjax.settings.using(conv_backend="xla", bn_backend="xla"):
          step = jax.jit(train_step)   # traced and compiled with XLA's convolutions

* Three environment variables, read when they are needed (`cpu_fast`, `cache_dir`,
  `dnnl_root`): CNNJAX_CPU_FAST (the CPU fast path of `cnnjax.xla_flags.configure_cpu`),
  CNNJAX_CACHE_DIR (where the native kernels are built) and CNNJAX_DNNL_ROOT (the oneDNN to
  build them against).

This module imports JAX only when the trace-time settings are first used, so that the
benchmark's command line and `cnnjax.xla_flags` can import it without starting JAX.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

# The choices of each field; 'auto' picks the measured default (PERFORMANCE.md).
CONV_BACKENDS = ("auto", "onednn", "xla")
CONV_VJP_MODES = ("auto", "canonical", "xla")
CONV_WEIGHTS = ("auto", "direct", "onednn")
ONEDNN_THREADS = ("xla", "omp")
BN_BACKENDS = ("auto", "native", "xla")
BN_VJP_MODES = ("auto", "fused", "autodiff")

_MODES = {
    "conv_backend": CONV_BACKENDS,
    "conv_vjp": CONV_VJP_MODES,
    "conv_weights": CONV_WEIGHTS,
    "onednn_threads": ONEDNN_THREADS,
    "bn_backend": BN_BACKENDS,
    "bn_vjp": BN_VJP_MODES,
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The layers' trace-time choices (all read when a layer is traced).

    Attributes:
      conv_backend: who computes `conv2d`: 'onednn' (`cnnjax.native`; float32, groups 1), 'xla',
        or 'auto' (oneDNN on the CPU backend where it can be used, XLA otherwise).
      conv_vjp: the gradient of an XLA convolution: 'canonical' (NHWC/HWIO convolutions), 'xla'
        (JAX's transpose rule), 'auto' (canonical on the CPU backend).
      conv_weights: who computes a oneDNN convolution's filter gradient: 'direct' (cnnjax's
        kernel, `native/conv_weights.h`, where it applies), 'onednn', 'auto' ('direct').
      onednn_threads: whose threads run a oneDNN convolution: 'xla' (its batch split over XLA's
        intra-op pool) or 'omp' (oneDNN's OpenMP threads).
      bn_backend: who computes `batch_norm`'s passes: 'native', 'xla', or 'auto' (native for
        float32 on the CPU backend where it can be used).
      bn_vjp: `batch_norm`'s training gradient: 'fused' (hand-written), 'autodiff', 'auto'
        (fused on the CPU backend).
    """

    conv_backend: str = "auto"
    conv_vjp: str = "auto"
    conv_weights: str = "auto"
    onednn_threads: str = "xla"
    bn_backend: str = "auto"
    bn_vjp: str = "auto"

    def __post_init__(self):
        for name, modes in _MODES.items():
            _check(name, getattr(self, name))


def _check(name: str, value) -> None:
    if name not in _MODES:
        raise TypeError(f"unknown setting {name!r}; the settings are {', '.join(_MODES)}")
    if value not in _MODES[name]:
        raise ValueError(f"{name}: mode must be one of {_MODES[name]}, got {value!r}")


_lock = threading.Lock()
_context = None  # jax.make_user_context(Settings()), made on first use


def _state():
    global _context
    if _context is None:
        with _lock:
            if _context is None:
                import jax

                _context = jax.make_user_context(Settings())
    return _context


def current() -> Settings:
    """The settings in effect in this thread (what a layer traced now uses)."""
    return _state().value


class using:  # noqa: N801 (used like a function: `with using(conv_backend='xla'): ...`)
    """Changes some settings inside a `with` block, in this thread; values checked at once."""

    def __init__(self, **changes: str):
        for name, value in changes.items():
            _check(name, value)
        self.changes, self._inner = changes, None

    def __enter__(self) -> Settings:
        new = dataclasses.replace(current(), **self.changes)
        self._inner = _state()(new)
        self._inner.__enter__()
        return new

    def __exit__(self, *exc) -> bool:
        self._inner.__exit__(*exc)
        return False


def set_defaults(**changes: str) -> Settings:
    """Changes the process-wide defaults (what every thread sees outside `using`)."""
    for name, value in changes.items():
        _check(name, value)
    state = _state()
    with _lock:
        new = dataclasses.replace(state.get_global(), **changes)
        state.set_global(new)
    return new


# --------------------------------------------------------------------------- environment

CPU_FAST_ENV = "CNNJAX_CPU_FAST"
CACHE_DIR_ENV = "CNNJAX_CACHE_DIR"
DNNL_ROOT_ENV = "CNNJAX_DNNL_ROOT"


def cpu_fast(environ: Mapping[str, str] | None = None) -> bool:
    """CNNJAX_CPU_FAST: 1/true/yes/on or unset (on), 0/false/no/off (off); else ValueError."""
    value = (os.environ if environ is None else environ).get(CPU_FAST_ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("", "1", "true", "yes", "on"):
        return True
    raise ValueError(f"{CPU_FAST_ENV}={value!r}: use 1 (on) or 0 (off; unset means on)")


def cache_dir() -> Path:
    """Where the native kernels are built: CNNJAX_CACHE_DIR, else $XDG_CACHE_HOME/cnnjax, else
    ~/.cache/cnnjax."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnjax"


def dnnl_root() -> Path:
    """Where oneDNN is looked for: CNNJAX_DNNL_ROOT, else this environment's prefix (where the
    pip packages put it)."""
    return Path(os.environ.get(DNNL_ROOT_ENV) or sys.prefix)
