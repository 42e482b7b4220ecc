"""Argument checks shared by cnnjax's layers, models and training code (private).

Each check returns the value normalised (an exact int, a float, a pair) or raises a ValueError
that names the argument and says what to pass instead. Checks run eagerly on static shapes and
Python values, so a bad call fails before anything is traced.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
IntPair = Union[int, Sequence[int]]


def is_traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def index(value) -> int | None:
    """`value` as a Python int when it is one exactly (an int, a NumPy integer, a concrete 0-d
    integer array), else None: bools, floats, strings and traced values are not ints here."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or is_traced(value):
        return None
    dtype = getattr(value, "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_int(value) -> bool:
    """Whether `value` is exactly an int (`index`): the one integer test of cnnjax's checks."""
    return index(value) is not None


def ints(value, length: int | None = None) -> list[int] | None:
    """The entries of a sequence as exact ints (`index`), or None: not a sequence (a scalar, a
    string), an entry that is not an int, or not `length` entries."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        return None
    try:
        items = [index(v) for v in value]
    except TypeError:
        return None
    if None in items or (length is not None and len(items) != length):
        return None
    return items  # type: ignore[return-value]


def positive_int(value, name: str, *, what: str = "") -> int:
    """`value` as an int >= 1 (NumPy integers accepted; bools, floats and strings rejected)."""
    i = index(value)
    if i is None or i < 1:
        raise ValueError(f"{name} must be a positive int{what}, got {value!r}")
    return i


def real(value, name: str, *, traced_ok: bool = False):
    """`value` as a finite Python float (NumPy and concrete 0-d arrays accepted; bools, strings and
    None rejected). A traced value is returned unchecked where `traced_ok`, else rejected: its
    value is not known while tracing, so it cannot be validated."""
    if is_traced(value):
        if traced_ok:
            return value
        raise ValueError(
            f"{name} must be a concrete number, got a traced value {value}; pass a Python float "
            "(under jax.jit close over it or mark it static, e.g. static_argnames)"
        )
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        f = float(value)
    elif (
        getattr(value, "shape", None) == ()
        and getattr(value, "dtype", None) is not None
        and (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer))
    ):
        f = float(value)
    else:
        raise ValueError(f"{name} must be a number (a Python float), got {value!r}")
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return f


def flag(value, name: str) -> bool:
    """`value` as a Python bool (bool, NumPy bool or a concrete 0-d bool array)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if is_traced(value):
        raise ValueError(
            f"{name} must be True or False, got a traced value {value}; it selects what is traced, "
            f"so pass a Python bool (under jax.jit mark it static, e.g. static_argnames='{name}')"
        )
    dtype = getattr(value, "dtype", None) or object
    if getattr(value, "shape", None) == () and jnp.issubdtype(dtype, jnp.bool_):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def as_array(x, name: str):
    """Arrays (JAX, NumPy, tracers) unchanged; anything else through jnp.asarray, or a clear
    error."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    if x is None:
        raise ValueError(f"{name} must be an array, got None")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{name} must be an array (or something jnp.asarray converts), got "
            f"{type(x).__name__} "
            f"{x!r}: {e}"
        ) from None


def pair(value: IntPair, name: str, *, minimum: int = 1) -> tuple[int, int]:
    """Normalises an int or a pair to a pair of ints >= minimum (NumPy integers accepted; floats,
    bools and strings rejected rather than truncated or iterated)."""
    single = index(value)
    if single is not None:
        pair = (single, single)
    else:
        items = ints(value, 2)
        if items is None:
            raise ValueError(
                f"{name} must be an int or a pair of ints, got {value!r}; pass e.g. {name}=2 or "
                f"{name}=(2, 1) (floats, bools and strings are not accepted)"
            )
        pair = tuple(items)
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in both dimensions, got {value!r}")
    return pair  # type: ignore[return-value]


def check_rank(x: Array, rank: int, name: str, layout: str) -> None:
    if x.ndim != rank:
        raise ValueError(
            f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)}; "
            f"add a batch dimension with x[None] or reshape to {layout}"
        )


def check_window_fits(spatial, window, dilation, pads, what: str, arg: str) -> None:
    for axis, size, k, d, (lo, hi) in zip(("height", "width"), spatial, window, dilation, pads):
        eff = (k - 1) * d + 1
        if eff > size + lo + hi:
            raise ValueError(
                f"{arg}: {what} of effective size {eff} (kernel {k}, dilation {d}) is larger than "
                f"the padded input {axis} {size}+{lo}+{hi}={size + lo + hi}; use a smaller {arg}, "
                "more padding, or a larger input"
            )


def check_key(rng, name: str) -> None:
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
    raise ValueError(
        f"{name} must be a single PRNG key such as jax.random.key(0) (in a module: "
        f"rngs={{'dropout': key}}), got {got}"
    )


def check_bn_rank(x, where: str = "") -> None:
    """BatchNorm's input rank; `where` (e.g. a layer's name and ': ') starts the message."""
    if x.ndim < 2:
        raise ValueError(
            f"{where}x must be (N, C) or (N, H, W, C), got shape {tuple(x.shape)}; "
            "add a batch axis with x[None]"
        )


def check_eps(eps, name: str = "eps"):
    """eps as a float > 0 (a traced eps passes unchecked). eps = 0 is rejected too: a constant
    channel (variance 0, e.g. a dead ReLU or zero padding) then gives 0 / 0 = NaN."""
    eps = real(eps, name, traced_ok=True)
    if isinstance(eps, float) and not eps > 0:
        raise ValueError(
            f"{name} must be > 0, got {eps!r}; it keeps 1 / sqrt(var + eps) finite where a "
            "channel's variance "
            "is 0 (the usual value is 1e-5)"
        )
    return eps


def check_channel_vectors(
    c: int, context: str, required: tuple[str, ...] = (), fix: str = "", **vectors
) -> dict:
    """Each given vector as an array of shape (C,); None stays None unless its name is `required`.
    `context` ends the shape message, e.g. "for x of shape (8, 3)"."""
    out = {}
    for name, v in vectors.items():
        if v is None and name in required:
            raise ValueError(f"{name} must be an array of shape ({c},), got None{fix}")
        if v is not None:
            v = as_array(v, name)
            if v.shape != (c,):
                raise ValueError(f"{name} must have shape ({c},) {context}, got {tuple(v.shape)}")
        out[name] = v
    return out


def conv_operands(x, kernel, groups) -> int:
    """A convolution's input (rank 4, NHWC) and kernel (rank 4, HWIO, (KH, KW, C_in // groups,
    C_out)) agree with `groups`, returned as an int."""
    check_rank(x, 4, "x", "NHWC")
    if kernel.ndim != 4:
        raise ValueError(f"kernel must have rank 4 (HWIO), got shape {tuple(kernel.shape)}")
    groups = positive_int(groups, "groups")
    c_in, (kh, kw, k_in, c_out) = x.shape[-1], kernel.shape
    if c_in == 0:
        raise ValueError(
            f"x has 0 channels (shape {tuple(x.shape)}); a convolution needs at "
            "least one input channel"
        )
    if min(kh, kw, k_in, c_out) == 0:
        raise ValueError(
            f"kernel has a zero-size dimension (shape {tuple(kernel.shape)}); KH, KW, "
            "C_in // groups and C_out must all be >= 1"
        )
    if c_in % groups:
        raise ValueError(
            f"groups={groups} must divide the input channels {c_in} (x shape {tuple(x.shape)})"
        )
    if c_out % groups:
        raise ValueError(
            f"groups={groups} must divide the output channels {c_out} "
            f"(kernel shape {tuple(kernel.shape)})"
        )
    if k_in * groups != c_in:
        raise ValueError(
            f"channel mismatch: x has {c_in} channels but kernel {tuple(kernel.shape)} expects "
            f"{k_in} x groups={groups} = {k_in * groups}; the kernel must be "
            "(KH, KW, C_in // groups, C_out)"
        )
    return groups


# --------------------------------------------------------------------------- layer operands
# The checks of cnnjax.functional's layers, in the order the layers ran them inline.


def padding(value, name: str = "padding"):
    """A layer's `padding`: 'SAME' or 'VALID' (any case), or explicit ((top, bottom), (left,
    right)) from an int p, a pair (ph, pw) or a pair of pairs."""
    if isinstance(value, str):
        mode = value.upper()
        if mode in ("SAME", "VALID"):
            return mode
        raise ValueError(
            f"{name} string must be 'SAME' or 'VALID', got {value!r}; "
            "or pass an int, a pair, or ((top, bottom), (left, right))"
        )
    bad = ValueError(
        f"{name} must be an int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID', got "
        f"{value!r}; every entry must be an int (floats and bools are not accepted)"
    )
    single = index(value)
    if single is not None:
        pads = ((single, single), (single, single))
    else:
        if isinstance(value, (bytes, bool, np.bool_)):
            raise bad
        try:
            items = list(value)  # type: ignore[arg-type]
        except TypeError:
            raise bad from None
        if len(items) != 2:
            raise ValueError(f"{name} must have 2 entries (height, width), got {value!r}")
        both = ints(items)
        if both is not None:
            pads = ((both[0], both[0]), (both[1], both[1]))
        else:
            pairs = []
            for item in items:
                p = ints(item, 2)
                if p is None:
                    raise bad
                pairs.append(tuple(p))
            pads = tuple(pairs)
    if any(p < 0 for lo_hi in pads for p in lo_hi):
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return pads


def output_size_operands(size, window, stride, pad, dilation, ceil_mode):
    """`output_size`'s arguments as (size, window, stride, (lo, hi), dilation, ceil_mode)."""
    i = index(size)
    if i is None or i < 0:
        raise ValueError(f"size must be a non-negative int (the input extent), got {size!r}")
    window = positive_int(window, "window", what=" (the kernel extent)")
    stride = positive_int(stride, "stride")
    dilation = positive_int(dilation, "dilation")
    ceil_mode = flag(ceil_mode, "ceil_mode")
    single = index(pad)
    if single is not None:
        lo, hi = single, single
    else:
        lo_hi = ints(pad, 2)
        if lo_hi is None:
            raise ValueError(f"pad must be an int or a pair of ints (lo, hi), got {pad!r}")
        lo, hi = lo_hi
    if min(lo, hi) < 0:
        raise ValueError(f"pad must be non-negative, got {pad!r}")
    return i, window, stride, (lo, hi), dilation, ceil_mode


