"""torchvision's GoogLeNet state_dicts (torchvision/models/googlenet.py): 'googlenet_torchvision'.

Every torchvision convolution is a BasicConv2d `X.conv` (no bias) with its BatchNorm `X.bn`;
cnnjax names the pair `X` and `X_bn`. The stem's `conv1`, `conv2`, `conv3` are cnnjax's `conv1`,
`conv2_reduce`, `conv2`. In Inception module `inceptionK` the branches `branch1`, `branch2.0` /
`.1`, `branch3.0` / `.1` and `branch4.1` (after its max pool) are `branch1x1`,
`branch3x3_reduce` / `branch3x3`, `branch5x5_reduce` / `branch5x5` and `pool_proj`. An aux head
`auxI` keeps its names (`conv`, `fc1`, `fc2`); fc1 follows the flatten of its 128x4x4 map.

Aux heads: torchvision builds them unless aux_logits=False, and its published checkpoint holds
them (untrained: torchvision drops them after loading). A state_dict with them converts into the
model with aux_logits=True (`model_overrides` says so); one without, into the registered model.
The eval logits are the same either way: the heads only run in training.

transform_input: torchvision's pretrained GoogLeNet maps ImageNet-normalised inputs to
(pixel - 0.5) / 0.5 before conv1, which its weights expect. A state_dict does not record it;
'googlenet_torchvision' is registered with transform_input=True, as torchvision loads its
weights. Weights of a model built without them (`googlenet()`, transform_input=False) need
`models.create('googlenet_torchvision', transform_input=False)`. The transform cannot be folded
into conv1: its zero padding would then pad the untransformed image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cnnjax.models.googlenet import GOOGLENET_MODULES
from cnnjax.weights._convert import Layout

SOURCES = {"googlenet_torchvision": "torchvision:googlenet"}

AUX_HEADS = ("aux1", "aux2")
_BRANCHES = {
    "branch1x1": "branch1",
    "branch3x3_reduce": "branch2.0",
    "branch3x3": "branch2.1",
    "branch5x5_reduce": "branch3.0",
    "branch5x5": "branch3.1",
    "pool_proj": "branch4.1",
}


def model_overrides(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Model options a state_dict needs: {'aux_logits': True} when it holds the aux heads (named
    as torchvision names them, or as cnnjax variables 'params/aux1/...')."""
    heads = tuple(f"{h}." for h in AUX_HEADS) + tuple(f"params/{h}/" for h in AUX_HEADS)
    return (
        {"aux_logits": True}
        if any(k.removeprefix("module.").startswith(heads) for k in state_dict)
        else {}
    )


def _basic_conv(layout: Layout, dst: str, src: str) -> None:
    layout.conv(dst, f"{src}.conv")
    layout.bn(f"{dst}_bn", f"{src}.bn")


def fill(layout: Layout, name: str) -> None:
    for dst, src in (("conv1", "conv1"), ("conv2_reduce", "conv2"), ("conv2", "conv3")):
        _basic_conv(layout, dst, src)
    for key in GOOGLENET_MODULES:
        for dst, src in _BRANCHES.items():
            _basic_conv(layout, f"inception{key}/{dst}", f"inception{key}.{src}")
    for head in AUX_HEADS:
        if f"params/{head}/fc1/kernel" in layout.template:
            _basic_conv(layout, f"{head}/conv", f"{head}.conv")
            side = math.isqrt(layout.template[f"params/{head}/fc1/kernel"][0] // 128)  # 4
            layout.dense(f"{head}/fc1", f"{head}.fc1", chw=(128, side, side))
            layout.dense(f"{head}/fc2", f"{head}.fc2")
    layout.dense("fc", "fc")
