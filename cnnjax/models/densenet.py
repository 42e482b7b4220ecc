"""DenseNet (Huang et al. 2017): ImageNet DenseNet-121/169/201/264/161 and CIFAR DenseNet-BC.

Every layer of a dense block sees the concatenation of the block input and of all earlier layers'
outputs, and adds `growth_rate` channels of its own (BN-ReLU-conv1x1(bn_size*k)-BN-ReLU-conv3x3(k),
the "B" bottleneck); transitions (BN-ReLU-conv1x1-avgpool 2x2) compress the channels by
`compression` (the "C"). The ImageNet variants reproduce torchvision's `densenet.py` exactly
(parameter counts included; DenseNet-264, which torchvision does not build, is its `DenseNet` class
with the paper's configuration); the CIFAR DenseNet-BC variants reproduce the paper's Table 2 models
as in the authors' Torch code and its common PyTorch ports (3x3 stem with 2k channels and no
BatchNorm, (L - 4) / 6 bottleneck layers per block).

Memory: concatenating at every layer keeps, for the backward pass, one concatenated input per
layer, so activation memory grows quadratically with the layers of a block. With
`memory_efficient=True` each layer is rematerialised (`nn.remat`) with the concatenation inside
it, so only the individual k-channel outputs are stored (linear memory) and the concat, BN1, ReLU
and 1x1 conv are recomputed in the backward pass (torchvision's `memory_efficient` trade).
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
from cnnjax.nn import AvgPool, Conv, Dense, Dropout, GlobalAvgPool, MaxPool, batch_norm_for

Array = jax.Array
ModuleDef = Any

# ImageNet (Table 1, Huang et al. 2017; torchvision): layers per dense block, growth rate.
IMAGENET_CONFIGS = {
    121: ((6, 12, 24, 16), 32),
    169: ((6, 12, 32, 32), 32),
    201: ((6, 12, 48, 32), 32),
    264: ((6, 12, 64, 48), 32),
    161: ((6, 12, 36, 24), 48),
}

# CIFAR DenseNet-BC (Table 2, Huang et al. 2017): depth L -> growth rate k;
# (L - 4) / 6 layers per block.
CIFAR_BC_CONFIGS = {100: 12, 250: 24, 190: 40}


def cifar_bc_block_sizes(depth: int) -> tuple[int, int, int]:
    """Three dense blocks of (depth - 4) / 6 bottleneck layers each (DenseNet-BC on CIFAR)."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"DenseNet-BC depth must be 6n + 4 with n >= 1 (e.g. 100, 190, 250), got {depth!r}"
        )
    n = (depth - 4) // 6
    return (n, n, n)


class DenseLayer(nn.Module):
    """One bottleneck layer: concat(inputs) -> BN-ReLU-conv1x1(bn_size*k) ->
    BN-ReLU-conv3x3(k) -> dropout."""

    growth_rate: int
    bn_size: int
    drop_rate: float
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]

    @nn.compact
    def __call__(self, inputs: Sequence[Array], train: bool) -> Array:
        x = jnp.concatenate(list(inputs), axis=-1)
        x = self.norm(name="bn1")(x, activation=self.act)
        x = self.conv(self.bn_size * self.growth_rate, kernel_size=1, name="conv1")(x)
        x = self.norm(name="bn2")(x, activation=self.act)
        x = self.conv(self.growth_rate, kernel_size=3, padding=1, name="conv2")(x)
        return Dropout(self.drop_rate, name="dropout")(x, deterministic=not train)


class DenseBlock(nn.Module):
    """`num_layers` DenseLayers; returns the concatenation of the input and every layer's output."""

    num_layers: int
    growth_rate: int
    bn_size: int
    drop_rate: float
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]
    memory_efficient: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        # static_argnums counts the module: (self, inputs, train).
        layer_cls = (
            nn.remat(DenseLayer, static_argnums=(2,)) if self.memory_efficient else DenseLayer
        )
        features = [x]
        for i in range(self.num_layers):
            layer = layer_cls(
                self.growth_rate,
                self.bn_size,
                self.drop_rate,
                self.conv,
                self.norm,
                self.act,
                name=f"layer{i + 1}",
            )
            features.append(layer(features, train))
        return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1(features) followed by 2x2 average pooling with stride 2."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = self.conv(self.features, kernel_size=1, name="conv")(
            self.norm(name="bn")(x, activation=self.act)
        )
        return AvgPool(2, 2, name="pool")(x)


def _imagenet_stem_size(n: int) -> int:
    return F.output_size(F.output_size(n, 7, 2, 3), 3, 2, 1)


