"""Pure functions for every layer of the lecture, on NHWC activations and HWIO kernels.

Everything here is a plain function of arrays: no parameters are created, no state is kept.
`cnnjax.nn` wraps these in Flax linen modules. Arguments are validated eagerly (on static
shapes), so a bad call fails before anything is traced, with a message naming the argument.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import os
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax import native, xla_flags
from cnnjax._vma import vary_alike
from cnnjax.native import batch_norm as native_bn
from cnnjax.native import onednn

Array = jax.Array
IntPair = Union[int, Sequence[int]]
# int p, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'.
Padding = Union[str, int, Sequence[int], Sequence[Sequence[int]]]

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# --------------------------------------------------------------------------- argument parsing


def _is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _index(value) -> int | None:
    """`value` as a Python int when it is one exactly (an int, a NumPy integer, a concrete 0-d
    integer array), else None: bools, floats, strings and traced values are not ints here."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or _is_traced(value):
        return None
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_int(value) -> bool:
    """Whether `value` is exactly an int (`_index`): the one integer test of cnnjax's argument checks."""
    return _index(value) is not None


def _ints(value, length: int | None = None) -> list[int] | None:
    """The entries of a sequence as exact ints (`_index`), or None: not a sequence (a scalar, a
    string), an entry that is not an int, or not `length` entries."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        return None
    try:
        items = [_index(v) for v in value]
    except TypeError:
        return None
    if None in items or (length is not None and len(items) != length):
        return None
    return items  # type: ignore[return-value]


def _positive_int(value, name: str, *, what: str = "") -> int:
    """`value` as an int >= 1 (NumPy integers accepted; bools, floats and strings rejected)."""
    i = _index(value)
    if i is None or i < 1:
        raise ValueError(f"{name} must be a positive int{what}, got {value!r}")
    return i


def _real(value, name: str, *, traced_ok: bool = False):
    """`value` as a finite Python float (NumPy and concrete 0-d arrays accepted; bools, strings and
    None rejected). A traced value is returned unchecked where `traced_ok`, else rejected: its
    value is not known while tracing, so it cannot be validated."""
    if _is_traced(value):
        if traced_ok:
            return value
        raise ValueError(
            f"{name} must be a concrete number, got a traced value {value}; pass a Python float "
            "(under jax.jit close over it or mark it static, e.g. static_argnames)"
        )
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        f = float(value)
    elif (getattr(value, "shape", None) == () and getattr(value, "dtype", None) is not None
          and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))):
        f = float(value)
    else:
        raise ValueError(f"{name} must be a number (a Python float), got {value!r}")
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return f


def _flag(value, name: str) -> bool:
    """`value` as a Python bool (bool, NumPy bool or a concrete 0-d bool array)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if _is_traced(value):
        raise ValueError(
            f"{name} must be True or False, got a traced value {value}; it selects what is traced, "
            f"so pass a Python bool (under jax.jit mark it static, e.g. static_argnames='{name}')"
        )
    if getattr(value, "shape", None) == () and jnp.issubdtype(getattr(value, "dtype", None) or object, jnp.bool_):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def _as_array(x, name: str):
    """Arrays (JAX, NumPy, tracers) unchanged; anything else through jnp.asarray, or a clear error."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    if x is None:
        raise ValueError(f"{name} must be an array, got None")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an array (or something jnp.asarray converts), got {type(x).__name__} "
                         f"{x!r}: {e}") from None


def compute_dtype(x, dtype=None):
    """The dtype a layer computes `x` in: `dtype` if given, x's own if floating, else float32.

    Integer and bool inputs (uint8 images) are promoted: a sum of products in uint8 wraps, and a
    float kernel cast down to int8 loses its values.
    """
    if dtype is not None:
        return jnp.dtype(dtype)
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _floating(x):
    """x in `compute_dtype(x)`: integers and bools promoted to float32, floats unchanged."""
    return x.astype(compute_dtype(x))


def _pair(value: IntPair, name: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalises an int or a pair to a pair of ints >= minimum (NumPy integers accepted; floats,
    bools and strings rejected rather than truncated or iterated)."""
    single = _index(value)
    if single is not None:
        pair = (single, single)
    else:
        items = _ints(value, 2)
        if items is None:
            raise ValueError(
                f"{name} must be an int or a pair of ints, got {value!r}; pass e.g. {name}=2 or "
                f"{name}=(2, 1) (floats, bools and strings are not accepted)"
            )
        pair = tuple(items)
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in both dimensions, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_rank(x: Array, rank: int, name: str, layout: str) -> None:
    if x.ndim != rank:
        raise ValueError(
            f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)}; "
            f"add a batch dimension with x[None] or reshape to {layout}"
        )


