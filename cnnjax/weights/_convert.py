"""The machinery every family's converter shares: a layout of rules, checked against the model.

A family converter writes, for one model, which source tensor fills which cnnjax variable
(`Layout.conv`, `.bn`, `.dense`, `.tensor`). `convert` then checks the whole state_dict against
the rules and the model's own variable tree (traced with `jax.eval_shape`, nothing computed):
every rule's source present, every source tensor used, every shape right, every variable of the
model filled. Problems are collected and raised together, so nothing half-converted is returned.

Layouts: PyTorch stores convolution kernels OIHW (O, I/groups, kh, kw) and dense weights (out, in);
cnnjax stores HWIO (kh, kw, I/groups, O) and (in, out). A dense layer that follows a flatten also
sees its inputs in another order: torch flattens NCHW feature maps as (C, H, W), cnnjax flattens
NHWC ones as (H, W, C), so that layer's rows are permuted (`Layout.dense(..., chw=(C, H, W))`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np


class WeightsError(ValueError):
    """A state_dict that does not fit the model: missing, unexpected or wrongly shaped tensors."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """Source tensor `src` fills cnnjax variable `dst` ('params/stem/conv/kernel') after `kind`.

    kind: 'conv' (OIHW -> HWIO), 'dense' ((out, in) -> (in, out)), 'dense_chw' (dense, and its
    input rows permuted from (C, H, W) to (H, W, C) order; `chw` gives the map's shape) or
    'copy' (the same array).
    """

    dst: str
    src: str
    kind: str = "copy"
    chw: tuple[int, int, int] | None = None

    def source_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The source's shape that gives a cnnjax variable of `shape`."""
        if self.kind == "conv":
            return (shape[3], shape[2], shape[0], shape[1])
        if self.kind in ("dense", "dense_chw"):
            return (shape[1], shape[0])
        return tuple(shape)

    def apply(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return np.transpose(a, (2, 3, 1, 0))
        if self.kind == "dense":
            return np.transpose(a)
        if self.kind == "dense_chw":
            c, h, w = self.chw
            out = a.shape[0]
            return np.transpose(a.reshape(out, c, h, w), (2, 3, 1, 0)).reshape(h * w * c, out)
        return a


class Layout:
    """The rules of one model, written module by module against the model's variable tree.

    `template` maps 'collection/path/name' to the shape of every variable the model has (from
    `variable_shapes`). The helpers look there for what a layer holds (a bias or not), so that a
    converter says which modules correspond and the layout fills in their variables.
    """

    def __init__(self, template: Mapping[str, tuple[int, ...]]):
        self.template = dict(template)
        self.rules: list[Rule] = []

    def tensor(self, dst: str, src: str, kind: str = "copy", chw=None) -> None:
        self.rules.append(Rule(dst, src, kind, None if chw is None else tuple(chw)))

    def conv(self, dst: str, src: str) -> None:
        """Conv module `dst` (under params) from torch Conv2d `src`, and its bias if it has one."""
        self.tensor(f"params/{dst}/kernel", f"{src}.weight", "conv")
        if f"params/{dst}/bias" in self.template:
            self.tensor(f"params/{dst}/bias", f"{src}.bias")

    def bn(self, dst: str, src: str) -> None:
        """BatchNorm `dst` from torch BatchNorm2d/1d `src`: affine and running statistics."""
        if f"params/{dst}/scale" in self.template:
            self.tensor(f"params/{dst}/scale", f"{src}.weight")
        if f"params/{dst}/bias" in self.template:
            self.tensor(f"params/{dst}/bias", f"{src}.bias")
        self.tensor(f"batch_stats/{dst}/mean", f"{src}.running_mean")
        self.tensor(f"batch_stats/{dst}/var", f"{src}.running_var")

    def dense(self, dst: str, src: str, chw: tuple[int, int, int] | None = None) -> None:
        """Dense `dst` from torch Linear `src`; `chw` when it follows a flatten of (C, H, W)."""
        self.tensor(
            f"params/{dst}/kernel", f"{src}.weight", "dense" if chw is None else "dense_chw", chw
        )
        if f"params/{dst}/bias" in self.template:
            self.tensor(f"params/{dst}/bias", f"{src}.bias")


def flat_chw(layout: Layout, dense: str, conv: str) -> tuple[int, int, int]:
    """(C, H, W) of the square map that Dense `dense` reads flattened, C from Conv `conv`."""
    c = layout.template[f"params/{conv}/kernel"][-1]
    n = layout.template[f"params/{dense}/kernel"][0]
    side = math.isqrt(n // c)
    if side * side * c != n:
        raise AssertionError(f"converter bug: {dense} reads {n} values, not a square map of {c}")
    return c, side, side


def variable_shapes(model: Any, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """'collection/path/name' -> shape of every variable of `model`, traced, nothing computed."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False)
    )
    flat = traverse_util.flatten_dict(dict(shapes), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state_dict's values as float32 NumPy arrays (torch tensors too), counters dropped.

    `num_batches_tracked` counts BatchNorm updates; it only matters to a BatchNorm with
    momentum=None, which none of the sources uses.
    """
    if not isinstance(state_dict, Mapping):
        raise WeightsError(
            f"state_dict must be a mapping of tensor names to arrays, got "
            f"{type(state_dict).__name__}"
        )
    out = {}
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise WeightsError(f"state_dict keys must be tensor names (str), got {name!r}")
        if name.endswith("num_batches_tracked"):
            continue
        if hasattr(value, "detach"):  # a torch tensor; no torch import needed to recognise it
            value = value.detach().cpu().float().numpy()
        a = np.asarray(value)
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise WeightsError(f"tensor {name!r} holds {a.dtype}, not numbers")
        out[name] = a.astype(np.float32, copy=False)
    return out


def _list(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str = "module.") -> dict:
    """The names without a prefix that all of them carry (nn.DataParallel's 'module.')."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def convert(
    layout: Layout,
    state_dict: Mapping[str, np.ndarray],
    source: str,
    what: str = "the state_dict",
    hint: str = "",
) -> dict[str, dict]:
    """Applies `layout` to `state_dict`: {'params', 'batch_stats'} of NumPy arrays, or
    WeightsError."""
    from flax import traverse_util

    arrays = dict(state_dict)
    problems: list[str] = []
    flat: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for rule in layout.rules:
        if rule.dst not in layout.template:
            raise AssertionError(f"converter bug: the model has no variable {rule.dst!r}")
        if rule.dst in flat:
            raise AssertionError(f"converter bug: {rule.dst!r} is filled twice")
        want = rule.source_shape(layout.template[rule.dst])
        target = "" if rule.src == rule.dst else f" for {rule.dst}"
        if rule.src not in arrays:
            problems.append(f"missing tensor {rule.src!r} (shape {want}{target})")
            continue
        used.add(rule.src)
        a = arrays[rule.src]
        if tuple(a.shape) != want:
            problems.append(
                f"tensor {rule.src!r} has shape {tuple(a.shape)}, expected {want}{target}"
            )
            continue
        flat[rule.dst] = np.ascontiguousarray(rule.apply(a))
    extra = set(arrays) - used
    if extra:
        problems.append(f"unexpected tensor(s) {_list(extra)} (not part of the model)")
    if problems:
        shown = "\n  ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise WeightsError(f"{what} does not fit {source}:\n  {shown}{more}{hint}")
    unfilled = set(layout.template) - set(flat)
    if unfilled:
        raise AssertionError(f"converter bug: variables left unfilled: {_list(unfilled)}")
    variables = traverse_util.unflatten_dict(flat, sep="/")
    return {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}


Converter = Callable[[Layout, str], None]
