"""timm Inception-v4 and Inception-ResNet-v2 state_dicts into cnnjax: logits and block outputs."""

from __future__ import annotations

import pytest

from cnnjax import models, weights

import torch_support as ts

# The smallest input both take: timm's unpadded convs/pools leave 1x1 maps after Reduction-B.
SIZE = 75
# One block of each: timm module -> cnnjax module (Inception-B of v4; the last residual A block
# of Inception-ResNet-v2, scaled by 0.17, and its last C block, scale 1 and no ReLU).
FEATURES = {
    "inception_v4": (("features.11", "inception_b1"),),
    "inception_resnet_v2": (("repeat.9", "block_a10"), ("block8", "block_c10")),
}


def test_sources_bn_epsilon_and_residual_scales_are_timms():
    covered = {n for n, s in weights.SOURCES.items() if s.startswith("timm:inception")}
    assert covered == set(FEATURES)
    for name in FEATURES:
        eps = {
            m.eps
            for m in ts.timm.create_model(name).modules()
            if isinstance(m, ts.torch.nn.BatchNorm2d)
        }
        assert eps == {1e-3} == {models.create(name).bn_epsilon}, name
    model = ts.timm.create_model("inception_resnet_v2")
    scales = [m.scale for m in (*model.repeat, *model.repeat_1, *model.repeat_2, model.block8)]
    assert scales == [0.17] * 10 + [0.1] * 20 + [0.2] * 9 + [1.0] and model.block8.relu is None
    cnnjax = models.create("inception_resnet_v2")
    assert tuple(cnnjax.residual_scales) == (0.17, 0.1, 0.2)
    assert tuple(cnnjax.num_blocks) == (10, 20, 10)  # the last C block: scale 1, no ReLU


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_logits_and_block_outputs_match_timm(name):
    assert weights.SOURCES[name] == f"timm:{name}"
    model = ts.timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == models.get_spec(name).reference_params
    ts.check_logits(name, model, SIZE, features=[(t, (c,)) for t, c in FEATURES[name]])


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_one_pixel_less_is_refused_by_both(name):
    model = ts.timm.create_model(name).eval()
    with pytest.raises(RuntimeError, match="Kernel size can't be greater"), ts.torch.no_grad():
        model(ts.inputs(SIZE - 1, batch=1))
    with pytest.raises(ValueError, match="75"):
        models.create(name).init(
            ts.jax.random.key(0), ts.jnp.zeros((1, SIZE - 1, SIZE - 1, 3)), train=False
        )
