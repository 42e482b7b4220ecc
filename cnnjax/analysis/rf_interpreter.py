"""The (r, S, P) interpretation of a jaxpr behind `receptive_field` (see that module's docstring).

Every variable of the traced forward pass gets a state: None (independent of the image: parameters,
constants), a spatial state (which axes are the input's H and W, and (r, S, P) along each), or a
collapsed state (no spatial axes left; the input region it depends on). Each primitive has a rule;
a primitive without one on a spatial value raises NotImplementedError rather than guess.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jax.extend import core as jex_core

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
        return Geometry(
            self.size + (span - 1) * self.stride,
            self.stride * stride,
            self.padding + pad_lo * self.stride,
        )

    def extent(self, n: int) -> Extent:
        """The input interval seen by all of units 0..n-1."""
        return (-self.padding, (n - 1) * self.stride - self.padding + self.size - 1)


def _hull_geometry(gs: Sequence[Geometry], what: str) -> Geometry:
    strides = {g.stride for g in gs}
    if len(strides) != 1:
        raise NotImplementedError(
            f"receptive_field: {what} merges values of "
            f"different effective strides {sorted(strides)}"
        )
    pad = max(g.padding for g in gs)
    return Geometry(max(g.size - g.padding for g in gs) + pad, gs[0].stride, pad)


def _hull_extents(es: Sequence[Extent]) -> Extent:
    return (min(e[0] for e in es), max(e[1] for e in es))


@dataclasses.dataclass(frozen=True)
class Spatial:
    axes: tuple[int, int]  # positions of the input's H and W axes in this value
    geo: tuple[Geometry, Geometry]
    context: tuple[Extent, Extent] | None = None  # region every unit also depends on (SE gating)


@dataclasses.dataclass(frozen=True)
class Collapsed:
    extent: tuple[Extent, Extent]


def _collapse(state: Any, shape: Sequence[int]) -> Any:
    if not isinstance(state, Spatial):
        return state
    ext = tuple(g.extent(shape[a]) for g, a in zip(state.geo, state.axes))
    if state.context is not None:
        ext = tuple(_hull_extents([e, c]) for e, c in zip(ext, state.context))
    return Collapsed(ext)  # type: ignore[arg-type]


def _merge(states: Sequence[Any], what: str) -> Any:
    states = [s for s in states if s is not None]
    if not states:
        return None
    spatial = [s for s in states if isinstance(s, Spatial)]
    contexts = [s.extent for s in states if isinstance(s, Collapsed)] + [
        s.context for s in spatial if s.context
    ]
    context = tuple(_hull_extents([c[i] for c in contexts]) for i in range(2)) if contexts else None
    if not spatial:
        return Collapsed(context)  # type: ignore[arg-type]
    if len({s.axes for s in spatial}) != 1:
        raise NotImplementedError(
            f"receptive_field: {what} combines values whose spatial axes differ"
        )
    geo = tuple(_hull_geometry([s.geo[i] for s in spatial], what) for i in range(2))
    return Spatial(spatial[0].axes, geo, context)  # type: ignore[arg-type]


def _renumber(state: Spatial, mapping) -> Spatial:
    return dataclasses.replace(state, axes=tuple(mapping(a) for a in state.axes))


# --------------------------------------------------------------------------- rules

_CALLS = {
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "remat",
    "checkpoint",
    "named_call",
}
_REDUCTIONS = {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "argmax",
    "argmin",
}
# Primitives acting position by position (a same-shape op is not enough: rev, cumsum, sort are not).
ELEMENTWISE = frozenset(
    """
    abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow
    is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real
    reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh
    xor
