"""timm Dual Path Network state_dicts into cnnjax: logits and blocks' outputs equal timm's, a
fine-tuned 1x1-conv head, and timm's 'b' variant refused (another layout)."""

import pytest

from cnnjax import models, weights

import torch_support as ts

NAMES = ("dpn68", "dpn92", "dpn98", "dpn107", "dpn131")


def test_sources():
    assert {n: s for n, s in weights.SOURCES.items() if n.startswith("dpn")} == {
        n: f"timm:{n}" for n in NAMES
    }


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_timm(name):
    model = ts.timm.create_model(name)
    # timm's BatchNorm epsilon is MXNet's 1e-3 throughout, as in cnnjax's DPN.
    eps = {m.eps for m in model.modules() if isinstance(m, ts.torch.nn.BatchNorm2d)}
    assert eps == {models.create(name).bn_epsilon} == {1e-3}
    assert isinstance(model.classifier, ts.torch.nn.Conv2d)
    # 32x32 leaves a 1x1 map after the last stage.
    ts.check_logits(name, model, 32)


def test_dpn68_fine_tuned_head_and_block_features():
    """The 1x1-conv classifier's width comes from the state_dict (its rules are added last); a
    dual path block's output is its (residual, dense) pair, concatenated as timm carries it."""
    model = ts.timm.create_model("dpn68", num_classes=10)
    blocks = ("stage3_block1", "stage3_block4")
    pairs = [(f"features.conv{b[5]}_{b[-1]}", (b,)) for b in blocks]
    variables = ts.check_logits("dpn68", model, 32, features=pairs, num_classes=10)
    assert variables["params"]["classifier"]["kernel"].shape == (1, 1, 832, 10)
    _, got = ts.cnnjax_outputs(
        "dpn68", variables, ts.inputs(32), [(b,) for b in blocks], num_classes=10
    )
    # Stage 3 of the small net: residual 128, dense 3 * 32 after its first block, + 32 per block.
    assert got[("stage3_block1",)].shape == (2, 4, 4, 128 + 3 * 32)
    assert got[("stage3_block4",)].shape == (2, 4, 4, 128 + 6 * 32)


def test_b_variant_is_refused():
    """dpn68b splits the last 1x1 conv of every block in two (`c1x1_c1`, `c1x1_c2`): as many
    parameters as dpn68, under other names."""
    sd = ts.timm.create_model("dpn68b").state_dict()
    assert "features.conv2_1.c1x1_c1.weight" in sd and "dpn68b" not in weights.SOURCES
    with pytest.raises(weights.WeightsError) as err:
        weights.load_torch_state_dict("dpn68", sd)
    message = str(err.value)
    assert "missing tensor 'features.conv2_1.c1x1_c.conv.weight' (shape (80, 128, 1, 1)" in message
    # One missing c1x1_c conv per block (3 + 4 + 12 + 3) and one line of unexpected tensors.
    assert message.count("missing tensor") == 12 and message.endswith("... and 11 more")