def resolve_padding(
    padding: Padding,
    spatial: tuple[int, int],
    window: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    *,
    name: str = "padding",
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Converts any accepted padding form to explicit ((top, bottom), (left, right))."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            pads = []
            for size, k, s, d in zip(spatial, window, stride, dilation):
                eff = (k - 1) * d + 1
                out = -(-size // s)
                total = max((out - 1) * s + eff - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)  # type: ignore[return-value]
        raise ValueError(
            f"{name} string must be 'SAME' or 'VALID', got {padding!r}; "
            "or pass an int, a pair, or ((top, bottom), (left, right))"
        )
    bad = ValueError(
        f"{name} must be an int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID', got "
        f"{padding!r}; every entry must be an int (floats and bools are not accepted)"
    )
    single = _index(padding)
    if single is not None:
        pads = ((single, single), (single, single))
    else:
        if isinstance(padding, (bytes, bool, np.bool_)):
            raise bad
        try:
            items = list(padding)  # type: ignore[arg-type]
        except TypeError:
            raise bad from None
        if len(items) != 2:
            raise ValueError(f"{name} must have 2 entries (height, width), got {padding!r}")
        ints = _ints(items)
        if ints is not None:
            pads = ((ints[0], ints[0]), (ints[1], ints[1]))
        else:
            pairs = []
            for item in items:
                pair = _ints(item, 2)
                if pair is None:
                    raise bad
                pairs.append(tuple(pair))
            pads = tuple(pairs)
    if any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"{name} must be non-negative, got {padding!r}")
    return pads  # type: ignore[return-value]


def output_size(size: int, window: int, stride: int = 1, pad: int | tuple[int, int] = 0,
                dilation: int = 1, ceil_mode: bool = False) -> int:
    """The lecture's output-size formula floor((W - K + 2P) / S) + 1, with dilation and ceil mode.

    0 when the (dilated) window does not fit the padded input. `pad` is an int or (lo, hi).
    """
    i = _index(size)
    if i is None or i < 0:
        raise ValueError(f"size must be a non-negative int (the input extent), got {size!r}")
    size = i
    window = _positive_int(window, "window", what=" (the kernel extent)")
    stride = _positive_int(stride, "stride")
    dilation = _positive_int(dilation, "dilation")
    ceil_mode = _flag(ceil_mode, "ceil_mode")
    single = _index(pad)
    if single is not None:
        lo, hi = single, single
    else:
        pair = _ints(pad, 2)
        if pair is None:
            raise ValueError(f"pad must be an int or a pair of ints (lo, hi), got {pad!r}")
        lo, hi = pair
    if min(lo, hi) < 0:
        raise ValueError(f"pad must be non-negative, got {pad!r}")
    eff = (window - 1) * dilation + 1
    span = size + lo + hi - eff
    if span < 0:
        return 0
    if ceil_mode:
        out = -(-span // stride) + 1
        # The last window must start inside the input or the left padding (PyTorch's rule).
        if (out - 1) * stride >= size + lo:
            out -= 1
        return out
    return span // stride + 1


def _check_window_fits(spatial, window, dilation, pads, what: str, arg: str) -> None:
    for axis, size, k, d, (lo, hi) in zip(("height", "width"), spatial, window, dilation, pads):
        eff = (k - 1) * d + 1
        if eff > size + lo + hi:
            raise ValueError(
                f"{arg}: {what} of effective size {eff} (kernel {k}, dilation {d}) is larger than "
                f"the padded input {axis} {size}+{lo}+{hi}={size + lo + hi}; use a smaller {arg}, "
                "more padding, or a larger input"
            )


# --------------------------------------------------------------------------- convolution


def conv2d(
    x: Array,
    kernel: Array,
    bias: Array | None = None,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    precision: lax.PrecisionLike = None,
    vjp: str | None = None,
    backend: str | None = None,
) -> Array:
    """2-D cross-correlation: out[n, i, j, o] = bias[o] + sum_{k, di, dj} w[di, dj, k, o] * x[n, ...].

    Args:
      x: input, (N, H, W, C_in).
      kernel: weights, (KH, KW, C_in // groups, C_out); C_out must be divisible by groups.
      bias: optional (C_out,).
      stride: int or (sh, sw), >= 1.
      padding: int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'.
      dilation: int or (dh, dw), >= 1 (atrous convolution).
      groups: feature groups; groups == C_in == C_out is a depthwise convolution.
      precision: passed to `lax.conv_general_dilated`.
      vjp: how the gradient is computed (the forward value is the same either way):
        'canonical' (input and kernel gradients as NHWC/HWIO convolutions, see `conv2d_vjp_mode`),
        'xla' (JAX's own transpose rule), or None for the default, `CONV_VJP` ('auto': canonical on
        CPU, where XLA runs the transposed layouts slowly, and JAX's rule elsewhere). Grouped
        convolutions always use JAX's rule.
      backend: which library computes the convolution and its gradients: 'onednn' (oneDNN through
        `cnnjax.native`, float32 with groups=1; other convolutions fall back to XLA), 'xla' (XLA's
        own, with `vjp`), or None for the default, `CONV_BACKEND` ('auto': oneDNN on the CPU
        backend when it is installed, XLA otherwise; see `conv2d_backend`). `precision` only
        concerns XLA: oneDNN computes float32 convolutions in float32.

    Returns:
      (N, H_out, W_out, C_out) with H_out = floor((H + pt + pb - ((KH - 1) * dh + 1)) / sh) + 1.
    """
    x, kernel = _floating(_as_array(x, "x")), _as_array(kernel, "kernel")
    bias = None if bias is None else _as_array(bias, "bias")
    _check_rank(x, 4, "x", "NHWC")
    if kernel.ndim != 4:
        raise ValueError(f"kernel must have rank 4 (HWIO), got shape {tuple(kernel.shape)}")
    groups = _positive_int(groups, "groups")
    strides = _pair(stride, "stride")
    dilations = _pair(dilation, "dilation")
    c_in, (kh, kw, k_in, c_out) = x.shape[-1], kernel.shape
    if c_in == 0:
        raise ValueError(f"x has 0 channels (shape {tuple(x.shape)}); a convolution needs at least one input channel")
    if min(kh, kw, k_in, c_out) == 0:
        raise ValueError(
            f"kernel has a zero-size dimension (shape {tuple(kernel.shape)}); KH, KW, C_in // groups and "
            "C_out must all be >= 1"
        )
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels {c_in} (x shape {tuple(x.shape)})")
    if c_out % groups:
        raise ValueError(f"groups={groups} must divide the output channels {c_out} (kernel shape {tuple(kernel.shape)})")
    if k_in * groups != c_in:
        raise ValueError(
            f"channel mismatch: x has {c_in} channels but kernel {tuple(kernel.shape)} expects "
            f"{k_in} x groups={groups} = {k_in * groups}; the kernel must be (KH, KW, C_in // groups, C_out)"
        )
    pads = resolve_padding(padding, x.shape[1:3], (kh, kw), strides, dilations)
    _check_window_fits(x.shape[1:3], (kh, kw), dilations, pads, "kernel", "kernel")
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
    kernel = kernel.astype(x.dtype)
    canonical = _use_canonical_vjp(vjp) and groups == 1  # validates vjp whichever library runs
    if _use_onednn(backend, x, kernel, groups):
        y_shape = (x.shape[0], *_conv_spatial(x.shape[1:3], (kh, kw), strides, pads, dilations), c_out)
        y = onednn.convolve(*vary_alike(x, kernel), (strides, pads, dilations), y_shape)
    elif canonical:
        y = _conv_canonical(x, kernel, strides, pads, dilations, precision)
    else:
        y = lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=pads,
            rhs_dilation=dilations,
            dimension_numbers=DIMENSION_NUMBERS,
            feature_group_count=groups,
            precision=precision,
        )
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


# The default gradient path of `conv2d` ('auto' | 'canonical' | 'xla') and of `batch_norm`'s training
# mode ('auto' | 'fused' | 'autodiff'); `conv2d_vjp_mode` / `batch_norm_vjp_mode` set them inside a
# `with`, the environment variables CNNJAX_CONV_VJP / CNNJAX_BN_VJP for a whole process (e.g.
# CNNJAX_CONV_VJP=xla CNNJAX_BN_VJP=autodiff switches both back to JAX's own differentiation).
CONV_VJP = os.environ.get("CNNJAX_CONV_VJP", "auto")
BN_VJP = os.environ.get("CNNJAX_BN_VJP", "auto")
_VJP_MODES, _BN_VJP_MODES = xla_flags.CONV_VJP_MODES, xla_flags.BN_VJP_MODES
# Which library computes `conv2d` ('auto' | 'onednn' | 'xla'); `conv2d_backend` sets it inside a
# `with`, CNNJAX_CONV_BACKEND for a whole process.
CONV_BACKEND = os.environ.get("CNNJAX_CONV_BACKEND", "auto")
_BACKENDS = xla_flags.CONV_BACKENDS
# Who computes `batch_norm`'s passes over the activations ('auto' | 'native' | 'xla');
# `batch_norm_backend` sets it inside a `with`, CNNJAX_BN_BACKEND for a whole process.
BN_BACKEND = os.environ.get("CNNJAX_BN_BACKEND", "auto")
_BN_BACKENDS = xla_flags.BN_BACKENDS


def _use_native(backend: str | None, default: str, modes: tuple[str, ...], supported: bool) -> bool:
    """Whether a layer runs on cnnjax.native's kernels: 'xla' never; the native mode (modes[1])
    wherever the kernels apply (`supported`), raising if they cannot run here; 'auto' likewise but
    only on the CPU backend, and XLA wherever they are not installed."""
    mode = default if backend is None else backend
    if mode not in modes:
        raise ValueError(f"backend must be one of {modes} or None, got {mode!r}")
    if mode == "xla" or not supported:
        return False
    on_cpu = jax.default_backend() == "cpu"
    if mode == "auto":
        return on_cpu and native.available()
    if not on_cpu:
        raise ValueError(f"backend={mode!r} runs on the CPU backend only (JAX's default backend is "
                         f"{jax.default_backend()!r}); use backend='xla' or 'auto'")
    native.load()  # raises NativeUnavailable, saying why and how to install oneDNN
    return True


def _use_onednn(backend: str | None, x, kernel, groups: int) -> bool:
    """Whether conv2d runs on oneDNN (float32, groups 1; see `_use_native`)."""
    return _use_native(backend, CONV_BACKEND, _BACKENDS, onednn.supports(x, kernel, groups))


def _resolve_vjp(vjp: str | None, default: str, modes: tuple[str, ...], cpu_choice: str) -> str:
    """The gradient path to trace: `vjp`, else the module default; 'auto' is `cpu_choice` on the CPU
    backend (where it was measured to win, PERFORMANCE.md) and JAX's own rule elsewhere (the last
    entry of `modes`)."""
    mode = default if vjp is None else vjp
    if mode not in modes:
        raise ValueError(f"vjp must be one of {modes} or None, got {mode!r}")
    if mode == "auto":
        return cpu_choice if jax.default_backend() == "cpu" else modes[-1]
    return mode


def _use_canonical_vjp(vjp: str | None) -> bool:
    return _resolve_vjp(vjp, CONV_VJP, _VJP_MODES, "canonical") == "canonical"


class _DefaultMode:
    """Sets a module-level default (a gradient path, conv2d's library) while a `with` block runs
    (read at trace time, so it must be set before a function is jitted)."""

    _default: str
    _modes: tuple[str, ...]

    def __init__(self, mode: str):
        if mode not in self._modes:
            raise ValueError(f"mode must be one of {self._modes}, got {mode!r}")
        self.mode, self._saved = mode, None

    def __enter__(self):
        self._saved, globals()[self._default] = globals()[self._default], self.mode
        return self

    def __exit__(self, *exc):
        globals()[self._default] = self._saved
        return False


class conv2d_vjp_mode(_DefaultMode):  # noqa: N801 (used like a function: `with conv2d_vjp_mode('xla'): ...`)
    """Sets the default gradient path of `conv2d` ('auto', 'canonical' or 'xla') inside a `with`.

    JAX differentiates a convolution into two convolutions with permuted dimension numbers (the
    kernel gradient contracts over the batch). XLA's CPU backend runs those permuted layouts far
    below its NHWC speed, and inside `lax.scan` (scanned ResNet blocks) it cannot re-layout them at
    all (measured: PERFORMANCE.md). The canonical path writes both gradients as ordinary NHWC/HWIO
    convolutions over explicitly transposed operands, which XLA CPU runs at full speed.
    """

    _default, _modes = "CONV_VJP", _VJP_MODES


class batch_norm_vjp_mode(_DefaultMode):  # noqa: N801
    """Sets the default gradient path of `batch_norm` in training ('auto', 'fused' or 'autodiff').

    'fused' is a hand-written VJP (the textbook BatchNorm backward: two per-channel sums and one
    element-wise pass). Under JAX's own differentiation the forward's per-channel multiplier is
    shared with the backward, and XLA's CPU backend then writes its broadcast out in full once per
    layer instead of fusing it; the hand-written backward keeps the two apart (PERFORMANCE.md).
    """

    _default, _modes = "BN_VJP", _BN_VJP_MODES


class conv2d_backend(_DefaultMode):  # noqa: N801
    """Sets the default library of `conv2d` ('auto', 'onednn' or 'xla') inside a `with`.

    oneDNN (`cnnjax.native`; a dependency on Linux x86-64) computes the forward pass and both gradients
    directly on NHWC/HWIO arrays, where XLA's CPU backend runs Eigen convolutions and transposes
    around every kernel gradient (PERFORMANCE.md section 10). 'auto' uses it on the CPU backend
    whenever it is installed; CNNJAX_CONV_BACKEND=xla switches back for a whole process.
    """

    _default, _modes = "CONV_BACKEND", _BACKENDS


class batch_norm_backend(_DefaultMode):  # noqa: N801
    """Sets the default library of `batch_norm`'s passes over the activations ('auto', 'native'
    or 'xla') inside a `with`.

    The native kernels (`cnnjax.native.batch_norm`, built with the oneDNN convolutions) make one
    pass for the statistics and one for the normalisation, with a following ReLU and residual
    addition fused in, and split each pass over XLA's intra-op threads; XLA's CPU backend runs
    its fusions of the same work on one thread each (PERFORMANCE.md section 11). 'auto' uses them
    for float32 on the CPU backend wherever they are built; CNNJAX_BN_BACKEND=xla switches back.
    """

    _default, _modes = "BN_BACKEND", _BN_BACKENDS


def _conv_nhwc(lhs, rhs, strides, pads, dilation, precision, lhs_dilation=(1, 1)):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides=strides, padding=pads, lhs_dilation=lhs_dilation, rhs_dilation=dilation,
        dimension_numbers=DIMENSION_NUMBERS, precision=precision,
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
    for size, out, k, s, d, (lo, hi) in zip(in_spatial, out_spatial, (kh, kw), strides, dilation, pads):
        extent = (k - 1) * d + 1
        r = (size + lo + hi - extent) - (out - 1) * s
        dx_pads.append((extent - 1 - lo, extent - 1 - hi + r))
        dw_pads.append((lo, hi - r))
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # (KH, KW, C_out, C_in)
    dx = _conv_nhwc(dy, flipped, (1, 1), dx_pads, dilation, precision, lhs_dilation=strides)
    dw = _conv_nhwc(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), dilation, dw_pads, strides, precision)
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(kernel.dtype)


