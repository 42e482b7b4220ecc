"""BatchNorm's passes over the activations as native kernels (`batch_norm.cc`), with references.

Activations are float32, channels last; `coef` stacks per-channel vectors into a (K, C) array.

    sums(x)                      (2, C)   [sum x, sum x^2] over every axis but the last
    apply(x, coef, r, relu)      y        act(x coef[0] + coef[1] (+ r)), act = ReLU or identity
    grad_sums(gy, x, coef, relu) (2, C)   [sum g, sum g x], g = gy masked where
                                          x coef[0] + coef[1] <= 0
    grad_sums_masked(gy, y, x)   ((2, C), g)   the same sums with g = gy masked where y <= 0, and g
    grad_apply(g, x, coef, relu) dx       g' coef[0] + x coef[1] + coef[2], g' = g masked where
                                          x coef[3] + coef[4] <= 0 (relu), else g

They are the passes of training BatchNorm fused with the ReLU and residual addition that follow
it in a ResNet; `cnnjax.functional.batch_norm` strings them together, with the per-channel
arithmetic between them (and the sums across devices) left to XLA. Each is split over XLA's own
intra-op threads, where XLA's fusions of the same passes run on one thread each (PERFORMANCE.md
section 11).

Each op's definition is also written with jax.numpy (`reference_*`); derivatives of an op are its
reference's (a custom JVP), so a gradient of a gradient, or a jvp, goes through XLA. The
first-order training gradient is what runs on the kernels (functional's VJP calls grad_sums and
grad_apply). Under vmap each call runs once per mapped element.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import native
from cnnjax._vma import vary_as


def _rows(a):
    return a.reshape(-1, a.shape[-1]).astype(jnp.float32)


def _mask(keep, g):
    return jnp.where(keep, g, jnp.zeros_like(g))


def reference_sums(x):
    x = _rows(x)
    return jnp.stack([jnp.sum(x, 0), jnp.sum(x * x, 0)])


def reference_apply(relu, x, coef, residual=None):
    y = x * coef[0] + coef[1]
    if residual is not None:
        y = y + residual
    return jnp.maximum(y, 0.0) if relu else y


def reference_grad_sums(relu, gy, x, coef):
    g = _mask(x * coef[0] + coef[1] > 0, gy) if relu else gy
    g, x = _rows(g), _rows(x)
    return jnp.stack([jnp.sum(g, 0), jnp.sum(g * x, 0)])


def reference_grad_sums_masked(gy, y, x):
    g = _mask(y > 0, gy)
    return reference_grad_sums(False, g, x, None), g


def reference_grad_apply(relu, g, x, coef):
    if relu:
        g = _mask(x * coef[3] + coef[4] > 0, g)
    return g * coef[0] + x * coef[1] + coef[2]


def _native_op(target: str, reference, results, *, relu_attr: bool):
    """The op computed by the FFI handler `target`, called as op(relu, *arrays) with the static
    relu flag first (None for handlers without one, `relu_attr` False, whose reference takes only
    the arrays); `results(*arrays)` gives its result types."""
    ref = reference if relu_attr else (lambda relu, *arrays: reference(*arrays))

    @functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
    def op(relu, *arrays):
        native.ensure_lowering_hook()  # built when first lowered
        attrs = {"relu": np.int64(bool(relu))} if relu_attr else {}
        out = jax.ffi.ffi_call(target, results(*arrays), vmap_method="sequential")(*arrays, **attrs)
        return jax.tree.map(lambda o: vary_as(o, *arrays), out)

    @op.defjvp
    def _jvp(relu, primals, tangents):
        return op(relu, *primals), jax.jvp(functools.partial(ref, relu), primals, tangents)[1]

    return op


def _like(a):
    return jax.ShapeDtypeStruct(a.shape, jnp.float32)


def _channel_sums(a):
    return jax.ShapeDtypeStruct((2, a.shape[-1]), jnp.float32)


_sums = _native_op("cnnjax_bn_sums", reference_sums, _channel_sums, relu_attr=False)
_apply = _native_op("cnnjax_bn_apply", reference_apply, lambda x, coef: _like(x), relu_attr=True)
_apply_residual = _native_op(
    "cnnjax_bn_apply_residual", reference_apply, lambda x, coef, r: _like(x), relu_attr=True
)
_grad_sums = _native_op(
    "cnnjax_bn_grad_sums", reference_grad_sums, lambda gy, x, coef: _channel_sums(x), relu_attr=True
)
_grad_sums_masked = _native_op(
    "cnnjax_bn_grad_sums_masked",
    reference_grad_sums_masked,
    lambda gy, y, x: (_channel_sums(x), _like(x)),
    relu_attr=False,
)
_grad_apply = _native_op(
    "cnnjax_bn_grad_apply", reference_grad_apply, lambda g, x, coef: _like(x), relu_attr=True
)


def _check(x, coef=None, k: int = 0, **same):
    if x.dtype != jnp.float32 or x.ndim < 1:
        raise ValueError(
            "the native BatchNorm kernels take float32 activations with a channel "
            f"axis, got {x.dtype}{tuple(x.shape)}; use cnnjax.functional.batch_norm, "
            "which picks XLA otherwise"
        )
    for name, a in same.items():
        if a.shape != x.shape or a.dtype != jnp.float32:
            raise ValueError(
                f"{name} must be float32 of the activations' shape {tuple(x.shape)}, "
                f"got {a.dtype}{tuple(a.shape)}"
            )
    if coef is not None and coef.shape != (k, x.shape[-1]):
        raise ValueError(f"coef must have shape ({k}, {x.shape[-1]}), got {tuple(coef.shape)}")


def sums(x):
    """[sum x, sum x^2] per channel, (2, C)."""
    _check(x)
    return _sums(None, x)


def apply(x, coef, residual=None, *, relu: bool = False):
    """act(x coef[0] + coef[1] (+ residual)), coef (2, C)."""
    coef = jnp.asarray(coef, jnp.float32)
    if residual is None:
        _check(x, coef, 2)
        return _apply(bool(relu), x, coef)
    _check(x, coef, 2, residual=residual)
    return _apply_residual(bool(relu), x, coef, residual)


def grad_sums(gy, x, coef, *, relu: bool = False):
    """[sum g, sum g x] per channel, g = gy where x coef[0] + coef[1] > 0 (relu) else 0."""
    coef = jnp.asarray(coef, jnp.float32)
    _check(x, coef, 2, gy=gy)
    return _grad_sums(bool(relu), gy, x, coef)


def grad_sums_masked(gy, y, x):
    """([sum g, sum g x], g) with g = gy where y > 0, else 0 (a ReLU's output y)."""
    _check(x, gy=gy, y=y)
    return _grad_sums_masked(None, gy, y, x)


def grad_apply(g, x, coef, *, relu: bool = False):
    """g' coef[0] + x coef[1] + coef[2], coef (5, C); g' = g masked where x coef[3] +
    coef[4] <= 0 (relu)."""
    coef = jnp.asarray(coef, jnp.float32)
    _check(x, coef, 5, g=g)
    return _grad_apply(bool(relu), g, x, coef)
