"""oneDNN convolutions in JAX: the three FFI calls of `dnnl_conv.cc`, differentiable to any order.

    conv(x, w)                    y  (N, Ho, Wo, O)   the forward pass
    conv_backward_data(dy, w)     dx (N, H, W, C)     the input gradient, J_x^T dy
    conv_backward_weights(x, dy)  dw (KH, KW, C, O)   the kernel gradient, J_w^T dy

Each is bilinear, and the transpose of each with respect to either argument is one of the three
(with <a, b> the sum of products): <conv_backward_data(dy, w), c> = <dy, conv(c, w)> and
<conv_backward_weights(x, dy), c> = <dy, conv(x, c)>, so

    conv:                   x <- conv_backward_data(ct, w),     w <- conv_backward_weights(x, ct)
    conv_backward_data:     dy <- conv(ct, w),                  w <- conv_backward_weights(ct, dy)
    conv_backward_weights:  x <- conv_backward_data(dy, ct),    dy <- conv(x, ct)

which is what their custom VJPs say: gradients of gradients (a gradient penalty, say) stay on
oneDNN. Float32 only, groups 1; `geometry` is (strides, ((top, bottom), (left, right)),
dilation), and each function is also told the shape of its result (`y_shape`, `x_shape`,
`w_shape`: its caller has it, and where a stride leaves rows unread x's is not derivable).
Forward-mode differentiation (jvp) is not defined, as for any custom VJP. Under vmap each call
runs once per mapped element.
`convolve` is the entry point `cnnjax.functional.conv2d` uses (`conv`, with strided 1x1
convolutions rewritten around a oneDNN bug). By default each call splits its batch over XLA's
own intra-op threads (`cnnjax.settings`' onednn_threads), so oneDNN adds no thread pool of its
own, and `conv_backward_weights` runs cnnjax's own kernel instead of oneDNN's where it applies
(conv_weights; `native/conv_weights.h`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import native, settings
from cnnjax._vma import vary_as

Geometry = tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]], tuple[int, int]]
Shape = tuple[int, ...]


def _call(target: str, shape: Shape, a, b, geometry: Geometry, **attrs):
    """One custom call, whose result has `shape`."""
    native.ensure_lowering_hook()  # the library is built when this call is first lowered
    strides, ((top, bottom), (left, right)), dilation = geometry
    # onednn_threads (cnnjax.settings, read at trace time): 'xla' splits the batch over XLA's
    # intra-op threads, each part one single-threaded oneDNN call (PERFORMANCE.md section 10).
    split = settings.current().onednn_threads == "xla"
    out = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    y = jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        a,
        b,
        strides=np.asarray(strides, np.int64),
        padding=np.asarray([top, bottom, left, right], np.int64),
        dilation=np.asarray(dilation, np.int64),
        split_batch=np.int64(split),
        **attrs,
    )
    return vary_as(y, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, w, geometry: Geometry, y_shape: Shape):
    return _call("cnnjax_dnnl_conv_fwd", y_shape, x, w, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_backward_data(dy, w, geometry: Geometry, x_shape: Shape):
    return _call("cnnjax_dnnl_conv_bwd_data", x_shape, dy, w, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_backward_weights(x, dy, geometry: Geometry, w_shape: Shape):
    return _call(
        "cnnjax_dnnl_conv_bwd_weights",
        w_shape,
        x,
        dy,
        geometry,
        direct=np.int64(settings.current().conv_weights != "onednn"),
    )


def _conv_fwd(x, w, geometry, y_shape):
    return conv(x, w, geometry, y_shape), (x, w)


def _conv_bwd(geometry, y_shape, residuals, ct):
    x, w = residuals
    return conv_backward_data(ct, w, geometry, x.shape), conv_backward_weights(
        x, ct, geometry, w.shape
    )


def _data_fwd(dy, w, geometry, x_shape):
    return conv_backward_data(dy, w, geometry, x_shape), (dy, w)


def _data_bwd(geometry, x_shape, residuals, ct):
    dy, w = residuals
    return conv(ct, w, geometry, dy.shape), conv_backward_weights(ct, dy, geometry, w.shape)


def _weights_fwd(x, dy, geometry, w_shape):
    return conv_backward_weights(x, dy, geometry, w_shape), (x, dy)


def _weights_bwd(geometry, w_shape, residuals, ct):
    x, dy = residuals
    return conv_backward_data(dy, ct, geometry, x.shape), conv(x, ct, geometry, dy.shape)


conv.defvjp(_conv_fwd, _conv_bwd)
conv_backward_data.defvjp(_data_fwd, _data_bwd)
conv_backward_weights.defvjp(_weights_fwd, _weights_bwd)


def convolve(x, w, geometry: Geometry, y_shape: Shape):
    """`conv`, with strided 1x1 convolutions given to oneDNN as what they are: a 1x1 convolution
    of every s-th pixel. (oneDNN 3.2's strided 1x1 filter gradient is wrong for some shapes, e.g.
    3 input channels with the image size a multiple of the stride; tests/test_native.py.)"""
    strides, pads, _ = geometry
    if w.shape[:2] == (1, 1) and tuple(strides) != (1, 1):
        (sh, sw), (_, ho, wo, _) = strides, y_shape
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))[
            :, : (ho - 1) * sh + 1 : sh, : (wo - 1) * sw + 1 : sw
        ]
        geometry = ((1, 1), ((0, 0), (0, 0)), (1, 1))
    return conv(x, w, geometry, y_shape)


def supports(x, kernel, groups: int) -> bool:
    """Whether `conv` computes this convolution: float32, groups 1."""
    return groups == 1 and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
