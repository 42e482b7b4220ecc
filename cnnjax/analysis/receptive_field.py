"""Receptive fields, effective strides and effective paddings of every layer, exactly.

Following Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural Networks",
Distill 2019: along one axis, unit u of a layer sees the input interval
[u*S - P, u*S - P + r - 1] (r: receptive field size, S: effective stride, P: effective padding),
and a layer of kernel k (dilation d), stride s and left padding p maps (r, S, P) to
(r + (d(k-1)) S, s S, P + p S).

How the graph is found: the model's forward pass is traced once to a jaxpr (`jax.make_jaxpr`, no
compile) with every layer output marked by a no-op primitive, and that jaxpr is interpreted with
(r, S, P) per spatial axis as the value of each variable: convolutions, pooling windows, pads and
strided slices compose the geometry; elementwise ops (residual adds, ReLU, BatchNorm) and channel
concatenations (Inception, DenseNet) take the union of their inputs' intervals, which is the
maximum over paths of Araujo et al. made exact when the paths' paddings differ. Nothing is
approximated: an operation the interpreter does not know on a spatial value raises
NotImplementedError. Values without spatial axes (after Flatten, global pooling, a Dense) get
the input region all their positions depended on ("collapsed"). A spatial value multiplied by
such a value (squeeze-excitation gating) is marked `global_context`.

`empirical_receptive_field` measures the same intervals as the support of a gradient, for tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from cnnjax import functional as F
from cnnjax import nn as cnn
from cnnjax.analysis import tracing

Extent = tuple[int, int]  # (lo, hi) input coordinates, unclipped


@dataclasses.dataclass(frozen=True)
class Geometry:
    """(r, S, P) along one axis: unit u sees input [u*S - P, u*S - P + size - 1]."""

    size: int
    stride: int
    padding: int

    def then(self, kernel: int, stride: int, pad_lo: int, dilation: int = 1) -> Geometry:
        """The geometry after a window of `kernel` (dilated), `stride`, left padding `pad_lo`."""
        span = (kernel - 1) * dilation + 1
        return Geometry(self.size + (span - 1) * self.stride, self.stride * stride, self.padding + pad_lo * self.stride)

    def extent(self, n: int) -> Extent:
        """The input interval seen by all of units 0..n-1."""
        return (-self.padding, (n - 1) * self.stride - self.padding + self.size - 1)


def _hull_geometry(gs: Sequence[Geometry], what: str) -> Geometry:
    strides = {g.stride for g in gs}
    if len(strides) != 1:
        raise NotImplementedError(f"receptive_field: {what} merges values of different effective strides {sorted(strides)}")
    pad = max(g.padding for g in gs)
    return Geometry(max(g.size - g.padding for g in gs) + pad, gs[0].stride, pad)


def _hull_extents(es: Sequence[Extent]) -> Extent:
    return (min(e[0] for e in es), max(e[1] for e in es))


@dataclasses.dataclass(frozen=True)
class _Spatial:
    axes: tuple[int, int]  # positions of the input's H and W axes in this value
    geo: tuple[Geometry, Geometry]
    context: tuple[Extent, Extent] | None = None  # region every unit also depends on (SE gating)


@dataclasses.dataclass(frozen=True)
class _Collapsed:
    extent: tuple[Extent, Extent]


def _collapse(state: Any, shape: Sequence[int]) -> Any:
    if not isinstance(state, _Spatial):
        return state
    ext = tuple(g.extent(shape[a]) for g, a in zip(state.geo, state.axes))
    if state.context is not None:
        ext = tuple(_hull_extents([e, c]) for e, c in zip(ext, state.context))
    return _Collapsed(ext)  # type: ignore[arg-type]


def _merge(states: Sequence[Any], what: str) -> Any:
    states = [s for s in states if s is not None]
    if not states:
        return None
    spatial = [s for s in states if isinstance(s, _Spatial)]
    contexts = [s.extent for s in states if isinstance(s, _Collapsed)] + [s.context for s in spatial if s.context]
    context = tuple(_hull_extents([c[i] for c in contexts]) for i in range(2)) if contexts else None
    if not spatial:
        return _Collapsed(context)  # type: ignore[arg-type]
    if len({s.axes for s in spatial}) != 1:
        raise NotImplementedError(f"receptive_field: {what} combines values whose spatial axes differ")
    geo = tuple(_hull_geometry([s.geo[i] for s in spatial], what) for i in range(2))
    return _Spatial(spatial[0].axes, geo, context)  # type: ignore[arg-type]


def _renumber(state: _Spatial, mapping) -> _Spatial:
    return dataclasses.replace(state, axes=tuple(mapping(a) for a in state.axes))


# --------------------------------------------------------------------------- jaxpr interpretation

_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
          "remat", "checkpoint", "named_call"}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin"}
_WINDOWS = {"reduce_window", "reduce_window_sum", "reduce_window_max", "reduce_window_min"}


def _windowed(state: _Spatial, name: str, kernel, stride, pad_lo, dilation, out_axes=None) -> _Spatial:
    geo = tuple(g.then(kernel(a), stride(a), pad_lo(a), dilation(a)) for g, a in zip(state.geo, state.axes))
    axes = state.axes if out_axes is None else tuple(out_axes(a) for a in state.axes)
    return _Spatial(axes, geo, state.context)  # type: ignore[arg-type]


def _conv(eqn, lhs: _Spatial, rhs: Any, shape) -> Any:
    if rhs is not None:
        raise NotImplementedError("receptive_field: a convolution whose kernel depends on the input")
    p, dn = eqn.params, eqn.params["dimension_numbers"]
    lhs_sp, rhs_sp, out_sp = dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:]
    if not set(lhs.axes) <= set(lhs_sp):
        return _collapse(lhs, shape)  # spatial axes used as features: every output mixes all positions
    if any(d != 1 for d in p["lhs_dilation"]):
        raise NotImplementedError("receptive_field: transposed (input-dilated) convolutions are not supported")
    k_shape = eqn.invars[1].aval.shape
    i = lhs_sp.index
    return _windowed(lhs, "conv", lambda a: k_shape[rhs_sp[i(a)]], lambda a: p["window_strides"][i(a)],
                     lambda a: p["padding"][i(a)][0], lambda a: p["rhs_dilation"][i(a)], lambda a: out_sp[i(a)])


def _spatial_rule(eqn, states: list[Any]) -> Any:
    """The output state of a single-output primitive with at least one spatial input."""
    name, p = eqn.primitive.name, eqn.params
    avals = [getattr(v, "aval", None) for v in eqn.invars]
    out_shape = eqn.outvars[0].aval.shape
    x, shape = states[0], getattr(avals[0], "shape", None)
    if name == "conv_general_dilated":
        return _conv(eqn, x, states[1], shape) if isinstance(x, _Spatial) else _merge(states, name)
    if name in _WINDOWS:
        n = len(states) // 2 if name == "reduce_window" else 1
        if any(p["base_dilation"][a] != 1 for s in states[:n] if isinstance(s, _Spatial) for a in s.axes):
            raise NotImplementedError("receptive_field: base-dilated windows are not supported")
        outs = [_windowed(s, name, lambda a: p["window_dimensions"][a], lambda a: p["window_strides"][a],
                          lambda a: p["padding"][a][0], lambda a: p["window_dilation"][a])
                if isinstance(s, _Spatial) else s for s in states[:n]]
        return _merge(outs, name)
    if name == "pad":
        if any(p["padding_config"][a][2] for a in x.axes):
            raise NotImplementedError("receptive_field: interior padding (upsampling) is not supported")
        return _windowed(x, name, lambda a: 1, lambda a: 1, lambda a: int(p["padding_config"][a][0]), lambda a: 1)
    if name == "slice":
        strides = p["strides"] or (1,) * len(shape)
        return _windowed(x, name, lambda a: 1, lambda a: strides[a], lambda a: -p["start_indices"][a], lambda a: 1)
    if name == "concatenate":
        if any(isinstance(s, _Spatial) and p["dimension"] in s.axes for s in states):
            raise NotImplementedError("receptive_field: concatenation along a spatial axis is not supported")
        return _merge(states, name)
    if name == "broadcast_in_dim":
        bd = p["broadcast_dimensions"]
        if any(shape[a] == 1 and out_shape[bd[a]] > 1 for a in x.axes):
            return _collapse(x, shape)
        return _renumber(x, lambda a: bd[a])
    if name == "reshape":
        m = max(x.axes) + 1
        return x if tuple(shape[:m]) == tuple(out_shape[:m]) else _collapse(x, shape)
    if name == "squeeze":
        dims = set(d % len(shape) for d in p["dimensions"])
        if dims & set(x.axes):
            return _collapse(x, shape)
        return _renumber(x, lambda a: a - sum(d < a for d in dims))
    if name == "transpose":
        return _renumber(x, lambda a: list(p["permutation"]).index(a))
    if name in _REDUCTIONS:
        axes = set(p["axes"])
        if axes & set(x.axes):
            return _collapse(x, shape)
        return _renumber(x, lambda a: a - sum(d < a for d in axes))
    if name == "dot_general":
        return _dot_general(eqn, states, avals)
    # Elementwise: every input that depends on the image has the output's shape.
    if all(s is None or tuple(av.shape) == tuple(out_shape) for s, av in zip(states, avals)):
        return _merge(states, name)
    raise NotImplementedError(f"receptive_field: no rule for primitive {name!r} on a spatial value "
                              f"(input shapes {[tuple(a.shape) for a in avals if a is not None]})")


def _dot_general(eqn, states, avals) -> Any:
    (contract, batch) = eqn.params["dimension_numbers"]
    nb = len(batch[0])
    free = [[d for d in range(len(avals[i].shape)) if d not in contract[i] and d not in batch[i]] for i in range(2)]
    outs = []
    for i, s in enumerate(states[:2]):
        if not isinstance(s, _Spatial):
            outs.append(s)
        elif set(s.axes) & set(contract[i]):
            outs.append(_collapse(s, avals[i].shape))
        else:
            offset = nb + (len(free[0]) if i else 0)
            outs.append(_renumber(s, lambda a, i=i, off=offset: list(batch[i]).index(a) if a in batch[i]
                                  else off + free[i].index(a)))
    return _merge(outs, "dot_general")


def _scan(eqn, states: list[Any], tags: dict[int, Any]) -> list[Any]:
    """Unrolls a lax.scan (e.g. flax nn.scan over blocks): its layers' tags keep the last iteration."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, carry, xs = states[:nc], states[nc:nc + nk], states[nc + nk:]
    if any(isinstance(s, _Spatial) and 0 in s.axes for s in xs):
        raise NotImplementedError("receptive_field: a scan over a spatial axis is not supported")
    xs = [_renumber(s, lambda a: a - 1) if isinstance(s, _Spatial) else s for s in xs]
    ys: list[Any] = []
    for _ in range(p["length"]):
        outs = _interpret(p["jaxpr"].jaxpr, [*consts, *carry, *xs], tags)
        carry, new = outs[:nk], [_renumber(s, lambda a: a + 1) if isinstance(s, _Spatial) else s for s in outs[nk:]]
        ys = new if not ys else [_merge([a, b], "scan") for a, b in zip(ys, new)]
    return [*carry, *ys] if p["length"] else [*carry, *([None] * (len(eqn.outvars) - nk))]


