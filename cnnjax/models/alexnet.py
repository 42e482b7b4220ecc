"""AlexNet (Krizhevsky et al. 2012), the single-tower AlexNet of torchvision, and ZFNet
(Zeiler & Fergus 2014).

All three are five convolutions with max pooling and three fully connected layers, so they are one
class driven by a per-layer table:

- 'alexnet', the 2012 paper (section 3, Figure 2): conv1 96 11x11/4 on 227x227 (the paper's
  "224" gives no 55x55 map; 227 does), conv2 256 5x5, conv3 384, conv4 384, conv5 256 (3x3);
  conv2/4/5 see only the channels of their own GPU (groups=2); ReLU after every layer; local
  response normalisation after the ReLUs of conv1 and conv2 with the paper's constants and its
  formula (alpha is *not* divided by n, unlike Caffe and PyTorch); overlapping 3x3/2 max pooling
  after both LRNs and after conv5; dropout 0.5 on FC6 and FC7. 60,965,224 parameters.
- 'alexnet_torchvision', the "one weird trick" single-GPU variant that torchvision ships:
  64/192/384/256/256 filters, conv1 padding 2, no LRN, no groups, dropout *before* FC6 and FC7.
  torchvision pools adaptively to 6x6 before FC6 (`adaptive_avg_pool`), so FC6 reads 6x6x256 at
  every input size and its weights fit any input; at 224x224 the map already is 6x6 and the pool
  is skipped. 61,100,840 parameters.
- 'zfnet' (Figure 3 of the paper): conv1 96 7x7/2, conv2 256 5x5/2, conv3/4/5 384/384/256 3x3 dense
  (one GPU, no groups); each of the first two layers is ReLU -> 3x3/2 max pool -> contrast
  normalisation across maps. The paper's maps 110 -> 55 -> 26 -> 13 -> 6 from 224x224 need
  conv1 padding 1 ((224 + 2 - 7) // 2 + 1 = 110), ceil-mode pooling (110 -> 55 and 26 -> 13;
  floor mode gives 54 and 12) and no padding on conv2 ((55 - 5) // 2 + 1 = 26). The paper gives
  no LRN constants; AlexNet's are used. 62,357,608 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import functional as F
from cnnjax.models._checks import check_image_input, check_positive_int
from cnnjax.models.registry import register
from cnnjax.nn import Conv, Dense, Dropout, Flatten, LocalResponseNorm, MaxPool

Array = jax.Array


class ConvLayer(NamedTuple):
    """One convolution stage: conv -> ReLU, then optionally LRN and a 3x3/2 max
    pool in `lrn` order."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    lrn: str | None = None  # None, 'before_pool' (AlexNet) or 'after_pool' (ZFNet)
    pool: bool = False


ALEXNET_CONFIGS: dict[str, tuple[ConvLayer, ...]] = {
    # Krizhevsky et al. 2012, section 3.5 and Figure 2.
    "alexnet": (
        ConvLayer(96, 11, 4, 0, lrn="before_pool", pool=True),
        ConvLayer(256, 5, 1, 2, groups=2, lrn="before_pool", pool=True),
        ConvLayer(384, 3, 1, 1),
        ConvLayer(384, 3, 1, 1, groups=2),
        ConvLayer(256, 3, 1, 1, groups=2, pool=True),
    ),
    # torchvision/models/alexnet.py (Krizhevsky 2014, "One weird trick").
    "alexnet_torchvision": (
        ConvLayer(64, 11, 4, 2, pool=True),
        ConvLayer(192, 5, 1, 2, pool=True),
        ConvLayer(384, 3, 1, 1),
        ConvLayer(256, 3, 1, 1),
        ConvLayer(256, 3, 1, 1, pool=True),
    ),
    # Zeiler & Fergus 2014, Figure 3.
    "zfnet": (
        ConvLayer(96, 7, 2, 1, lrn="after_pool", pool=True),
        ConvLayer(256, 5, 2, 0, lrn="after_pool", pool=True),
        ConvLayer(384, 3, 1, 1),
        ConvLayer(384, 3, 1, 1),
        ConvLayer(256, 3, 1, 1, pool=True),
    ),
}


