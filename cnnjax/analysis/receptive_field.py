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

The rules live in `cnnjax.analysis.rf_interpreter`. `empirical_receptive_field` measures the same
intervals as the support of a gradient, for tests.
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

from cnnjax import functional as F
from cnnjax import nn as cnn
from cnnjax.analysis import tracing
from cnnjax.analysis.rf_interpreter import Extent, Geometry, Spatial, geometry_of, interpret


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
        """((top, bottom), (left, right)) input coordinates seen by output
        unit (i, j), unclipped."""
        if self.size is None or self.stride is None or self.padding is None:
            raise ValueError(
                f"interval: layer {self.path!r} has no spatial "
                f"receptive field (collapsed={self.collapsed})"
            )
        return tuple(
            (u * s - p, u * s - p + r - 1)  # type: ignore[return-value]
            for u, s, p, r in zip(unit, self.stride, self.padding, self.size)
        )


def _row(path: str, kind: str, shape: tuple[int, ...], out_state: Any, in_state: Any) -> RFRow:
    size, stride, padding, collapsed, context = geometry_of(out_state)
    in_size, in_stride, in_padding, _, _ = geometry_of(in_state)
    if not isinstance(in_state, Spatial):
        in_size = in_stride = in_padding = None
    return RFRow(
        path, kind, shape, size, stride, padding, collapsed, context, in_size, in_stride, in_padding
    )


def receptive_field(
    model: nn.Module, input_shape: Sequence[int], *, train: bool = False
) -> list[RFRow]:
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
        calls.append(
            (tracing.module_path(ctx.module), type(ctx.module).__name__, tuple(y.shape[1:]))
        )
        return tracing.tag(y, 2 * i + 1)

    def forward(x):
        with nn.intercept_methods(tracing.layer_interceptor(on_layer)):
            return tracing.init_with_output(model, x, train, fn)[0]

    # The interpreter reads XLA's primitives; the native kernels would be opaque custom calls.
    with F.conv2d_backend("xla"), F.batch_norm_backend("xla"):
        closed = jax.make_jaxpr(forward)(tracing.example_input(shape))
    one = Geometry(1, 1, 0)
    tags: dict[int, Any] = {}
    interpret(closed.jaxpr, [Spatial((1, 2), (one, one))], tags)
    return [
        _row(path, kind, out_shape, tags.get(2 * i + 1), tags.get(2 * i))
        for i, (path, kind, out_shape) in enumerate(calls)
    ]


def stacked_receptive_field(
    kernel_sizes: Sequence[int],
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
) -> int:
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
        raise ValueError(
            f"stacked_receptive_field: kernel_sizes ({len(ks)}), strides ({len(ss)}) and "
            f"dilations ({len(ds)}) must have one entry per layer"
        )
    if any(not isinstance(v, int) or v < 1 for v in ks + ss + ds):
        raise ValueError(
            f"stacked_receptive_field: sizes, strides and dilations must be positive ints, "
            f"got {ks}, {ss}, {ds}"
        )
    g = Geometry(1, 1, 0)
    for k, s, d in zip(ks, ss, ds):
        g = g.then(k, s, 0, d)
    return g.size


