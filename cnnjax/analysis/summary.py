"""The lecture's layer table: output size, weight size, parameters and multiply-adds per layer.

`summary(model, (224, 224, 3))` traces `model.init` under `jax.eval_shape` (nothing is compiled,
ResNet-152 takes a couple of seconds) and records every layer call (cnnjax.nn modules) through
`flax.linen.intercept_methods`.

Conventions: multiply-adds (MACs) are those of the Conv and Dense kernels, per image:
conv H_out*W_out*KH*KW*(C_in/groups)*C_out, dense in*out (times the positions it is applied
at). Bias adds, BatchNorm, pooling, LRN and activations are not counted (torchvision's and
fvcore's convention, and the one of He et al. 2016, Table 1). FLOPs = 2 x MACs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from cnnjax.analysis import tracing

MACS_NOTE = (
    "MACs: multiply-adds of Conv and Dense kernels per image; bias adds, BatchNorm, pooling, "
    "LRN and activations are not counted. FLOPs = 2 x MACs."
)


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One layer call of the summary.

    Attributes:
      path: module path, 'stage2_block1/conv1'.
      type: module class name ('Conv', 'BatchNorm', ...); '<Class> (own params)' for parameters
        a non-layer module creates itself.
      input_shape: shape of one example's input (no batch axis).
      output_shape: shape of one example's output (no batch axis).
      weight_shape: kernel shape (conv HWIO, dense (in, out)) or BatchNorm scale
          shape; None if none.
      bias_shape: bias (or BatchNorm shift) shape; None if none.
      params: parameters of this layer ('params' collection); 0 on repeated calls of a shared layer.
      macs: multiply-adds per image of this call (Conv and Dense only).
      shared: True when this is a repeated call of a layer listed before.
      repeats: iterations of an nn.scan loop this row stands for (params and MACs include all).
    """

    path: str
    type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None
    bias_shape: tuple[int, ...] | None
    params: int
    macs: int
    shared: bool = False
    repeats: int = 1

    @property
    def output_size(self) -> str:
        """'28x28x20' (the lecture's H x W x C)."""
        return _dims(self.output_shape)

    @property
    def weight_size(self) -> str:
        """'5x5x1x20' for a conv kernel, '2450x500' for a dense one, '' if none."""
        return "" if self.weight_shape is None else _dims(self.weight_shape)