def conv2d_operands(x, kernel, bias, groups, stride, dilation):
    """conv2d's bias (an array or None), groups, strides and dilations, after `conv_operands`."""
    bias = None if bias is None else as_array(bias, "bias")
    groups = conv_operands(x, kernel, groups)  # ranks, channels and groups
    return bias, groups, pair(stride, "stride"), pair(dilation, "dilation")


def check_conv_bias(bias, c_out: int) -> None:
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")


def dense_operands(x, kernel, bias):
    """dense's bias as an array (or None), after checking that x (..., in), kernel (in, out) and
    bias (out,) agree."""
    bias = None if bias is None else as_array(bias, "bias")
    if kernel.ndim != 2:
        raise ValueError(f"kernel must have rank 2 (in, out), got shape {tuple(kernel.shape)}")
    if x.ndim < 1:
        raise ValueError(
            f"x must have a feature axis (shape (..., {kernel.shape[0]})), "
            "got a scalar; reshape it, e.g. x.reshape(1, -1)"
        )
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"x has {x.shape[-1]} features but kernel {tuple(kernel.shape)} expects "
            f"{kernel.shape[0]}; flatten the input or fix the layer's input size"
        )
    if bias is not None and bias.shape != (kernel.shape[1],):
        raise ValueError(
            f"bias must have shape ({kernel.shape[1]},) (the kernel's outputs), "
            f"got {tuple(bias.shape)}"
        )
    return bias


