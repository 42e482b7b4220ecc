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
