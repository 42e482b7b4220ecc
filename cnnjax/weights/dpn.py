"""timm's Dual Path Network state_dicts (timm/models/dpn.py), the plain dpn68/92/98/107/131.

timm keeps everything but the classifier in one `features` Sequential: the stem `conv1_1`
(`conv`, `bn`), the blocks `conv{s}_{b}` of stages s = 2-5 (b from 1) and the final `conv5_bn_ac`.
A block's BN-ReLU-conv units are `c1x1_a`, `c3x3_b`, `c1x1_c` (cnnjax: `conv1`, `conv2`, `conv3`)
and its projection is `c1x1_w_s1` in stage 2, `c1x1_w_s2` (stride 2) after it (cnnjax: `proj`).
The classifier is a 1x1 Conv2d, as in cnnjax. BatchNorm epsilon is 1e-3 in both. timm's 'b'
variants (dpn68b: the last 1x1 conv split into `c1x1_c1`/`c1x1_c2`) are another layout, not mapped.

The weights (timm's `mx_in1k`, converted from the authors' MXNet models) expect timm's DPN
normalisation, mean (124, 117, 104) / 255 and std 1 / (0.0167 * 255), not ImageNet's.
"""

from __future__ import annotations

import re

from cnnjax.weights._convert import Layout

SOURCES = {f"dpn{d}": f"timm:dpn{d}" for d in (68, 92, 98, 107, 131)}

_UNITS = {"conv1": "c1x1_a", "conv2": "c3x3_b", "conv3": "c1x1_c"}


def _unit(layout: Layout, dst: str, src: str) -> None:
    layout.bn(f"{dst}/bn", f"{src}.bn")
    layout.conv(f"{dst}/conv", f"{src}.conv")


def fill(layout: Layout, name: str) -> None:
    layout.conv("stem_conv", "features.conv1_1.conv")
    layout.bn("stem_bn", "features.conv1_1.bn")
    blocks = sorted(
        {
            (int(m[1]), int(m[2]))
            for k in layout.template
            if (m := re.match(r"params/stage(\d+)_block(\d+)/", k))
        }
    )
    for stage, block in blocks:
        dst, src = f"stage{stage}_block{block}", f"features.conv{stage}_{block}"
        if f"params/{dst}/proj/conv/kernel" in layout.template:
            _unit(layout, f"{dst}/proj", f"{src}.c1x1_w_s{1 if stage == 2 else 2}")
        for mine, theirs in _UNITS.items():
            _unit(layout, f"{dst}/{mine}", f"{src}.{theirs}")
    layout.bn("final_bn", "features.conv5_bn_ac.bn")
    layout.conv("classifier", "classifier")
