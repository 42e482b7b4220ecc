"""torchvision DenseNet state_dicts into cnnjax: logits and a dense block's output equal torch's,
the legacy names of the published .pth files, and DenseNet-264 laid out as torchvision's class."""

import jax
import numpy as np
import pytest

from cnnjax import models, weights
from cnnjax.weights import densenet as densenet_weights
from cnnjax.weights._convert import Layout, convert, to_numpy, variable_shapes

import torch_support as ts

NAMES = ("densenet121", "densenet161", "densenet169", "densenet201")


def test_sources():
    assert {n: s for n, s in weights.SOURCES.items() if n.startswith("densenet")} == {
        n: f"torchvision:{n}" for n in NAMES
    }


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_torchvision(name):
    # 32x32 is the smallest square input a power of two above the 29x29 minimum.
    ts.check_logits(name, getattr(ts.torchvision.models, name)(), 32)


def test_dense_block_and_transition_features():
    pairs = [("features.denseblock2", ("block2",)), ("features.transition2", ("transition2",))]
    variables = ts.check_logits(
        "densenet121", ts.torchvision.models.densenet121(), 32, features=pairs
    )
    _, maps = ts.cnnjax_outputs("densenet121", variables, ts.inputs(32), [("block2",)])
    assert maps[("block2",)].shape == (2, 4, 4, 128 + 12 * 32)


def _legacy(state_dict):
    """Names as in torchvision's published densenet*.pth files ('denselayer1.norm.1.weight'),
    which predate BatchNorm's num_batches_tracked."""
    out = {}
    for k, v in state_dict.items():
        for part in ("norm1", "norm2", "conv1", "conv2"):
            if ".denselayer" in k and f".{part}." in k:
                k = k.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        out[k] = v
    return out


def test_legacy_names_are_renamed():
    sd = {
        k: v
        for k, v in ts.torchvision.models.densenet121().state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    legacy = _legacy(sd)
    assert "features.denseblock1.denselayer1.norm.1.running_var" in legacy
    assert "features.denseblock4.denselayer16.conv.2.weight" in legacy
    # 58 layers of 2 BatchNorms (4 tensors each) and 2 convs; stem, transitions, norm5 keep theirs.
    assert sum(a != b for a, b in zip(sd, legacy)) == 58 * (2 * 4 + 2)
    renamed = densenet_weights.rename_state_dict(legacy)
    assert list(renamed) == list(sd) and all(renamed[k] is sd[k] for k in sd)
    prefixed = densenet_weights.rename_state_dict({f"module.{k}": v for k, v in legacy.items()})
    assert list(prefixed) == [f"module.{k}" for k in sd]
    # The published files' names, through the public loader: the same variables as today's names.
    want = weights.load_torch_state_dict("densenet121", sd)
    got = weights.load_torch_state_dict("densenet121", legacy)
    assert jax.tree.all(jax.tree.map(np.array_equal, want, got))


def test_densenet264_is_torchvisions_class_with_the_papers_blocks():
    """torchvision has no densenet264 builder: its DenseNet(32, (6, 12, 64, 48), 64) fits the
    registered model tensor for tensor (shapes only; the same code as the logits tests)."""
    model = ts.torchvision.models.DenseNet(32, (6, 12, 64, 48), 64)
    count = sum(p.numel() for p in model.parameters())
    assert count == models.get_spec("densenet264").reference_params
    assert "densenet264" not in weights.SOURCES
    layout = Layout(variable_shapes(models.create("densenet264"), (32, 32, 3)))
    densenet_weights.fill(layout, "densenet264")
    variables = convert(layout, to_numpy(model.state_dict()), "torchvision DenseNet-264")
    assert variables["params"]["fc"]["kernel"].shape == (2688, 1000)
    assert variables["params"]["block3"]["layer64"]["conv2"]["kernel"].shape == (3, 3, 128, 32)
