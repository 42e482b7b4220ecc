"""torchvision's AlexNet state_dict (torchvision/models/alexnet.py) into 'alexnet_torchvision'.

torchvision numbers `features` in one sequence of conv, ReLU and max-pool layers, so its five
convs are features.0, .3, .6, .8 and .10 (cnnjax conv1-conv5). `classifier` is Dropout, Linear,
ReLU, Dropout, Linear, ReLU, Linear: FC6-FC8 are classifier.1, .4 and .6. FC6 reads the 6x6x256
map of the adaptive pool, which torch flattens as (C, H, W) and cnnjax as (H, W, C).
"""

from __future__ import annotations

from cnnjax.weights._convert import Layout, flat_chw

SOURCES = {"alexnet_torchvision": "torchvision:alexnet"}


def fill(layout: Layout, name: str) -> None:
    for i, index in enumerate((0, 3, 6, 8, 10), start=1):
        layout.conv(f"conv{i}", f"features.{index}")
    layout.dense("fc6", "classifier.1", chw=flat_chw(layout, "fc6", "conv5"))
    layout.dense("fc7", "classifier.4")
    layout.dense("fc8", "classifier.6")
