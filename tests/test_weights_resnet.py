"""torchvision ResNet / ResNeXt / Wide ResNet state_dicts into cnnjax: logits and block outputs."""

from __future__ import annotations

import pytest

from cnnjax import models, weights

import torch_support as ts

NAMES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
SIZE = 32  # the smallest input cnnjax's ResNets take: their total stride
# Block outputs of one model: layer1 ends the stride-1 stage that opens with a projection,
# layer2 the strided one (V1.5), whose projection is checked too.
FEATURES = {
    "resnet50": [
        ("layer1", ("stage1_block3",)),
        ("layer2", ("stage2_block4",)),
        ("layer2.0.downsample", ("stage2_block1", "proj_bn")),
    ]
}


def test_every_torchvision_resnet_is_covered():
    assert {
        n
        for n, s in weights.SOURCES.items()
        if s.startswith("torchvision:") and models.get_spec(n).family == "resnet"
    } == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_block_outputs_match_torchvision(name):
    assert weights.SOURCES[name] == f"torchvision:{name}"
    model = getattr(ts.torchvision.models, name)()
    # The registered count is torchvision's (its weights' meta["num_params"]).
    assert sum(p.numel() for p in model.parameters()) == models.get_spec(name).reference_params
    ts.check_logits(name, model, SIZE, features=FEATURES.get(name, ()))