def _interpret(jaxpr, in_states: Sequence[Any], tags: dict[int, Any]) -> list[Any]:
    env: dict[Any, Any] = dict(zip(jaxpr.invars, in_states))

    def read(v):
        return env.get(v) if isinstance(v, jex_core.Var) else None

    for eqn in jaxpr.eqns:
        states = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == tracing.tag_p.name:
            tags[eqn.params["index"]] = states[0]
            outs = states
        elif all(s is None for s in states):
            outs = [None] * len(eqn.outvars)
        elif all(s is None or isinstance(s, _Collapsed) for s in states):
            outs = [_merge(states, name)] * len(eqn.outvars)
        elif name == "scan":
            outs = _scan(eqn, states, tags)
        elif name == "cond":
            branches = [_interpret(b.jaxpr, states[1:], tags) for b in eqn.params["branches"]]
            outs = [_merge(list(o), name) for o in zip(*branches)]
        elif name in _CALLS:
            subs = [j for j in tracing.sub_jaxprs(eqn) if len(j.invars) == len(states)]
            if not subs:
                raise NotImplementedError(f"receptive_field: cannot follow call primitive {name!r}")
            outs = _interpret(subs[0], states, tags)
        elif len(eqn.outvars) == 1:
            outs = [_spatial_rule(eqn, states)]
        else:
            raise NotImplementedError(f"receptive_field: no rule for primitive {name!r} on a spatial value")
        for v, s in zip(eqn.outvars, outs):
            env[v] = s
    return [read(v) for v in jaxpr.outvars]


