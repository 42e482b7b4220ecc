"""The model registry: `create(name, **overrides)`, `list_models(pattern)`, `get_spec(name)`.

Each family file registers its named variants with `register(...)`, giving the default input
shape, number of classes and the source (paper table or reference implementation) of the
variant, and the published parameter count to test against.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from cnnjax import _checks as C


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of one named model.

    Attributes:
      name: registry name, lower case ('resnet50', 'cifar_plain56').
      builder: callable returning the linen module (usually a functools.partial of a generic class).
      input_shape: default (H, W, C) of one image.
      num_classes: default number of classes.
      source: where the architecture comes from (paper and table, or reference implementation).
      family: the family file's name ('resnet', 'vgg', ...).
      dataset: what the default configuration is for ('imagenet', 'cifar10', 'mnist', ...).
      reference_params: published parameter count for the default configuration, if any.
      params_rtol: relative tolerance on reference_params (0 for an exact count).
      params_note: which implementation convention an exact count assumes, or where it comes from.
    """

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    source: str
    family: str
    dataset: str = "imagenet"
    reference_params: int | None = None
    params_rtol: float = 0.0
    params_note: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, builder: Callable[..., nn.Module], **spec: Any) -> Callable[..., nn.Module]:
    """Registers `builder` under `name` (see ModelSpec for the keyword
    arguments); returns builder."""
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(
            f"model {name!r} is registered twice (by "
            f"{_REGISTRY[key].family} and {spec.get('family')})"
        )
    _REGISTRY[key] = ModelSpec(name=key, builder=builder, **spec)
    return builder


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(str(name).lower(), list(_REGISTRY), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown model {name!r}{hint} (list_models() gives all {len(_REGISTRY)} names)"
    )


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec of a registered model; ValueError naming the closest names otherwise."""
    try:
        return _REGISTRY[str(name).lower()]
    except KeyError:
        raise _unknown(name) from None


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style pattern ('resnet*')."""
    names = sorted(_REGISTRY)
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string such as 'resnet*' or None, got {pattern!r}")
    return names if pattern is None else [n for n in names if fnmatch.fnmatch(n, pattern.lower())]


def create(name: str, **overrides: Any) -> nn.Module:
    """Builds the named model; `overrides` replace fields of its module
    (num_classes, dtype, ...)."""
    spec = get_spec(name)
    kwargs = {"num_classes": spec.num_classes, **overrides}
    kwargs["num_classes"] = C.positive_int(
        kwargs["num_classes"], "num_classes", what=" (the classifier's outputs)"
    )
    try:
        return spec.builder(**kwargs)
    except TypeError:
        fields = _fields_of(spec.builder)
        bad = sorted(set(kwargs) - fields) if fields else []
        if bad:
            raise ValueError(
                f"model {spec.name!r} has no option(s) {bad}; its options are {sorted(fields)}"
            ) from None
        raise


def _fields_of(builder: Callable[..., Any]) -> set[str]:
    """Names a builder accepts (dataclass fields of the underlying module class)."""
    target = getattr(builder, "func", builder)
    while hasattr(target, "func"):
        target = target.func
    if dataclasses.is_dataclass(target):
        return {f.name for f in dataclasses.fields(target) if f.name not in ("parent", "name")}
    try:
        return set(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return set()