def flatten_input(x):
    x = as_array(x, "x")
    if x.ndim < 2:
        raise ValueError(
            f"x must have a batch axis and at least one more, got shape {tuple(x.shape)}"
        )
    return x


def pool_window(x, kernel_size, stride, ceil_mode):
    """A pool's (ceil_mode, window, strides) for an NHWC x; stride None is the window."""
    check_rank(x, 4, "x", "NHWC")
    ceil_mode = flag(ceil_mode, "ceil_mode")
    window = pair(kernel_size, "kernel_size")
    strides = window if stride is None else pair(stride, "stride")
    return ceil_mode, window, strides


def check_pool_padding(x, window, padding, pads, name: str) -> None:
    """The window fits the padded input, and explicit padding is at most half the window."""
    check_window_fits(x.shape[1:3], window, (1, 1), pads, f"{name} window", "kernel_size")
    if not isinstance(padding, str):
        for k, (lo, hi) in zip(window, pads):
            if max(lo, hi) > k // 2:
                raise ValueError(
                    f"padding {padding!r} must be at most half the pooling window {window}; "
                    "larger padding makes windows that see only padding"
                )


def check_max_pool_dtype(x) -> None:
    if not any(jnp.issubdtype(x.dtype, t) for t in (jnp.floating, jnp.integer, jnp.bool_)):
        raise ValueError(
            f"max_pool needs a real x (float, int or bool), got dtype {x.dtype}; convert x first"
        )