# --------------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class RFRow:
    """The receptive field of one layer's output.

    Attributes:
      path, type: the layer ('features/pool5', 'MaxPool').
      output_shape: one example's output shape.
      size: receptive field (height, width) in input pixels; for a collapsed value (no spatial
        axes, e.g. after Flatten) the size of the input region it depends on.
      stride: effective stride (jump) (height, width); None for a collapsed value.
      padding: effective padding (height, width): unit (0, 0) starts at input (-padding).
      collapsed: the value has no spatial axes any more.
      global_context: the value is also gated by a summary of a whole map (its true receptive
        field is then that whole region).
      input_size, input_stride, input_padding: the same for the layer's input when it is spatial
        (for the global pooling of the head: the network's final feature map, the figure
        Araujo et al. tabulate).
    """

    path: str
    type: str
    output_shape: tuple[int, ...]
    size: tuple[int, int] | None
    stride: tuple[int, int] | None
    padding: tuple[int, int] | None
    collapsed: bool = False
    global_context: bool = False
    input_size: tuple[int, int] | None = None
    input_stride: tuple[int, int] | None = None
    input_padding: tuple[int, int] | None = None

    def interval(self, unit: tuple[int, int]) -> tuple[Extent, Extent]:
        """((top, bottom), (left, right)) input coordinates seen by output unit (i, j), unclipped."""
        if self.size is None or self.stride is None or self.padding is None:
            raise ValueError(f"interval: layer {self.path!r} has no spatial receptive field (collapsed={self.collapsed})")
        return tuple((u * s - p, u * s - p + r - 1)  # type: ignore[return-value]
                     for u, s, p, r in zip(unit, self.stride, self.padding, self.size))


