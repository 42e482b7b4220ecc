"""LeNet-5 as in the lecture's table (the Caffe-style LeNet with ReLU and max pooling).

input 28x28x1 -> conv 20 5x5 pad 2 -> ReLU -> max-pool 2/2 -> conv 50 5x5 pad 2 -> ReLU ->
max-pool 2/2 -> flatten (7*7*50 = 2450) -> FC 500 -> ReLU -> FC 10; 1,256,080 parameters.
LeCun et al. (1998) used 6/16 filters, tanh-like units and subsampling; the lecture's version keeps
the layout and modernises the layers. The padding 2 keeps 28x28 after each conv (Caffe's
`lenet.prototxt` uses none, giving 4*4*50 = 800 inputs to FC 500 instead of 2450).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import functional as F
from cnnjax.models._checks import check_image_input, check_positive_int, check_widths
from cnnjax.models.registry import register
from cnnjax.nn import Conv, Dense, Flatten, MaxPool

Array = jax.Array


class LeNet5(nn.Module):
    """LeNet-5: two conv (5x5, 'same' padding) + ReLU + 2x2 max-pool stages, then two FC layers.

    Args:
      num_classes: outputs of the last FC layer.
      features: filters of the two convolutions (the lecture's 20 and 50).
      hidden: width of the hidden FC layer (500).
      in_channels: channels the NHWC input must have (1 for MNIST).
      act: name of the activation in `cnnjax.functional.ACTIVATIONS` (ReLU in the lecture).
      dtype: compute dtype (None: the input's); parameters stay float32.
      bn_axis_name, bn_momentum: unused (no BatchNorm); accepted so that every model takes the
        same options.

    The FC layer sees whatever map the convolutions leave: 7x7x50 = 2450 features at the
    lecture's 28x28 (the published count); other input sizes change only its input width.
    """

    num_classes: int
    features: Sequence[int] = (20, 50)
    hidden: int = 500
    in_channels: int = 1
    act: str = "relu"
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9

    def min_input_size(self) -> int:
        """Smallest input side (4) that survives the two 2x2 poolings."""
        return 2 ** len(self.features)

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_widths("LeNet5", "features", self.features)
        check_positive_int("LeNet5", "hidden", self.hidden)
        check_image_input(
            x,
            "LeNet5",
            min_size=self.min_input_size(),
            in_channels=self.in_channels,
            size_note=" (28x28 in the lecture)",
        )
        act = F.get_activation(self.act)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        for i, feats in enumerate(self.features):
            x = act(
                Conv(int(feats), kernel_size=5, padding=2, dtype=self.dtype, name=f"conv{i + 1}")(x)
            )
            x = MaxPool(2, 2, name=f"pool{i + 1}")(x)
        x = Flatten(name="flatten")(x)
        x = act(Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        x = Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)
        return x.astype(jnp.float32)


register(
    "lenet5",
    LeNet5,
    input_shape=(28, 28, 1),
    num_classes=10,
    source="lecture's LeNet-5 table (after LeCun et al. 1998; Caffe LeNet widths 20/50/500)",
    family="lenet",
    dataset="mnist",
    reference_params=1_256_080,
    params_note="conv 20 and 50 (5x5, pad 2, bias), FC 2450 -> 500 -> 10 (bias); exact",
)