def avg_pool_input(x, count_include_pad):
    """avg_pool's x (an array, float or int) and count_include_pad (a bool)."""
    x = as_array(x, "x")
    count_include_pad = flag(count_include_pad, "count_include_pad")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise ValueError(
            f"avg_pool needs a numeric x (float or int), got dtype {x.dtype}; "
            "convert it first, e.g. x.astype(jnp.float32)"
        )
    return x, count_include_pad


def global_pool_input(x, keepdims, name: str):
    """A global pool's x: an NHWC array with H, W >= 1."""
    x = as_array(x, "x")
    check_rank(x, 4, "x", "NHWC")
    flag(keepdims, "keepdims")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(
            f"x has an empty spatial extent (shape {tuple(x.shape)}); {name} needs H >= 1 and W >= "
            "1 (the pool of zero positions is undefined): check the layers before it"
        )
    return x


def batch_norm_apply_operands(x, mean, var, scale, bias, eps):
    """batch_norm_apply's x, eps and (mean, var, scale, bias) as checked (C,) vectors."""
    x = as_array(x, "x")
    if x.ndim < 1:
        raise ValueError(
            "x must have a channel axis (last), got a scalar; pass (..., C) with C = mean.shape[0]"
        )
    eps = check_eps(eps)
    vs = check_channel_vectors(
        x.shape[-1],
        f"for x of shape {tuple(x.shape)}",
        ("mean", "var"),
        mean=mean,
        var=var,
        scale=scale,
        bias=bias,
    )
    return x, eps, (vs["mean"], vs["var"], vs["scale"], vs["bias"])


def batch_norm_operands(x, train, momentum, eps):
    """batch_norm's train (a bool), momentum (in [0, 1]) and eps (> 0) for an x of rank >= 2,
    not empty in training."""
    check_bn_rank(x)
    train = flag(train, "train")
    if train and x.size == 0:
        raise ValueError(
            f"batch_norm in training needs at least one value per channel, got x of "
            f"shape {tuple(x.shape)}: the statistics of an empty batch are 0 / 0"
        )
    momentum = real(momentum, "momentum")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"momentum must be in [0, 1] (Flax convention, 0.9 = PyTorch's 0.1), got {momentum}"
        )
    return train, momentum, check_eps(eps)


