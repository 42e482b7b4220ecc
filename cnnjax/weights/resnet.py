"""torchvision's ResNet, ResNeXt and Wide ResNet state_dicts (torchvision/models/resnet.py).

torchvision names stage s (1-4) `layer{s}` and its blocks from 0; cnnjax names them
`stage{s}_block{b}` from 1. A block's 1x1 projection with its BN is `downsample.0` / `.1`
there, `proj_conv` / `proj_bn` here. All of them stride the 3x3 conv (V1.5), as cnnjax does by
default.
"""

from __future__ import annotations

import re

from cnnjax.weights._convert import Layout

SOURCES = {
    **{f"resnet{d}": f"torchvision:resnet{d}" for d in (18, 34, 50, 101, 152)},
    **{
        n: f"torchvision:{n}"
        for n in (
            "resnext50_32x4d",
            "resnext101_32x8d",
            "resnext101_64x4d",
            "wide_resnet50_2",
            "wide_resnet101_2",
        )
    },
}


def fill(layout: Layout, name: str) -> None:
    layout.conv("stem_conv", "conv1")
    layout.bn("stem_bn", "bn1")
    blocks = sorted(
        {
            (int(m[1]), int(m[2]))
            for k in layout.template
            if (m := re.match(r"params/stage(\d+)_block(\d+)/", k))
        }
    )
    for stage, block in blocks:
        dst, src = f"stage{stage}_block{block}", f"layer{stage}.{block - 1}"
        for i in (1, 2, 3):
            if f"params/{dst}/conv{i}/kernel" in layout.template:
                layout.conv(f"{dst}/conv{i}", f"{src}.conv{i}")
                layout.bn(f"{dst}/bn{i}", f"{src}.bn{i}")
        if f"params/{dst}/proj_conv/kernel" in layout.template:
            layout.conv(f"{dst}/proj_conv", f"{src}.downsample.0")
            layout.bn(f"{dst}/proj_bn", f"{src}.downsample.1")
    layout.dense("fc", "fc")
