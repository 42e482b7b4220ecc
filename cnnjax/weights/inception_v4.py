"""timm's Inception-v4 and Inception-ResNet-v2 state_dicts (timm/models/inception_v4.py and
inception_resnet_v2.py, Cadene's port of the TF-slim checkpoints).

Every conv-BN-ReLU is timm's ConvNormAct (`.conv`, `.bn`), cnnjax's ConvBN (`/conv`, `/bn`).
cnnjax names layer j of branch i `branch{i}_{j}`; timm names it `branch{i}.{j}` in a Sequential
branch, `branch{i}` when the branch is a single conv, and `conv` for the lone conv of Mixed-3a
and Mixed-5a. Inception-C (and only it) names its layers flat: `branch1_0`, its split 1x3 / 3x1
pair `branch1_1a` / `branch1_1b` (cnnjax's fork sub-branches `branch1_1a_0` / `branch1_1b_0`).
Inception-v4's blocks are `features.{k}` in order (3 stem convs, Mixed-3a/4a/5a, 4 A, Reduction-A,
7 B, Reduction-B, 3 C); Inception-ResNet-v2's are `repeat.{k}` (A), `repeat_1.{k}` (B),
`repeat_2.{k}` and the last C block `block8`, their residual 1x1 projection `conv2d`.
"""

from __future__ import annotations

import re

from cnnjax.models.inception_v4 import (
    AVG,
    INCEPTION_RESNET_V2_BLOCKS,
    INCEPTION_V4_BLOCKS,
    MAX,
    Fork,
)
from cnnjax.weights._convert import Layout

SOURCES = {"inception_v4": "timm:inception_v4", "inception_resnet_v2": "timm:inception_resnet_v2"}


def _conv_bn(layout: Layout, dst: str, src: str) -> None:
    layout.conv(f"{dst}/conv", f"{src}.conv")
    layout.bn(f"{dst}/bn", f"{src}.bn")


def _block(layout: Layout, dst: str, src: str, table: tuple, lone: str | None = None) -> None:
    """The conv layers of an InceptionBlock built from `table`; `lone` names a one-conv branch."""
    for i, branch in enumerate(table):
        flat = any(isinstance(layer, Fork) for layer in branch)
        for j, layer in enumerate(branch):
            if layer in (MAX, AVG):
                continue
            if isinstance(layer, Fork):
                for side in "ab":
                    _conv_bn(layout, f"{dst}/branch{i}_{j}{side}_0", f"{src}.branch{i}_{j}{side}")
            elif flat:
                _conv_bn(layout, f"{dst}/branch{i}_{j}", f"{src}.branch{i}_{j}")
            elif len(branch) > 1:
                _conv_bn(layout, f"{dst}/branch{i}_{j}", f"{src}.branch{i}.{j}")
            else:
                _conv_bn(layout, f"{dst}/branch{i}_{j}", f"{src}.{lone or f'branch{i}'}")


def _count(layout: Layout, prefix: str) -> int:
    """How many blocks `{prefix}{n}` the model has (the template knows its num_blocks)."""
    found = {int(m[1]) for k in layout.template if (m := re.match(rf"params/{prefix}(\d+)/", k))}
    return max(found, default=0)


def _inception_v4(layout: Layout) -> None:
    t = INCEPTION_V4_BLOCKS
    for k in range(3):
        _conv_bn(layout, f"stem_conv{k + 1}", f"features.{k}")
    for k, name in enumerate(("mixed_3a", "mixed_4a", "mixed_5a"), start=3):
        _block(layout, f"stem_{name}", f"features.{k}", t[name], lone="conv")
    k = 6
    for kind, reduction in (("a", "reduction_a"), ("b", "reduction_b"), ("c", None)):
        for b in range(1, _count(layout, f"inception_{kind}") + 1):
            _block(layout, f"inception_{kind}{b}", f"features.{k}", t[f"inception_{kind}"])
            k += 1
        if reduction:
            _block(layout, reduction, f"features.{k}", t[reduction])
            k += 1
    layout.dense("fc", "last_linear")


def _inception_resnet_v2(layout: Layout) -> None:
    t = INCEPTION_RESNET_V2_BLOCKS
    for k, src in enumerate(("1a", "2a", "2b", "3b", "4a"), start=1):
        _conv_bn(layout, f"stem_conv{k}", f"conv2d_{src}")
    _block(layout, "stem_mixed_5b", "mixed_5b", t["mixed_5b"])
    for kind, src, reduction, reduction_src in (
        ("a", "repeat", "reduction_a", "mixed_6a"),
        ("b", "repeat_1", "reduction_b", "mixed_7a"),
        ("c", "repeat_2", None, None),
    ):
        n = _count(layout, f"block_{kind}")
        for b in range(1, n + 1):
            block_src = "block8" if kind == "c" and b == n else f"{src}.{b - 1}"
            _block(layout, f"block_{kind}{b}", block_src, t[f"block_{kind}"])
            layout.conv(f"block_{kind}{b}/proj_conv", f"{block_src}.conv2d")
        if reduction:
            _block(layout, reduction, reduction_src, t[reduction])
    _conv_bn(layout, "final_conv", "conv2d_7b")
    layout.dense("fc", "classif")


def fill(layout: Layout, name: str) -> None:
    {"inception_v4": _inception_v4, "inception_resnet_v2": _inception_resnet_v2}[name](layout)
