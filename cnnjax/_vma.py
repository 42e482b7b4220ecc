"""Varying manual axes (shard_map's `check_vma` types) for the hand-written VJPs and custom calls.

Below `cnnjax.functional` and `cnnjax.native`, which both use it; imports only JAX.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(a) -> frozenset:
    """The manual mesh axes `a` varies over inside shard_map (empty elsewhere, and on JAX versions
    without the attribute)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _mark(a, axes: frozenset):
    """`a` marked varying over `axes` too."""
    missing = axes - varying_axes(a)
    return lax.pcast(a, tuple(sorted(missing)), to="varying") if missing else a


def vary_alike(*arrays):
    """The arrays, each marked varying over every manual mesh axis any of them varies over.

    Under shard_map with check_vma, x varies over the batch axis and a replicated parameter does
    not; JAX's own differentiation marks the parameter varying where they meet (the transpose of
    that mark sums the parameter's gradient over the axis). A custom VJP must see operands of one
    type to give gradients of their types, so the hand-written VJPs do the same before they start.
    """
    union = frozenset().union(*(varying_axes(a) for a in arrays))
    return tuple(_mark(a, union) for a in arrays)


def vary_as(y, *operands):
    """`y` marked varying over every manual mesh axis an operand varies over: the result of a
    custom call, whose own type says nothing of it."""
    return _mark(y, frozenset().union(*(varying_axes(a) for a in operands)))
