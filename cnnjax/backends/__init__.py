"""Who computes a layer on the CPU: kernel selection and the hand-written gradients.

`cnnjax.functional` writes each layer as reference code on `lax`. Two layers have faster
implementations on XLA's CPU backend, chosen here at trace time from the call's `backend` /
`vjp` arguments and `cnnjax.settings`:

  conv.py        `conv2d`: oneDNN (`cnnjax.native.onednn`), or XLA's convolution with the
                 canonical VJP (both gradients as NHWC/HWIO convolutions), or JAX's own rule.
  batch_norm.py  `batch_norm`: the native kernels (`cnnjax.native.batch_norm`) with their VJP,
                 or XLA's passes with the hand-written (fused) VJP, or JAX's differentiation.

Whether the native kernels can be used is decided from cheap facts (`cnnjax.native.usable`);
they are built when a call to them is first lowered, so tracing alone builds nothing.
"""

from __future__ import annotations

import jax

from cnnjax import native


def on_native(mode: str, modes: tuple[str, ...], supported: bool) -> bool:
    """Whether a layer runs on cnnjax.native's kernels under `mode` (one of `modes`: 'auto', the
    native name, 'xla'): 'xla' never; the native mode wherever the kernels apply (`supported`),
    raising where they cannot run here; 'auto' likewise but only on the CPU backend, and XLA
    wherever they cannot be used."""
    if mode not in modes:
        raise ValueError(f"backend must be one of {modes} or None, got {mode!r}")
    if mode == "xla" or not supported:
        return False
    on_cpu = jax.default_backend() == "cpu"
    if mode == "auto":
        return on_cpu and native.usable()
    if not on_cpu:
        raise ValueError(
            f"backend={mode!r} runs on the CPU backend only (JAX's default backend is "
            f"{jax.default_backend()!r}); use backend='xla' or 'auto'"
        )
    reason = native.usable_reason()
    if reason:
        raise native.NativeUnavailable(reason)  # why, and how to install oneDNN
    return True


def resolve_vjp(mode: str, modes: tuple[str, ...], cpu_choice: str) -> str:
    """The gradient path to trace: 'auto' is `cpu_choice` on the CPU backend (where it was
    measured to win, PERFORMANCE.md) and JAX's own rule elsewhere (the last entry of `modes`)."""
    if mode not in modes:
        raise ValueError(f"vjp must be one of {modes} or None, got {mode!r}")
    if mode == "auto":
        return cpu_choice if jax.default_backend() == "cpu" else modes[-1]
    return mode