_conv_canonical_impl.defvjp(_conv_canonical_fwd, _conv_canonical_bwd)


def dense(x: Array, kernel: Array, bias: Array | None = None, *, precision: lax.PrecisionLike = None) -> Array:
    """Fully connected layer: x @ kernel + bias over the last axis (integer x in float32)."""
    x, kernel = _floating(_as_array(x, "x")), _as_array(kernel, "kernel")
    bias = None if bias is None else _as_array(bias, "bias")
    if kernel.ndim != 2:
        raise ValueError(f"kernel must have rank 2 (in, out), got shape {tuple(kernel.shape)}")
    if x.ndim < 1:
        raise ValueError(
            f"x must have a feature axis (shape (..., {kernel.shape[0]})), got a scalar; reshape it, e.g. x.reshape(1, -1)"
        )
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"x has {x.shape[-1]} features but kernel {tuple(kernel.shape)} expects {kernel.shape[0]}; "
            "flatten the input or fix the layer's input size"
        )
    if bias is not None and bias.shape != (kernel.shape[1],):
        raise ValueError(f"bias must have shape ({kernel.shape[1]},) (the kernel's outputs), got {tuple(bias.shape)}")
    y = jnp.matmul(x, kernel.astype(x.dtype), precision=precision)
    return y if bias is None else y + bias.astype(y.dtype)