def batch_norm_vectors(x, residual, scale, bias, running_mean, running_var):
    """batch_norm's residual (x's shape, or None) checked, and (scale, bias, running_mean,
    running_var) as (C,) vectors (scale and bias may be None)."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(
            f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    vs = check_channel_vectors(
        x.shape[-1],
        f"for x of shape {tuple(x.shape)}",
        ("running_mean", "running_var"),
        "; start from zeros (mean) and ones (var)",
        scale=scale,
        bias=bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    return vs["scale"], vs["bias"], vs["running_mean"], vs["running_var"]


def fold_batch_norm_operands(kernel, bias, scale, shift, mean, var, eps):
    """fold_batch_norm's kernel (rank >= 2), eps, and (bias, scale, shift, mean, var) as vectors
    of the kernel's output channels (bias, scale and shift may be None)."""
    kernel = as_array(kernel, "kernel")
    if kernel.ndim < 2:
        raise ValueError(
            f"kernel must be a conv (HWIO) or dense (IO) kernel, got shape {tuple(kernel.shape)}"
        )
    eps = check_eps(eps)
    vs = check_channel_vectors(
        kernel.shape[-1],
        f"to match kernel {tuple(kernel.shape)}",
        ("mean", "var"),
        bias=bias,
        scale=scale,
        shift=shift,
        mean=mean,
        var=var,
    )
    return kernel, eps, (vs["bias"], vs["scale"], vs["shift"], vs["mean"], vs["var"])


def local_response_norm_operands(x, size, alpha, beta, k, alpha_over_n):
    """local_response_norm's (size, alpha, beta, k, alpha_over_n) for an NHWC x.

    The denominator (k + alpha' * sum of squares) ** beta: with k > 0 and alpha >= 0 its base is
    positive, so any finite beta gives a finite value; k <= 0 gives 0 / 0 on a window of zeros
    (and a fractional power of a negative base), alpha < 0 a negative base for large inputs.
    Traced alpha, beta and k pass unchecked.
    """
    check_rank(x, 4, "x", "NHWC")
    size = positive_int(size, "size", what=" (channels in the window)")
    alpha_over_n = flag(alpha_over_n, "alpha_over_n")
    k = real(k, "k", traced_ok=True)
    if isinstance(k, float) and not k > 0:
        raise ValueError(
            f"k must be > 0, got {k!r}; with k <= 0 a window "
            "of zeros gives 0 / 0 = NaN (the paper uses k = 2)"
        )
    alpha = real(alpha, "alpha", traced_ok=True)
    if isinstance(alpha, float) and alpha < 0:
        raise ValueError(
            f"alpha must be >= 0, got {alpha!r}; a negative alpha makes k + alpha * sum(a^2) "
            "negative for large activations, and its power NaN (the paper uses 1e-4)"
        )
    beta = real(beta, "beta", traced_ok=True)
    return size, alpha, beta, k, alpha_over_n


def dropout_operands(rate, rng, deterministic):
    """dropout's rate (a float in [0, 1)) and deterministic (a bool); rng a single key or None."""
    rate = real(rate, "rate")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    deterministic = flag(deterministic, "deterministic")
    if rng is not None:
        check_key(rng, "rng")
    return rate, deterministic


def conv_output_shape_operands(input_shape, kernel_size, features, stride, dilation):
    """conv_output_shape's NHWC input shape (4 ints >= 0, C >= 1), features (an int >= 1) and
    (kernel_size, stride, dilation) as pairs."""
    dims = ints(input_shape, 4)
    if dims is None or min(dims) < 0:
        raise ValueError(
            "input_shape must be an NHWC shape (N, H, W, C) of 4 non-negative ints, got "
            f"{input_shape!r}; add the batch dimension, e.g. (1, *shape)"
        )
    if dims[3] == 0:
        raise ValueError(
            f"input_shape has 0 channels ({input_shape!r}); "
            "a convolution needs at least one input channel"
        )
    features = positive_int(features, "features")
    pairs = pair(kernel_size, "kernel_size"), pair(stride, "stride"), pair(dilation, "dilation")
    return dims, features, pairs
