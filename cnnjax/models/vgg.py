"""VGG (Simonyan & Zisserman 2015), configurations A/B/D/E of Table 1, with and without BatchNorm.

Stacks of 3x3 convolutions (stride 1, padding 1) with ReLU, 2x2/2 max pooling between the five
stages, then FC 4096 -> ReLU -> dropout 0.5 -> FC 4096 -> ReLU -> dropout 0.5 -> FC classes. The
"_bn" variants put BatchNorm between each convolution and its ReLU and keep the convolution bias,
as torchvision's `vgg*_bn` do, so every count equals torchvision's exactly (vgg16: 138,357,544).
torchvision pools adaptively to 7x7 before FC6, and so do the registered models
(`adaptive_avg_pool`): FC6 reads 7x7x512 at every input size, so torchvision's weights fit any
input and the parameter count does not depend on it. At 224x224 the map already is 7x7 and the
pool is skipped. `adaptive_pool=None` flattens the last map as it is instead (FC6 then reads 512
values at 32x32, the small CIFAR-style head).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import functional as F
from cnnjax.models._checks import check_image_input, check_positive_int, check_widths
from cnnjax.models.registry import register
from cnnjax.nn import Conv, Dense, Dropout, Flatten, MaxPool, batch_norm_for

Array = jax.Array

# Table 1 of Simonyan & Zisserman 2015: conv3 widths, 'M' = 2x2/2 max pool.
# fmt: off
VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),  # A
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),  # B
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
         512, 512, 512, "M", 512, 512, 512, "M"),  # D
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),  # E
}
# fmt: on

# torchvision's parameter counts (1000 classes), plain / with BatchNorm.
TORCHVISION_PARAMS = {
    11: (132_863_336, 132_868_840),
    13: (133_047_848, 133_053_736),
    16: (138_357_544, 138_365_992),
    19: (143_667_240, 143_678_248),
}


class VGG(nn.Module):
    """VGG: stages of 3x3 conv (+ BatchNorm) + ReLU separated by 2x2 max pools,
    then three FC layers.

    Args:
      num_classes: outputs of the last FC layer.
      config: conv widths and 'M' pools, a value of VGG_CONFIGS.
      batch_norm: BatchNorm after every convolution (the torchvision "_bn" models).
      hidden: width of FC6 and FC7 (4096).
      dropout_rate: dropout after the ReLUs of FC6 and FC7 (0.5).
      in_channels: channels the NHWC input must have.
      kernel_init: initializer of the convolutions (torchvision: He normal, fan out).
      dtype: compute dtype (None: the input's); parameters and BN statistics stay float32.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics.
      bn_momentum: BatchNorm running-average momentum (Flax convention).
      adaptive_pool: side of torchvision's adaptive average pool before FC6 (7 in the registered
        models); None flattens the last map as it is.

    Layers are named as in the Caffe models: conv{stage}_{i} (bn{stage}_{i}), pool{stage}, fc6-fc8.
    """

    num_classes: int
    config: Sequence[int | str] = VGG_CONFIGS[16]
    batch_norm: bool = False
    hidden: int = 4096
    dropout_rate: float = 0.5
    in_channels: int = 3
    kernel_init: Any = "he_normal_fan_out"
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    adaptive_pool: int | None = None

    def min_input_size(self) -> int:
        """Smallest input side that survives every 2x2 pool (32 for the
        five-pool configurations)."""
        return 2 ** sum(1 for v in self.config if v == "M")

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_widths("VGG", "config", self.config, words=("M",))
        check_positive_int("VGG", "hidden", self.hidden)
        if self.adaptive_pool is not None:
            check_positive_int("VGG", "adaptive_pool", self.adaptive_pool)
        check_image_input(
            x,
            "VGG",
            min_size=self.min_input_size(),
            in_channels=self.in_channels,
            size_note=" (one per 2x2 pool)",
            fix="resize or pad the images (224 natively)",
        )
        conv = partial(
            Conv, kernel_size=3, padding=1, kernel_init=self.kernel_init, dtype=self.dtype
        )
        norm = batch_norm_for(self, train)
        if self.dtype is not None:
            x = x.astype(self.dtype)

        stage, index = 1, 1
        for v in self.config:
            if v == "M":
                x = MaxPool(2, 2, name=f"pool{stage}")(x)
                stage, index = stage + 1, 1
                continue
            x = conv(int(v), name=f"conv{stage}_{index}")(x)
            if self.batch_norm:
                x = norm(name=f"bn{stage}_{index}")(x)
            x = jax.nn.relu(x)
            index += 1

        if self.adaptive_pool is not None:
            x = F.adaptive_avg_pool(x, self.adaptive_pool)
        x = Flatten(name="flatten")(x)
        for j in (6, 7):
            x = jax.nn.relu(Dense(self.hidden, dtype=self.dtype, name=f"fc{j}")(x))
            x = Dropout(self.dropout_rate, name=f"drop{j}")(x, deterministic=not train)
        x = Dense(self.num_classes, dtype=self.dtype, name="fc8")(x)
        return x.astype(jnp.float32)


_LETTER = {11: "A", 13: "B", 16: "D", 19: "E"}
for _depth, _cfg in VGG_CONFIGS.items():
    for _bn, _params in zip((False, True), TORCHVISION_PARAMS[_depth]):
        register(
            f"vgg{_depth}{'_bn' if _bn else ''}",
            partial(VGG, config=_cfg, batch_norm=_bn, adaptive_pool=7),
            input_shape=(224, 224, 3),
            num_classes=1000,
            source=f"Simonyan & Zisserman 2015, Table 1 configuration {_LETTER[_depth]}"
            + (" + BatchNorm (torchvision)" if _bn else ""),
            family="vgg",
            reference_params=_params,
            params_note=(
                "torchvision definition (conv bias kept with BatchNorm; "
                "scale and bias per BN); exact"
            ),
        )
