"""Published weights into cnnjax models: torchvision and timm state_dicts, converted and checked.

    from cnnjax import models, weights
    variables = weights.load("resnet50", "resnet50-11ad3fa6.pth")     # or a .safetensors file
    logits = models.create("resnet50").apply(variables, images_nhwc, train=False)

`SOURCES` names, for every covered registry name, the model whose `state_dict()` layout it reads
('torchvision:resnet50', 'timm:dpn92'). Inputs are NHWC, normalised as the source expects
(`normalization(name)`: ImageNet's mean and std for torchvision's, Inception's and DPN's own
constants for timm's). Nothing here imports torch unless a `.pth` file is read;
torch, torchvision, timm and safetensors are the optional extra `cnnjax[torch]`.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from cnnjax._files import atomic_write
from cnnjax.weights._convert import (
    Layout,
    Rule,
    WeightsError,
    convert,
    strip_prefix,
    to_numpy,
    variable_shapes,
)

__all__ = [
    "SOURCES",
    "WeightsError",
    "load",
    "load_torch_state_dict",
    "normalization",
    "read_state_dict",
    "save",
]

_FAMILIES = ("resnet", "alexnet", "vgg", "googlenet", "densenet", "dpn", "inception_v4")
_FILL: dict[str, Any] = {}
_OVERRIDES: dict[str, Any] = {}  # names -> model options the weights need ({'aux_logits': True})
_RENAME: dict[str, Any] = {}  # legacy tensor names -> current ones (DenseNet's published files)
SOURCES: dict[str, str] = {}
for _family in _FAMILIES:
    _module = importlib.import_module(f"cnnjax.weights.{_family}")
    SOURCES.update(_module.SOURCES)
    _FILL.update(dict.fromkeys(_module.SOURCES, _module.fill))
    if hasattr(_module, "model_overrides"):
        _OVERRIDES.update(dict.fromkeys(_module.SOURCES, _module.model_overrides))
    if hasattr(_module, "rename_state_dict"):
        _RENAME.update(dict.fromkeys(_module.SOURCES, _module.rename_state_dict))
del _family, _module


def _model_overrides(name: str, names) -> dict[str, Any]:
    return _OVERRIDES[name](names) if name in _OVERRIDES else {}


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_EXTRA = "pip install 'cnnjax[torch]'"


def normalization(model_name: str) -> str:
    """The `normalize` mode (cnnjax.data.FIXED_NORMALIZATIONS) the model's source weights expect."""
    source = SOURCES[_spec(model_name).name]
    if source.startswith("timm:inception"):
        return "inception"
    if source.startswith("timm:dpn"):
        return "dpn"
    return "imagenet"


def _spec(model_name: str):
    from cnnjax import models

    spec = models.get_spec(model_name)  # ValueError with close names for an unknown model
    if spec.name not in SOURCES:
        raise ValueError(
            f"no published weights are mapped for model {spec.name!r}; covered: "
            f"{', '.join(sorted(SOURCES))}"
        )
    return spec


def _template(spec, **overrides) -> dict[str, tuple[int, ...]]:
    return _traced_template(spec.name, spec.input_shape, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=32)
def _traced_template(name: str, input_shape, overrides) -> dict[str, tuple[int, ...]]:
    from cnnjax import models

    return variable_shapes(models.create(name, **dict(overrides)), input_shape)


def _num_classes(state_dict: Mapping[str, np.ndarray], spec, **overrides) -> dict[str, int]:
    """{'num_classes': n} when the classifier of `state_dict` is not the registered width."""
    layout = Layout(_template(spec, **overrides))
    _FILL[spec.name](layout, spec.name)
    # Converters add the classifier last; its kernel's source is (out, in) or (out, in, 1, 1).
    last = next((r for r in reversed(layout.rules) if r.dst.endswith("/kernel")), None)
    if last is None or last.src not in state_dict:
        return {}
    n = int(state_dict[last.src].shape[0])
    return {} if n == spec.num_classes else {"num_classes": n}


