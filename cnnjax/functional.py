"""Pure functions for every layer of the lecture, on NHWC activations and HWIO kernels.

Everything here is a plain function of arrays: no parameters are created, no state is kept.
`cnnjax.nn` wraps these in Flax linen modules. Each function states its math first and computes
it with `lax` / `jax.numpy`; arguments are checked eagerly (on static shapes, `cnnjax._checks`),
so a bad call fails before anything is traced, with a message naming the argument.

On XLA's CPU backend `conv2d` and `batch_norm` may hand the same math to faster code (oneDNN,
native kernels, hand-written gradients): `cnnjax.backends` picks it at trace time, from their
`backend` / `vjp` arguments and `cnnjax.settings`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax import _bn, settings
from cnnjax import _checks as C
from cnnjax.backends import batch_norm as _bn_backend
from cnnjax.backends import conv as _conv_backend

Array = jax.Array
IntPair = Union[int, Sequence[int]]
# int p, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'.
Padding = Union[str, int, Sequence[int], Sequence[Sequence[int]]]

DIMENSION_NUMBERS = _conv_backend.DIMENSION_NUMBERS  # ("NHWC", "HWIO", "NHWC")


# --------------------------------------------------------------------------- shapes and dtypes


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


def resolve_padding(
    padding: Padding,
    spatial: tuple[int, int],
    window: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    *,
    name: str = "padding",
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Converts any accepted padding form to explicit ((top, bottom), (left, right)).

    'SAME' pads each axis by max((ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0) in all,
    the odd one at the far side (bottom, right); 'VALID' is no padding.
    """
    pads = C.padding(padding, name)  # 'SAME', 'VALID' or ((top, bottom), (left, right))
    if pads == "VALID":
        return ((0, 0), (0, 0))
    if pads != "SAME":
        return pads
    same = []
    for size, k, s, d in zip(spatial, window, stride, dilation):
        eff = (k - 1) * d + 1
        out = -(-size // s)
        total = max((out - 1) * s + eff - size, 0)
        same.append((total // 2, total - total // 2))
    return tuple(same)  # type: ignore[return-value]


def output_size(
    size: int,
    window: int,
    stride: int = 1,
    pad: int | tuple[int, int] = 0,
    dilation: int = 1,
    ceil_mode: bool = False,
) -> int:
    """The lecture's output-size formula floor((W - K + 2P) / S) + 1, with dilation and ceil mode.

    0 when the (dilated) window does not fit the padded input. `pad` is an int or (lo, hi).
    """
    size, window, stride, (lo, hi), dilation, ceil_mode = C.output_size_operands(
        size, window, stride, pad, dilation, ceil_mode
    )
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


def _conv_spatial(spatial, window, strides, pads, dilation) -> tuple[int, int]:
    """(H_out, W_out) of a convolution (`output_size` per axis)."""
    h, w = (
        output_size(n, k, s, p, d)
        for n, k, s, p, d in zip(spatial, window, strides, pads, dilation)
    )
    return h, w


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
    """2-D cross-correlation: out[n, i, j, o] = bias[o] + sum_{k, di, dj} w[di,
    dj, k, o] * x[n, ...].

    Args:
      x: input, (N, H, W, C_in).
      kernel: weights, (KH, KW, C_in // groups, C_out); C_out must be divisible by groups.
      bias: optional (C_out,).
      stride: int or (sh, sw), >= 1.
      padding: int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'.
      dilation: int or (dh, dw), >= 1 (atrous convolution).
      groups: feature groups; groups == C_in == C_out is a depthwise convolution.
      precision: passed to `lax.conv_general_dilated`.
      vjp: the gradient path of XLA's convolution (the values are the same either way):
        'canonical' (both gradients as NHWC/HWIO convolutions, `cnnjax.backends.conv`), 'xla'
        (JAX's transpose rule), or None: `cnnjax.settings` conv_vjp ('auto': canonical on the
        CPU backend). Grouped convolutions always use JAX's rule.
      backend: who computes it: 'onednn' (`cnnjax.native`, float32, groups 1; others fall back
        to XLA), 'xla', or None: `cnnjax.settings` conv_backend ('auto': oneDNN on the CPU
        backend where it can be used). Read at trace time. `precision` only concerns XLA.

    Returns:
      (N, H_out, W_out, C_out) with H_out = floor((H + pt + pb - ((KH - 1) * dh + 1)) / sh) + 1.
    """
    x, kernel = _floating(C.as_array(x, "x")), C.as_array(kernel, "kernel")
    bias, groups, strides, dilations = C.conv2d_operands(x, kernel, bias, groups, stride, dilation)
    pads = resolve_padding(padding, x.shape[1:3], kernel.shape[:2], strides, dilations)
    C.check_window_fits(x.shape[1:3], kernel.shape[:2], dilations, pads, "kernel", "kernel")
    C.check_conv_bias(bias, kernel.shape[3])
    kernel = kernel.astype(x.dtype)
    # The same convolution by faster code where there is some (oneDNN, or XLA's with the
    # canonical gradient: cnnjax.backends.conv), else XLA's with JAX's gradient.
    impl = _conv_backend.select(x, kernel, groups, vjp=vjp, backend=backend)
    if impl is not None:
        y = impl(x, kernel, strides, pads, dilations, precision)
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


def dense(
    x: Array, kernel: Array, bias: Array | None = None, *, precision: lax.PrecisionLike = None
) -> Array:
    """Fully connected layer: x @ kernel + bias over the last axis (integer x in float32)."""
    x, kernel = _floating(C.as_array(x, "x")), C.as_array(kernel, "kernel")
    bias = C.dense_operands(x, kernel, bias)  # x (..., in), kernel (in, out), bias (out,)
    y = jnp.matmul(x, kernel.astype(x.dtype), precision=precision)
    return y if bias is None else y + bias.astype(y.dtype)


def flatten(x: Array) -> Array:
    """Flattens all but the batch axis (NHWC order)."""
    x = C.flatten_input(x)
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------- pooling


def _pool_geometry(x, kernel_size, stride, padding, ceil_mode, name):
    """A pool's (window, strides, explicit pads); with ceil_mode the far side is padded further."""
    ceil_mode, window, strides = C.pool_window(x, kernel_size, stride, ceil_mode)
    pads = resolve_padding(padding, x.shape[1:3], window, strides)
    C.check_pool_padding(x, window, padding, pads, name)
    if ceil_mode:
        # Extra padding on the far side so that the last partial window is kept.
        new = []
        for size, k, s, (lo, hi) in zip(x.shape[1:3], window, strides, pads):
            out = output_size(size, k, s, (lo, hi), ceil_mode=True)
            need = (out - 1) * s + k - (size + lo + hi)
            new.append((lo, hi + max(need, 0)))
        pads = tuple(new)
    return window, strides, pads


def max_pool(
    x: Array,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    *,
    ceil_mode: bool = False,
) -> Array:
    """Max pooling (padding never wins: it is -inf); stride defaults to the window."""
    x = C.as_array(x, "x")
    window, strides, pads = _pool_geometry(x, kernel_size, stride, padding, ceil_mode, "pooling")
    C.check_max_pool_dtype(x)  # float, int or bool
    # NumPy (not traced) init values: lax.reduce_window only has autodiff rules for the known
    # monoids (max with -inf, add with 0), which it recognises from constant inits. On bools the
    # max is a logical or, and the padding (False) never wins either.
    if jnp.issubdtype(x.dtype, jnp.floating):
        init = np.array(-np.inf, x.dtype)
    elif jnp.issubdtype(x.dtype, jnp.integer):
        init = np.array(np.iinfo(x.dtype).min, x.dtype)
    else:
        init = np.array(False)
    return lax.reduce_window(
        x, init, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
    )


def avg_pool(
    x: Array,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: Padding = 0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> Array:
    """Average pooling. count_include_pad counts the explicit zero padding in the divisor
    (PyTorch's default); the extra far-side padding of ceil_mode is never counted. Integer x is
    averaged in float32."""
    x, count_include_pad = C.avg_pool_input(x, count_include_pad)
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
        count = lax.reduce_window(
            ones, np.array(0, x.dtype), lax.add, dims, wstrides, ((0, 0), *extra, (0, 0))
        )
    else:
        count = lax.reduce_window(ones, np.array(0, x.dtype), lax.add, dims, wstrides, wpads)
    return total / count


def adaptive_avg_pool(x: Array, size: IntPair) -> Array:
    """PyTorch's AdaptiveAvgPool2d(size) on NHWC: output i of an n-long axis averages inputs
    floor(i n / size) to ceil((i + 1) n / size) - 1, so bins overlap when size does not divide n
    and inputs repeat when n < size. The identity (no operation) where the map already is
    that size: torchvision pools so before its classifiers, to fit its weights to any input."""
    C.check_rank(x, 4, "adaptive_avg_pool", "NHWC")
    sizes = C.pair(size, "size")
    if tuple(x.shape[1:3]) == sizes:
        return x
    x = _floating(x)
    for axis, out in zip((1, 2), sizes):
        n = x.shape[axis]
        if n != out:
            x = jnp.concatenate(
                [
                    lax.slice_in_dim(x, i * n // out, -(-(i + 1) * n // out), axis=axis).mean(
                        axis=axis, keepdims=True
                    )
                    for i in range(out)
                ],
                axis=axis,
            )
    return x


def global_avg_pool(x: Array, *, keepdims: bool = False) -> Array:
    """Mean over the spatial axes: (N, H, W, C) -> (N, C) (or (N, 1, 1, C)); integers in float32."""
    x = _floating(C.global_pool_input(x, keepdims, "global_avg_pool"))
    return jnp.mean(x, axis=(1, 2), keepdims=keepdims)


def global_max_pool(x: Array, *, keepdims: bool = False) -> Array:
    """Max over the spatial axes."""
    x = C.global_pool_input(x, keepdims, "global_max_pool")
    return jnp.max(x, axis=(1, 2), keepdims=keepdims)


# --------------------------------------------------------------------------- normalisation


def batch_norm_statistics(x: Array, *, axis_name: str | None = None) -> tuple[Array, Array]:
    """Per-channel mean and biased variance over every axis but the last, in float32:
    E[x] and max(E[x^2] - E[x]^2, 0).

    With `axis_name`, the statistics are those of the batch across all devices on that axis
    (E[x] and E[x^2] averaged over it, `lax.pmean`).
    """
    x = C.as_array(x, "x")
    C.check_bn_rank(x)
    return _bn.statistics(x, axis_name)


def batch_norm_apply(
    x: Array, mean: Array, var: Array, scale: Array | None, bias: Array | None, *, eps: float = 1e-5
) -> Array:
    """y = (x - mean) / sqrt(var + eps) * scale + bias, folded to one multiply-add per element:
    y = x * mul + add with mul = scale / sqrt(var + eps), add = bias - mean * mul."""
    x, eps, (mean, var, scale, bias) = C.batch_norm_apply_operands(x, mean, var, scale, bias, eps)
    return _bn.apply(x, mean, var, scale, bias, eps)


def _resolve_activation(activation):
    """batch_norm's `activation` as a function (None: none)."""
    if activation is None or callable(activation):
        return activation
    if isinstance(activation, str):
        return get_activation(activation)
    raise TypeError(
        f"activation must be None, a name ({', '.join(sorted(ACTIVATIONS))}) or a function, "
        f"got {type(activation).__name__}"
    )


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
      vjp: the training-mode gradient path: 'fused' (a hand-written backward,
        `cnnjax.backends.batch_norm`), 'autodiff' (JAX differentiates the forward), or None:
        `cnnjax.settings` bn_vjp ('auto': fused on the CPU backend). The same values either way.
      residual: an array of x's shape added after the normalisation (a ResNet block's shortcut),
        or None.
      activation: applied last: None, a name from `ACTIVATIONS` or a function. ReLU (and the
        residual) are fused into the native kernels' passes; anything else runs after them.
      backend: who computes the passes over the activations: 'native' (`cnnjax.native.batch_norm`,
        float32 on the CPU backend), 'xla', or None: `cnnjax.settings` bn_backend ('auto': native
        for float32 on the CPU backend where the kernels can be used). Read at trace time; the
        values agree to float32 rounding.

    Returns:
      (y, (new_running_mean, new_running_var)); integer x is normalised in float32.
    """
    x = _floating(C.as_array(x, "x"))
    train, momentum, eps = C.batch_norm_operands(x, train, momentum, eps)
    act = _resolve_activation(activation)
    residual = None if residual is None else _floating(C.as_array(residual, "residual"))
    scale, bias, running_mean, running_var = C.batch_norm_vectors(
        x, residual, scale, bias, running_mean, running_var
    )
    # Faster code for the same math where there is some (cnnjax.backends.batch_norm): the native
    # kernels (which fuse the residual and a ReLU), or a hand-written training gradient.
    choice = _bn_backend.select(x, residual, vjp=vjp, backend=backend)
    fuse_relu = choice.native and act is relu
    if train:
        out = _bn_backend.train(choice, x, scale, bias, residual, eps, axis_name, relu=fuse_relu)
        if out is None:
            mean, var = batch_norm_statistics(x, axis_name=axis_name)
            y = batch_norm_apply(x, mean, var, scale, bias, eps=eps)
        else:
            y, mean, var = out
        new_mean = momentum * running_mean + (1.0 - momentum) * mean
        new_var = momentum * running_var + (1.0 - momentum) * var
        new_stats = (new_mean, new_var)
    else:
        if choice.native:
            y = _bn_backend.evaluate(
                x, running_mean, running_var, scale, bias, eps, residual, relu=fuse_relu
            )
        else:
            y = batch_norm_apply(x, running_mean, running_var, scale, bias, eps=eps)
        new_stats = (running_mean, running_var)
    # What the kernels did not fuse: on XLA's path the residual and the activation, natively an
    # activation other than ReLU.
    residual = None if choice.native else residual
    return add_and_activate(y, residual, None if fuse_relu else act), new_stats


def add_and_activate(y: Array, residual: Array | None = None, activation=None) -> Array:
    """activation(y + residual), either part optional: what `batch_norm` does after normalising
    (for a layer that stands in for a BatchNorm, e.g. one folded into its convolution)."""
    if residual is not None:
        y = y + residual.astype(y.dtype)
    act = _resolve_activation(activation)
    return y if act is None else act(y)


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
    kernel, eps, (bias, scale, shift, mean, var) = C.fold_batch_norm_operands(
        kernel, bias, scale, shift, mean, var, eps
    )
    c_out = kernel.shape[-1]
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
    x = _floating(C.as_array(x, "x"))
    size, alpha, beta, k, alpha_over_n = C.local_response_norm_operands(
        x, size, alpha, beta, k, alpha_over_n
    )  # k > 0 and alpha >= 0 keep the denominator's base positive
    a = alpha / size if alpha_over_n else alpha
    sq = jnp.square(x.astype(jnp.float32))
    half = size // 2
    window_sum = lax.reduce_window(
        sq,
        0.0,
        lax.add,
        (1, 1, 1, size),
        (1, 1, 1, 1),
        ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)),
    )
    return (x.astype(jnp.float32) / jnp.power(k + a * window_sum, beta)).astype(x.dtype)


# ------------------------------------------------------------------- regularisation and activations


def dropout(x: Array, rate: float, rng: Array | None, *, deterministic: bool) -> Array:
    """Inverted dropout: zero each unit with probability `rate`, scale survivors by 1 / (1 - rate).

    `rate` must be a concrete number (it decides what is traced); `rng` a single PRNG key.
    """
    x = C.as_array(x, "x")
    rate, deterministic = C.dropout_operands(rate, rng, deterministic)
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
    "relu": relu,
    "relu6": relu6,
    "leaky_relu": leaky_relu,
    "elu": elu,
    "gelu": gelu,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "identity": lambda x: x,
}


def get_activation(name: str):
    """Looks up an activation function by name."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def conv_output_shape(
    input_shape: Sequence[int],
    kernel_size: IntPair,
    features: int,
    *,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> tuple[int, int, int, int]:
    """Static output shape of conv2d for an NHWC input shape; raises where conv2d would."""
    dims, features, (k, s, d) = C.conv_output_shape_operands(
        input_shape, kernel_size, features, stride, dilation
    )
    spatial = (dims[1], dims[2])
    pads = resolve_padding(padding, spatial, k, s, d)
    C.check_window_fits(spatial, k, d, pads, "kernel", "kernel_size")
    return (dims[0], *_conv_spatial(spatial, k, s, pads, d), features)


# ----------------------------------------------------------------------- defaults (cnnjax.settings)


def conv2d_backend(mode: str) -> settings.using:
    """`with conv2d_backend('xla'):` sets `conv2d`'s default library ('auto', 'onednn', 'xla') in
    the block: `cnnjax.settings.using(conv_backend=mode)`."""
    return settings.using(conv_backend=mode)


def conv2d_vjp_mode(mode: str) -> settings.using:
    """`with conv2d_vjp_mode('xla'):` sets `conv2d`'s default gradient path ('auto',
    'canonical', 'xla'): `cnnjax.settings.using(conv_vjp=mode)`."""
    return settings.using(conv_vjp=mode)


def batch_norm_backend(mode: str) -> settings.using:
    """`with batch_norm_backend('xla'):` sets `batch_norm`'s default library ('auto', 'native',
    'xla'): `cnnjax.settings.using(bn_backend=mode)`."""
    return settings.using(bn_backend=mode)


def batch_norm_vjp_mode(mode: str) -> settings.using:
    """`with batch_norm_vjp_mode('autodiff'):` sets `batch_norm`'s default training gradient
    ('auto', 'fused', 'autodiff'): `cnnjax.settings.using(bn_vjp=mode)`."""
    return settings.using(bn_vjp=mode)
