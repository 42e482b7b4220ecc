"""torchvision's AlexNet and VGG weights in cnnjax: logits, features and the flatten order.

The models are run below their native size, so the last map is smaller than torchvision's
adaptive-pool size (AlexNet 4x4 -> 6x6 at 159, VGG 2x2 -> 7x7 at 64): the logits check the
adaptive pool's overlapping bins, and, the pooled map not being constant, FC6's (C, H, W) ->
(H, W, C) row permutation.
"""

import numpy as np
import pytest

from cnnjax.functional import adaptive_avg_pool
from cnnjax.weights import SOURCES, _convert, alexnet, vgg

import torch_support as ts

torch = ts.torch

SIZE = {**dict.fromkeys(alexnet.SOURCES, 159), **dict.fromkeys(vgg.SOURCES, 64)}
NAMES = sorted(SIZE)
# Per family one model whose intermediate maps are compared too: torch module -> cnnjax path.
FEATURES = {
    "alexnet_torchvision": {"features.2": "pool1", "features.5": "pool2", "features.12": "pool5"},
    "vgg16_bn": {"features.6": "pool1", "features.34": "conv5_1", "features.43": "pool5"},
}
FC6 = {"alexnet_torchvision": "classifier.1", "vgg16_bn": "classifier.0"}


def torch_model(name, **kwargs):
    return getattr(ts.torchvision.models, SOURCES[name].split(":")[1])(**kwargs)


def test_sources_cover_alexnet_and_every_vgg():
    assert NAMES == [
        "alexnet_torchvision",
        *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    ]
    assert {n: SOURCES[n] for n in NAMES} == {
        "alexnet_torchvision": "torchvision:alexnet",
        **{n: f"torchvision:{n}" for n in NAMES[1:]},
    }


@pytest.mark.parametrize("name", NAMES)
def test_classifier_rules_come_last_and_fc6_is_permuted(name):
    spec = ts.models.get_spec(name)
    layout = _convert.Layout(_convert.variable_shapes(ts.models.create(name), spec.input_shape))
    (alexnet if name.startswith("alexnet") else vgg).fill(layout, name)
    kernels = [r for r in layout.rules if r.dst.endswith("/kernel")]
    assert kernels[-1].dst == "params/fc8/kernel" and kernels[-1].src == "classifier.6.weight"
    fc6 = next(r for r in layout.rules if r.dst == "params/fc6/kernel")
    assert fc6.kind == "dense_chw"
    assert fc6.chw == ((256, 6, 6) if name.startswith("alexnet") else (512, 7, 7))


# VGG at 64 (2 -> 7), AlexNet at 159 (4 -> 6), and a map larger than the pool's (13 -> 6).
@pytest.mark.parametrize("n,size", [(2, 7), (4, 6), (13, 6)])
def test_adaptive_avg_pool_is_torchs(n, size):
    x = ts.inputs(n, batch=2)  # (2, 3, n, n)
    want = torch.nn.functional.adaptive_avg_pool2d(x, size).permute(0, 2, 3, 1).numpy()
    got = adaptive_avg_pool(ts.jnp.asarray(x.permute(0, 2, 3, 1).numpy()), size)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_torchvision(name):
    model = torch_model(name)
    pairs = [(module, (path,)) for module, path in FEATURES.get(name, {}).items()]
    if name in FEATURES:  # FC6's input: torchvision's adaptive pool, cnnjax's flattened map
        pairs.append(("avgpool", ("flatten",)))
    variables = ts.check_logits(name, model, SIZE[name], features=pairs)
    if name not in FEATURES:
        return
    # Read in torch's (C, H, W) order, the same map gives another FC6 output: the permutation
    # matters (the logits would see it; this says where).
    _, maps = ts.torch_outputs(model, ts.inputs(SIZE[name]), ["avgpool"])
    pooled = maps["avgpool"]  # NHWC
    fc6 = model.get_submodule(FC6[name])
    with torch.no_grad():
        want = fc6(torch.from_numpy(pooled).permute(0, 3, 1, 2).flatten(1)).numpy()
    p = variables["params"]["fc6"]
    flat = pooled.reshape(len(pooled), -1)
    ts.assert_close(flat @ np.asarray(p["kernel"]) + np.asarray(p["bias"]), want, what="fc6")
    unpermuted = flat @ fc6.weight.detach().numpy().T + fc6.bias.detach().numpy()
    assert np.max(np.abs(unpermuted - want)) > 0.1 * np.max(np.abs(want))


def test_fine_tuned_alexnet_head_is_read_from_the_state_dict():
    model = torch_model("alexnet_torchvision", num_classes=10)
    x = ts.inputs(SIZE["alexnet_torchvision"])
    with torch.no_grad():
        want = model.eval()(x).numpy()
    variables = ts.convert("alexnet_torchvision", model)
    assert variables["params"]["fc8"]["kernel"].shape == (4096, 10)
    ts.assert_close(ts.cnnjax_apply("alexnet_torchvision", variables, x, num_classes=10), want)


def test_plain_vgg_weights_do_not_fit_the_bn_model():
    # Only the shapes of the convolutions matter here: meta tensors, filled as zeros.
    with torch.device("meta"):
        sd = torch_model("vgg11").state_dict()
    arrays = {k: np.zeros(v.shape, np.float32) for k, v in sd.items() if k.startswith("features")}
    with pytest.raises(
        ts.weights.WeightsError,
        match=r"vgg11_bn \(torchvision:vgg11_bn\)"
        r"[\s\S]*missing tensor 'features.1.running_mean'",
    ):
        ts.weights.load_torch_state_dict("vgg11_bn", arrays)