def _geometry_of(state: Any) -> tuple[Any, Any, Any, bool, bool]:
    """(size, stride, padding, collapsed, global_context) of a state."""
    if isinstance(state, _Spatial):
        g = state.geo
        return ((g[0].size, g[1].size), (g[0].stride, g[1].stride), (g[0].padding, g[1].padding), False,
                state.context is not None)
    if isinstance(state, _Collapsed):
        e = state.extent
        return (e[0][1] - e[0][0] + 1, e[1][1] - e[1][0] + 1), None, (-e[0][0], -e[1][0]), True, False
    return None, None, None, False, False


def _row(path: str, kind: str, shape: tuple[int, ...], out_state: Any, in_state: Any) -> RFRow:
    size, stride, padding, collapsed, context = _geometry_of(out_state)
    in_size, in_stride, in_padding, _, _ = _geometry_of(in_state)
    if not isinstance(in_state, _Spatial):
        in_size = in_stride = in_padding = None
    return RFRow(path, kind, shape, size, stride, padding, collapsed, context, in_size, in_stride, in_padding)


def receptive_field(model: nn.Module, input_shape: Sequence[int], *, train: bool = False) -> list[RFRow]:
    """Receptive field, effective stride and padding of every layer call, in call order.

    Args:
      model: a flax.linen Module called as model(x, train=...) on NHWC inputs.
      input_shape: one example's (H, W, C); geometry does not depend on it, but the model
        must accept it.
      train: trace in training mode (only matters for auxiliary heads).

    Returns:
      One RFRow per layer call (cnnjax.nn modules), exact for multi-path networks (see module doc).
    """
    fn = "receptive_field"
    tracing.check_model(model, fn)
    shape = tracing.check_input_shape(input_shape, fn)
    if len(shape) != 3:
        raise ValueError(f"{fn}: input_shape must be (H, W, C) for an image model, got {shape}")
    calls: list[tuple[str, str, tuple[int, ...]]] = []

    def on_layer(next_fun, args, kwargs, ctx):
        if tracing.is_discarded_trace(args[0]):
            return next_fun(*args, **kwargs)
        i = len(calls)
        # Even tags mark the layer's input, odd ones its output.
        y = next_fun(tracing.tag(args[0], 2 * i), *args[1:], **kwargs)
        calls.append((tracing.module_path(ctx.module), type(ctx.module).__name__, tuple(y.shape[1:])))
        return tracing.tag(y, 2 * i + 1)

    def forward(x):
        with nn.intercept_methods(tracing.layer_interceptor(on_layer)):
            return tracing.init_with_output(model, x, train, fn)[0]

    closed = jax.make_jaxpr(forward)(tracing.example_input(shape))
    one = Geometry(1, 1, 0)
    tags: dict[int, Any] = {}
    _interpret(closed.jaxpr, [_Spatial((1, 2), (one, one))], tags)
    return [_row(path, kind, out_shape, tags.get(2 * i + 1), tags.get(2 * i))
            for i, (path, kind, out_shape) in enumerate(calls)]


