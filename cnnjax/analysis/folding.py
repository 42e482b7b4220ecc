"""Folding every evaluation-mode BatchNorm of a network into the convolution or
dense layer before it.

In evaluation BN(W x + b) = (W g) x + (b - mean) g + beta with g = gamma / sqrt(var + eps)
(`cnnjax.functional.fold_batch_norm`), so a conv followed directly by a BatchNorm is one conv
with a new kernel and bias. `fold_batchnorm(model, variables, input_shape)` finds those pairs and
returns a `FoldedModel` whose `apply` runs the original module with each folded conv computing
with its folded kernel and bias and each folded BatchNorm replaced by the identity
(`flax.linen.intercept_methods`; the architecture code is not touched).

Which BatchNorm follows which layer is read from one abstract trace (`jax.make_jaxpr`, no
compile): a BatchNorm is folded when its input is the very output of a Conv or Dense call and
that output has no other consumer (it feeds the BatchNorm only). BatchNorms that precede their
convolution (pre-activation ResNets, DenseNet's BN-ReLU-conv) cannot be folded this way and are
left in place, listed in `FoldedModel.unfolded` with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
from jax.extend import core as jex_core

from cnnjax import functional as F
from cnnjax import nn as cnn
from cnnjax.analysis import tracing

_FOLDABLE = (cnn.Conv, cnn.Dense)


@dataclasses.dataclass(frozen=True)
class FoldedModel:
    """A model with its BatchNorms folded, for inference: `folded.apply(folded_variables, x)`.

    Attributes:
      model: the original linen module (its code is run unchanged, intercepted).
      pairs: (layer path, BatchNorm path) of every folded pair, in call order.
      unfolded: {BatchNorm path: reason} for the BatchNorms left in place.
    """

    model: nn.Module
    pairs: tuple[tuple[str, str], ...]
    unfolded: Mapping[str, str]

    def apply(
        self, variables: Mapping[str, Any], x: jax.Array, *, train: bool = False, **kwargs: Any
    ) -> Any:
        """Evaluation-mode forward pass with the folded variables (train must be False)."""
        if train:
            raise ValueError(
                "FoldedModel.apply: a folded network is for inference only (train=False); "
                "train the original model"
            )
        layers = {p for p, _ in self.pairs}
        norms = {b for _, b in self.pairs}

        def interceptor(next_fun, args, kwargs_, ctx):
            path = tracing.module_path(ctx.module)
            if path in norms:  # the identity, then the shortcut and activation it was handed
                m = ctx.module
                y = args[0].astype(m.dtype) if m.dtype is not None else args[0]
                return F.add_and_activate(y, kwargs_.get("residual"), kwargs_.get("activation"))
            if path in layers:
                return _folded_call(ctx.module, args[0])
            return next_fun(*args, **kwargs_)

        with nn.intercept_methods(tracing.layer_interceptor(interceptor)):
            return self.model.apply(
                variables,
                x,
                **tracing.call_kwargs(self.model, False, "FoldedModel.apply"),
                **kwargs,
            )

    __call__ = apply


def _folded_call(m: cnn.Conv | cnn.Dense, x: jax.Array) -> jax.Array:
    """The layer's computation (as in cnnjax.nn) with its folded kernel and bias."""
    p = m.variables["params"]
    dtype = m.dtype or x.dtype
    kernel, bias = p["kernel"].astype(dtype), p["bias"].astype(dtype)
    if isinstance(m, cnn.Conv):
        return F.conv2d(
            x.astype(dtype),
            kernel,
            bias,
            stride=m.strides,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            precision=m.precision,
        )
    return F.dense(x.astype(dtype), kernel, bias, precision=m.precision)


def _find_pairs(model: nn.Module, variables: Mapping[str, Any], shape: tuple[int, ...], fn: str):
    """One abstract trace: returns (pairs, unfolded, epsilons by BN path)."""
    calls: list[dict[str, Any]] = []
    outputs: dict[int, tuple[int, Any]] = {}  # id(output) -> (call index, output), kept alive
    counts: dict[str, int] = {}

    def on_layer(next_fun, args, kwargs, ctx):
        if tracing.is_discarded_trace(args[0]):
            return next_fun(*args, **kwargs)
        m, i, x = ctx.module, len(calls), args[0]
        path = tracing.module_path(m)
        counts[path] = counts.get(path, 0) + 1
        call = {"path": path, "module": m, "source": None}
        calls.append(call)
        if isinstance(m, cnn.BatchNorm):
            call["eval"] = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
            if call["eval"] is None:
                call["eval"] = m.use_running_average
            if id(x) in outputs and outputs[id(x)][1] is x:
                call["source"] = outputs[id(x)][0]
                x = tracing.tag(x, 2 * i)  # marks the BN's use of the layer output in the jaxpr
            return next_fun(x, *args[1:], **kwargs)
        y = next_fun(*args, **kwargs)
        if isinstance(m, _FOLDABLE):
            y = tracing.tag(y, 2 * i + 1)
            outputs[id(y)] = (i, y)
        return y

    def forward(v, x):
        with nn.intercept_methods(tracing.layer_interceptor(on_layer)):
            return model.apply(v, x, **tracing.call_kwargs(model, False, fn))

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
    closed = jax.make_jaxpr(forward)(abstract, tracing.example_input(shape))
    uses = _uses_of_tags(closed.jaxpr)

    pairs, unfolded = [], {}
    for i, call in enumerate(calls):
        if not isinstance(call["module"], cnn.BatchNorm):
            continue
        path, src = call["path"], call["source"]
        reason = None
        if src is None:
            reason = (
                "its input is not the output of a Conv or Dense layer (e.g. BN before the conv)"
            )
        elif not call["eval"]:
            reason = "it uses batch statistics in evaluation mode (use_running_average=False)"
        elif counts[path] > 1 or counts[calls[src]["path"]] > 1:
            reason = "the BatchNorm or its layer is called more than once (shared)"
        elif uses.get(2 * src + 1) != [2 * i]:
            reason = f"the output of {calls[src]['path']} is also used elsewhere"
        if reason:
            unfolded[path] = reason
        else:
            pairs.append((calls[src]["path"], path, call["module"]))
    return pairs, unfolded