def load_torch_state_dict(
    model_name: str, state_dict: Mapping[str, Any], num_classes: int | None = None
) -> dict[str, dict]:
    """cnnjax variables {'params', 'batch_stats'} of `model_name` from a source's `state_dict()`.

    Args:
      model_name: a registry name in SOURCES ('resnet50', 'googlenet_torchvision', 'dpn92').
      state_dict: tensor name -> NumPy array or torch tensor, named as the source's
        `state_dict()` names them (a DataParallel 'module.' prefix is removed).
      num_classes: classifier width; by default the state_dict's own (a fine-tuned head).

    Raises:
      WeightsError: listing every missing, unexpected or wrongly shaped tensor, with the shape
        expected in the source's layout. Nothing is returned half-converted.
    """
    spec = _spec(model_name)
    arrays = strip_prefix(to_numpy(state_dict))
    if spec.name in _RENAME:
        arrays = _RENAME[spec.name](arrays)
    overrides = _model_overrides(spec.name, arrays)
    overrides.update(
        {"num_classes": num_classes}
        if num_classes is not None
        else _num_classes(arrays, spec, **overrides)
    )
    layout = Layout(_template(spec, **overrides))
    _FILL[spec.name](layout, spec.name)
    return convert(layout, arrays, f"{spec.name} ({SOURCES[spec.name]})")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensor name -> array from a `.safetensors` file (no torch needed) or a torch file.

    A torch checkpoint that wraps its weights ({'state_dict': ...}, {'model': ...}) is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError(f"reading {path!r} needs the safetensors package: {_EXTRA}") from None
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise WeightsError(f"{path!r} is not a readable .safetensors file: {e}") from None
    if path.endswith(_TORCH_SUFFIXES):
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"reading the torch file {path!r} needs torch: {_EXTRA} (or give a "
                ".safetensors file, which needs no torch)"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
            raise WeightsError(f"{path!r} is not a readable torch checkpoint: {e}") from None
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
        return to_numpy(obj)
    raise ValueError(
        f"weights file {path!r}: expected .safetensors, {', '.join(_TORCH_SUFFIXES)} "
        "(a source's state_dict) or .npz (cnnjax variables from `cnnjax convert`)"
    )


def _check_variables(
    model_name: str, arrays: dict[str, np.ndarray], what: str, num_classes: int | None
) -> dict[str, dict]:
    from cnnjax import models

    spec = models.get_spec(model_name)
    overrides = _model_overrides(spec.name, arrays)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    template = _template(spec, **overrides)
    layout = Layout(template)
    layout.rules = [Rule(k, k) for k in template]
    hint = (
        ""
        if num_classes is not None
        else (
            f"\n(with the registered {spec.num_classes} classes: give num_classes for another "
            "classifier width)"
        )
    )
    return convert(layout, arrays, spec.name, what=what, hint=hint)


def _load_npz(model_name: str, path: str, num_classes: int | None) -> dict[str, dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, ...
        raise WeightsError(f"{path!r} is not a readable .npz file: {e}") from None
    return _check_variables(model_name, arrays, f"the variables in {path!r}", num_classes)


def _load_orbax(model_name: str, path: str, num_classes: int | None) -> dict[str, dict]:
    import orbax.checkpoint as ocp
    from flax import traverse_util

    try:
        with ocp.StandardCheckpointer() as ckpt:
            tree = ckpt.restore(os.path.abspath(path))
    except Exception as e:
        raise WeightsError(
            f"{path!r} is not a readable orbax checkpoint of variables: {str(e).splitlines()[0]}"
        ) from None
    arrays = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
    return _check_variables(model_name, arrays, f"the variables in {path!r}", num_classes)


def load(
    model_name: str, path: str | os.PathLike, num_classes: int | None = None
) -> dict[str, dict]:
    """cnnjax variables of `model_name` from a weights file.

    `path` is a source's state_dict (`.safetensors`, or `.pth`/`.pt`/`.bin` with torch installed)
    or cnnjax variables written by `save` / `cnnjax convert` (an `.npz` file or an orbax
    checkpoint directory; give `num_classes` if the classifier is not the registered width).
    """
    path = os.fspath(path)
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file {path!r} does not exist")
        return _load_npz(model_name, path, num_classes)
    if os.path.isdir(path):
        return _load_orbax(model_name, path, num_classes)
    _spec(model_name)  # an unmapped model fails before a large file is read
    return load_torch_state_dict(model_name, read_state_dict(path), num_classes)


def save(variables: Mapping[str, Any], path: str | os.PathLike) -> str:
    """Writes cnnjax variables to `path`, atomically: an `.npz` file (keys 'params/...') or, for
    any other name, an orbax checkpoint directory. An existing `path` is not overwritten."""
    from flax import traverse_util

    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"output {path!r} exists; remove it or choose another name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output {path!r}: its folder {folder!r} does not exist")
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    if not path.endswith(".npz"):
        import orbax.checkpoint as ocp

        # orbax writes into a temporary directory and renames it when complete.
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.abspath(path), traverse_util.unflatten_dict(arrays, sep="/"))
        return path
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path
