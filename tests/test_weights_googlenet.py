"""torchvision's GoogLeNet state_dicts in 'googlenet_torchvision': with and without the aux heads,
with and without transform_input; eval logits, the aux heads' training outputs, one module."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import models, weights
from cnnjax.weights import googlenet as converter
from cnnjax.weights._convert import Layout, convert, to_numpy, variable_shapes

import torch_support as ts
from torch_support import torch

NAME = "googlenet_torchvision"
# The smallest input cnnjax's pools allow: torchvision's ceil-mode pools also take windows
# larger than the map (its metadata says 15), cnnjax's do not. The adaptive aux pool needs no more.
SIZE = 31


def torch_googlenet(**kwargs):
    """torchvision's GoogLeNet with He-initialised weights and random biases. Its own inits shrink
    the signal layer by layer, so far that its logits hardly depend on the input: a logit check
    would then not see a wrongly converted early layer."""
    model = ts.torchvision.models.googlenet(init_weights=False, **kwargs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def published():
    """The layout torchvision's pretrained model has: no aux heads, transform_input=True."""
    model = torch_googlenet(aux_logits=False, transform_input=True)
    assert not converter.model_overrides(model.state_dict())
    # Logits and one inception module's output; the logits vary across images by more than 5%.
    variables = ts.check_logits(NAME, model, SIZE, features=[("inception4a", ("inception4a",))])
    assert not {"aux1", "aux2"} & set(variables["params"])
    with torch.no_grad():
        ts.assert_input_matters(model(ts.inputs(SIZE)), 0.05)
    return model, variables


def test_logits_without_aux_heads(published):
    _, variables = published
    assert models.create(NAME).transform_input  # the registered model is set up for these weights
    assert variables["params"]["inception3a"]["branch5x5"]["kernel"].shape == (3, 3, 16, 32)


def test_aux_heads_and_no_transform_input():
    # torchvision.models.googlenet()'s own defaults: aux_logits=True, transform_input=False.
    model = torch_googlenet(dropout=0.0, dropout_aux=0.0)
    ts.randomize(model, size=SIZE)
    assert converter.model_overrides(model.state_dict()) == {"aux_logits": True}
    variables = weights.load_torch_state_dict(NAME, model.state_dict())
    x = ts.inputs(SIZE, batch=4)
    with torch.no_grad():
        want = model.eval()(x).numpy()
    ts.assert_input_matters(want, 0.05)
    # The plain model ignores the heads' variables.
    ts.assert_close(ts.cnnjax_apply(NAME, variables, x, transform_input=False), want)

    # Training mode (batch statistics, no dropout): the aux heads' logits too.
    with torch.no_grad():
        logits, aux2, aux1 = model.train()(x)
    module = models.create(
        NAME, aux_logits=True, transform_input=False, dropout_rate=0.0, aux_dropout_rate=0.0
    )
    nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
    apply = jax.jit(lambda v, a: module.apply(v, a, train=True, mutable=["batch_stats"]))
    (got, (got1, got2)), _ = apply(variables, nhwc)
    for g, w, what in ((got, logits, "logits"), (got1, aux1, "aux1"), (got2, aux2, "aux2")):
        ts.assert_close(g, w.numpy(), what=f"training {what}")


def test_one_aux_head_or_none_for_the_aux_model():
    sd = {k: v.numpy() for k, v in torch_googlenet().state_dict().items()}
    with pytest.raises(weights.WeightsError, match=r"missing tensor 'aux2\.conv\.conv\.weight'"):
        weights.load_torch_state_dict(
            NAME, {k: v for k, v in sd.items() if not k.startswith("aux2.")}
        )
    # A state_dict without heads converts into the plain model only.
    plain = {k: v for k, v in sd.items() if not k.startswith(("aux1.", "aux2."))}
    variables = weights.load_torch_state_dict(NAME, plain)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], sd["fc.weight"].T)
    aux = Layout(variable_shapes(models.create(NAME, aux_logits=True), (224, 224, 3)))
    converter.fill(aux, NAME)
    with pytest.raises(weights.WeightsError, match=r"missing tensor 'aux1\.fc1\.weight'"):
        convert(aux, to_numpy(plain), NAME)
