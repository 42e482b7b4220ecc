"""BatchNorm's arithmetic, shared by the layer (`cnnjax.functional.batch_norm`) and its faster
backends (`cnnjax.backends.batch_norm`), which both import it from here."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def mean_var(mean, mean_sq, axis_name):
    """(mean, biased variance) from this device's E[x] and E[x^2], averaged over `axis_name`."""
    if axis_name is not None:
        mean, mean_sq = lax.pmean((mean, mean_sq), axis_name)
    # E[x^2] - E[x]^2 can round below zero.
    return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def statistics(x, axis_name):
    """Per-channel (mean, biased variance) of x over every axis but the last, in float32."""
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    return mean_var(jnp.mean(x32, axes), jnp.mean(jnp.square(x32), axes), axis_name)


def affine(mean, var, scale, bias, eps):
    """BatchNorm as one multiply-add per element, y = x * mul + add: the per-channel (mul, add) in
    float32 (scale and bias may be None)."""
    mul = lax.rsqrt(var.astype(jnp.float32) + eps)
    if scale is not None:
        mul = mul * scale.astype(jnp.float32)
    add = -mean.astype(jnp.float32) * mul
    if bias is not None:
        add = add + bias.astype(jnp.float32)
    return mul, add


def apply(x, mean, var, scale, bias, eps):
    """(x - mean) / sqrt(var + eps) * scale + bias, in x's dtype."""
    mul, add = affine(mean, var, scale, bias, eps)
    return (x * mul.astype(x.dtype) + add.astype(x.dtype)).astype(x.dtype)