def flatten(x: Array) -> Array:
    """Flattens all but the batch axis (NHWC order)."""
    x = _as_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have a batch axis and at least one more, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- pooling


def _pool_geometry(x, kernel_size, stride, padding, ceil_mode, name):
    _check_rank(x, 4, "x", "NHWC")
    ceil_mode = _flag(ceil_mode, "ceil_mode")
    window = _pair(kernel_size, "kernel_size")
    strides = window if stride is None else _pair(stride, "stride")
    pads = resolve_padding(padding, x.shape[1:3], window, strides)
    _check_window_fits(x.shape[1:3], window, (1, 1), pads, f"{name} window", "kernel_size")
    if not isinstance(padding, str):
        for k, (lo, hi) in zip(window, pads):
            if max(lo, hi) > k // 2:
                raise ValueError(
                    f"padding {padding!r} must be at most half the pooling window {window}; "
                    "larger padding makes windows that see only padding"
                )
    if ceil_mode:
        # Extra padding on the far side so that the last partial window is kept.
        new = []
        for size, k, s, (lo, hi) in zip(x.shape[1:3], window, strides, pads):
            out = output_size(size, k, s, (lo, hi), ceil_mode=True)
            need = (out - 1) * s + k - (size + lo + hi)
            new.append((lo, hi + max(need, 0)))
        pads = tuple(new)
    return window, strides, pads


def max_pool(x: Array, kernel_size: IntPair, stride: IntPair | None = None, padding: Padding = 0,
             *, ceil_mode: bool = False) -> Array:
    """Max pooling (padding never wins: it is -inf); stride defaults to the window."""
    x = _as_array(x, "x")
    window, strides, pads = _pool_geometry(x, kernel_size, stride, padding, ceil_mode, "pooling")
    # NumPy (not traced) init values: lax.reduce_window only has autodiff rules for the known
    # monoids (max with -inf, add with 0), which it recognises from constant inits. On bools the
    # max is a logical or, and the padding (False) never wins either.
    if jnp.issubdtype(x.dtype, jnp.floating):
        init = np.array(-np.inf, x.dtype)
    elif jnp.issubdtype(x.dtype, jnp.integer):
        init = np.array(np.iinfo(x.dtype).min, x.dtype)
    elif jnp.issubdtype(x.dtype, jnp.bool_):
        init = np.array(False)
    else:
        raise ValueError(f"max_pool needs a real x (float, int or bool), got dtype {x.dtype}; convert x first")
    return lax.reduce_window(x, init, lax.max, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *pads, (0, 0)))


