"""The lecture's recap models: a linear classifier and a two-layer MLP on flattened images.

Both see an image as one long vector (32x32x3 CIFAR-10 -> 3072 numbers) and are the same class:
`hidden_sizes=()` is the linear classifier f(x) = W x + b (3072 -> C); `hidden_sizes=(100,)` is
the lecture's two-layer network f(x) = W2 max(0, W1 x + b1) + b2 (3072 -> 100 -> C; the width
100 is the one on the lecture's slide, as in CS231n's "x (3072) -> h (100) -> s (10)").
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import functional as F
from cnnjax.models._checks import check_image_input, check_widths
from cnnjax.models.registry import register
from cnnjax.nn import Dense, Flatten

Array = jax.Array

# Hidden widths of the named variants (the lecture's recap slides; CIFAR-10 input).
MLP_CONFIGS = {"linear": (), "mlp": (100,)}


class MLP(nn.Module):
    """Fully connected classifier on flattened NHWC images; linear when `hidden_sizes` is empty.

    Args:
      num_classes: number of output scores C.
      hidden_sizes: widths of the hidden layers, each followed by `act`; () gives the linear
        classifier, (100,) the lecture's two-layer net.
      in_channels: channels the NHWC input must have (3 for CIFAR-10).
      act: name of the hidden activation in `cnnjax.functional.ACTIVATIONS`.
      dtype: compute dtype (None: the input's); parameters stay float32.
      bn_axis_name, bn_momentum: unused (no BatchNorm); accepted so that every model takes the
        same options.
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (100,)
    in_channels: int = 3
    act: str = "relu"
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_image_input(
            x, "MLP", min_size=1, in_channels=self.in_channels
        )  # images, also for flat vectors
        check_widths("MLP", "hidden_sizes", self.hidden_sizes, empty_ok=True)
        act = F.get_activation(self.act)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = Flatten(name="flatten")(x)
        for i, width in enumerate(self.hidden_sizes):
            x = act(Dense(int(width), dtype=self.dtype, name=f"fc{i + 1}")(x))
        x = Dense(self.num_classes, dtype=self.dtype, name=f"fc{len(self.hidden_sizes) + 1}")(x)
        return x.astype(jnp.float32)


register(
    "linear",
    partial(MLP, hidden_sizes=MLP_CONFIGS["linear"]),
    input_shape=(32, 32, 3),
    num_classes=10,
    source="lecture recap: linear classifier f = Wx + b on 3072-d CIFAR-10 vectors",
    family="classic",
    dataset="cifar10",
    reference_params=30_730,
    params_note="3072 x 10 weights + 10 biases",
)
register(
    "mlp",
    partial(MLP, hidden_sizes=MLP_CONFIGS["mlp"]),
    input_shape=(32, 32, 3),
    num_classes=10,
    source="lecture recap: two-layer net 3072 -> 100 -> 10 (CS231n slide)",
    family="classic",
    dataset="cifar10",
    reference_params=308_310,
    params_note="3072 x 100 + 100, 100 x 10 + 10 (weights and biases)",
)