@dataclasses.dataclass(frozen=True)
class Summary:
    """The table of a model: rows in call order and the totals.

    Attributes:
      model: the model's class name.
      input_shape: one example's shape (H, W, C).
      rows: LayerRow per layer call.
      total_params: size of the 'params' collection (equals the sum of the rows' params).
      total_macs: multiply-adds per image (Conv and Dense).
      total_state: size of the other collections (BatchNorm running statistics: 'batch_stats').
      output_shape: the model output's shape for one example (a tuple of shapes
          for several outputs).
    """

    model: str
    input_shape: tuple[int, ...]
    rows: list[LayerRow]
    total_params: int
    total_macs: int
    total_state: int
    output_shape: Any

    @property
    def total_flops(self) -> int:
        """2 x total_macs."""
        return 2 * self.total_macs

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "output_shape": self.output_shape,
            "total_params": self.total_params,
            "total_macs": self.total_macs,
            "total_flops": self.total_flops,
            "total_state": self.total_state,
            "macs_convention": MACS_NOTE,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The summary as JSON (rows as objects, shapes as lists)."""
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        return format_summary(self)


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _count_shapes(tree: Any) -> int:
    """Scalars in a tree whose leaves are shape tuples."""
    return sum(math.prod(s) for s in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, tuple)))


def _shape_of(tree: Any) -> Any:
    shapes = [tuple(int(d) for d in leaf.shape[1:]) for leaf in jax.tree_util.tree_leaves(tree)]
    return shapes[0] if len(shapes) == 1 else shapes


def _trace(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, train: bool, fn: str):
    """Runs init abstractly; returns (output, variables, calls, module types by path)."""
    calls: list[tuple[str, str, Any, Any, tuple | None]] = []
    types: dict[str, str] = {}

    def on_layer(next_fun, args, kwargs, ctx):
        y = next_fun(*args, **kwargs)
        if not tracing.is_discarded_trace(args[0]):
            # The variables as this call sees them: one slice of the stacked ones inside nn.scan.
            calls.append(
                (
                    tracing.module_path(ctx.module),
                    type(ctx.module).__name__,
                    args[0],
                    y,
                    dict(ctx.module.variables.get("params", {})),
                )
            )
        return y

    layer_icpt = tracing.layer_interceptor(on_layer)

    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__":
            types.setdefault(tracing.module_path(ctx.module), type(ctx.module).__name__)
        return layer_icpt(next_fun, args, kwargs, ctx)

    def init(x):
        with nn.intercept_methods(interceptor):
            return tracing.init_with_output(model, x, train, fn)

    # Shapes only: the calls list holds tracers, of which only .shape is read.
    out, variables = jax.eval_shape(init, tracing.example_input(input_shape, batch_size))
    calls = [
        (p, t, tuple(x.shape[1:]), tuple(y.shape[1:]), jax.tree.map(lambda a: a.shape, v))
        for p, t, x, y, v in calls
    ]
    return out, variables, calls, types


def summary(
    model: nn.Module | str,
    input_shape: Sequence[int] | None = None,
    *,
    batch_size: int = 1,
    train: bool = False,
) -> Summary:
    """The per-layer table of a model (see the module docstring for the MAC convention).

    Args:
      model: a flax.linen Module called as model(x, train=...), or a registered model name.
      input_shape: one example's shape (H, W, C); optional for a registered name (its default).
      batch_size: batch of the traced input (MACs are reported per image whatever it is).
      train: trace in training mode (e.g. to include auxiliary classifiers).

    Returns:
      A Summary; str() of it is the table.
    """
    fn = "summary"
    if isinstance(model, str):
        from cnnjax import (
            models,
        )  # analysis sits above models; imported lazily to keep import light

        spec = models.get_spec(model)
        model, input_shape = (
            models.create(model),
            spec.input_shape if input_shape is None else input_shape,
        )
    tracing.check_model(model, fn)
    if input_shape is None:
        raise ValueError(f"{fn}: input_shape is required for a model object, e.g. (224, 224, 3)")
    shape = tracing.check_input_shape(input_shape, fn)
    tracing.check_batch_size(batch_size, fn)
    out, variables, calls, types = _trace(model, shape, batch_size, train, fn)
    params = variables.get("params", {})

    rows, seen = [], set()
    for path, kind, x_shape, y_shape, seen_params in calls:
        stored = tracing.subtree(params, path) or {}
        shared = path in seen
        seen.add(path)
        # Inside nn.scan a call sees one slice of parameters stacked over `repeats` iterations.
        per_call = _count_shapes(seen_params)
        repeats = (
            _count_shapes(jax.tree.map(lambda a: a.shape, stored)) // per_call if per_call else 1
        )
        kernel, bias = seen_params.get("kernel"), seen_params.get("bias")
        macs = 0
        if kernel is not None and len(kernel) in (2, 4):
            # Kernel product count times the positions it is applied at (Hout*Wout for a conv).
            macs = math.prod(kernel) * math.prod(y_shape[:-1]) * repeats
        weight = kernel if kernel is not None else seen_params.get("scale")
        rows.append(
            LayerRow(
                path,
                kind,
                x_shape,
                y_shape,
                weight,
                bias,
                0 if shared else tracing.size_of(stored),
                macs,
                shared,
                repeats,
            )
        )

    rows.extend(_unlisted_params(params, seen, types))
    state = {k: v for k, v in variables.items() if k != "params"}
    return Summary(
        type(model).__name__,
        shape,
        rows,
        tracing.size_of(params),
        sum(r.macs for r in rows),
        tracing.size_of(state),
        _shape_of(out),
    )


def _unlisted_params(
    params: Mapping[str, Any], listed: set[str], types: Mapping[str, str]
) -> list[LayerRow]:
    """Rows for parameters that no layer owns (a module calling self.param itself)."""
    owners: dict[str, int] = {}
    for name, leaf in tracing.leaves_with_paths(params):
        parts = name.split("/")
        if any("/".join(parts[:i]) in listed for i in range(len(parts))):
            continue
        owner = "/".join(parts[:-1])
        owners[owner] = owners.get(owner, 0) + tracing.size_of(leaf)
    return [
        LayerRow(owner, f"{types.get(owner, 'Module')} (own params)", (), (), None, None, n, 0)
        for owner, n in owners.items()
    ]


def count_params(variables_or_params: Mapping[str, Any]) -> int:
    """Number of parameters: of the 'params' collection of a variables dict, or of a params tree.

    Leaves may be arrays or jax.ShapeDtypeStruct (from jax.eval_shape).
    """
    if not isinstance(variables_or_params, Mapping):
        raise ValueError(
            "count_params: expected a variables dict ({'params': ..., 'batch_stats': ...}) "
            f"or a params tree, got {type(variables_or_params).__name__}"
        )
    tree = variables_or_params.get("params", variables_or_params)
    return tracing.size_of(tree)


def parameter_count(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Parameters of `model` for inputs of `input_shape` (H, W, C), via
    jax.eval_shape (no compile)."""
    fn = "parameter_count"
    tracing.check_model(model, fn)
    shape = tracing.check_input_shape(input_shape, fn)
    _, variables = jax.eval_shape(
        lambda x: tracing.init_with_output(model, x, False, fn), tracing.example_input(shape)
    )
    return count_params(variables)


def _num(n: int) -> str:
    return f"{n:,}"


def _giga(n: int) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e9 else f"{n / 1e6:.3f} M"


def format_summary(s: Summary) -> str:
    """The lecture-style table: layer, type, output size, weights, bias, params,
    MACs; totals and notes."""
    header = ("layer", "type", "output", "weights", "bias", "params", "MACs")
    body = [
        (
            r.path or "(root)",
            r.type
            + (" (shared)" if r.shared else "")
            + (f" x{r.repeats}" if r.repeats > 1 else ""),
            r.output_size,
            r.weight_size,
            "" if r.bias_shape is None else _dims(r.bias_shape),
            _num(r.params) if r.params else "",
            _num(r.macs) if r.macs else "",
        )
        for r in s.rows
    ]
    widths = [
        max(len(header[i]), *(len(row[i]) for row in body)) if body else len(header[i])
        for i in range(len(header))
    ]
    right = {5, 6}

    def line(cells):
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "-" * len(line(["x" * w for w in widths]))
    out = [
        f"{s.model}, input {_dims(s.input_shape)}",
        rule,
        line(header),
        rule,
        *(line(b) for b in body),
        rule,
    ]
    out.append(
        f"total params: {_num(s.total_params)}    non-trainable state (batch_stats): "
        f"{_num(s.total_state)}"
    )
    out.append(
        f"total MACs per image: {_num(s.total_macs)} ({_giga(s.total_macs)})    "
        f"FLOPs = 2 x MACs: {_num(s.total_flops)} ({_giga(s.total_flops)})"
    )
    out.append(MACS_NOTE)
    return "\n".join(out)