""".split()
)
_WINDOWS = {"reduce_window", "reduce_window_sum", "reduce_window_max", "reduce_window_min"}


def _windowed(
    state: Spatial, name: str, kernel, stride, pad_lo, dilation, out_axes=None
) -> Spatial:
    geo = tuple(
        g.then(kernel(a), stride(a), pad_lo(a), dilation(a)) for g, a in zip(state.geo, state.axes)
    )
    axes = state.axes if out_axes is None else tuple(out_axes(a) for a in state.axes)
    return Spatial(axes, geo, state.context)  # type: ignore[arg-type]


def _conv(eqn, lhs: Spatial, rhs: Any, shape) -> Any:
    if rhs is not None:
        raise NotImplementedError(
            "receptive_field: a convolution whose kernel depends on the input"
        )
    p, dn = eqn.params, eqn.params["dimension_numbers"]
    lhs_sp, rhs_sp, out_sp = dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:]
    if not set(lhs.axes) <= set(lhs_sp):
        return _collapse(
            lhs, shape
        )  # spatial axes used as features: every output mixes all positions
    if any(d != 1 for d in p["lhs_dilation"]):
        raise NotImplementedError(
            "receptive_field: transposed (input-dilated) convolutions are not supported"
        )
    k_shape = eqn.invars[1].aval.shape
    i = lhs_sp.index
    return _windowed(
        lhs,
        "conv",
        lambda a: k_shape[rhs_sp[i(a)]],
        lambda a: p["window_strides"][i(a)],
        lambda a: p["padding"][i(a)][0],
        lambda a: p["rhs_dilation"][i(a)],
        lambda a: out_sp[i(a)],
    )


def _spatial_rule(eqn, states: list[Any]) -> Any:
    """The output state of a single-output primitive with at least one spatial input."""
    name, p = eqn.primitive.name, eqn.params
    avals = [getattr(v, "aval", None) for v in eqn.invars]
    out_shape = eqn.outvars[0].aval.shape
    x, shape = states[0], getattr(avals[0], "shape", None)
    if name == "conv_general_dilated":
        return _conv(eqn, x, states[1], shape) if isinstance(x, Spatial) else _merge(states, name)
    if name in _WINDOWS:
        n = len(states) // 2 if name == "reduce_window" else 1
        if any(
            p["base_dilation"][a] != 1 for s in states[:n] if isinstance(s, Spatial) for a in s.axes
        ):
            raise NotImplementedError("receptive_field: base-dilated windows are not supported")
        outs = [
            _windowed(
                s,
                name,
                lambda a: p["window_dimensions"][a],
                lambda a: p["window_strides"][a],
                lambda a: p["padding"][a][0],
                lambda a: p["window_dilation"][a],
            )
            if isinstance(s, Spatial)
            else s
            for s in states[:n]
        ]
        return _merge(outs, name)
    if name == "pad":
        if any(p["padding_config"][a][2] for a in x.axes):
            raise NotImplementedError(
                "receptive_field: interior padding (upsampling) is not supported"
            )
        return _windowed(
            x, name, lambda a: 1, lambda a: 1, lambda a: int(p["padding_config"][a][0]), lambda a: 1
        )
    if name == "slice":
        strides = p["strides"] or (1,) * len(shape)
        return _windowed(
            x,
            name,
            lambda a: 1,
            lambda a: strides[a],
            lambda a: -p["start_indices"][a],
            lambda a: 1,
        )
    if name == "concatenate":
        if any(isinstance(s, Spatial) and p["dimension"] in s.axes for s in states):
            raise NotImplementedError(
                "receptive_field: concatenation along a spatial axis is not supported"
            )
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
    if name in ELEMENTWISE and all(
        s is None or tuple(av.shape) == tuple(out_shape) for s, av in zip(states, avals)
    ):
        return _merge(states, name)
    raise NotImplementedError(
        f"receptive_field: no rule for primitive {name!r} on a spatial value "
        f"(input shapes {[tuple(a.shape) for a in avals if a is not None]})"
    )


def _dot_general(eqn, states, avals) -> Any:
    (contract, batch) = eqn.params["dimension_numbers"]
    nb = len(batch[0])
    free = [
        [d for d in range(len(avals[i].shape)) if d not in contract[i] and d not in batch[i]]
        for i in range(2)
    ]
    outs = []
    for i, s in enumerate(states[:2]):
        if not isinstance(s, Spatial):
            outs.append(s)
        elif set(s.axes) & set(contract[i]):
            outs.append(_collapse(s, avals[i].shape))
        else:
            offset = nb + (len(free[0]) if i else 0)
            outs.append(
                _renumber(
                    s,
                    lambda a, i=i, off=offset: (
                        list(batch[i]).index(a) if a in batch[i] else off + free[i].index(a)
                    ),
                )
            )
    return _merge(outs, "dot_general")


def _scan(eqn, states: list[Any], tags: dict[int, Any]) -> list[Any]:
    """Unrolls a lax.scan (e.g. flax nn.scan over blocks): its layers' tags
    keep the last iteration."""
    p = eqn.params
    nc, nk = tracing.scan_counts(eqn)
    consts, carry, xs = states[:nc], states[nc : nc + nk], states[nc + nk :]
    if any(isinstance(s, Spatial) and 0 in s.axes for s in xs):
        raise NotImplementedError("receptive_field: a scan over a spatial axis is not supported")
    xs = [_renumber(s, lambda a: a - 1) if isinstance(s, Spatial) else s for s in xs]
    ys: list[Any] = []
    for _ in range(p["length"]):
        outs = interpret(tracing.inner_jaxpr(p["jaxpr"]), [*consts, *carry, *xs], tags)
        carry, new = (
            outs[:nk],
            [_renumber(s, lambda a: a + 1) if isinstance(s, Spatial) else s for s in outs[nk:]],
        )
        ys = new if not ys else [_merge([a, b], "scan") for a, b in zip(ys, new)]
    return [*carry, *ys] if p["length"] else [*carry, *([None] * (len(eqn.outvars) - nk))]


def interpret(jaxpr, in_states: Sequence[Any], tags: dict[int, Any]) -> list[Any]:
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
        elif all(s is None or isinstance(s, Collapsed) for s in states):
            outs = [_merge(states, name)] * len(eqn.outvars)
        elif name == "scan":
            outs = _scan(eqn, states, tags)
        elif name == "cond":
            branches = [
                interpret(tracing.inner_jaxpr(b), states[1:], tags) for b in eqn.params["branches"]
            ]
            outs = [_merge(list(o), name) for o in zip(*branches)]
        elif name in _CALLS:
            subs = [j for j in tracing.sub_jaxprs(eqn) if len(j.invars) == len(states)]
            if not subs:
                raise NotImplementedError(f"receptive_field: cannot follow call primitive {name!r}")
            outs = interpret(subs[0], states, tags)
        elif len(eqn.outvars) == 1:
            outs = [_spatial_rule(eqn, states)]
        else:
            raise NotImplementedError(
                f"receptive_field: no rule for primitive {name!r} on a spatial value"
            )
        for v, s in zip(eqn.outvars, outs):
            env[v] = s
    return [read(v) for v in jaxpr.outvars]


def geometry_of(state: Any) -> tuple[Any, Any, Any, bool, bool]:
    """(size, stride, padding, collapsed, global_context) of a state."""
    if isinstance(state, Spatial):
        g = state.geo
        return (
            (g[0].size, g[1].size),
            (g[0].stride, g[1].stride),
            (g[0].padding, g[1].padding),
            False,
            state.context is not None,
        )
    if isinstance(state, Collapsed):
        e = state.extent
        return (
            (e[0][1] - e[0][0] + 1, e[1][1] - e[1][0] + 1),
            None,
            (-e[0][0], -e[1][0]),
            True,
            False,
        )
    return None, None, None, False, False
