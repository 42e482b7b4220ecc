"""Who computes `cnnjax.functional.conv2d`, and the canonical VJP of XLA's convolution.

`select` picks, at trace time, from the call's `backend` / `vjp` and `cnnjax.settings`:

  oneDNN     (`cnnjax.native.onednn`): forward pass and both gradients as FFI calls on the
             NHWC/HWIO arrays; float32, groups 1, CPU backend (PERFORMANCE.md section 10).
  canonical  XLA's convolution whose gradients are written as ordinary NHWC/HWIO convolutions.
             JAX differentiates a convolution into two convolutions with permuted dimension
             numbers (the kernel gradient contracts over the batch); XLA's CPU backend runs those
             layouts far below its NHWC speed, and inside `lax.scan` cannot re-layout them at all
             (PERFORMANCE.md section 6). Groups 1.
  None       XLA's convolution with JAX's own transpose rule: `functional.conv2d`'s own code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cnnjax import settings
from cnnjax._vma import vary_alike
from cnnjax.backends import on_native, resolve_vjp
from cnnjax.native import onednn

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def select(x, kernel, groups: int, *, vjp: str | None, backend: str | None):
    """The implementation of this convolution other than XLA's plain one, or None. Called as
    impl(x, kernel, strides, pads, dilation, precision), with explicit ((top, bottom), (left,
    right)) pads; `precision` only concerns XLA."""
    s = settings.current()
    mode = resolve_vjp(s.conv_vjp if vjp is None else vjp, settings.CONV_VJP_MODES, "canonical")
    canonical = mode == "canonical" and groups == 1  # vjp validated whichever library runs
    lib = s.conv_backend if backend is None else backend
    if on_native(lib, settings.CONV_BACKENDS, onednn.supports(x, kernel, groups)):
        return _onednn
    return _conv_canonical if canonical else None


def _onednn(x, kernel, strides, pads, dilation, precision):
    del precision  # oneDNN computes float32 convolutions in float32
    spatial = tuple(
        (n + lo + hi - (k - 1) * d - 1) // s + 1
        for n, k, s, d, (lo, hi) in zip(x.shape[1:3], kernel.shape[:2], strides, dilation, pads)
    )
    y_shape = (x.shape[0], *spatial, kernel.shape[3])
    return onednn.convolve(*vary_alike(x, kernel), (tuple(strides), pads, tuple(dilation)), y_shape)


def _conv_nhwc(lhs, rhs, strides, pads, dilation, precision, lhs_dilation=(1, 1)):
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=strides,
        padding=pads,
        lhs_dilation=lhs_dilation,
        rhs_dilation=dilation,
        dimension_numbers=DIMENSION_NUMBERS,
        precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_canonical_impl(x, kernel, strides, pads, dilation, precision):
    return _conv_nhwc(x, kernel, strides, pads, dilation, precision)


def _conv_canonical(x, kernel, strides, pads, dilation, precision):
    x, kernel = vary_alike(x, kernel)
    return _conv_canonical_impl(x, kernel, tuple(strides), pads, tuple(dilation), precision)


def _conv_canonical_fwd(x, kernel, strides, pads, dilation, precision):
    return _conv_nhwc(x, kernel, strides, pads, dilation, precision), (x, kernel)


def _conv_canonical_bwd(strides, pads, dilation, precision, residuals, dy):
    """Both gradients as NHWC/HWIO convolutions (derivation per spatial axis, stride s, dilation d,
    kernel k, effective extent e = (k - 1) d + 1, padding (lo, hi), r = (H + lo + hi - e) mod s):

      dx = dy dilated by s (lhs_dilation), padded (e - 1 - lo, e - 1 - hi + r), correlated with the
           flipped kernel (channels swapped), dilation d;
      dw[t, ci, co] = sum_{n, i} x_pad[n, i s + t d, ci] dy[n, i, co]: a convolution of x seen as
           (C_in, H, W, N) with dy seen as (Ho, Wo, N, C_out), stride d, kernel dilation s, padding
           (lo, hi - r) so that exactly k taps come out.
    """
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    in_spatial, out_spatial = x.shape[1:3], dy.shape[1:3]
    dx_pads, dw_pads = [], []
    geometry = zip(in_spatial, out_spatial, (kh, kw), strides, dilation, pads)
    for size, out, k, s, d, (lo, hi) in geometry:
        extent = (k - 1) * d + 1
        r = (size + lo + hi - extent) - (out - 1) * s
        dx_pads.append((extent - 1 - lo, extent - 1 - hi + r))
        dw_pads.append((lo, hi - r))
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (KH, KW, C_out, C_in)
    dx = _conv_nhwc(dy, flipped, (1, 1), dx_pads, dilation, precision, lhs_dilation=strides)
    dw = _conv_nhwc(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), dilation, dw_pads, strides, precision
    )
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(kernel.dtype)


_conv_canonical_impl.defvjp(_conv_canonical_fwd, _conv_canonical_bwd)