class LRNConfig(NamedTuple):
    """Constants of LocalResponseNorm: b = a / (k + alpha' * sum of a^2 over
    `size` maps) ** beta."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0
    alpha_over_n: bool = (
        False  # alpha' = alpha / size (Caffe, PyTorch) instead of alpha (the paper)
    )


# Section 3.3 of the AlexNet paper (alpha is not divided by n).
PAPER_LRN = LRNConfig()


def feature_map_sizes(
    layers: Sequence[ConvLayer], size: int, ceil_mode: bool
) -> list[tuple[str, int]]:
    """(layer name, output side) for every conv and pool of `layers` on a size x size input."""
    out = []
    for i, layer in enumerate(layers, start=1):
        size = F.output_size(size, layer.kernel, layer.stride, layer.padding)
        out.append((f"conv{i}", size))
        if layer.pool:
            size = F.output_size(size, 3, 2, 0, ceil_mode=ceil_mode)
            out.append((f"pool{i}", size))
    return out


class AlexNet(nn.Module):
    """Five convolutions with ReLU, optional LRN and 3x3/2 max pooling, then
    FC-ReLU-dropout x2 and FC.

    Args:
      num_classes: outputs of the last FC layer.
      layers: the convolution table (a value of ALEXNET_CONFIGS).
      hidden: width of FC6 and FC7 (4096).
      dropout_rate: dropout on FC6/FC7 (0.5 in all three papers).
      dropout_first: put dropout before FC6 and FC7 (torchvision) instead of after their ReLUs
        (the paper and Caffe).
      ceil_mode: ceil-mode max pooling (ZFNet's map sizes); AlexNet's sizes are the same both ways.
      lrn: constants of LocalResponseNorm, an LRNConfig (PAPER_LRN: the AlexNet paper's formula).
      in_channels: channels the NHWC input must have.
      kernel_init: initializer of the convolutions (name in cnnjax.nn.INITIALIZERS or a callable).
      dtype: compute dtype (None: the input's); parameters stay float32.
      adaptive_pool: side of torchvision's adaptive average pool before FC6 (6 for
        'alexnet_torchvision'), which keeps FC6's width at every input size; None flattens the
        last map as it is (6x6x256 at the native input; other sizes change FC6's width).
      bn_axis_name, bn_momentum: unused (no BatchNorm); accepted so that every model takes the
        same options.
    """

    num_classes: int
    layers: Sequence[ConvLayer] = ALEXNET_CONFIGS["alexnet"]
    hidden: int = 4096
    dropout_rate: float = 0.5
    dropout_first: bool = False
    ceil_mode: bool = False
    lrn: LRNConfig = PAPER_LRN
    in_channels: int = 3
    kernel_init: Any = "he_normal_fan_in"
    dtype: Any = None
    adaptive_pool: int | None = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9

    def min_input_size(self) -> int:
        """Smallest input side for which every conv and pool still has at least one output pixel."""
        n = 1
        while min(s for _, s in feature_map_sizes(self.layers, n, self.ceil_mode)) < 1:
            n += 1
        return n

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_positive_int(type(self).__name__, "hidden", self.hidden)
        if self.adaptive_pool is not None:
            check_positive_int(type(self).__name__, "adaptive_pool", self.adaptive_pool)
        check_image_input(
            x,
            type(self).__name__,
            min_size=self.min_input_size(),
            in_channels=self.in_channels,
            fix="resize or pad the images (227 or 224 natively)",
        )
        lrn = LRNConfig(*self.lrn)._asdict()
        conv = partial(Conv, kernel_init=self.kernel_init, dtype=self.dtype)
        if self.dtype is not None:
            x = x.astype(self.dtype)

        for i, layer in enumerate(self.layers, start=1):
            x = conv(
                layer.features,
                kernel_size=layer.kernel,
                strides=layer.stride,
                padding=layer.padding,
                groups=layer.groups,
                name=f"conv{i}",
            )(x)
            x = jax.nn.relu(x)
            if layer.lrn == "before_pool":
                x = LocalResponseNorm(**lrn, name=f"norm{i}")(x)
            if layer.pool:
                x = MaxPool(3, 2, ceil_mode=self.ceil_mode, name=f"pool{i}")(x)
            if layer.lrn == "after_pool":
                x = LocalResponseNorm(**lrn, name=f"norm{i}")(x)

        if self.adaptive_pool is not None:
            x = F.adaptive_avg_pool(x, self.adaptive_pool)
        x = Flatten(name="flatten")(x)
        for j in (6, 7):
            if self.dropout_first:
                x = Dropout(self.dropout_rate, name=f"drop{j}")(x, deterministic=not train)
            x = jax.nn.relu(Dense(self.hidden, dtype=self.dtype, name=f"fc{j}")(x))
            if not self.dropout_first:
                x = Dropout(self.dropout_rate, name=f"drop{j}")(x, deterministic=not train)
        x = Dense(self.num_classes, dtype=self.dtype, name="fc8")(x)
        return x.astype(jnp.float32)


register(
    "alexnet",
    partial(AlexNet, layers=ALEXNET_CONFIGS["alexnet"]),
    input_shape=(227, 227, 3),
    num_classes=1000,
    source="Krizhevsky et al. 2012, section 3 and Figure 2",
    family="alexnet",
    reference_params=60_965_224,
    params_note="two-GPU paper net as one model: groups=2 on conv2/4/5, biases everywhere; exact",
)
register(
    "alexnet_torchvision",
    partial(
        AlexNet, layers=ALEXNET_CONFIGS["alexnet_torchvision"], dropout_first=True, adaptive_pool=6
    ),
    input_shape=(224, 224, 3),
    num_classes=1000,
    source="torchvision alexnet (Krizhevsky 2014, one weird trick)",
    family="alexnet",
    reference_params=61_100_840,
    params_note="torchvision definition (64/192/384/256/256, no LRN, no groups); exact",
)
register(
    "zfnet",
    partial(AlexNet, layers=ALEXNET_CONFIGS["zfnet"], ceil_mode=True),
    input_shape=(224, 224, 3),
    num_classes=1000,
    source="Zeiler & Fergus 2014, Figure 3",
    family="alexnet",
    reference_params=62_357_608,
    params_note=(
        "dense convs (no groups), biases everywhere, FC 9216 -> 4096 -> 4096 -> 1000; exact"
    ),
)
