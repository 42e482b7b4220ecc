"""Inception-v4 and Inception-ResNet-v2 (Szegedy et al. 2016, "Inception-v4, Inception-ResNet and
the Impact of Residual Connections on Learning").

Every block is a set of parallel branches whose outputs are concatenated on channels; the
branches are data (the tables below), built by one `InceptionBlock` module. In the Inception-ResNet
blocks the concatenation is projected back to the input width by a 1x1 convolution with bias,
scaled (0.17, 0.1, 0.2 for the A, B and C blocks: section 3.3 of the paper) and added to the input.

Conventions are those of the common port of Google's TF-slim checkpoints (Cadene's
`pretrainedmodels`, timm `inception_v4.py` / `inception_resnet_v2.py`), which give the published
parameter counts exactly with 1000 classes: every "conv" is conv (no bias) -> BatchNorm (scale
and bias, epsilon 1e-3) -> ReLU; 'valid' convolutions are unpadded; branch average pools are 3x3,
stride 1, padding 1, not counting the padding; the head is global average pooling, dropout
(keep 0.8, as in the paper's Figures 9 and 15) and a fully connected layer with bias. No
auxiliary classifier. Inception-ResNet-v2 follows TF-slim (and the released weights) rather than
the paper's Figure 3 stem: an Inception-v3-style stem, a 'Mixed_5b' block giving 320 channels,
blocks of 320/1088/2080 channels, and a last C block with scale 1 and no ReLU followed by a 1x1
conv to 1536 channels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import functional as F
from cnnjax.models._checks import check_image_input
from cnnjax.models.registry import register
from cnnjax.nn import AvgPool, Conv, Dense, Dropout, GlobalAvgPool, MaxPool, batch_norm_for

Array = jax.Array
ModuleDef = Any


class C(NamedTuple):
    """A conv-BN-ReLU layer in a branch table: output channels, kernel, stride, padding."""

    features: int
    kernel: int | tuple[int, int]
    stride: int = 1
    padding: int | tuple[int, int] = 0


MAX = "max"  # 3x3 max pool, stride 2, no padding
AVG = "avg"  # 3x3 average pool, stride 1, padding 1, padding not counted


class Fork(NamedTuple):
    """Sub-branches applied to the same input and concatenated (Inception-C's split 1x3 / 3x1)."""

    left: tuple
    right: tuple


_1x7, _7x1 = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
_1x3, _3x1 = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))

# Inception-v4, Figures 3-8 (Szegedy et al. 2016); branch order as in the TF-slim checkpoints.
INCEPTION_V4_BLOCKS = {
    "mixed_3a": ((MAX,), (C(96, 3, 2),)),
    "mixed_4a": ((C(64, 1), C(96, 3)), (C(64, 1), C(64, **_1x7), C(64, **_7x1), C(96, 3))),
    "mixed_5a": ((C(192, 3, 2),), (MAX,)),
    "inception_a": (
        (C(96, 1),),
        (C(64, 1), C(96, 3, 1, 1)),
        (C(64, 1), C(96, 3, 1, 1), C(96, 3, 1, 1)),
        (AVG, C(96, 1)),
    ),
    "reduction_a": ((C(384, 3, 2),), (C(192, 1), C(224, 3, 1, 1), C(256, 3, 2)), (MAX,)),
    "inception_b": (
        (C(384, 1),),
        (C(192, 1), C(224, **_1x7), C(256, **_7x1)),
        (C(192, 1), C(192, **_7x1), C(224, **_1x7), C(224, **_7x1), C(256, **_1x7)),
        (AVG, C(128, 1)),
    ),
    "reduction_b": (
        (C(192, 1), C(192, 3, 2)),
        (C(256, 1), C(256, **_1x7), C(320, **_7x1), C(320, 3, 2)),
        (MAX,),
    ),
    "inception_c": (
        (C(256, 1),),
        (C(384, 1), Fork((C(256, **_1x3),), (C(256, **_3x1),))),
        (C(384, 1), C(448, **_3x1), C(512, **_1x3), Fork((C(256, **_1x3),), (C(256, **_3x1),))),
        (AVG, C(256, 1)),
    ),
}

