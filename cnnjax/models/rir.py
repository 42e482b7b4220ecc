"""ResNet in ResNet (Targ, Almeida & Lyman 2016, "Resnet in Resnet: Generalizing
Residual Architectures").

A generalized residual layer keeps two streams, a residual stream r (with an identity shortcut)
and a transient stream t (without), and mixes them with four convolutions (eq. 1):

    r' = sigma(conv(r, W_rr) + conv(t, W_tr) + shortcut(r))
    t' = sigma(conv(r, W_rt) + conv(t, W_tt))

with sigma = BN then ReLU. As in the paper's "ResNet Init", the four convolutions are one
convolution of the concatenated streams [r, t] (kernel rows: inputs r then t; columns: outputs
r then t), so the layer costs what a plain conv of the same total width costs. RiR replaces
each conv of a two-layer ResNet block by such a layer and keeps the block's own shortcut on
the residual stream (Figure 1d).

The "18-layer + wide" CIFAR model (5.01% C10 error, 22.90% C100) is taken here as: a 3x3 stem
(96 = 48 + 48 channels), stages of 2, 3 and 3 RiR blocks of total width 96, 192 and 384 (the
first block of stages 2 and 3 strides 2 in its first layer), global average pooling of both
streams and a Dense classifier: 1 + 8 x 2 + 1 = 18 weighted layers. This follows the layout of
the public ports (nutszebra's Chainer port, weiaicunzai/pytorch-cifar100); their classifier heads
differ and we could not check the paper's table, so the head is the lecture's GAP + FC. All
shortcuts (inner and outer) are parameter-free: subsampling plus zero channel padding. The
model has 9,469,930 parameters for 10 classes (9,458,208 of them convolution weights);
the paper's text that we could read gives no count to compare with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.models._checks import check_positive_int
from cnnjax.models.registry import register
from cnnjax.models.resnet import zero_pad_shortcut
from cnnjax.nn import Conv, Dense, GlobalAvgPool, batch_norm_for

ModuleDef = Any


class GeneralizedResidualLayer(nn.Module):
    """One generalized residual layer (eq. 1), as one convolution of the concatenated streams.

    Args:
      features: output channels of each stream.
      conv, norm, act: layer constructors.
      strides: stride of the convolution (and of the residual shortcut).
      shortcut: add the identity (option A when the shape changes) to the residual stream.
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    shortcut: bool = True

    @nn.compact
    def __call__(self, r: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        c = self.features
        z = self.conv(2 * c, 3, self.strides, 1, name="conv")(jnp.concatenate([r, t], axis=-1))
        zr, zt = z[..., :c], z[..., c:]
        if self.shortcut:
            zr = zr + zero_pad_shortcut(r, c, self.strides).astype(zr.dtype)
        # BatchNorm is per channel, so one BN of [r, t] is the paper's two.
        z = self.norm(name="bn")(jnp.concatenate([zr, zt], axis=-1), activation=self.act)
        return z[..., :c], z[..., c:]


class RiRBlock(nn.Module):
    """A ResNet block whose layers are generalized residual layers, with its own outer shortcut.

    Args:
      features: output channels of each stream.
      conv, norm, act: layer constructors.
      strides: stride of the first layer.
      layers: generalized residual layers in the block (2, as the ResNet block it replaces).
      inner_shortcut: the per-layer shortcut of the residual stream.
      outer_shortcut: the block's shortcut around all its layers (residual stream only).
    """

    features: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    layers: int = 2
    inner_shortcut: bool = True
    outer_shortcut: bool = True

    @nn.compact
    def __call__(self, r: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        r_in = r
        for i in range(self.layers):
            r, t = GeneralizedResidualLayer(
                self.features,
                self.conv,
                self.norm,
                self.act,
                strides=self.strides if i == 0 else 1,
                shortcut=self.inner_shortcut,
                name=f"layer{i + 1}",
            )(r, t)
        if self.outer_shortcut:
            r = r + zero_pad_shortcut(r_in, self.features, self.strides).astype(r.dtype)
        return r, t


class RiR(nn.Module):
    """ResNet in ResNet for CIFAR (Targ et al. 2016).

    Args:
      num_classes: classifier outputs.
      stage_sizes: RiR blocks per stage; the first block of every stage after the first strides 2.
      stage_widths: total width (residual + transient stream, split equally) of each stage.
      stem_width: total width of the 3x3 stem (conv + BN + ReLU, then split into r and t).
      layers_per_block: generalized residual layers per RiR block.
      inner_shortcut, outer_shortcut: switch the two levels of shortcuts off for ablations
        (both off gives a plain two-stream CNN).
      dtype: compute dtype (parameters and BN statistics stay float32).
      bn_axis_name: mapped axis for cross-device BatchNorm statistics.
      bn_momentum: running-average momentum (Flax convention, 0.9).
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 3, 3)
    stage_widths: Sequence[int] = (96, 192, 384)
    stem_width: int = 96
    layers_per_block: int = 2
    inner_shortcut: bool = True
    outer_shortcut: bool = True
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        check_positive_int("RiR", "layers_per_block", self.layers_per_block)
        widths = (self.stem_width, *self.stage_widths)
        if any(w % 2 for w in widths) or len(self.stage_sizes) != len(self.stage_widths):
            raise ValueError(
                f"RiR: stem_width and stage_widths {widths} must be even "
                "(split into two equal streams) and stage_widths must "
                f"match stage_sizes {tuple(self.stage_sizes)} in length"
            )
        min_size = 2 ** (len(self.stage_sizes) - 1)
        if x.ndim != 4 or min(x.shape[1:3]) < min_size:
            raise ValueError(
                f"RiR: x must be NHWC with height and width >= {min_size}, got shape "
                f"{tuple(x.shape)}; the CIFAR model expects input_shape (32, 32, 3)"
            )
        conv = partial(Conv, use_bias=False, dtype=self.dtype)
        norm = batch_norm_for(self, train)
        x = nn.relu(norm(name="stem_bn")(conv(self.stem_width, 3, 1, 1, name="stem_conv")(x)))
        r, t = x[..., : self.stem_width // 2], x[..., self.stem_width // 2 :]
        for s, (n, w) in enumerate(zip(self.stage_sizes, self.stage_widths), start=1):
            for b in range(1, n + 1):
                r, t = RiRBlock(
                    w // 2,
                    conv,
                    norm,
                    nn.relu,
                    strides=2 if (s > 1 and b == 1) else 1,
                    layers=self.layers_per_block,
                    inner_shortcut=self.inner_shortcut,
                    outer_shortcut=self.outer_shortcut,
                    name=f"stage{s}_block{b}",
                )(r, t)
        x = GlobalAvgPool(name="pool")(jnp.concatenate([r, t], axis=-1))
        return Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)


register(
    "rir18_wide",
    RiR,
    input_shape=(32, 32, 3),
    num_classes=10,
    family="resnet",
    dataset="cifar10",
    source="Targ et al. 2016, Table 1 ('18-layer + wide RiR', 5.01% C10 / 22.90% C100 error)",
    params_note=(
        "our reading of the 18-layer + wide layout (see rir.py); no published count checked"
    ),
)
