"""torchvision's DenseNet state_dicts (torchvision/models/densenet.py).

torchvision keeps everything but the classifier in one `features` Sequential: the stem
`conv0`/`norm0`, `denseblock{i}.denselayer{j}` (both from 1) with `norm1`, `conv1`, `norm2`,
`conv2`, `transition{i}` with `norm`/`conv`, and `norm5`; the Linear is `classifier`. cnnjax names
them `stem_conv`/`stem_bn`, `block{i}/layer{j}` (`bn1`, `conv1`, `bn2`, `conv2`),
`transition{i}` (`bn`, `conv`), `final_bn` and `fc`.

The published .pth files predate those names: their layers hold `norm.1`, `conv.1`, `norm.2`,
`conv.2` (torchvision renames them in `_load_state_dict`). `rename_state_dict` does the same.
DenseNet-264 has no published torchvision weights, so it is not mapped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cnnjax.weights._convert import Layout

SOURCES = {f"densenet{d}": f"torchvision:densenet{d}" for d in (121, 161, 169, 201)}

# torchvision's own pattern (densenet.py, _load_state_dict): 'norm.1.weight' -> 'norm1.weight'.
_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def rename_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """`state_dict` with the legacy dense-layer names ('...denselayer1.norm.1.weight') renamed
    as torchvision's current DenseNet names them ('...denselayer1.norm1.weight')."""
    return {(m[1] + m[2] if (m := _LEGACY.match(k)) else k): v for k, v in state_dict.items()}


def fill(layout: Layout, name: str) -> None:
    layout.conv("stem_conv", "features.conv0")
    layout.bn("stem_bn", "features.norm0")
    layers = sorted(
        {
            (int(m[1]), int(m[2]))
            for k in layout.template
            if (m := re.match(r"params/block(\d+)/layer(\d+)/", k))
        }
    )
    for block, layer in layers:
        dst, src = f"block{block}/layer{layer}", f"features.denseblock{block}.denselayer{layer}"
        for i in (1, 2):
            layout.bn(f"{dst}/bn{i}", f"{src}.norm{i}")
            layout.conv(f"{dst}/conv{i}", f"{src}.conv{i}")
    transitions = sorted(
        {int(m[1]) for k in layout.template if (m := re.match(r"params/transition(\d+)/", k))}
    )
    for t in transitions:
        layout.bn(f"transition{t}/bn", f"features.transition{t}.norm")
        layout.conv(f"transition{t}/conv", f"features.transition{t}.conv")
    layout.bn("final_bn", "features.norm5")
    layout.dense("fc", "classifier")