# Inception-ResNet-v2 as in TF-slim `inception_resnet_v2.py` (Figures 16-19 of the paper give the
# A/B/C branch widths; the stem and Mixed_5b are TF-slim's).
INCEPTION_RESNET_V2_BLOCKS = {
    "mixed_5b": (
        (C(96, 1),),
        (C(48, 1), C(64, 5, 1, 2)),
        (C(64, 1), C(96, 3, 1, 1), C(96, 3, 1, 1)),
        (AVG, C(64, 1)),
    ),
    "block_a": (
        (C(32, 1),),
        (C(32, 1), C(32, 3, 1, 1)),
        (C(32, 1), C(48, 3, 1, 1), C(64, 3, 1, 1)),
    ),
    "reduction_a": ((C(384, 3, 2),), (C(256, 1), C(256, 3, 1, 1), C(384, 3, 2)), (MAX,)),
    "block_b": ((C(192, 1),), (C(128, 1), C(160, **_1x7), C(192, **_7x1))),
    "reduction_b": (
        (C(256, 1), C(384, 3, 2)),
        (C(256, 1), C(288, 3, 2)),
        (C(256, 1), C(288, 3, 1, 1), C(320, 3, 2)),
        (MAX,),
    ),
    "block_c": ((C(192, 1),), (C(192, 1), C(224, **_1x3), C(256, **_3x1))),
}


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation: the port's BasicConv2d."""

    features: int
    kernel_size: int | tuple[int, int]
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    strides: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = self.conv(
            self.features, self.kernel_size, strides=self.strides, padding=self.padding, name="conv"
        )(x)
        return self.norm(name="bn")(x, activation=self.act)


class InceptionBlock(nn.Module):
    """Parallel branches (a table of C / MAX / AVG / Fork) concatenated on channels.

    With `residual_scale`, the concatenation is projected by a 1x1 conv with bias to the input's
    channels ('proj_conv'), scaled, added to the input and (if `activate`) passed through ReLU.
    """

    branches: tuple
    conv_bn: ModuleDef
    conv: ModuleDef
    act: Callable[[Array], Array]
    residual_scale: float | None = None
    activate: bool = True

    def _layer(self, layer, x: Array, name: str) -> Array:
        if layer == MAX:
            return MaxPool(3, 2, name=name)(x)
        if layer == AVG:
            return AvgPool(3, 1, padding=1, count_include_pad=False, name=name)(x)
        if isinstance(layer, Fork):
            left, right = (
                self._branch(layer.left, x, name + "a"),
                self._branch(layer.right, x, name + "b"),
            )
            return jnp.concatenate([left, right], axis=-1)
        return self.conv_bn(
            layer.features, layer.kernel, strides=layer.stride, padding=layer.padding, name=name
        )(x)

    def _branch(self, layers: Sequence, x: Array, prefix: str) -> Array:
        # Layer j of branch i is 'branch{i}_{j}'; a fork's sub-branches are
        # 'branch{i}_{j}a_{k}' and '..b_{k}'.
        for j, layer in enumerate(layers):
            x = self._layer(layer, x, f"{prefix}_{j}")
        return x

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = jnp.concatenate(
            [self._branch(b, x, f"branch{i}") for i, b in enumerate(self.branches)], axis=-1
        )
        if self.residual_scale is None:
            return y
        y = self.conv(x.shape[-1], kernel_size=1, use_bias=True, name="proj_conv")(y)
        y = x + self.residual_scale * y
        return self.act(y) if self.activate else y


# Strides of the unpadded 3x3 convs/pools that shrink the maps, in both networks' order
# (stem: conv1, conv2, pool or conv, 3x3 conv, pool or conv; then Reduction-A and -B).
_VALID_3X3_STRIDES = (2, 1, 2, 1, 2, 2, 2)


def _min_input_size() -> int:
    """Smallest input height/width (75) whose maps keep at least one pixel after Reduction-B."""
    n = 1
    while True:
        size = n
        for s in _VALID_3X3_STRIDES:
            size = F.output_size(size, 3, s)
        if size >= 1:
            return n
        n += 1


class _InceptionBase(nn.Module):
    """Shared fields and layer constructors of the two networks (see their docstrings)."""

    num_classes: int
    drop_rate: float = 0.2
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-3

    @staticmethod
    def min_input_size() -> int:
        """Smallest input height/width (75) that leaves one pixel after Reduction-B."""
        return _min_input_size()

    def _check_input(self, x: Array, name: str) -> None:
        check_image_input(
            x, name, min_size=self.min_input_size(), size_note=" (299x299 by default)"
        )

    def _layers(self, train: bool):
        conv = partial(Conv, use_bias=False, dtype=self.dtype)
        norm = batch_norm_for(self, train)
        act = jax.nn.relu
        conv_bn = partial(ConvBN, conv=conv, norm=norm, act=act)
        block = partial(InceptionBlock, conv_bn=conv_bn, conv=conv, act=act)
        return conv_bn, block

    def _head(self, x: Array, train: bool) -> Array:
        x = Dropout(self.drop_rate, name="dropout")(
            GlobalAvgPool(name="global_pool")(x), deterministic=not train
        )
        return Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)


