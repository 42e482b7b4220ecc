"""Dual Path Networks (Chen et al. 2017): DPN-68, DPN-92, DPN-98, DPN-107 and DPN-131.

A dual path block carries two streams: a residual path of fixed width (ResNet-like, outputs are
added) and a densely connected path that grows by `inc` channels per block (DenseNet-like,
outputs are concatenated). Both are read together (concatenated) and fed through one
pre-activation bottleneck BN-ReLU-conv1x1 -> BN-ReLU-grouped conv3x3 -> BN-ReLU-conv1x1, whose
output is split between the two paths. The first block of each stage projects the concatenated
input (BN-ReLU-conv1x1, stride 2 except in stage 2) to initialise both paths.

Conventions follow the common port of the authors' MXNet models (Cadene pretrainedmodels, timm
`dpn.py`), which gives the published parameter counts exactly: 7x7/2 stem conv without bias + BN +
ReLU + 3x3/2 max pool (DPN-68, the "small" net: a 3x3/2 stem conv and residual widths of 64, not
256, doubling per stage); pre-activation BN-ReLU-conv units with bias-free convs; a final BN-ReLU
on the concatenated paths; global average pooling; a 1x1 convolution with bias as the classifier
(parameter-for-parameter the same as a fully connected layer, kept as a conv to match the port's
kernel layout). BatchNorm epsilon is 1e-3, as in the port (the weights came from MXNet).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import functional as F
from cnnjax.models._checks import check_image_input, check_positive_int, check_widths
from cnnjax.models.registry import register
from cnnjax.nn import Conv, Dropout, GlobalAvgPool, MaxPool, batch_norm_for

Array = jax.Array
ModuleDef = Any

# Table 1 of Chen et al. 2017 and the authors' MXNet symbols (as in timm's dpn.py): stem width,
# bottleneck width k_r of stage 2 (doubling per stage), groups G of the 3x3 conv, blocks per stage,
# dense increment per stage; DPN-68 is the small layout (3x3 stem, residual width 64 in stage 2).
DPN_CONFIGS = {
    68: dict(
        num_init_features=10,
        k_r=128,
        groups=32,
        block_sizes=(3, 4, 12, 3),
        increments=(16, 32, 32, 64),
        base_width=64,
        stem_kernel=3,
    ),
    92: dict(
        num_init_features=64,
        k_r=96,
        groups=32,
        block_sizes=(3, 4, 20, 3),
        increments=(16, 32, 24, 128),
    ),
    98: dict(
        num_init_features=96,
        k_r=160,
        groups=40,
        block_sizes=(3, 6, 20, 3),
        increments=(16, 32, 32, 128),
    ),
    107: dict(
        num_init_features=128,
        k_r=200,
        groups=50,
        block_sizes=(4, 8, 20, 3),
        increments=(20, 64, 64, 128),
    ),
    131: dict(
        num_init_features=128,
        k_r=160,
        groups=40,
        block_sizes=(4, 8, 28, 3),
        increments=(16, 32, 32, 128),
    ),
}


class BNActConv(nn.Module):
    """Pre-activation unit: BN -> activation -> conv (bias-free)."""

    features: int
    kernel_size: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    strides: int = 1
    groups: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = self.norm(name="bn")(x, activation=self.act)
        return self.conv(
            self.features,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.kernel_size // 2,
            groups=self.groups,
            name="conv",
        )(x)


class DualPathBlock(nn.Module):
    """One dual path block on (residual, dense) -> (residual, dense).

    The residual path has `out_features` channels; the dense path gains `inc` channels (and
    starts with 2 * inc in a projecting block). `strides` 2 makes a downsampling projection.
    """

    bottleneck: int
    out_features: int
    inc: int
    groups: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    project: bool = False
    strides: int = 1

    @nn.compact
    def __call__(self, paths: tuple[Array, Array] | Array) -> tuple[Array, Array]:
        unit = partial(BNActConv, conv=self.conv, norm=self.norm, act=self.act)
        x = jnp.concatenate(paths, axis=-1) if isinstance(paths, tuple) else paths
        if self.project:
            s = unit(self.out_features + 2 * self.inc, 1, strides=self.strides, name="proj")(x)
            resid, dense = s[..., : self.out_features], s[..., self.out_features :]
        else:
            if not isinstance(paths, tuple) or self.strides != 1:
                raise ValueError(
                    f"{self.name}: a block without projection needs (residual, "
                    "dense) inputs and stride 1"
                )
            resid, dense = paths
        y = unit(self.bottleneck, 1, name="conv1")(x)
        y = unit(self.bottleneck, 3, strides=self.strides, groups=self.groups, name="conv2")(y)
        y = unit(self.out_features + self.inc, 1, name="conv3")(y)
        return resid + y[..., : self.out_features], jnp.concatenate(
            [dense, y[..., self.out_features :]], axis=-1
        )


class DPN(nn.Module):
    """Dual Path Network for ImageNet-style inputs (large DPN-92/98/107/131, small DPN-68).

    Args:
      num_classes: outputs of the 1x1 convolutional classifier.
      num_init_features: channels of the stride-2 stem convolution.
      k_r: bottleneck width of stage 2; stage s uses k_r * 2**(s - 2).
      groups: groups of every 3x3 convolution.
      block_sizes: dual path blocks in stages 2-5.
      increments: channels each block adds to the dense path, per stage.
      base_width: residual-path width of stage 2 (256; 64 in the small DPN-68), doubling per stage.
      stem_kernel: kernel size of the stem convolution (7; 3 in DPN-68), padded to keep the size.
      drop_rate: dropout before the classifier (0 in the paper and the port).
      dtype: compute dtype (None: the input's); parameters and BN statistics stay float32.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics.
      bn_momentum: BatchNorm running-average momentum (Flax convention).
      bn_epsilon: BatchNorm epsilon (1e-3 in the MXNet-derived port).
    """

    num_classes: int
    num_init_features: int = 64
    k_r: int = 96
    groups: int = 32
    block_sizes: Sequence[int] = (3, 4, 20, 3)
    increments: Sequence[int] = (16, 32, 24, 128)
    base_width: int = 256
    stem_kernel: int = 7
    drop_rate: float = 0.0
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-3

    def min_input_size(self) -> int:
        """Smallest input height/width: 1, as the padded stem conv, 3x3/2 pool and stride-2 stages
        keep >= 1 pixel."""
        return 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_widths("DPN", "block_sizes", self.block_sizes)
        check_widths("DPN", "increments", self.increments)
        for name in ("num_init_features", "k_r", "groups", "base_width", "stem_kernel"):
            check_positive_int("DPN", name, getattr(self, name))
        if self.stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be odd, got {self.stem_kernel}")
        if len(self.block_sizes) != 4 or len(self.increments) != 4:
            raise ValueError(
                "block_sizes and increments need 4 entries (stages 2-5) with at least one block "
                f"each, got {self.block_sizes!r} and {self.increments!r}"
            )
        check_image_input(x, "DPN", min_size=self.min_input_size())
        conv = partial(Conv, use_bias=False, dtype=self.dtype)
        norm = batch_norm_for(self, train)
        act = jax.nn.relu
        if self.dtype is not None:
            x = x.astype(self.dtype)

        x = conv(
            self.num_init_features,
            kernel_size=self.stem_kernel,
            strides=2,
            padding=self.stem_kernel // 2,
            name="stem_conv",
        )(x)
        x = MaxPool(3, 2, padding=1, name="stem_pool")(norm(name="stem_bn")(x, activation=act))

        paths: tuple[Array, Array] | Array = x
        for s, (num_blocks, inc) in enumerate(zip(self.block_sizes, self.increments)):
            width, bottleneck = self.base_width << s, self.k_r << s
            for b in range(int(num_blocks)):
                paths = DualPathBlock(
                    bottleneck,
                    width,
                    int(inc),
                    self.groups,
                    conv,
                    norm,
                    act,
                    project=b == 0,
                    strides=2 if (b == 0 and s > 0) else 1,
                    name=f"stage{s + 2}_block{b + 1}",
                )(paths)

        x = norm(name="final_bn")(jnp.concatenate(paths, axis=-1), activation=act)
        x = GlobalAvgPool(keepdims=True, name="global_pool")(x)
        x = Dropout(self.drop_rate, name="dropout")(x, deterministic=not train)
        x = Conv(
            self.num_classes, kernel_size=1, use_bias=True, dtype=self.dtype, name="classifier"
        )(x)
        return F.flatten(x).astype(jnp.float32)


_SOURCE = "Chen et al. 2017, Table 1; authors' MXNet models; Cadene pretrainedmodels / timm dpn.py"
_NOTE = (
    "exact count of the common port (bias-free convs, BN scale+bias, final BN on the concatenated "
    "paths, 1x1-conv classifier with bias, 1000 classes); timm's model card gives it to 0.01M"
)

# timm's counts of its dpn68/92/98/107/131 (model cards: 12.61M, 37.67M, 61.57M, 86.92M, 79.25M).
_PARAMS = {68: 12_611_602, 92: 37_668_392, 98: 61_570_728, 107: 86_917_800, 131: 79_254_504}

for _depth, _params in _PARAMS.items():
    register(
        f"dpn{_depth}",
        partial(DPN, **DPN_CONFIGS[_depth]),
        input_shape=(224, 224, 3),
        num_classes=1000,
        family="dpn",
        dataset="imagenet",
        source=_SOURCE,
        reference_params=_params,
        params_rtol=0.0,
        params_note=_NOTE,
    )
