"""Shared machinery of the analyses: which modules are layers, how a model is called abstractly,
and a no-op primitive that marks a layer's output in a jaxpr.

Every analysis runs the model under `flax.linen.intercept_methods` inside `jax.eval_shape` or
`jax.make_jaxpr`, so nothing is compiled: the interceptor sees each module call with its path,
its inputs, its output and its variables.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import mlir

from cnnjax import _checks as C
from cnnjax import nn as cnn

# The leaves of every cnnjax architecture: one summary row per call of one of these.
LAYER_TYPES: tuple[type, ...] = (
    cnn.Conv,
    cnn.Dense,
    cnn.BatchNorm,
    cnn.LocalResponseNorm,
    cnn.Dropout,
    cnn.MaxPool,
    cnn.AvgPool,
    cnn.GlobalAvgPool,
    cnn.Flatten,
)
# flax.linen's own layers, should a model use them, are leaves too (nn.Sequential is not).
_FLAX_LAYER_MODULES = (
    "flax.linen.linear",
    "flax.linen.normalization",
    "flax.linen.stochastic",
    "flax.linen.pooling",
)


def is_layer(module: nn.Module) -> bool:
    """True for a leaf layer (a cnnjax.nn module, or a flax.linen layer such as nn.Conv)."""
    return isinstance(module, LAYER_TYPES) or type(module).__module__ in _FLAX_LAYER_MODULES


def module_path(module: nn.Module) -> str:
    """'stage2_block1/conv1' for a bound module; '' for the root."""
    return "/".join(str(p) for p in module.path)


def check_model(model: Any, fn: str) -> None:
    """Raises ValueError unless `model` is a flax.linen Module."""
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{fn}: model must be a flax.linen.Module (e.g. cnnjax.models.create('resnet50')), "
            f"got {type(model).__name__}"
        )


def check_input_shape(input_shape: Any, fn: str) -> tuple[int, ...]:
    """Validates one example's shape, e.g. (H, W, C) without the batch axis;
    returns it as a tuple."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(
            f"{fn}: input_shape must be a sequence of positive ints such as (224, 224, 3), "
            f"got {input_shape!r}"
        ) from None
    if not shape or not all(C.is_int(d) and d > 0 for d in shape):
        raise ValueError(
            f"{fn}: input_shape must be positive ints without the batch axis, e.g. (224, 224, 3), "
            f"got {input_shape!r}"
        )
    if len(shape) == 4:  # every network here takes NHWC batches: this one has a batch axis already
        raise ValueError(
            f"{fn}: input_shape is one example's shape without the batch axis, e.g. (224, 224, 3); "
            f"got {input_shape!r}: drop the leading {shape[0]} (the batch size is its own argument)"
        )
    return shape


def check_batch_size(batch_size: Any, fn: str) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def call_kwargs(model: nn.Module, train: bool, fn: str) -> dict[str, Any]:
    """The keyword arguments that select train or eval mode for this model's __call__."""
    params = inspect.signature(type(model).__call__).parameters
    if "train" in params:
        return {"train": train}
    if train:
        raise ValueError(
            f"{fn}: train=True was asked but "
            f"{type(model).__name__}.__call__ has no `train` argument"
        )
    return {}


def init_with_output(model: nn.Module, x: jax.Array, train: bool, fn: str) -> tuple[Any, Any]:
    """model.init_with_output with fixed rngs; meant to run under eval_shape or make_jaxpr."""
    key = jax.random.key(0)
    return model.init_with_output(
        {"params": key, "dropout": key}, x, **call_kwargs(model, train, fn)
    )


def example_input(input_shape: Sequence[int], batch_size: int = 1) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32)


def subtree(tree: Mapping[str, Any], path: str) -> Any:
    """The part of a variables collection at a module path ('' is the whole
    tree); None if absent."""
    node: Any = tree
    for name in filter(None, path.split("/")):
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


def leaves_with_paths(tree: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """[('stage1_block1/conv1/kernel', leaf), ...] of a nested dict."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(str(getattr(k, "key", k)) for k in kp), leaf) for kp, leaf in flat]


def size_of(tree: Any) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        n = 1
        for d in leaf.shape:
            n *= int(d)
        total += n
    return total


def is_discarded_trace(x: Any) -> bool:
    """True inside the extra trace flax's nn.scan makes of its body before the real one.

    nn.scan traces its body twice (first to find the loop invariants); analyses record only the
    second trace. That first pass is flax's `axes_scan` body function called with
    `init_mode=True`, which is what is looked for on the call stack (flax 0.10 to 0.12.10 at
    least). Flax versions that ran that pass as a partial evaluation are also recognised by the
    tracer's type (there is no public type for it, hence the name).
    """
    return type(x).__name__ == "JaxprTracer" or in_scan_invariant_pass()


def in_scan_invariant_pass() -> bool:
    """Whether the caller runs inside flax nn.scan's first trace (`axes_scan`
    body, init_mode=True)."""
    frame = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "body_fn"
            and frame.f_globals.get("__name__") == "flax.core.axes_scan"
            and frame.f_locals.get("init_mode") is True
        ):
            return True
        frame = frame.f_back
    return False


def layer_interceptor(on_layer: Callable[[Callable[..., Any], tuple, dict, Any], Any]):
    """An interceptor that hands every outermost layer __call__ to `on_layer(next_fun,
    args, kwargs, ctx)`.

    Calls nested inside a layer (none in cnnjax.nn) are passed through untouched.
    """
    depth = [0]

    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__" or not is_layer(ctx.module) or depth[0]:
            return next_fun(*args, **kwargs)
        depth[0] += 1
        try:
            return on_layer(next_fun, args, kwargs, ctx)
        finally:
            depth[0] -= 1

    return interceptor


# A no-op primitive marking a value in a jaxpr: `tag(x, index=i)` is x. Traced, never lowered in
# practice (the lowering is the identity should anyone jit it).
tag_p = jex_core.Primitive("cnnjax_tag")
tag_p.def_impl(lambda x, *, index: x)
tag_p.def_abstract_eval(lambda aval, *, index: aval)
mlir.register_lowering(tag_p, lambda ctx, x, *, index: [x])


def tag(x: jax.Array, index: int) -> jax.Array:
    """Marks `x` with `index` in the jaxpr being traced."""
    return tag_p.bind(x, index=index)


def inner_jaxpr(j: Any) -> Any:
    """The Jaxpr of a ClosedJaxpr, or `j` itself: JAX 0.11 gives scan bodies as a Jaxpr that holds
    its own constants."""
    return j.jaxpr if isinstance(j, jex_core.ClosedJaxpr) else j


def scan_counts(eqn: Any) -> tuple[int, int]:
    """(constants, carries) among a scan equation's operands (the rest are the scanned inputs).

    Up to JAX 0.10 the equation names them (`num_consts`, `num_carry`); JAX 0.11 groups the
    operands in a flat tree `ft_in` of (constants, carries, scanned inputs).
    """
    p = eqn.params
    if "num_consts" in p:
        return p["num_consts"], p["num_carry"]
    consts, carry, _ = (list(g) for g in p["ft_in"].update(list(range(len(eqn.invars)))).unpack())
    return len(consts), len(carry)


def sub_jaxprs(eqn: Any) -> list[Any]:
    """The jaxprs nested in an equation's parameters (jit, custom_jvp_call,
    remat, cond, scan...)."""
    found = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jex_core.ClosedJaxpr):
                found.append(v.jaxpr)
            elif isinstance(v, jex_core.Jaxpr):
                found.append(v)
    return found