def _uses_of_tags(jaxpr) -> dict[int, list[Any]]:
    """For each tagged value: the tags of the equations consuming it ('other' for anything else)."""
    producers, consumers = {}, {}

    def walk(j):
        for eqn in j.eqns:
            for v in eqn.invars:
                if isinstance(v, jex_core.Var):
                    is_tag = eqn.primitive is tracing.tag_p
                    consumers.setdefault(v, []).append(eqn.params["index"] if is_tag else "other")
            if eqn.primitive is tracing.tag_p:
                producers[eqn.params["index"]] = eqn.outvars[0]
            for sub in tracing.sub_jaxprs(eqn):
                walk(sub)
        for v in j.outvars:
            if isinstance(v, jex_core.Var):
                consumers.setdefault(v, []).append("other")

    walk(jaxpr)
    return {i: consumers.get(v, []) for i, v in producers.items()}


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[last] = value


def _delete(tree: dict, path: str) -> None:
    """Removes tree[path] and the dictionaries left empty above it."""
    names = path.split("/")
    stack = [tree]
    for name in names[:-1]:
        if name not in stack[-1]:
            return
        stack.append(stack[-1][name])
    stack[-1].pop(names[-1], None)
    for parent, name in zip(reversed(stack[:-1]), reversed(names[:-1])):
        if parent[name]:
            break
        del parent[name]


def _to_dicts(tree: Any) -> Any:
    return {k: _to_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _fold(args: tuple, eps: float) -> tuple[jax.Array, jax.Array]:
    fold = partial(F.fold_batch_norm, eps=eps)
    # Inside nn.scan the variables are stacked over a leading axis: fold each slice.
    for _ in range(args[4].ndim - 1):
        fold = jax.vmap(fold, in_axes=tuple(None if a is None else 0 for a in args))
    return fold(*args)


def fold_batchnorm(
    model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]
) -> tuple[FoldedModel, dict[str, Any]]:
    """Folds every evaluation-mode BatchNorm that directly follows a Conv or Dense into that layer.

    Args:
      model: a flax.linen Module made of cnnjax.nn layers, called as model(x, train=...).
      variables: its variables ({'params': ..., 'batch_stats': ...}), e.g. after training.
      input_shape: one example's (H, W, C), used to trace the network once (abstractly).

    Returns:
      (folded_model, folded_variables): `folded_model.apply(folded_variables, x)` equals
      `model.apply(variables, x, train=False)` up to rounding. Folded layers get kernel and bias
      (a bias even if they had none); folded BatchNorms lose their params and batch_stats.
      `folded_model.unfolded` lists the BatchNorms left in place and why.
    """
    fn = "fold_batchnorm"
    tracing.check_model(model, fn)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            f"{fn}: variables must be the model's variables dict with a 'params' collection "
            f"(and 'batch_stats'), got {type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
        )
    shape = tracing.check_input_shape(input_shape, fn)
    found, unfolded = _find_pairs(model, variables, shape, fn)

    out = _to_dicts(variables)
    params, stats = out["params"], out.get("batch_stats", {})
    jobs = []
    for layer, norm, bn in found:
        lp, bp, bs = (
            tracing.subtree(params, layer),
            tracing.subtree(params, norm),
            tracing.subtree(stats, norm),
        )
        if bs is None:
            raise ValueError(
                f"{fn}: variables have no batch_stats for BatchNorm {norm!r}; "
                "pass the full variables"
            )
        jobs.append(
            (
                (
                    lp["kernel"],
                    lp.get("bias"),
                    bp.get("scale"),
                    bp.get("bias"),
                    bs["mean"],
                    bs["var"],
                ),
                bn.epsilon,
            )
        )
    # One compiled program for all pairs (eager ops would compile once per shape).
    folded = jax.jit(lambda args: [_fold(a, eps) for a, (_, eps) in zip(args, jobs)])(
        [a for a, _ in jobs]
    )
    for (layer, norm, _), (new_kernel, new_bias) in zip(found, folded):
        _set(
            params,
            layer,
            {**tracing.subtree(params, layer), "kernel": new_kernel, "bias": new_bias},
        )
        _delete(params, norm)
        _delete(stats, norm)
    if "batch_stats" in out and not out["batch_stats"]:
        del out["batch_stats"]
    pairs = tuple((layer, norm) for layer, norm, _ in found)
    return FoldedModel(model, pairs, dict(unfolded)), out
