"""Every architecture of the lecture, one file per family, and the registry.

Importing this package imports every family module in it, each of which registers its named
variants: `create('resnet50', num_classes=10)`, `list_models('resnet*')`, `get_spec('vgg16')`.
"""

import importlib
import pkgutil

from cnnjax.models.registry import ModelSpec, create, get_spec, list_models, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["ModelSpec", "create", "get_spec", "list_models", "register"]
