"""Residual networks (He et al. 2016) and their plain twins, for ImageNet and CIFAR.

One generic `ResNet` (stages of basic or bottleneck blocks) covers the ImageNet nets of Table 1,
the CIFAR nets of section 4.2 (`CifarResNet`, depth 6n+2) and, through fields, the later family
(pre-activation, stochastic depth, wide and grouped bottlenecks: see resnet_variants.py).
A plain net is the same module with `plain=True`: the same layers, no shortcut at all. Called
with `shortcut_scale`, a traced scalar, the ResNet computes `branch + shortcut_scale * shortcut`:
0 gives its plain twin's function (option A: the same parameters), so that the trainer can run
both twins as members of one vmapped program (`TrainConfig.twins`).

Conventions (checked against torchvision's counts, see tests): convolutions have no bias and
are followed by BatchNorm; option B projections are a 1x1 conv + BN (a 1x1 conv alone in
pre-activation nets, as in He et al. 2016b); in a pre-activation net the first block of each
stage shares its first BN-ReLU with its shortcut (identity, option A or projection), as
fb.resnet.torch's preresnet.lua ('both_preact') and KaimingHe/resnet-1k-layers do; the
classifier is global average pooling and a Dense layer with bias. Bottleneck striding defaults
to 'v1.5' (stride on the 3x3 conv, as torchvision, fb.resnet.torch and the Flax ImageNet
example); `version='v1'` strides the first 1x1 conv as in the paper. Both have the same
parameters, not the same FLOPs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.models._checks import check_image_input
from cnnjax.models.registry import register
from cnnjax.nn import Conv, Dense, Dropout, GlobalAvgPool, MaxPool, batch_norm_for

ModuleDef = Any

# Table 1, He et al. 2016; 200 from He et al. 2016b (Identity Mappings), section 5.
STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
IMAGENET_BLOCK = {
    18: "basic",
    34: "basic",
    50: "bottleneck",
    101: "bottleneck",
    152: "bottleneck",
    200: "bottleneck",
}
# torchvision parameter counts (REFERENCE.md), option B projections at stage transitions.
TORCHVISION_PARAMS = {
    18: 11_689_512,
    34: 21_797_672,
    50: 25_557_032,
    101: 44_549_160,
    152: 60_192_808,
}
# CIFAR-10, Table 6 (depth 6n+2): exact counts for option A (zero padding) and
# option B (projection).
CIFAR_PARAMS = {
    20: (269_722, 272_474),
    32: (464_154, 466_906),
    44: (658_586, 661_338),
    56: (853_018, 855_770),
    110: (1_727_962, 1_730_714),
    1202: (19_421_274, 19_424_026),
}

SHORTCUTS = ("A", "B", "C")
BLOCKS = ("basic", "bottleneck")
VERSIONS = ("v1", "v1.5")
DROP_PATH_MODES = ("batch", "sample")


def zero_pad_shortcut(x: jax.Array, features: int, strides: int = 1) -> jax.Array:
    """Option A: the parameter-free identity, subsampled by `strides`, zero-padded to `features`.

    The new channels are appended after the old ones (fb.resnet.torch's 'A' shortcut).
    """
    if x.shape[-1] > features:
        raise ValueError(
            f"option A shortcut cannot reduce channels: input has {x.shape[-1]}, output "
            f"{features}; use shortcut='B' (projection)"
        )
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    pad = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))) if pad else x


def drop_path(module: nn.Module, branch: jax.Array, rate: Any, mode: str, train: bool) -> jax.Array:
    """Stochastic depth (Huang et al. 2016) on a residual branch, drawing from the 'dropout' rng.

    Training keeps the branch with probability 1 - rate, for the whole batch ('batch', the
    paper) or per sample ('sample'); test time scales the branch by 1 - rate (the paper's
    convention, not the inverted one). The keep mask is sown as `intermediates/drop_path_keep`.
    """
    if rate is None:
        return branch
    survival = 1.0 - rate
    if not train:
        return branch * jnp.asarray(survival, branch.dtype)
    shape = (1,) * branch.ndim if mode == "batch" else (branch.shape[0],) + (1,) * (branch.ndim - 1)
    keep = jax.random.bernoulli(module.make_rng("dropout"), survival, shape)
    module.sow("intermediates", "drop_path_keep", keep.reshape(-1))
    return jnp.where(keep, branch, jnp.zeros_like(branch))


class _Block(nn.Module):
    """Fields and the shortcut shared by BasicBlock and BottleneckBlock."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: int = 1
    shortcut: str = "B"
    plain: bool = False
    preact: bool = False
    first: bool = False
    zero_init_residual: bool = False
    dropout_rate: float = 0.0
    drop_path_mode: str = "batch"

    def _finish(
        self, x, pre, branch, out_features, train, drop_rate, last_norm: str, shortcut_scale=None
    ):
        """Ends the block: the branch's last BatchNorm (`last_norm`, post-activation blocks only;
        `branch` is the last convolution's output), the shortcut (identity, option A padding or
        projection, times `shortcut_scale` if given) and the activation. Where nothing stands
        between that BatchNorm and the sum, BatchNorm, sum and activation are one call (fused on
        the CPU, `F.batch_norm`)."""
        if self.plain and shortcut_scale is not None:
            raise ValueError(
                "shortcut_scale scales the shortcuts of a ResNet; a plain net (plain=True) has none"
            )
        if self.preact:  # the branch ends with its convolution
            if self.plain:
                return branch
            sc = self._shortcut(x, pre, out_features, shortcut_scale)
            return sc + drop_path(self, branch, drop_rate, self.drop_path_mode, train)
        norm = self._last_norm(last_norm)
        if self.plain:
            return norm(branch, activation=self.act)
        sc = self._shortcut(x, pre, out_features, shortcut_scale)
        if drop_rate is None:
            return norm(branch, residual=sc, activation=self.act)
        return self.act(sc + drop_path(self, norm(branch), drop_rate, self.drop_path_mode, train))

    def _shortcut(self, x, pre, out_features, scale=None):
        changes = x.shape[-1] != out_features or self.strides != 1
        if self.first or changes:
            # Pre-activation: a stage's first unit applies BN-ReLU before splitting into branch
            # and shortcut (fb.resnet.torch preresnet.lua 'both_preact', KaimingHe/resnet-1k-layers
            # resnet-pre-act.lua); later units' shortcuts see the raw sum.
            # Post-activation: pre is x.
            x = pre
        if self.shortcut == "C" or (self.shortcut == "B" and changes):
            sc = self.conv(out_features, 1, self.strides, 0, name="proj_conv")(x)
            sc = sc if self.preact else self.norm(name="proj_bn")(sc)
        elif changes:
            sc = zero_pad_shortcut(x, out_features, self.strides)
        else:
            sc = x
        return sc if scale is None else sc * jnp.asarray(scale, sc.dtype)

    def _last_norm(self, name):
        return (
            self.norm(name=name, scale_init=nn.initializers.zeros)
            if self.zero_init_residual
            else self.norm(name=name)
        )

    def scan_step(self, x, drop_rate, train, shortcut_scale=None):
        """The block as an `nn.scan` body: (carry, per-block input) -> (carry, None)."""
        return self(x, train, drop_rate, shortcut_scale), None


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34, CIFAR ResNets, WRN).

    Args:
      features: output channels.
      conv, norm, act: layer constructors (bias-free Conv, configured BatchNorm, activation).
      strides: stride of the first convolution (and of the shortcut).
      shortcut: 'A' zero-padded identity, 'B' projection when the shape changes,
          'C' projection always.
      plain: no shortcut (the plain twin).
      preact: BN-ReLU-conv ordering (He et al. 2016b), no activation after the addition.
      first: the first block of its stage (set by ResNet): with preact, its shortcut takes the
        input after bn1-ReLU, as does any shortcut that changes the shape (fb.resnet.torch
        preresnet.lua); other blocks' shortcuts take the block's input.
      zero_init_residual: last BN of the branch starts with gamma = 0 (post-activation only).
      dropout_rate: dropout between the two convolutions (WRN).
      drop_path_mode: stochastic depth per 'batch' (the paper) or per 'sample'.
    """

    @nn.compact
    def __call__(self, x, train: bool, drop_rate=None, shortcut_scale=None):
        pre = self.norm(name="bn1")(x, activation=self.act) if self.preact else x
        y = self.conv(self.features, 3, self.strides, 1, name="conv1")(pre)
        y = self.norm(name="bn2" if self.preact else "bn1")(y, activation=self.act)
        if self.dropout_rate:
            y = Dropout(self.dropout_rate, name="dropout")(y, deterministic=not train)
        y = self.conv(self.features, 3, 1, 1, name="conv2")(y)
        return self._finish(x, pre, y, self.features, train, drop_rate, "bn2", shortcut_scale)


class BottleneckBlock(_Block):
    """1x1 reduce, 3x3 (optionally grouped), 1x1 expand (ResNet-50+, ResNeXt, preact-164).

    Args:
      features: the stage's width ("planes"); the block outputs features * expansion channels
        and its inner width is int(features * base_width / 64) * groups (torchvision's rule).
      expansion: output / planes (4).
      groups: cardinality of the 3x3 convolution (ResNeXt).
      base_width: width per group at 64 planes (64; 4 for ResNeXt 32x4d; 128 for wide_resnet50_2).
      stride_on_3x3: True strides the 3x3 conv ('v1.5'), False the first 1x1 conv ('v1').
      Other fields as in BasicBlock (dropout sits before the last convolution).
    """

    expansion: int = 4
    groups: int = 1
    base_width: int = 64
    stride_on_3x3: bool = True

    @nn.compact
    def __call__(self, x, train: bool, drop_rate=None, shortcut_scale=None):
        inner = int(self.features * self.base_width / 64) * self.groups
        out = self.features * self.expansion
        s1, s3 = (1, self.strides) if self.stride_on_3x3 else (self.strides, 1)
        pre = self.norm(name="bn1")(x, activation=self.act) if self.preact else x
        y = self.conv(inner, 1, s1, 0, name="conv1")(pre)
        y = self.norm(name="bn2" if self.preact else "bn1")(y, activation=self.act)
        y = self.conv(inner, 3, s3, 1, groups=self.groups, name="conv2")(y)
        y = self.norm(name="bn3" if self.preact else "bn2")(y, activation=self.act)
        if self.dropout_rate:
            y = Dropout(self.dropout_rate, name="dropout")(y, deterministic=not train)
        y = self.conv(out, 1, 1, 0, name="conv3")(y)
        return self._finish(x, pre, y, out, train, drop_rate, "bn3", shortcut_scale)


class ResNet(nn.Module):
    """Generic residual network: a stem, stages of residual blocks, global pooling, a classifier.

    Args:
      num_classes: classifier outputs.
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3); the first block of stage s > 1 strides 2.
      block: 'basic' or 'bottleneck'.
      stage_widths: width of each stage (output channels of a basic block,
          "planes" of a bottleneck).
      stem: 'imagenet' (7x7/2 conv, 3x3/2 max pool) or 'cifar' (3x3/1 conv).
      stem_width: stem output channels.
      shortcut: 'A' zero-padded identity, 'B' projection where the shape changes, 'C' projection
        on every block (He et al. 2016, section 4.1).
      plain: drop every shortcut (the plain twin of the same depth).
      preact: pre-activation blocks (He et al. 2016b): the stem is a bare conv and the head starts
        with BN-ReLU (`final_bn`); each stage's first block feeds its shortcut the activated input.
        (fb.resnet.torch's ImageNet preresnet has stage 1's first BN-ReLU in the stem, before the
        max pool: the same function while that BN's scales are positive, as pooling commutes.)
      version: bottleneck striding, 'v1' (first 1x1, the paper) or 'v1.5' (3x3, torchvision).
      width: multiplier of every stage width (not the stem): k of WRN.
      groups, base_width, expansion: bottleneck shape (ResNeXt cardinality, width per group).
      zero_init_residual: zero gamma in the last BN of each residual branch (Goyal et al. 2017).
      dropout_rate: dropout inside each block (between its last two convolutions).
      drop_path_rate: stochastic depth: block l of L is dropped with probability rate * l / L in
        training (Huang et al. 2016: p_L = 1 - rate, 0.5 in the paper), its branch scaled by the
        survival probability at test time; uses the 'dropout' rng.
      drop_path_mode: 'batch' drops a block for the whole mini-batch (the paper), 'sample' per
        example (as timm's DropPath, but not rescaled in training).
      scan_blocks: run blocks 2..n of each stage with `nn.scan` (parameters stacked under
        'stage{s}_blocks'; see unscan_variables / scan_variables). The train step of ResNet-110
        compiles about 4x faster, but on XLA CPU the backward convolutions inside the loop miss
        the fast (canonical-layout) path and a step runs about 15x slower: use it for
        compile-bound work (smoke tests, counting). Drop-path masks differ between the layouts.
      dtype: compute dtype (parameters and BN statistics stay float32).
      bn_axis_name: mapped axis for cross-device BatchNorm statistics ('batch' in the trainer).
      bn_momentum: running-average momentum (Flax convention, 0.9).
    """

    num_classes: int = 1000
    stage_sizes: Sequence[int] | None = None
    block: str = "basic"
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    shortcut: str = "B"
    plain: bool = False
    preact: bool = False
    version: str = "v1.5"
    width: float = 1.0
    groups: int = 1
    base_width: int = 64
    expansion: int = 4
    zero_init_residual: bool = False
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_mode: str = "batch"
    scan_blocks: bool = False
    dtype: Any = None
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9

    def blocks_per_stage(self) -> tuple[int, ...]:
        """The number of blocks of each stage."""
        if self.stage_sizes is None:
            raise ValueError(
                "ResNet needs stage_sizes, e.g. (2, 2, 2, 2); or use create('resnet18') "
                "/ CifarResNet(depth=...)"
            )
        return tuple(int(n) for n in self.stage_sizes)

    def _check_config(self, sizes):
        for field, value, allowed in (
            ("shortcut", self.shortcut, SHORTCUTS),
            ("block", self.block, BLOCKS),
            ("version", self.version, VERSIONS),
            ("stem", self.stem, ("imagenet", "cifar")),
            ("drop_path_mode", self.drop_path_mode, DROP_PATH_MODES),
        ):
            if value not in allowed:
                raise ValueError(
                    f"{type(self).__name__}: {field}={value!r}; choose one of {allowed}"
                )
        if len(sizes) != len(self.stage_widths) or min(sizes, default=0) < 1:
            raise ValueError(
                f"{type(self).__name__}: stage_sizes {sizes} must be positive and match "
                f"stage_widths {tuple(self.stage_widths)} in length"
            )
        if not 0.0 <= self.drop_path_rate < 1.0 or not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(
                f"{type(self).__name__}: drop_path_rate={self.drop_path_rate} and "
                f"dropout_rate={self.dropout_rate} must be in [0, 1)"
            )
        if self.plain and self.drop_path_rate:
            raise ValueError(
                "stochastic depth drops residual branches; a plain net (plain=True) has none: "
                "set drop_path_rate=0"
            )
        if self.zero_init_residual and (self.plain or self.preact):
            raise ValueError(
                "zero_init_residual zeroes the last BN of a residual branch: it needs "
                "plain=False and preact=False (pre-activation branches end with a conv)"
            )
        if self.width <= 0 or self.groups < 1:
            raise ValueError(f"width={self.width} must be > 0 and groups={self.groups} >= 1")

    def _check_input(self, x, sizes):
        stride = (4 if self.stem == "imagenet" else 1) * 2 ** (len(sizes) - 1)
        check_image_input(
            x,
            type(self).__name__,
            min_size=stride,
            size_note=f" (the total stride of the {self.stem} stem and {len(sizes)} stages)",
            fix="resize the images or use a CIFAR-style stem",
        )

    @nn.compact
    def __call__(self, x, train: bool, shortcut_scale=None):
        """Logits of images `x` [N, H, W, C]; `shortcut_scale` (a scalar, traced or not) multiplies
        every shortcut: 0 computes the plain twin with this net's parameters (option A)."""
        sizes = self.blocks_per_stage()
        self._check_config(sizes)
        self._check_input(x, sizes)
        conv = partial(Conv, use_bias=False, dtype=self.dtype)
        norm = batch_norm_for(self, train)
        act = nn.relu
        if self.stem == "imagenet":
            x = conv(self.stem_width, 7, 2, 3, name="stem_conv")(x)
        else:
            x = conv(self.stem_width, 3, 1, 1, name="stem_conv")(x)
        if not self.preact:
            x = norm(name="stem_bn")(x, activation=act)
        if self.stem == "imagenet":
            x = MaxPool(3, 2, 1, name="stem_pool")(x)

        common = dict(
            conv=conv,
            norm=norm,
            act=act,
            shortcut=self.shortcut,
            plain=self.plain,
            preact=self.preact,
            zero_init_residual=self.zero_init_residual,
            dropout_rate=self.dropout_rate,
            drop_path_mode=self.drop_path_mode,
        )
        if self.block == "basic":
            block = partial(BasicBlock, **common)
        else:
            block = partial(
                BottleneckBlock,
                expansion=self.expansion,
                groups=self.groups,
                base_width=self.base_width,
                stride_on_3x3=self.version == "v1.5",
                **common,
            )
        total = sum(sizes)
        rates = (
            [self.drop_path_rate * (i + 1) / total for i in range(total)]
            if self.drop_path_rate
            else None
        )
        index = 0
        for s, (n, w) in enumerate(zip(sizes, self.stage_widths), start=1):
            features = max(1, int(round(w * self.width)))
            x = block(
                features=features, strides=1 if s == 1 else 2, first=True, name=f"stage{s}_block1"
            )(x, train, None if rates is None else rates[index], shortcut_scale)
            if self.scan_blocks and n > 1:
                stage_rates = (
                    None
                    if rates is None
                    else jnp.asarray(rates[index + 1 : index + n], jnp.float32)
                )
                stack = nn.scan(
                    block.func,
                    variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(
                        nn.broadcast if stage_rates is None else 0,
                        nn.broadcast,
                        nn.broadcast,
                    ),
                    length=n - 1,
                    methods=["scan_step"],
                )
                x, _ = stack(
                    **block.keywords, features=features, name=f"stage{s}_blocks"
                ).scan_step(x, stage_rates, train, shortcut_scale)
            else:
                for b in range(2, n + 1):
                    x = block(features=features, name=f"stage{s}_block{b}")(
                        x, train, None if rates is None else rates[index + b - 1], shortcut_scale
                    )
            index += n
        if self.preact:
            x = norm(name="final_bn")(x, activation=act)
        x = GlobalAvgPool(name="pool")(x)
        x = Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)


class CifarResNet(ResNet):
    """The CIFAR-10 ResNet of He et al. 2016, section 4.2, and its plain twin, for any depth.

    A 3x3 conv with 16 filters, three stages of n blocks on 32x32, 16x16 and 8x8 maps with widths
    16/32/64, global average pooling and a 10-way classifier; option A shortcuts by default.

    Args:
      depth: number of weighted layers, 2 + (layers per block) x (blocks) = 6n + 2 for basic
        blocks (20, 32, 44, 56, 110, 1202) and 9n + 2 for bottlenecks (164, 1001).
      All other fields as in ResNet (stage_sizes must stay None: it follows from depth).
    """

    depth: int = 20
    num_classes: int = 10
    stem: str = "cifar"
    stem_width: int = 16
    stage_widths: Sequence[int] = (16, 32, 64)
    shortcut: str = "A"

    def _layers_per_block(self):
        return 2 if self.block == "basic" else 3

    def _depth_rule(self):
        """(constant, layers per unit of n) in depth = constant + unit * n."""
        return 2, self._layers_per_block() * len(self.stage_widths)

    def blocks_per_stage(self) -> tuple[int, ...]:
        if self.stage_sizes is not None:
            raise ValueError(
                f"{type(self).__name__} derives stage_sizes from depth={self.depth}; "
                "leave stage_sizes None, or use ResNet(stem='cifar', "
                "stage_sizes=...) for arbitrary stages"
            )
        const, unit = self._depth_rule()
        if (
            not isinstance(self.depth, int)
            or self.depth < const + unit
            or (self.depth - const) % unit
        ):
            raise ValueError(
                f"{type(self).__name__}: depth={self.depth!r} must be {unit}n+{const} with n >= 1 "
                f"for {self.block} blocks and {len(self.stage_widths)} stages (e.g. "
                f"{const + unit}, {const + 3 * unit}, {const + 9 * unit})"
            )
        return ((self.depth - const) // unit,) * len(self.stage_widths)


def cifar_resnet(
    depth: int, *, plain: bool = False, shortcut: str = "A", **kwargs: Any
) -> CifarResNet:
    """A CIFAR ResNet (or plain net with plain=True) of any depth 6n+2; kwargs
    are CifarResNet fields.

    The depth is checked here (ValueError), not only when the module is first called.
    """
    model = CifarResNet(depth=depth, plain=plain, shortcut=shortcut, **kwargs)
    model.blocks_per_stage()
    return model


# ------------------------------------------------------------------------- scanned parameter layout

_SCANNED = re.compile(r"^stage(\d+)_blocks$")
_UNSCANNED = re.compile(r"^stage(\d+)_block(\d+)$")


def unscan_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned layout (`stage{s}_blocks`, leading axis over blocks 2..n) ->
    `stage{s}_block{k}` names.

    Works on every collection (params, batch_stats, ...); other entries are kept as they are.
    """
    out = {}
    for col, tree in variables.items():
        new = {}
        for key, sub in tree.items():
            m = _SCANNED.match(key)
            if m is None:
                new[key] = sub
                continue
            n = {leaf.shape[0] for leaf in jax.tree.leaves(sub)}
            if len(n) != 1:
                raise ValueError(
                    f"{col}/{key}: scanned leaves disagree on the number of blocks: {sorted(n)}"
                )
            for i in range(n.pop()):
                new[f"stage{m.group(1)}_block{i + 2}"] = jax.tree.map(lambda a, i=i: a[i], sub)
        out[col] = new
    return out


def scan_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of unscan_variables: stacks `stage{s}_block{2..n}` into `stage{s}_blocks`."""
    out = {}
    for col, tree in variables.items():
        new, stages = {}, {}
        for key, sub in tree.items():
            m = _UNSCANNED.match(key)
            if m is None or int(m.group(2)) == 1:
                new[key] = sub
            else:
                stages.setdefault(int(m.group(1)), {})[int(m.group(2))] = sub
        for s, blocks in sorted(stages.items()):
            if sorted(blocks) != list(range(2, len(blocks) + 2)):
                raise ValueError(
                    f"{col}: stage{s} has blocks {sorted(blocks)}; expected 2..{len(blocks) + 1}"
                )
            new[f"stage{s}_blocks"] = jax.tree.map(
                lambda *a: jnp.stack(a), *(blocks[b] for b in sorted(blocks))
            )
        out[col] = new
    return out


# --------------------------------------------------------------------------- registered variants

_TV_NOTE = (
    "torchvision convention: bias-free convs each followed by BN, option B projection (1x1 conv + "
    "BN) at stage transitions, FC with bias; V1 and V1.5 striding have the same count"
)
for _d, _sizes in STAGE_SIZES.items():
    if _d not in TORCHVISION_PARAMS:
        continue
    _kw = dict(input_shape=(224, 224, 3), num_classes=1000, family="resnet", dataset="imagenet")
    register(
        f"resnet{_d}",
        partial(ResNet, stage_sizes=_sizes, block=IMAGENET_BLOCK[_d]),
        source="He et al. 2016, Table 1; torchvision resnet (V1.5 striding)",
        reference_params=TORCHVISION_PARAMS[_d],
        params_note=_TV_NOTE,
        **_kw,
    )
    register(
        f"plain{_d}",
        partial(ResNet, stage_sizes=_sizes, block=IMAGENET_BLOCK[_d], plain=True),
        source=(
            "He et al. 2016, Table 1 and section 4.1 (plain network: the ResNet without shortcuts)"
        ),
        params_note="the ResNet's layers without the option B projections",
        **_kw,
    )

_CIFAR_NOTE = (
    "option A (parameter-free zero-padding shortcut), bias-free convs + BN, FC with bias; "
    "REFERENCE.md Table 6 (option B: {b:,})"
)
for _d, (_a, _b) in CIFAR_PARAMS.items():
    _kw = dict(input_shape=(32, 32, 3), num_classes=10, family="resnet", dataset="cifar10")
    register(
        f"resnet{_d}",
        partial(CifarResNet, depth=_d),
        source="He et al. 2016, section 4.2 and Table 6",
        reference_params=_a,
        params_note=_CIFAR_NOTE.format(b=_b),
        **_kw,
    )
    register(
        f"plain{_d}",
        partial(CifarResNet, depth=_d, plain=True),
        source="He et al. 2016, section 4.2 (plain net of Figure 6)",
        reference_params=_a,
        params_note="identical to the ResNet under option A: its shortcuts have no parameters",
        **_kw,
    )
