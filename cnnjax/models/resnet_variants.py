"""The later ResNet family, as fields of the generic ResNet / CifarResNet (resnet.py).

- Pre-activation ResNets (He et al. 2016b, "Identity Mappings"): `preact=True`; CIFAR ResNet-110
  (basic), -164 and -1001 (bottleneck, the authors' resnet-1k-layers layout: 16 -> 64/128/256,
  stride on the first 1x1, 1x1-conv projections of the activated input), ImageNet 18...200.
- Stochastic depth (Huang et al. 2016): `drop_path_rate=0.5` (p_L = 0.5, linear decay) on the
  CIFAR ResNet-110/1202 with option A shortcuts, as in the paper.
- Wide ResNets (Zagoruyko & Komodakis 2016): `WideResNet`, WRN-d-k on CIFAR (pre-activation
  basic blocks, widths 16k/32k/64k, depth 6n+4, optional dropout between the convs); torchvision's
  wide_resnet50_2 / 101_2 (bottleneck inner width doubled: base_width=128).
- ResNeXt (Xie et al. 2017): grouped 3x3 bottlenecks, `groups` x `base_width`; ResNeXt-29 on
  CIFAR (64-channel stem, planes 64/128/256, output 4x, projections where channels change) and
  torchvision's resnext50_32x4d / resnext101_32x8d / resnext101_64x4d.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from cnnjax.models.registry import register
from cnnjax.models.resnet import IMAGENET_BLOCK, STAGE_SIZES, CifarResNet, ResNet


class WideResNet(CifarResNet):
    """WRN-d-k (Zagoruyko & Komodakis 2016): a pre-activation CIFAR ResNet, k times wider.

    Args:
      depth: d = 6n + 4 (n basic blocks per stage; the paper counts the projection convs).
      width: the widening factor k (stage widths 16k, 32k, 64k; the stem stays at 16).
      dropout_rate: dropout between the two convolutions of each block (0.3 in the paper).
      All other fields as in CifarResNet (preact=True and shortcut='B' by default).

    A stage's first block shares its BN-ReLU with the 1x1 projection, as in the authors' code;
    with k = 1 the first stage keeps its width and its identity shortcut takes the activated
    input too (He et al.'s rule, resnet.py), where the authors' code gives it the raw input.
    """

    depth: int = 28
    width: float = 10.0
    preact: bool = True
    shortcut: str = "B"
    stage_widths: Sequence[int] = (16, 32, 64)

    def _depth_rule(self):
        if self.block != "basic":
            raise ValueError(f"WideResNet uses basic blocks (depth 6n+4), got block={self.block!r}")
        return 4, 2 * len(self.stage_widths)


# --------------------------------------------------------------------------- pre-activation

_CIFAR = dict(input_shape=(32, 32, 3), num_classes=10, family="resnet", dataset="cifar10")
_IMAGENET = dict(input_shape=(224, 224, 3), num_classes=1000, family="resnet", dataset="imagenet")

register(
    "preact_resnet110",
    partial(CifarResNet, depth=110, preact=True),
    source="He et al. 2016b, Table 3 (pre-activation ResNet-110, option A shortcuts)",
    reference_params=1_700_000,
    params_rtol=0.03,
    params_note="paper: 1.7M",
    **_CIFAR,
)
for _d, _ref, _rtol in ((164, 1_700_000, 0.01), (1001, 10_200_000, 0.015)):
    register(
        f"preact_resnet{_d}",
        partial(CifarResNet, depth=_d, block="bottleneck", preact=True, shortcut="B", version="v1"),
        source="He et al. 2016b, Table 2; KaimingHe/resnet-1k-layers resnet-pre-act.lua",
        reference_params=_ref,
        params_rtol=_rtol,
        params_note="paper's rounded count; the authors' code layout gives 1,703,258 (164) and "
        "10,327,706 (1001), 1.25% above the paper's 10.2M",
        **_CIFAR,
    )
for _d in (18, 34, 50, 101, 152, 200):
    register(
        f"preact_resnet{_d}",
        partial(ResNet, stage_sizes=STAGE_SIZES[_d], block=IMAGENET_BLOCK[_d], preact=True),
        source=(
            "He et al. 2016b, section 5 (ImageNet pre-activation ResNets; "
            "V1.5 striding as fb.resnet.torch)"
        ),
        params_note="no published exact count: bare conv stem, BN-ReLU before each conv, 1x1-conv "
        "projections, final BN",
        **_IMAGENET,
    )

# --------------------------------------------------------------------------- stochastic depth

register(
    "resnet110_stochastic_depth",
    partial(CifarResNet, depth=110, drop_path_rate=0.5),
    source="Huang et al. 2016, section 4 (CIFAR-10, p_L = 0.5, linear decay, option A)",
    reference_params=1_727_962,
    params_note="the CIFAR ResNet-110 of REFERENCE.md Table 6 (option A)",
    **_CIFAR,
)
register(
    "resnet1202_stochastic_depth",
    partial(CifarResNet, depth=1202, drop_path_rate=0.5),
    source="Huang et al. 2016, section 4 (1202-layer net, p_L = 0.5)",
    reference_params=19_421_274,
    params_note="the CIFAR ResNet-1202 of REFERENCE.md Table 6 (option A)",
    **_CIFAR,
)

# --------------------------------------------------------------------------- wide ResNets

# WRN name -> (depth, k, exact CIFAR-10 count of the authors' layout: bias-free convs, 1x1-conv
# projections where the width changes, final BN, FC with bias; REFERENCE.md).
WRN_CONFIGS = {
    "wrn28_10": (28, 10, 36_479_194),
    "wrn40_4": (40, 4, 8_949_210),
    "wrn16_8": (16, 8, 10_961_370),
}
for _name, (_d, _k, _ref) in WRN_CONFIGS.items():
    register(
        _name,
        partial(WideResNet, depth=_d, width=_k),
        source="Zagoruyko & Komodakis 2016, Tables 4-5 (szagoruyko/wide-residual-networks)",
        reference_params=_ref,
        params_note="pre-activation, 1x1-conv projections, no conv biases",
        **_CIFAR,
    )
for _d, _ref in ((50, 68_883_240), (101, 126_886_696)):
    register(
        f"wide_resnet{_d}_2",
        partial(ResNet, stage_sizes=STAGE_SIZES[_d], block="bottleneck", base_width=128),
        source="Zagoruyko & Komodakis 2016; torchvision wide_resnet (bottleneck inner width x2)",
        reference_params=_ref,
        params_note="torchvision convention, option B",
        **_IMAGENET,
    )

# --------------------------------------------------------------------------- ResNeXt

_RESNEXT_CIFAR = partial(
    CifarResNet,
    depth=29,
    block="bottleneck",
    stem_width=64,
    stage_widths=(64, 128, 256),
    base_width=64,
    shortcut="B",
)
for _groups, _ref in ((8, 34_426_698), (16, 68_155_210)):
    register(
        f"resnext29_{_groups}x64d",
        partial(_RESNEXT_CIFAR, groups=_groups),
        source="Xie et al. 2017, section 5.3 and Table 7 (CIFAR ResNeXt-29)",
        reference_params=_ref,
        params_note=(
            "bias-free convs each followed by BN, 1x1 conv + BN projection wherever channels "
            "change (also stage 1: 64 -> 256), FC with bias (the common PyTorch port)"
        ),
        **_CIFAR,
    )
# torchvision's counts (the weights' meta["num_params"]).
for _name, _d, _groups, _bw, _ref in (
    ("resnext50_32x4d", 50, 32, 4, 25_028_904),
    ("resnext101_32x8d", 101, 32, 8, 88_791_336),
    ("resnext101_64x4d", 101, 64, 4, 83_455_272),
):
    register(
        _name,
        partial(
            ResNet, stage_sizes=STAGE_SIZES[_d], block="bottleneck", groups=_groups, base_width=_bw
        ),
        source="Xie et al. 2017, Table 1; torchvision resnext",
        reference_params=_ref,
        params_note="torchvision convention, option B",
        **_IMAGENET,
    )
