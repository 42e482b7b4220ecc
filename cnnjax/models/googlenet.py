"""GoogLeNet (Szegedy et al. 2014) and BN-Inception (Ioffe & Szegedy 2015).

GoogLeNet, Table 1 and Figures 2-3 of "Going deeper with convolutions": stem conv 7x7/2 -> max
pool 3x3/2 -> LRN -> conv 1x1 64 -> conv 3x3 192 -> LRN -> max pool 3x3/2, nine Inception modules
(3a, 3b, pool, 4a-4e, pool, 5a, 5b), average pool, dropout 0.4, FC. Every conv has a bias and a
ReLU; pooling is ceil-mode, as in the Caffe reference model (bvlc_googlenet), which is what gives
Table 1's 56/28/14/7 maps from 224. The paper gives no LRN constants: Caffe's are used (n=5,
alpha=1e-4 divided by n, beta=0.75, k=1). The final 7x7/1 average pool is a global average pool
(the same at 224). With `aux_logits=True` the two auxiliary classifiers of section 5 (on 4a and 4d:
avg pool 5x5/3, conv 1x1 128, FC 1024, dropout 0.7, FC) run in training and the model returns
`(logits, [aux1, aux2])`; their parameters are created by `init` whatever `train` is.

The Inception module comes in both forms of Figure 2: 'naive' (1x1, 3x3 and 5x5 convolutions and
a 3x3 max pool side by side on the input, concatenated) and 'reduced' (1x1 reductions before the
3x3 and 5x5 convolutions and after the pool). The "5x5" branch really is 5x5 here; torchvision's
GoogLeNet has a 3x3 kernel there (a bug kept for its weights), BatchNorm and no LRN:
'googlenet_torchvision' reproduces those conventions (and its 6,624,904 parameters) on purpose,
with torchvision's aux heads (an adaptive average pool to 4x4 instead of 5x5/3: other windows on
4a's 14x14 map) and the `transform_input` its published weights are loaded with: they take
(pixel - 0.5) / 0.5, and the model maps ImageNet-normalised inputs there first.

BN-Inception ("Inception-v2" of the BatchNorm paper, Figure 5): BatchNorm after every convolution,
no LRN and no dropout, each 5x5 replaced by two 3x3, average or max pooling in the pool branch,
and the stride-2 modules 3c and 4e (no 1x1 branch, strided 3x3s, max pool passed through).
Figure 5 has typos (3c's output is 14x14, and 4c/4d output 608 channels, 4e 1056); the filter
counts of its columns are used as they are, which is what the common Caffe-derived port does
(11,295,240 parameters: conv biases kept, BN scale and shift). The first layer is a plain 7x7
convolution as in that port (TF-slim's inception_v2 defaults to a separable one).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax import functional as F
from cnnjax.models._checks import check_image_input
from cnnjax.models.registry import register
from cnnjax.nn import (
    AvgPool,
    Conv,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    LocalResponseNorm,
    MaxPool,
    batch_norm_for,
)

Array = jax.Array
ModuleDef = Any

# Table 1 of Szegedy et al. 2014: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
GOOGLENET_MODULES: dict[str, tuple[int, int, int, int, int, int]] = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
_POOL_AFTER = {"3b": "pool3", "4e": "pool4"}
_AUX_AFTER = {"4a": "aux1", "4d": "aux2"}

# Figure 5 of Ioffe & Szegedy 2015: #1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3,
# pool type, pool proj (0: pass through), stride.
BN_INCEPTION_MODULES: dict[str, tuple[int, int, int, int, int, str, int, int]] = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 1),
    "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 1),
    "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "4c": (160, 128, 160, 128, 160, "avg", 128, 1),
    "4d": (96, 128, 192, 160, 192, "avg", 128, 1),
    "4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1),
    "5b": (352, 192, 320, 192, 224, "max", 128, 1),
}

# bvlc_googlenet's LRN (Caffe divides alpha by n; its k defaults to 1).
CAFFE_LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0, "alpha_over_n": True}


def _unit(
    conv: ModuleDef,
    norm: ModuleDef | None,
    act: Callable,
    x: Array,
    features: int,
    kernel: int,
    name: str,
    stride: int = 1,
) -> Array:
    """conv (padding kernel // 2) -> optional BatchNorm named `name`_bn -> act,
    in the calling module."""
    x = conv(features, kernel_size=kernel, strides=stride, padding=kernel // 2, name=name)(x)
    if norm is not None:
        x = norm(name=f"{name}_bn")(x)
    return act(x)


class InceptionModule(nn.Module):
    """GoogLeNet's Inception module (Figure 2), naive or with 1x1 dimension reductions.

    Args:
      b1x1: filters of the 1x1 branch.
      b3x3_reduce: 1x1 reduction before the 3x3 (ignored by 'naive').
      b3x3: filters of the 3x3 branch.
      b5x5_reduce: 1x1 reduction before the 5x5 (ignored by 'naive').
      b5x5: filters of the 5x5 branch.
      pool_proj: 1x1 projection after the 3x3/1 max pool (ignored by 'naive').
      block: 'reduced' (Figure 2b, output b1x1 + b3x3 + b5x5 + pool_proj channels) or 'naive'
        (Figure 2a: every branch sees the input and the pooled input is passed on, so the output
        has b1x1 + b3x3 + b5x5 + C_in channels).
      b5x5_kernel: kernel of the "5x5" branch (3 reproduces torchvision's GoogLeNet).
      conv: convolution constructor (cnnjax.nn.Conv or a partial of it).
      norm: BatchNorm constructor applied after every convolution, or None.
      act: activation after every convolution (ReLU).

    The lecture's example on a 28x28x256 input: `InceptionModule(b1x1=128, b3x3=192, b5x5=96,
    block='naive')` against `InceptionModule(128, 64, 192, 64, 96, 64)`.
    """

    b1x1: int = 0
    b3x3_reduce: int = 0
    b3x3: int = 0
    b5x5_reduce: int = 0
    b5x5: int = 0
    pool_proj: int = 0
    block: str = "reduced"
    b5x5_kernel: int = 5
    conv: ModuleDef = Conv
    norm: ModuleDef | None = None
    act: Callable[[Array], Array] = jax.nn.relu

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.block not in ("reduced", "naive"):
            raise ValueError(f"block must be 'reduced' or 'naive', got {self.block!r}")
        if self.b5x5_kernel < 1 or self.b5x5_kernel % 2 == 0:
            raise ValueError(
                "b5x5_kernel must be odd (padding k // 2 keeps the map size), "
                f"got {self.b5x5_kernel}"
            )
        needed = ("b1x1", "b3x3", "b5x5") + (
            ("b3x3_reduce", "b5x5_reduce", "pool_proj") if self.block == "reduced" else ()
        )
        bad = {
            k: getattr(self, k)
            for k in needed
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1
        }
        if bad:
            raise ValueError(
                f"the {self.block} Inception module needs positive filter counts, got {bad}"
            )
        unit = partial(_unit, self.conv, self.norm, self.act)
        pooled = MaxPool(3, 1, padding=1, name="pool")(x)
        if self.block == "naive":
            branches = [
                unit(x, self.b1x1, 1, "branch1x1"),
                unit(x, self.b3x3, 3, "branch3x3"),
                unit(x, self.b5x5, self.b5x5_kernel, "branch5x5"),
                pooled,
            ]
        else:
            branches = [
                unit(x, self.b1x1, 1, "branch1x1"),
                unit(unit(x, self.b3x3_reduce, 1, "branch3x3_reduce"), self.b3x3, 3, "branch3x3"),
                unit(
                    unit(x, self.b5x5_reduce, 1, "branch5x5_reduce"),
                    self.b5x5,
                    self.b5x5_kernel,
                    "branch5x5",
                ),
                unit(pooled, self.pool_proj, 1, "pool_proj"),
            ]
        return jnp.concatenate(branches, axis=-1)


AUX_POOLS = ("5x5/3", "adaptive")


class InceptionAux(nn.Module):
    """Auxiliary classifier (section 5): avg pool 5x5/3 -> conv 1x1 128 -> FC 1024 -> dropout -> FC.

    pool: '5x5/3' (the paper) or 'adaptive' (torchvision: adaptive average pool to 4x4, the
    paper's output size at 224, whatever the input).
    """

    num_classes: int
    dropout_rate: float
    conv: ModuleDef
    norm: ModuleDef | None
    act: Callable[[Array], Array]
    dtype: Any = None
    pool: str = "5x5/3"

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = F.adaptive_avg_pool(x, 4) if self.pool == "adaptive" else AvgPool(5, 3, name="pool")(x)
        x = Flatten(name="flatten")(_unit(self.conv, self.norm, self.act, x, 128, 1, "conv"))
        x = self.act(Dense(1024, dtype=self.dtype, name="fc1")(x))
        x = Dropout(self.dropout_rate, name="drop")(x, deterministic=not train)
        return Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)


_FIX_224 = "resize or pad the images (224x224 natively)"
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def googlenet_map_sizes(size: int, pool4_window: int = 3) -> dict[str, int]:
    """Side of the stem's and the max pools' outputs (and 4a's, for the aux pool) on
    a size x size input."""
    out = {"conv1": F.output_size(size, 7, 2, 3)}
    out["pool1"] = F.output_size(out["conv1"], 3, 2, 0, ceil_mode=True)
    out["pool2"] = F.output_size(out["pool1"], 3, 2, 0, ceil_mode=True)
    out["pool3"] = F.output_size(out["pool2"], 3, 2, 0, ceil_mode=True)
    out["pool4"] = F.output_size(out["pool3"], pool4_window, 2, 0, ceil_mode=True)
    out["aux_pool"] = F.output_size(out["pool3"], 5, 3)
    return out


class GoogLeNet(nn.Module):
    """GoogLeNet: stem, nine Inception modules, global average pool, dropout, FC (Table 1).

    Args:
      num_classes: outputs of the classifier (and of the auxiliary classifiers).
      inception_block: 'reduced' (the paper's GoogLeNet) or 'naive' (Figure 2a modules with the
        same 1x1/3x3/5x5 widths, for the lecture's comparison; the channels then grow with depth).
      aux_logits: build the two auxiliary classifiers; in training the model then returns
        `(logits, [aux1, aux2])` (the paper weights their losses by 0.3).
      dropout_rate: dropout before the classifier (0.4).
      aux_dropout_rate: dropout in the auxiliary classifiers (0.7).
      lrn: local response normalisation in the stem (the paper; torchvision has none).
      batch_norm: BatchNorm after every convolution, whose bias it then replaces (torchvision).
      b5x5_kernel: kernel of the "5x5" branches (3 reproduces torchvision's GoogLeNet).
      pool4_window: window of the max pool between 4e and 5a (3 in the paper, 2 in torchvision).
      aux_pool: the auxiliary classifiers' pool, '5x5/3' (the paper) or 'adaptive' (to 4x4, as
        torchvision).
      transform_input: first map inputs normalised with the ImageNet mean and std to
        (pixel - 0.5) / 0.5, as torchvision's GoogLeNet does for its published weights.
      in_channels: channels the NHWC input must have.
      kernel_init: initializer of the convolutions.
      dtype: compute dtype (None: the input's); parameters and BN statistics stay float32.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics.
      bn_momentum: BatchNorm running-average momentum (Flax convention).
      bn_epsilon: BatchNorm epsilon (torchvision's GoogLeNet uses 1e-3).
    """

    num_classes: int
    inception_block: str = "reduced"
    aux_logits: bool = False
    dropout_rate: float = 0.4
    aux_dropout_rate: float = 0.7
    lrn: bool = True
    batch_norm: bool = False
    b5x5_kernel: int = 5
    pool4_window: int = 3
    aux_pool: str = "5x5/3"
    transform_input: bool = False
    in_channels: int = 3
    kernel_init: Any = "he_normal_fan_in"
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def min_input_size(self, with_aux: bool = False) -> int:
        """Smallest input side (47; 79 when the paper's auxiliary classifiers run) that leaves every
        pool an output."""
        n = 1
        while True:
            sizes = googlenet_map_sizes(n, self.pool4_window)
            if not with_aux or self.aux_pool == "adaptive":
                sizes.pop("aux_pool")
            if min(sizes.values()) >= 1:
                return n
            n += 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array | tuple[Array, list[Array]]:
        run_aux = self.aux_logits and (train or self.is_initializing())
        if self.aux_pool not in AUX_POOLS:
            raise ValueError(f"aux_pool must be one of {list(AUX_POOLS)}, got {self.aux_pool!r}")
        min_size = self.min_input_size(run_aux)
        hint = (
            " with the auxiliary classifiers (aux_logits=False lowers it)"
            if min_size > self.min_input_size()
            else ""
        )
        check_image_input(
            x,
            "GoogLeNet",
            min_size=min_size,
            in_channels=self.in_channels,
            size_note=hint,
            fix=_FIX_224,
        )
        if self.inception_block not in ("reduced", "naive"):
            raise ValueError(
                f"inception_block must be 'reduced' or 'naive', got {self.inception_block!r}"
            )
        if self.transform_input and self.in_channels != 3:
            raise ValueError(
                f"transform_input re-normalises RGB inputs; in_channels={self.in_channels}"
            )
        conv = partial(
            Conv, use_bias=not self.batch_norm, kernel_init=self.kernel_init, dtype=self.dtype
        )
        norm = None
        if self.batch_norm:
            norm = batch_norm_for(self, train)
        act = jax.nn.relu
        unit = partial(_unit, conv, norm, act)
        if self.transform_input:
            # torchvision's _transform_input: x * std / 0.5 + (mean - 0.5) / 0.5 per channel.
            scale = jnp.asarray([s / 0.5 for s in _IMAGENET_STD], x.dtype)
            shift = jnp.asarray([(m - 0.5) / 0.5 for m in _IMAGENET_MEAN], x.dtype)
            x = x * scale + shift
        if self.dtype is not None:
            x = x.astype(self.dtype)

        x = MaxPool(3, 2, ceil_mode=True, name="pool1")(unit(x, 64, 7, "conv1", stride=2))
        if self.lrn:
            x = LocalResponseNorm(**CAFFE_LRN, name="norm1")(x)
        x = unit(unit(x, 64, 1, "conv2_reduce"), 192, 3, "conv2")
        if self.lrn:
            x = LocalResponseNorm(**CAFFE_LRN, name="norm2")(x)
        x = MaxPool(3, 2, ceil_mode=True, name="pool2")(x)

        aux = []
        for key, widths in GOOGLENET_MODULES.items():
            x = InceptionModule(
                *widths,
                block=self.inception_block,
                b5x5_kernel=self.b5x5_kernel,
                conv=conv,
                norm=norm,
                act=act,
                name=f"inception{key}",
            )(x)
            if run_aux and key in _AUX_AFTER:
                head = InceptionAux(
                    self.num_classes,
                    self.aux_dropout_rate,
                    conv,
                    norm,
                    act,
                    dtype=self.dtype,
                    pool=self.aux_pool,
                    name=_AUX_AFTER[key],
                )
                aux.append(head(x, train).astype(jnp.float32))
            if key in _POOL_AFTER:
                window = self.pool4_window if key == "4e" else 3
                x = MaxPool(window, 2, ceil_mode=True, name=_POOL_AFTER[key])(x)

        x = GlobalAvgPool(name="avgpool")(x)
        x = Dropout(self.dropout_rate, name="dropout")(x, deterministic=not train)
        x = Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)
        return (x, aux) if self.aux_logits and train else x


class BNInceptionModule(nn.Module):
    """BN-Inception module (Figure 5): 1x1, 1x1-3x3, 1x1-3x3-3x3 and pool branches, concatenated.

    Args:
      b1x1: filters of the 1x1 branch (0: no such branch, as in the stride-2 modules).
      b3x3_reduce, b3x3: the 1x1 reduction and the 3x3 of the single-3x3 branch.
      d3x3_reduce, d3x3: the 1x1 reduction and the two 3x3s that replace the 5x5.
      pool: 'avg' or 'max' pooling (3x3) in the pool branch.
      pool_proj: 1x1 projection after the pool (0: the pooled input is passed through).
      stride: 2 for the grid-reducing modules (strided last 3x3s and pool), else 1.
      conv, norm, act: layer constructors; each convolution is conv -> norm -> act.
    """

    b1x1: int
    b3x3_reduce: int
    b3x3: int
    d3x3_reduce: int
    d3x3: int
    pool: str
    pool_proj: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef | None
    act: Callable[[Array], Array]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.pool not in ("avg", "max") or self.stride not in (1, 2):
            raise ValueError(
                "pool must be 'avg' or 'max' and stride 1 or 2, "
                f"got {self.pool!r} and {self.stride}"
            )
        unit = partial(_unit, self.conv, self.norm, self.act)
        s = self.stride
        branches = [unit(x, self.b1x1, 1, "branch1x1")] if self.b1x1 else []
        branches.append(
            unit(
                unit(x, self.b3x3_reduce, 1, "branch3x3_reduce"),
                self.b3x3,
                3,
                "branch3x3",
                stride=s,
            )
        )
        y = unit(unit(x, self.d3x3_reduce, 1, "double3x3_reduce"), self.d3x3, 3, "double3x3_1")
        branches.append(unit(y, self.d3x3, 3, "double3x3_2", stride=s))
        if s == 2:
            # 'SAME' is Caffe's ceil-mode 3x3/2 pool on even sides and keeps the branches'
            # sizes equal on odd ones.
            pooled = MaxPool(3, 2, padding="SAME", name="pool")(x)
        elif self.pool == "avg":
            pooled = AvgPool(3, 1, padding=1, count_include_pad=True, name="pool")(x)
        else:
            pooled = MaxPool(3, 1, padding=1, name="pool")(x)
        branches.append(unit(pooled, self.pool_proj, 1, "pool_proj") if self.pool_proj else pooled)
        return jnp.concatenate(branches, axis=-1)


class BNInception(nn.Module):
    """BN-Inception (Inception-v2 of Ioffe & Szegedy 2015, Figure 5).

    Args:
      num_classes: outputs of the classifier.
      in_channels: channels the NHWC input must have.
      kernel_init: initializer of the convolutions.
      dtype: compute dtype (None: the input's); parameters and BN statistics stay float32.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics.
      bn_momentum: BatchNorm running-average momentum (Flax convention).
      bn_epsilon: BatchNorm epsilon.
    """

    num_classes: int
    in_channels: int = 3
    kernel_init: Any = "he_normal_fan_in"
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def min_input_size(self) -> int:
        """Smallest input side (11) for which both stem pools still have an output."""
        n = 1
        while (
            F.output_size(
                F.output_size(-(-n // 2), 3, 2, 0, ceil_mode=True), 3, 2, 0, ceil_mode=True
            )
            < 1
        ):
            n += 1
        return n

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_image_input(
            x,
            "BNInception",
            min_size=self.min_input_size(),
            in_channels=self.in_channels,
            fix=_FIX_224,
        )
        # The Caffe-derived port keeps the conv biases in front of BatchNorm
        # (part of its 11,295,240).
        conv = partial(Conv, kernel_init=self.kernel_init, dtype=self.dtype)
        norm = batch_norm_for(self, train)
        act = jax.nn.relu
        unit = partial(_unit, conv, norm, act)
        if self.dtype is not None:
            x = x.astype(self.dtype)

        x = MaxPool(3, 2, ceil_mode=True, name="pool1")(unit(x, 64, 7, "conv1", stride=2))
        x = unit(unit(x, 64, 1, "conv2_reduce"), 192, 3, "conv2")
        x = MaxPool(3, 2, ceil_mode=True, name="pool2")(x)
        for key, row in BN_INCEPTION_MODULES.items():
            x = BNInceptionModule(*row, conv=conv, norm=norm, act=act, name=f"inception{key}")(x)
        x = GlobalAvgPool(name="avgpool")(x)
        return Dense(self.num_classes, dtype=self.dtype, name="fc")(x).astype(jnp.float32)


register(
    "googlenet",
    GoogLeNet,
    input_shape=(224, 224, 3),
    num_classes=1000,
    source="Szegedy et al. 2014, Table 1 (bvlc_googlenet for LRN constants and ceil-mode pools)",
    family="googlenet",
    reference_params=6_960_845,
    params_rtol=0.01,
    params_note="sum of Table 1's params column, 6797.7K (the '6.8M'), whose K is 1024 weights "
    "without biases: 6,960,845; this implementation (no aux heads) has 6,998,552 "
    "= 6,990,272 weights + 8,280 biases",
)
register(
    "googlenet_naive",
    partial(GoogLeNet, inception_block="naive"),
    input_shape=(224, 224, 3),
    num_classes=1000,
    source="Szegedy et al. 2014, Figure 2a modules with Table 1 widths",
    family="googlenet",
    params_note=(
        "no published count: naive modules pass the input through, so channels grow to 4944"
    ),
)
register(
    "googlenet_torchvision",
    partial(
        GoogLeNet,
        lrn=False,
        batch_norm=True,
        b5x5_kernel=3,
        pool4_window=2,
        dropout_rate=0.2,
        bn_epsilon=1e-3,
        aux_pool="adaptive",
        transform_input=True,
    ),
    input_shape=(224, 224, 3),
    num_classes=1000,
    source="torchvision googlenet (3x3 kernels in the '5x5' branches, BatchNorm, no LRN, "
    "adaptive aux pools, transform_input as with its weights)",
    family="googlenet",
    reference_params=6_624_904,
    params_note="torchvision's conventions, aux_logits=False (13,004,888 with them); exact",
)
register(
    "bn_inception",
    BNInception,
    input_shape=(224, 224, 3),
    num_classes=1000,
    source="Ioffe & Szegedy 2015, Figure 5 (BN-Inception)",
    family="googlenet",
    reference_params=11_295_240,
    params_note=(
        "common Caffe-derived port (Cadene's bninception): conv biases kept before BN; exact"
    ),
)
