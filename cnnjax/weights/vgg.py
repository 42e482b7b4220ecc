"""torchvision's VGG state_dicts, plain and "_bn" (torchvision/models/vgg.py).

torchvision numbers `features` in one sequence: every conv is followed by its BatchNorm (the
"_bn" models) and a ReLU, every stage by a max pool, and each of these takes an index. cnnjax
names the convs conv{stage}_{i} and their BatchNorms bn{stage}_{i}. `classifier` is Linear,
ReLU, Dropout, Linear, ReLU, Dropout, Linear: FC6-FC8 are classifier.0, .3 and .6. FC6 reads the
7x7x512 map of the adaptive pool, which torch flattens as (C, H, W) and cnnjax as (H, W, C).
"""

from __future__ import annotations

import re

from cnnjax.weights._convert import Layout, flat_chw

SOURCES = {f"vgg{d}{bn}": f"torchvision:vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")}


def fill(layout: Layout, name: str) -> None:
    convs = sorted(
        {
            (int(m[1]), int(m[2]))
            for k in layout.template
            if (m := re.match(r"params/conv(\d+)_(\d+)/kernel$", k))
        }
    )
    index, stage = 0, 1
    for s, i in convs:
        if s != stage:  # the previous stage's max pool
            index, stage = index + 1, s
        layout.conv(f"conv{s}_{i}", f"features.{index}")
        if f"params/bn{s}_{i}/scale" in layout.template:
            index += 1
            layout.bn(f"bn{s}_{i}", f"features.{index}")
        index += 2  # the conv (or its BatchNorm) and the ReLU
    s, i = convs[-1]
    layout.dense("fc6", "classifier.0", chw=flat_chw(layout, "fc6", f"conv{s}_{i}"))
    layout.dense("fc7", "classifier.3")
    layout.dense("fc8", "classifier.6")