def avg_pool(x: Array, kernel_size: IntPair, stride: IntPair | None = None, padding: Padding = 0,
             *, ceil_mode: bool = False, count_include_pad: bool = True) -> Array:
    """Average pooling. count_include_pad counts the explicit zero padding in the divisor
    (PyTorch's default); the extra far-side padding of ceil_mode is never counted. Integer x is
    averaged in float32."""
    x = _as_array(x, "x")
    count_include_pad = _flag(count_include_pad, "count_include_pad")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(f"avg_pool needs a numeric x (float or int), got dtype {x.dtype}; "
                         "convert it first, e.g. x.astype(jnp.float32)")
    x = _floating(x)
    window, strides, pads = _pool_geometry(x, kernel_size, stride, padding, ceil_mode, "pooling")
    dims, wstrides, wpads = (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
    total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, dims, wstrides, wpads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    if count_include_pad:
        # Count the user's padding, but not the extra ceil-mode padding beyond it.
        user = resolve_padding(padding, x.shape[1:3], window, strides)
        ones = jnp.pad(ones, ((0, 0), *user, (0, 0)), constant_values=1)
        extra = tuple((lo - ulo, hi - uhi) for (lo, hi), (ulo, uhi) in zip(pads, user))
        count = lax.reduce_window(ones, np.array(0, x.dtype), lax.add, dims, wstrides, ((0, 0), *extra, (0, 0)))
    else:
        count = lax.reduce_window(ones, np.array(0, x.dtype), lax.add, dims, wstrides, wpads)
    return total / count


def _check_global_pool_input(x, keepdims, name: str):
    x = _as_array(x, "x")
    _check_rank(x, 4, "x", "NHWC")
    _flag(keepdims, "keepdims")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(
            f"x has an empty spatial extent (shape {tuple(x.shape)}); {name} needs H >= 1 and W >= 1 "
            "(the pool of zero positions is undefined): check the layers before it"
        )
    return x


def global_avg_pool(x: Array, *, keepdims: bool = False) -> Array:
    """Mean over the spatial axes: (N, H, W, C) -> (N, C) (or (N, 1, 1, C)); integers in float32."""
    x = _floating(_check_global_pool_input(x, keepdims, "global_avg_pool"))
    return jnp.mean(x, axis=(1, 2), keepdims=keepdims)


def global_max_pool(x: Array, *, keepdims: bool = False) -> Array:
    """Max over the spatial axes."""
    x = _check_global_pool_input(x, keepdims, "global_max_pool")
    return jnp.max(x, axis=(1, 2), keepdims=keepdims)


# --------------------------------------------------------------------------- normalisation


def _check_bn_rank(x, where: str = "") -> None:
    """BatchNorm's input rank; `where` (e.g. a layer's name and ': ') starts the message."""
    if x.ndim < 2:
        raise ValueError(
            f"{where}x must be (N, C) or (N, H, W, C), got shape {tuple(x.shape)}; add a batch axis with x[None]"
        )


def _check_eps(eps, name: str = "eps"):
    """eps as a float > 0 (a traced eps passes unchecked). eps = 0 is rejected too: a constant
    channel (variance 0, e.g. a dead ReLU or zero padding) then gives 0 / 0 = NaN."""
    eps = _real(eps, name, traced_ok=True)
    if isinstance(eps, float) and not eps > 0:
        raise ValueError(
            f"{name} must be > 0, got {eps!r}; it keeps 1 / sqrt(var + eps) finite where a channel's variance "
            "is 0 (the usual value is 1e-5)"
        )
    return eps


def _check_channel_vectors(c: int, context: str, required: tuple[str, ...] = (), fix: str = "", **vectors) -> dict:
    """Each given vector as an array of shape (C,); None stays None unless its name is `required`.
    `context` ends the shape message, e.g. "for x of shape (8, 3)"."""
    out = {}
    for name, v in vectors.items():
        if v is None and name in required:
            raise ValueError(f"{name} must be an array of shape ({c},), got None{fix}")
        if v is not None:
            v = _as_array(v, name)
            if v.shape != (c,):
                raise ValueError(f"{name} must have shape ({c},) {context}, got {tuple(v.shape)}")
        out[name] = v
    return out


def batch_norm_statistics(x: Array, *, axis_name: str | None = None) -> tuple[Array, Array]:
    """Per-channel mean and biased variance over every axis but the last, in float32.

    With `axis_name`, the statistics are those of the batch across all devices on that axis.
    """
    x = _as_array(x, "x")
    _check_bn_rank(x)
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    return _mean_var(jnp.mean(x32, axes), jnp.mean(jnp.square(x32), axes), axis_name)


def _mean_var(mean, mean_sq, axis_name):
    """(mean, biased variance) from this device's E[x] and E[x^2], averaged over `axis_name`."""
    if axis_name is not None:
        mean, mean_sq = lax.pmean((mean, mean_sq), axis_name)
    # E[x^2] - E[x]^2 can round below zero.
    return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def _bn_affine(mean, var, scale, bias, eps):
    """BatchNorm as one multiply-add per element, y = x * mul + add: the per-channel (mul, add) in
    float32 (scale and bias may be None)."""
    mul = lax.rsqrt(var.astype(jnp.float32) + eps)
    if scale is not None:
        mul = mul * scale.astype(jnp.float32)
    add = -mean.astype(jnp.float32) * mul
    if bias is not None:
        add = add + bias.astype(jnp.float32)
    return mul, add


def batch_norm_apply(x: Array, mean: Array, var: Array, scale: Array | None, bias: Array | None,
                     *, eps: float = 1e-5) -> Array:
    """y = (x - mean) / sqrt(var + eps) * scale + bias, folded to one multiply-add per element."""
    x = _as_array(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have a channel axis (last), got a scalar; pass (..., C) with C = mean.shape[0]")
    eps = _check_eps(eps)
    vs = _check_channel_vectors(x.shape[-1], f"for x of shape {tuple(x.shape)}", ("mean", "var"),
                                mean=mean, var=var, scale=scale, bias=bias)
    mul, add = _bn_affine(vs["mean"], vs["var"], vs["scale"], vs["bias"], eps)
    return (x * mul.astype(x.dtype) + add.astype(x.dtype)).astype(x.dtype)


def _resolve_activation(activation):
    """batch_norm's `activation` as a function (None: none)."""
    if activation is None or callable(activation):
        return activation
    if isinstance(activation, str):
        return get_activation(activation)
    raise TypeError(f"activation must be None, a name ({', '.join(sorted(ACTIVATIONS))}) or a function, "
                    f"got {type(activation).__name__}")


def batch_norm(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    running_mean: Array,
    running_var: Array,
    *,
    train: bool,
    momentum: float = 0.9,
    eps: float = 1e-5,
    axis_name: str | None = None,
    vjp: str | None = None,
    residual: Array | None = None,
    activation=None,
    backend: str | None = None,
) -> tuple[Array, tuple[Array, Array]]:
    """Batch normalisation (Ioffe & Szegedy 2015), optionally followed by a residual addition and
    an activation: y = activation(BN(x) + residual).

    Args:
      x: (N, C) or (N, H, W, C).
      scale, bias: learnable gamma and beta, (C,), or None.
      running_mean, running_var: the running averages, (C,).
      train: True normalises with the batch statistics (biased variance) and returns updated
        running averages; False uses the running averages and returns them unchanged.
      momentum: running = momentum * running + (1 - momentum) * batch (Flax convention).
      eps: added to the variance.
      axis_name: a mapped axis over which the batch statistics are averaged (the global batch).
      vjp: the training-mode gradient path: 'fused' (a hand-written backward, see
        `batch_norm_vjp_mode`), 'autodiff' (JAX differentiates the forward), or None for the
        default, `BN_VJP` ('auto': fused on CPU, autodiff elsewhere). Values are the same either way.
      residual: an array of x's shape added after the normalisation (a ResNet block's shortcut), or None.
      activation: applied last: None, a name from `ACTIVATIONS` or a function. ReLU (and the
        residual) are fused into the native kernels' passes; anything else runs after them.
      backend: who computes the passes over the activations: 'native' (`cnnjax.native.batch_norm`,
        float32 on the CPU backend), 'xla', or None for the default, `BN_BACKEND` ('auto': native
        for float32 on the CPU backend where the kernels are built, XLA otherwise; see
        `batch_norm_backend`). Values agree to float32 rounding.

    Returns:
      (y, (new_running_mean, new_running_var)); integer x is normalised in float32.
    """
    x = _floating(_as_array(x, "x"))
    _check_bn_rank(x)
    train = _flag(train, "train")
    if train and x.size == 0:
        raise ValueError(f"batch_norm in training needs at least one value per channel, got x of "
                         f"shape {tuple(x.shape)}: the statistics of an empty batch are 0 / 0")
    momentum = _real(momentum, "momentum")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (Flax convention, 0.9 = PyTorch's 0.1), got {momentum}")
    eps = _check_eps(eps)
    mode = _resolve_vjp(vjp, BN_VJP, _BN_VJP_MODES, "fused")  # validated in both modes
    act = _resolve_activation(activation)
    if residual is not None:
        residual = _floating(_as_array(residual, "residual"))
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    c = x.shape[-1]
    vs = _check_channel_vectors(c, f"for x of shape {tuple(x.shape)}", ("running_mean", "running_var"),
                                "; start from zeros (mean) and ones (var)",
                                scale=scale, bias=bias, running_mean=running_mean, running_var=running_var)
    scale, bias, running_mean, running_var = vs["scale"], vs["bias"], vs["running_mean"], vs["running_var"]
    float32 = x.dtype == jnp.float32 and (residual is None or residual.dtype == jnp.float32)
    use_native = _use_native(backend, BN_BACKEND, _BN_BACKENDS, float32)
    fuse_relu = use_native and act is relu  # into the kernels' passes, with the residual
    if train:
        if mode == "fused" and _is_traced(eps):
            raise ValueError("eps must be a concrete number for the fused BatchNorm gradient, got a traced value; "
                             "pass a Python float or vjp='autodiff'")
        operands = (x, jnp.ones((c,), jnp.float32) if scale is None else scale,
                    jnp.zeros((c,), jnp.float32) if bias is None else bias)
        if use_native:
            operands = vary_alike(*operands, *(() if residual is None else (residual,)))
            args = (*operands[:3], None if residual is None else operands[3])
            static = (axis_name, fuse_relu, residual is not None)
            if mode == "fused":
                y, mean, var = _batch_norm_native(*args, float(eps), *static)
            else:  # JAX differentiates the kernels through their references' derivatives
                y, mean, var = _batch_norm_native_fwd(*args, eps, *static)[0]
        elif mode == "fused":
            y, mean, var = _batch_norm_train(*vary_alike(*operands), float(eps), axis_name)
        else:
            mean, var = batch_norm_statistics(x, axis_name=axis_name)
            y = batch_norm_apply(x, mean, var, scale, bias, eps=eps)
        new_mean = momentum * running_mean + (1.0 - momentum) * mean
        new_var = momentum * running_var + (1.0 - momentum) * var
        new_stats = (new_mean, new_var)
    else:
        if use_native:
            y = native_bn.apply(x, jnp.stack(_bn_affine(running_mean, running_var, scale, bias, eps)), residual,
                                relu=fuse_relu)
        else:
            y = batch_norm_apply(x, running_mean, running_var, scale, bias, eps=eps)
        new_stats = (running_mean, running_var)
    # What the kernels did not fuse: on XLA's path the residual and the activation, natively an
    # activation other than ReLU.
    return add_and_activate(y, None if use_native else residual, None if fuse_relu else act), new_stats


def add_and_activate(y: Array, residual: Array | None = None, activation=None) -> Array:
    """activation(y + residual), either part optional: what `batch_norm` does after normalising
    (for a layer that stands in for a BatchNorm, e.g. one folded into its convolution)."""
    if residual is not None:
        y = y + residual.astype(y.dtype)
    act = _resolve_activation(activation)
    return y if act is None else act(y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, eps, axis_name):
    """Training-mode BatchNorm with its own VJP: (y, batch mean, batch variance)."""
    return _batch_norm_train_fwd(x, scale, bias, eps, axis_name)[0]


def _batch_norm_train_fwd(x, scale, bias, eps, axis_name):
    mean, var = batch_norm_statistics(x, axis_name=axis_name)
    inv = lax.rsqrt(var + eps)
    return (batch_norm_apply(x, mean, var, scale, bias, eps=eps), mean, var), (x, scale, mean, inv)


def _bn_grad_coefficients(sum_g, sum_gx, n, mean, inv, mul, g_mean, g_var, axis_name):
    """The training BatchNorm backward's per-channel numbers. With m = scale / sqrt(var + eps)
    (`mul`), x^ = (x - mean) / sqrt(var + eps), sums S over the n values of a channel (across
    devices with axis_name) and cotangents g (of y), g_mean, g_var:

      d bias = sum(g),  d scale = sum(g x^) = (sum(g x) - mean sum(g)) / sqrt(var + eps),
      d x = m (g - S(g) / n - x^ S(g x^) / n) + g_mean / n + 2 g_var (x - mean) / n,

    d x written as m g + a x + b with per-channel a and b: one pass over the activations. Given
    this device's sum(g) and sum(g x), returns (d scale, d bias, a, b). The parameters' gradients
    are this device's sums, as JAX's own differentiation gives them (the data-parallel step
    averages them; under check_vma `vary_alike`'s mark sums them).
    """
    d_scale, d_bias = inv * (sum_gx - mean * sum_g), sum_g
    if axis_name is not None:
        sum_g, sum_gx = lax.psum((sum_g, sum_gx), axis_name)
        n = n * lax.psum(1, axis_name)
    sum_gxhat = inv * (sum_gx - mean * sum_g)
    a = (2.0 * g_var - mul * inv * sum_gxhat) / n
    b = (g_mean - mul * sum_g) / n - a * mean
    return d_scale, d_bias, a, b


def _batch_norm_train_bwd(eps, axis_name, residuals, cotangents):
    """The backward pass of `_bn_grad_coefficients`, in XLA."""
    x, scale, mean, inv = residuals
    gy, g_mean, g_var = cotangents
    axes = tuple(range(x.ndim - 1))
    g32, x32 = gy.astype(jnp.float32), x.astype(jnp.float32)
    # Not the forward's multiplier itself: XLA would share one broadcast of it between the forward
    # and this pass and write that broadcast out in full (the reason this VJP exists).
    mul = lax.optimization_barrier(inv * scale.astype(jnp.float32))
    d_scale, d_bias, a, b = _bn_grad_coefficients(jnp.sum(g32, axes), jnp.sum(g32 * x32, axes),
                                                   x.size // x.shape[-1], mean, inv, mul, g_mean, g_var, axis_name)
    dx = g32 * mul + x32 * a + b
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _batch_norm_native(x, scale, bias, residual, eps, axis_name, relu, has_residual):
    """Training BatchNorm (+ residual, + ReLU) on the native kernels, with its own VJP whose
    passes are native too: (y, batch mean, batch variance). float32; residual may be None
    (has_residual False)."""
    return _batch_norm_native_fwd(x, scale, bias, residual, eps, axis_name, relu, has_residual)[0]


def _batch_norm_native_fwd(x, scale, bias, residual, eps, axis_name, relu, has_residual):
    moments = native_bn.sums(x) / (x.size // x.shape[-1])
    mean, var = _mean_var(moments[0], moments[1], axis_name)
    mul, add = _bn_affine(mean, var, scale, bias, eps)
    y = native_bn.apply(x, jnp.stack([mul, add]), residual, relu=relu)
    keep_y = relu and has_residual  # the ReLU's mask is read from y (x alone does not give it)
    return (y, mean, var), (x, y if keep_y else None, mean, lax.rsqrt(var + eps), mul, add)


def _batch_norm_native_bwd(eps, axis_name, relu, has_residual, residuals, cotangents):
    x, y, mean, inv, mul, add = residuals
    gy, g_mean, g_var = cotangents
    if y is not None:  # ReLU after a residual addition: its mask from y, and g (the masked gy) kept
        sums, g = native_bn.grad_sums_masked(gy, y, x)
        mask = False
    else:  # ReLU (if any) masks where x * mul + add <= 0, recomputed in both passes
        sums, g, mask = native_bn.grad_sums(gy, x, jnp.stack([mul, add]), relu=relu), gy, relu
    d_scale, d_bias, a, b = _bn_grad_coefficients(sums[0], sums[1], x.size // x.shape[-1], mean, inv, mul,
                                                  g_mean, g_var, axis_name)
    dx = native_bn.grad_apply(g, x, jnp.stack([mul, a, b, mul, add]), relu=mask)
    return dx, d_scale, d_bias, (g if has_residual else None)


_batch_norm_native.defvjp(_batch_norm_native_fwd, _batch_norm_native_bwd)


def fold_batch_norm(
    kernel: Array,
    bias: Array | None,
    scale: Array | None,
    shift: Array | None,
    mean: Array,
    var: Array,
    *,
    eps: float = 1e-5,
) -> tuple[Array, Array]:
    """Folds an evaluation-mode BatchNorm into the preceding conv (HWIO) or dense (IO) layer.

    BN(W x + b) = (W * g) x + (b - mean) * g + shift with g = scale / sqrt(var + eps), so the
    folded layer has kernel W * g (per output channel, the last axis) and that bias.
    """
    kernel = _as_array(kernel, "kernel")
    if kernel.ndim < 2:
        raise ValueError(f"kernel must be a conv (HWIO) or dense (IO) kernel, got shape {tuple(kernel.shape)}")
    eps = _check_eps(eps)
    c_out = kernel.shape[-1]
    vs = _check_channel_vectors(c_out, f"to match kernel {tuple(kernel.shape)}", ("mean", "var"),
                                bias=bias, scale=scale, shift=shift, mean=mean, var=var)
    bias, scale, shift, mean, var = vs["bias"], vs["scale"], vs["shift"], vs["mean"], vs["var"]
    g = lax.rsqrt(var.astype(jnp.float32) + eps)
    if scale is not None:
        g = g * scale
    b = jnp.zeros((c_out,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    new_bias = (b - mean) * g
    if shift is not None:
        new_bias = new_bias + shift
    return (kernel * g).astype(kernel.dtype), new_bias.astype(kernel.dtype)


def local_response_norm(
    x: Array,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    *,
    alpha_over_n: bool = False,
) -> Array:
    """Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).

    b_c = a_c / (k + alpha' * sum_{c' in [c - size//2, c + size//2]} a_{c'}^2) ** beta,
    with alpha' = alpha (the paper's formula) or alpha / size when `alpha_over_n` (PyTorch, Caffe).
    """
    x = _floating(_as_array(x, "x"))
    _check_rank(x, 4, "x", "NHWC")
    size = _positive_int(size, "size", what=" (channels in the window)")
    alpha_over_n = _flag(alpha_over_n, "alpha_over_n")
    # The denominator (k + alpha' * sum of squares) ** beta: with k > 0 and alpha >= 0 its base is
    # positive, so any finite beta gives a finite value; k <= 0 gives 0 / 0 on a window of zeros
    # (and a fractional power of a negative base), alpha < 0 a negative base for large inputs.
    k = _real(k, "k", traced_ok=True)
    if isinstance(k, float) and not k > 0:
        raise ValueError(f"k must be > 0, got {k!r}; with k <= 0 a window of zeros gives 0 / 0 = NaN (the paper uses k = 2)")
    alpha = _real(alpha, "alpha", traced_ok=True)
    if isinstance(alpha, float) and alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}; a negative alpha makes k + alpha * sum(a^2) negative "
                         "for large activations, and its power NaN (the paper uses 1e-4)")
    beta = _real(beta, "beta", traced_ok=True)
    a = alpha / size if alpha_over_n else alpha
    sq = jnp.square(x.astype(jnp.float32))
    half = size // 2
    window_sum = lax.reduce_window(sq, 0.0, lax.add, (1, 1, 1, size), (1, 1, 1, 1),
                                   ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)))
    return (x.astype(jnp.float32) / jnp.power(k + a * window_sum, beta)).astype(x.dtype)


# --------------------------------------------------------------------------- regularisation and activations


def _check_key(rng, name: str) -> None:
    """A single PRNG key: a typed key (jax.random.key) or raw key data (jax.random.PRNGKey)."""
    dtype = getattr(rng, "dtype", None)
    shape = tuple(getattr(rng, "shape", ()))
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
        got = f"a batch of keys of shape {shape}"
    elif dtype is not None and dtype == jnp.uint32 and shape in ((2,), (4,)):
        return
    elif dtype is not None:
        got = f"an array of dtype {dtype} and shape {shape}"
    else:
        got = repr(rng)
    raise ValueError(f"{name} must be a single PRNG key such as jax.random.key(0) (in a module: "
                     f"rngs={{'dropout': key}}), got {got}")


def dropout(x: Array, rate: float, rng: Array | None, *, deterministic: bool) -> Array:
    """Inverted dropout: zero each unit with probability `rate`, scale survivors by 1 / (1 - rate).

    `rate` must be a concrete number (it decides what is traced); `rng` a single PRNG key.
    """
    x = _as_array(x, "x")
    rate = _real(rate, "rate")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    deterministic = _flag(deterministic, "deterministic")
    if rng is not None:
        _check_key(rng, "rng")
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout in training needs an rng: pass rngs={'dropout': key} to apply")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


relu = jax.nn.relu
relu6 = jax.nn.relu6
leaky_relu = jax.nn.leaky_relu
elu = jax.nn.elu
gelu = jax.nn.gelu
sigmoid = jax.nn.sigmoid
tanh = jnp.tanh
softmax = jax.nn.softmax
log_softmax = jax.nn.log_softmax

ACTIVATIONS = {
    "relu": relu, "relu6": relu6, "leaky_relu": leaky_relu, "elu": elu, "gelu": gelu,
    "sigmoid": sigmoid, "tanh": tanh, "identity": lambda x: x,
}


def get_activation(name: str):
    """Looks up an activation function by name."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def conv_output_shape(input_shape: Sequence[int], kernel_size: IntPair, features: int, *, stride: IntPair = 1,
                      padding: Padding = 0, dilation: IntPair = 1) -> tuple[int, int, int, int]:
    """Static output shape of conv2d for an NHWC input shape; raises where conv2d would."""
    dims = _ints(input_shape, 4)
    if dims is None or min(dims) < 0:
        raise ValueError(
            f"input_shape must be an NHWC shape (N, H, W, C) of 4 non-negative ints, got {input_shape!r}; "
            "add the batch dimension, e.g. (1, *shape)"
        )
    if dims[3] == 0:
        raise ValueError(f"input_shape has 0 channels ({input_shape!r}); a convolution needs at least one input channel")
    features = _positive_int(features, "features")
    k, s, d = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(dilation, "dilation")
    spatial = (dims[1], dims[2])
    pads = resolve_padding(padding, spatial, k, s, d)
    _check_window_fits(spatial, k, d, pads, "kernel", "kernel_size")
    return (dims[0], *_conv_spatial(spatial, k, s, pads, d), features)


def _conv_spatial(spatial, window, strides, pads, dilation) -> tuple[int, int]:
    """(H_out, W_out) of a convolution (`output_size` per axis)."""
    h, w = (output_size(n, k, s, p, d) for n, k, s, p, d in zip(spatial, window, strides, pads, dilation))
    return h, w