def empirical_receptive_field(
    model: nn.Module,
    input_shape: Sequence[int],
    layers: str | Sequence[str],
    unit: tuple[int, int] | None = None,
) -> Any:
    """Measures the input interval seen by one output unit of a layer as the support of a gradient.

    The model runs with positive weights (each kernel 1/fan_in), zero biases, BatchNorm as the
    identity, max and average pooling replaced by window sums of the same geometry and LRN by the
    identity, on an all-ones input: every path contributes a positive term, so the gradient of
    the unit (summed over channels) is non-zero exactly on its receptive field, clipped to the
    input. This compiles the model (once for all `layers`): meant for tests on small networks.

    Args:
      model: a flax.linen Module built from cnnjax.nn layers.
      input_shape: (H, W, C); large enough that the unit's field fits for an unclipped answer.
      layers: a layer path ('stage2_block1/conv2'; its first call is used) or a list of them.
      unit: the output unit (i, j); default the centre ((H_out - 1) // 2, (W_out - 1) // 2).

    Returns:
      ((top, bottom), (left, right)) input rows and columns with a non-zero gradient; a list of
      those when `layers` is a list.
    """
    fn = "empirical_receptive_field"
    tracing.check_model(model, fn)
    shape = tracing.check_input_shape(input_shape, fn)
    wanted = [layers] if isinstance(layers, str) else list(layers)
    _, abstract = jax.eval_shape(
        lambda x: tracing.init_with_output(model, x, False, fn), tracing.example_input(shape)
    )

    def positive(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            return jnp.full(
                leaf.shape, 1.0 / max(1, tracing.size_of(leaf) // leaf.shape[-1]), leaf.dtype
            )
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(positive, abstract)

    def unit_values(x):
        captured: dict[str, jax.Array] = {}

        def on_layer(next_fun, args, kwargs, ctx):
            m = ctx.module
            if isinstance(m, (cnn.MaxPool, cnn.AvgPool)):
                y = _sum_pool(args[0], m)
            elif isinstance(m, cnn.LocalResponseNorm):
                y = args[0]
            else:
                y = next_fun(*args, **kwargs)
            captured.setdefault(tracing.module_path(m), y)
            return y

        with nn.intercept_methods(tracing.layer_interceptor(on_layer)):
            model.apply(variables, x, **tracing.call_kwargs(model, False, fn))
        values = []
        for layer in wanted:
            y = captured.get(layer)
            if y is None:
                raise ValueError(
                    f"{fn}: no layer called {layer!r}; "
                    "receptive_field(model, input_shape) lists the paths"
                )
            if y.ndim != 4:
                raise ValueError(
                    f"{fn}: layer {layer!r} output {tuple(y.shape)} has no spatial axes"
                )
            i, j = unit if unit is not None else ((y.shape[1] - 1) // 2, (y.shape[2] - 1) // 2)
            values.append(jnp.sum(y[0, i, j, :]))
        return jnp.stack(values)

    jacobian = np.asarray(jax.jit(jax.jacrev(unit_values))(jnp.ones((1, *shape), jnp.float32)))
    results = []
    for layer, grad in zip(wanted, jacobian):
        support = np.abs(grad[0]).sum(-1) > 0
        rows, cols = np.nonzero(support.any(1))[0], np.nonzero(support.any(0))[0]
        if rows.size == 0:
            raise ValueError(
                f"{fn}: the gradient of layer {layer!r} is zero everywhere (a layer it passes "
                "through has no positive stand-in, e.g. a max pool not made with cnnjax.nn.MaxPool)"
            )
        results.append(((int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))))
    return results[0] if isinstance(layers, str) else results


def _sum_pool(x: jax.Array, m: cnn.MaxPool | cnn.AvgPool) -> jax.Array:
    """Window sums with the pool's geometry: a positive stand-in for max and average pooling."""
    window, strides, pads = F._pool_geometry(
        x, m.window, m.strides, m.padding, m.ceil_mode, "pooling"
    )
    # A NumPy init value keeps reduce_window differentiable under jit.
    return lax.reduce_window(
        x, np.array(0, x.dtype), lax.add, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
    )


def format_receptive_field(rows: Sequence[RFRow]) -> str:
    """A table: layer, type, output, receptive field, effective stride, effective padding."""

    def pair(v):
        return "" if v is None else (str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}")

    body = [
        (
            r.path,
            r.type,
            "x".join(map(str, r.output_shape)),
            pair(r.size)
            + (" (all)" if r.collapsed else "")
            + (" +global" if r.global_context else ""),
            pair(r.stride),
            pair(r.padding),
        )
        for r in rows
    ]
    header = ("layer", "type", "output", "receptive field", "eff. stride", "eff. padding")
    widths = [max([len(header[i])] + [len(b[i]) for b in body]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body]
    ]
    return "\n".join(lines)