class InceptionV4(_InceptionBase):
    """Inception-v4 (Figure 9 of Szegedy et al. 2016).

    Args:
      num_classes: outputs of the final fully connected layer.
      num_blocks: Inception-A, -B and -C blocks (4, 7, 3).
      drop_rate: dropout before the classifier (0.2, keep probability 0.8, in the paper).
      dtype: compute dtype (None: the input's); parameters and BN statistics stay float32.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics.
      bn_momentum: BatchNorm running-average momentum (Flax convention).
      bn_epsilon: BatchNorm epsilon (1e-3, TF-slim's, as in the port).
    """

    num_blocks: Sequence[int] = (4, 7, 3)

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        self._check_input(x, "InceptionV4")
        if len(self.num_blocks) != 3 or min(self.num_blocks) < 0:
            raise ValueError(
                f"num_blocks must give the (A, B, C) repeat counts, got {self.num_blocks!r}"
            )
        conv_bn, block = self._layers(train)
        t = INCEPTION_V4_BLOCKS
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = conv_bn(32, 3, strides=2, name="stem_conv1")(x)
        x = conv_bn(32, 3, name="stem_conv2")(x)
        x = conv_bn(64, 3, padding=1, name="stem_conv3")(x)
        for name in ("mixed_3a", "mixed_4a", "mixed_5a"):
            x = block(t[name], name=f"stem_{name}")(x)
        for kind, reduction, repeats in (
            ("a", "reduction_a", self.num_blocks[0]),
            ("b", "reduction_b", self.num_blocks[1]),
            ("c", None, self.num_blocks[2]),
        ):
            for i in range(repeats):
                x = block(t[f"inception_{kind}"], name=f"inception_{kind}{i + 1}")(x)
            if reduction:
                x = block(t[reduction], name=reduction)(x)
        return self._head(x, train)


class InceptionResNetV2(_InceptionBase):
    """Inception-ResNet-v2 (Szegedy et al. 2016, Figure 15; TF-slim layout).

    Args:
      num_classes: outputs of the final fully connected layer.
      num_blocks: Inception-ResNet-A, -B and -C blocks (10, 20, 10); the last C block has
        scale 1 and no ReLU.
      residual_scales: scales of the residual branches of the A, B, C blocks (0.17, 0.1, 0.2).
      drop_rate: dropout before the classifier (0.2, keep probability 0.8, in the paper).
      dtype: compute dtype (None: the input's); parameters and BN statistics stay float32.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics.
      bn_momentum: BatchNorm running-average momentum (Flax convention).
      bn_epsilon: BatchNorm epsilon (1e-3, TF-slim's, as in the port).
    """

    num_blocks: Sequence[int] = (10, 20, 10)
    residual_scales: Sequence[float] = (0.17, 0.1, 0.2)

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        self._check_input(x, "InceptionResNetV2")
        if len(self.num_blocks) != 3 or min(self.num_blocks) < 0 or self.num_blocks[2] < 1:
            raise ValueError(
                f"num_blocks must give the (A, B, C) repeat counts with at least one C block, "
                f"got {self.num_blocks!r}"
            )
        conv_bn, block = self._layers(train)
        t = INCEPTION_RESNET_V2_BLOCKS
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = conv_bn(32, 3, strides=2, name="stem_conv1")(x)
        x = conv_bn(32, 3, name="stem_conv2")(x)
        x = conv_bn(64, 3, padding=1, name="stem_conv3")(x)
        x = MaxPool(3, 2, name="stem_pool1")(x)
        x = conv_bn(80, 1, name="stem_conv4")(x)
        x = conv_bn(192, 3, name="stem_conv5")(x)
        x = MaxPool(3, 2, name="stem_pool2")(x)
        x = block(t["mixed_5b"], name="stem_mixed_5b")(x)
        for kind, reduction, repeats, scale in zip(
            "abc", ("reduction_a", "reduction_b", None), self.num_blocks, self.residual_scales
        ):
            for i in range(repeats):
                last = kind == "c" and i == repeats - 1
                x = block(
                    t[f"block_{kind}"],
                    residual_scale=1.0 if last else scale,
                    activate=not last,
                    name=f"block_{kind}{i + 1}",
                )(x)
            if reduction:
                x = block(t[reduction], name=reduction)(x)
        x = conv_bn(1536, 1, name="final_conv")(x)
        return self._head(x, train)


_SOURCE = "Szegedy et al. 2016; TF-slim layout as ported by Cadene pretrainedmodels / timm"
_NOTE = (
    "exact count of the common port with 1000 classes (bias-free convs, "
    "BN scale+bias, residual 1x1 projections with bias, FC with bias, "
    "no auxiliary head); the TF-slim checkpoints have 1001 classes"
)
register(
    "inception_v4",
    InceptionV4,
    input_shape=(299, 299, 3),
    num_classes=1000,
    family="inception_v4",
    dataset="imagenet",
    source=_SOURCE + " (Figure 9)",
    reference_params=42_679_816,
    params_rtol=0.0,
    params_note=_NOTE,
)
register(
    "inception_resnet_v2",
    InceptionResNetV2,
    input_shape=(299, 299, 3),
    num_classes=1000,
    family="inception_v4",
    dataset="imagenet",
    source=_SOURCE + " (Figure 15)",
    reference_params=55_843_464,
    params_rtol=0.0,
    params_note=_NOTE,
)