def stacked_receptive_field(kernel_sizes: Sequence[int], strides: Sequence[int] | None = None,
                            dilations: Sequence[int] | None = None) -> int:
    """Receptive field of a chain of layers along one axis: two 3x3 convs see 5x5, three see 7x7.

    Args:
      kernel_sizes: kernel size of each layer, first layer first.
      strides: stride of each layer (default all 1).
      dilations: dilation of each layer (default all 1).
    """
    ks = list(kernel_sizes)
    ss = [1] * len(ks) if strides is None else list(strides)
    ds = [1] * len(ks) if dilations is None else list(dilations)
    if len(ss) != len(ks) or len(ds) != len(ks):
        raise ValueError(f"stacked_receptive_field: kernel_sizes ({len(ks)}), strides ({len(ss)}) and "
                         f"dilations ({len(ds)}) must have one entry per layer")
    if any(not isinstance(v, int) or v < 1 for v in ks + ss + ds):
        raise ValueError(f"stacked_receptive_field: sizes, strides and dilations must be positive ints, "
                         f"got {ks}, {ss}, {ds}")
    g = Geometry(1, 1, 0)
    for k, s, d in zip(ks, ss, ds):
        g = g.then(k, s, 0, d)
    return g.size


def empirical_receptive_field(model: nn.Module, input_shape: Sequence[int], layer: str,
                              unit: tuple[int, int] | None = None) -> tuple[Extent, Extent]:
    """Measures the input interval seen by one output unit of a layer as the support of a gradient.

    The model runs with positive weights (each kernel 1/fan_in), zero biases, BatchNorm as the
    identity, max and average pooling replaced by window sums of the same geometry and LRN by the
    identity, on an all-ones input: every path contributes a positive term, so the gradient of
    the unit (summed over channels) is non-zero exactly on its receptive field, clipped to the
    input. This compiles the model: meant for tests on small networks.

    Args:
      model: a flax.linen Module built from cnnjax.nn layers.
      input_shape: (H, W, C); large enough that the unit's field fits for an unclipped answer.
      layer: the layer path ('stage2_block1/conv2'); its first call is used.
      unit: the output unit (i, j); default the centre ((H_out - 1) // 2, (W_out - 1) // 2).

    Returns:
      ((top, bottom), (left, right)) input rows and columns with a non-zero gradient.
    """
    fn = "empirical_receptive_field"
    tracing.check_model(model, fn)
    shape = tracing.check_input_shape(input_shape, fn)
    _, abstract = jax.eval_shape(lambda x: tracing.init_with_output(model, x, False, fn), tracing.example_input(shape))

    def positive(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            return jnp.full(leaf.shape, 1.0 / max(1, tracing.size_of(leaf) // leaf.shape[-1]), leaf.dtype)
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(positive, abstract)
    captured: list[jax.Array] = []

    def on_layer(next_fun, args, kwargs, ctx):
        m = ctx.module
        if isinstance(m, (cnn.MaxPool, cnn.AvgPool)):
            y = _sum_pool(args[0], m)
        elif isinstance(m, cnn.LocalResponseNorm):
            y = args[0]
        else:
            y = next_fun(*args, **kwargs)
        if tracing.module_path(m) == layer and not captured:
            captured.append(y)
        return y

    def unit_value(x):
        with nn.intercept_methods(tracing.layer_interceptor(on_layer)):
            model.apply(variables, x, **tracing.call_kwargs(model, False, fn))
        if not captured:
            raise ValueError(f"{fn}: no layer called {layer!r}; see receptive_field(model, input_shape) for the paths")
        y = captured.pop()
        if y.ndim != 4:
            raise ValueError(f"{fn}: layer {layer!r} output {tuple(y.shape)} has no spatial axes")
        i, j = unit if unit is not None else ((y.shape[1] - 1) // 2, (y.shape[2] - 1) // 2)
        return jnp.sum(y[0, i, j, :])

    grad = jax.jit(jax.grad(unit_value))(jnp.ones((1, *shape), jnp.float32))
    support = jnp.abs(grad[0]).sum(-1) > 0
    rows, cols = jnp.nonzero(support.any(1))[0], jnp.nonzero(support.any(0))[0]
    if rows.size == 0:
        raise ValueError(f"{fn}: the gradient of layer {layer!r} is zero everywhere (a layer it passes through "
                         "has no positive-path rule, e.g. a max pool not made with cnnjax.nn.MaxPool)")
    return ((int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1])))


def _sum_pool(x: jax.Array, m: cnn.MaxPool | cnn.AvgPool) -> jax.Array:
    """Window sums with the pool's geometry: a positive stand-in for max and average pooling."""
    window, strides, pads = F._pool_geometry(x, m.window, m.strides, m.padding, m.ceil_mode, "pooling")
    # A NumPy init value keeps reduce_window differentiable under jit.
    return lax.reduce_window(x, np.array(0, x.dtype), lax.add, (1, *window, 1), (1, *strides, 1),
                             ((0, 0), *pads, (0, 0)))


def format_receptive_field(rows: Sequence[RFRow]) -> str:
    """A table: layer, type, output, receptive field, effective stride, effective padding."""
    def pair(v):
        return "" if v is None else (str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}")

    body = [(r.path, r.type, "x".join(map(str, r.output_shape)),
             pair(r.size) + (" (all)" if r.collapsed else "") + (" +global" if r.global_context else ""),
             pair(r.stride), pair(r.padding)) for r in rows]
    header = ("layer", "type", "output", "receptive field", "eff. stride", "eff. padding")
    widths = [max([len(header[i])] + [len(b[i]) for b in body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body]]
    return "\n".join(lines)
