"""Who computes `cnnjax.functional.batch_norm`, and its hand-written gradients.

`select` picks, at trace time, from the call's `backend` / `vjp` and `cnnjax.settings`:

  native     the kernels of `cnnjax.native.batch_norm` (float32, CPU backend): one pass for the
             statistics, one for the normalisation with a following ReLU and residual addition
             fused in, split over XLA's intra-op threads; in training with their own VJP whose
             passes are native too (PERFORMANCE.md section 11).
  fused      XLA's passes with a hand-written VJP (the textbook backward: two per-channel sums and
             one element-wise pass). Under JAX's own differentiation the forward's per-channel
             multiplier is shared with the backward, and XLA's CPU backend then writes its
             broadcast out in full once per layer (PERFORMANCE.md section 7).
  neither    `functional.batch_norm`'s own code, differentiated by JAX.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cnnjax import _bn, settings
from cnnjax import _checks as C
from cnnjax._vma import vary_alike
from cnnjax.backends import on_native, resolve_vjp
from cnnjax.native import batch_norm as native_bn


class Choice(NamedTuple):
    native: bool  # the native kernels (which fuse the residual and a ReLU)
    fused_vjp: bool  # the hand-written training gradient


def select(x, residual, *, vjp: str | None, backend: str | None) -> Choice:
    s = settings.current()
    mode = resolve_vjp(s.bn_vjp if vjp is None else vjp, settings.BN_VJP_MODES, "fused")
    float32 = x.dtype == jnp.float32 and (residual is None or residual.dtype == jnp.float32)
    lib = s.bn_backend if backend is None else backend
    return Choice(on_native(lib, settings.BN_BACKENDS, float32), mode == "fused")


def train(choice: Choice, x, scale, bias, residual, eps, axis_name, *, relu: bool):
    """Training BatchNorm as `choice` says: (y, batch mean, batch variance), y with the residual
    and ReLU where native (`relu`); None where it is functional's own code."""
    if choice.fused_vjp and C.is_traced(eps):
        raise ValueError(
            "eps must be a concrete number for the fused BatchNorm gradient, got a "
            "traced value; pass a Python float or vjp='autodiff'"
        )
    if not (choice.native or choice.fused_vjp):
        return None
    c = x.shape[-1]
    operands = (
        x,
        jnp.ones((c,), jnp.float32) if scale is None else scale,
        jnp.zeros((c,), jnp.float32) if bias is None else bias,
    )
    if not choice.native:
        return _batch_norm_train(*vary_alike(*operands), float(eps), axis_name)
    operands = vary_alike(*operands, *(() if residual is None else (residual,)))
    args = (*operands[:3], None if residual is None else operands[3])
    static = (axis_name, relu, residual is not None)
    if choice.fused_vjp:
        return _batch_norm_native(*args, float(eps), *static)
    # JAX differentiates the kernels through their references' derivatives
    return _batch_norm_native_fwd(*args, eps, *static)[0]


def evaluate(x, mean, var, scale, bias, eps, residual, *, relu: bool):
    """Evaluation BatchNorm on the native kernels (+ residual, + ReLU where `relu`)."""
    coef = jnp.stack(_bn.affine(mean, var, scale, bias, eps))
    return native_bn.apply(x, coef, residual, relu=relu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, eps, axis_name):
    """Training-mode BatchNorm with its own VJP: (y, batch mean, batch variance)."""
    return _batch_norm_train_fwd(x, scale, bias, eps, axis_name)[0]


def _batch_norm_train_fwd(x, scale, bias, eps, axis_name):
    mean, var = _bn.statistics(x, axis_name)
    inv = lax.rsqrt(var + eps)
    y = _bn.apply(x, mean, var, scale, bias, eps)
    return (y, mean, var), (x, scale, mean, inv)


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
    d_scale, d_bias, a, b = _bn_grad_coefficients(
        jnp.sum(g32, axes),
        jnp.sum(g32 * x32, axes),
        x.size // x.shape[-1],
        mean,
        inv,
        mul,
        g_mean,
        g_var,
        axis_name,
    )
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
    mean, var = _bn.mean_var(moments[0], moments[1], axis_name)
    mul, add = _bn.affine(mean, var, scale, bias, eps)
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
    d_scale, d_bias, a, b = _bn_grad_coefficients(
        sums[0], sums[1], x.size // x.shape[-1], mean, inv, mul, g_mean, g_var, axis_name
    )
    dx = native_bn.grad_apply(g, x, jnp.stack([mul, a, b, mul, add]), relu=mask)
    return dx, d_scale, d_bias, (g if has_residual else None)


_batch_norm_native.defvjp(_batch_norm_native_fwd, _batch_norm_native_bwd)