class DenseNet(nn.Module):
    """DenseNet with bottleneck layers and compressing transitions (DenseNet-BC).

    Args:
      num_classes: outputs of the final fully connected layer.
      block_sizes: layers in each dense block; a transition follows every block but the last.
      growth_rate: k, channels added by each layer.
      num_init_features: channels of the stem convolution; None means 2 * growth_rate (64 for
        DenseNet-121/169/201, 96 for DenseNet-161, 2k for DenseNet-BC on CIFAR).
      bn_size: the 1x1 bottleneck has bn_size * growth_rate channels (4 in the paper).
      compression: theta, a transition outputs floor(theta * channels) channels (0.5 for "-BC").
      drop_rate: dropout after each layer's 3x3 convolution (the paper uses 0.2 on CIFAR without
        data augmentation, 0 otherwise).
      stem: 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool) or 'cifar' (one 3x3 conv, no BN).
      memory_efficient: rematerialise each dense layer so that activation memory grows linearly
        instead of quadratically with depth (same outputs and gradients, more compute).
      kernel_init: initializer of the convolutions (torchvision: He normal, fan in).
      dtype: compute dtype (None: the input's); parameters and BN statistics stay float32.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics.
      bn_momentum: BatchNorm running-average momentum (Flax convention).
      bn_epsilon: BatchNorm epsilon.
    """

    num_classes: int
    block_sizes: Sequence[int] = (6, 12, 24, 16)
    growth_rate: int = 32
    num_init_features: int | None = None
    bn_size: int = 4
    compression: float = 0.5
    drop_rate: float = 0.0
    stem: str = "imagenet"
    memory_efficient: bool = False
    kernel_init: str | Callable[..., Array] = "he_normal_fan_in"
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def min_input_size(self) -> int:
        """Smallest input height/width that leaves at least one pixel after the last transition."""
        stem = _imagenet_stem_size if self.stem == "imagenet" else (lambda n: n)
        n = 1
        while (stem(n) >> (len(self.block_sizes) - 1)) < 1:
            n += 1
        return n

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        check_widths("DenseNet", "block_sizes", self.block_sizes)
        for name in ("growth_rate", "bn_size"):
            check_positive_int("DenseNet", name, getattr(self, name))
        if self.num_init_features is not None:
            check_positive_int("DenseNet", "num_init_features", self.num_init_features)
        if not 0.0 < self.compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")
        check_image_input(
            x,
            f"DenseNet ({self.stem} stem, {len(self.block_sizes)} blocks)",
            min_size=self.min_input_size(),
        )
        conv = partial(Conv, use_bias=False, kernel_init=self.kernel_init, dtype=self.dtype)
        norm = batch_norm_for(self, train)
        act = jax.nn.relu
        if self.dtype is not None:
            x = x.astype(self.dtype)

        channels = self.num_init_features or 2 * self.growth_rate
        if self.stem == "imagenet":
            x = conv(channels, kernel_size=7, strides=2, padding=3, name="stem_conv")(x)
            x = MaxPool(3, 2, padding=1, name="stem_pool")(norm(name="stem_bn")(x, activation=act))
        else:
            x = conv(channels, kernel_size=3, padding=1, name="stem_conv")(x)

        for i, num_layers in enumerate(self.block_sizes):
            x = DenseBlock(
                int(num_layers),
                self.growth_rate,
                self.bn_size,
                self.drop_rate,
                conv,
                norm,
                act,
                memory_efficient=self.memory_efficient,
                name=f"block{i + 1}",
            )(x, train)
            channels += int(num_layers) * self.growth_rate
            if i != len(self.block_sizes) - 1:
                channels = int(channels * self.compression)
                x = Transition(channels, conv, norm, act, name=f"transition{i + 1}")(x)

        x = GlobalAvgPool(name="global_pool")(norm(name="final_bn")(x, activation=act))
        x = Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)


def _register_imagenet(depth: int, params: int, source: str, note: str) -> None:
    sizes, k = IMAGENET_CONFIGS[depth]
    register(
        f"densenet{depth}",
        partial(DenseNet, block_sizes=sizes, growth_rate=k),
        input_shape=(224, 224, 3),
        num_classes=1000,
        family="densenet",
        dataset="imagenet",
        source=source,
        reference_params=params,
        params_rtol=0.0,
        params_note=note,
    )


for _depth, _params in ((121, 7_978_856), (169, 14_149_480), (201, 20_013_928), (161, 28_681_000)):
    _register_imagenet(
        _depth,
        _params,
        "Huang et al. 2017, Table 1; torchvision densenet.py",
        "exact torchvision count: bias-free convs, BN scale+bias, FC with bias",
    )
# The paper prints no count for DenseNet-264; torchvision has the class but no builder for it.
_register_imagenet(
    264,
    33_337_704,
    "Huang et al. 2017, Table 1 (DenseNet-264); torchvision densenet.py",
    "exact count of torchvision's DenseNet(32, (6, 12, 64, 48), 64) (its "
    "densenet121 layout with the paper's blocks): bias-free convs, BN scale+bias, "
    "FC with bias",
)

# Paper-rounded counts (Table 2); 100-12 is exact for the common implementation (C10, FC with bias).
_CIFAR_BC_PARAMS = {
    100: (769_162, 0.0),
    250: (15_300_000, 0.05 / 15.3),
    190: (25_600_000, 0.05 / 25.6),
}

for _depth, _k in CIFAR_BC_CONFIGS.items():
    _ref, _rtol = _CIFAR_BC_PARAMS[_depth]
    register(
        f"densenet_bc_{_depth}_{_k}",
        partial(DenseNet, block_sizes=cifar_bc_block_sizes(_depth), growth_rate=_k, stem="cifar"),
        input_shape=(32, 32, 3),
        num_classes=10,
        family="densenet",
        dataset="cifar10",
        source="Huang et al. 2017, Table 2 (DenseNet-BC)",
        reference_params=_ref,
        params_rtol=_rtol,
        params_note=(
            "exact count of the common PyTorch implementation (3x3 stem of 2k channels, "
            "no stem BN, FC with bias, 10 classes)"
            if _rtol == 0.0
            else "paper's rounded count (Table 2), within its rounding of 0.05M"
        ),
    )
