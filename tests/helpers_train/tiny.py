"""Tiny CNNs with BatchNorm for the training-engine tests (fast to compile on a CPU)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

from cnnjax import nn as cnn


class TinyCNN(nn.Module):
    """conv-BN-ReLU, strided conv-BN-ReLU, global average pool, dense; optional auxiliary head.

    Takes the keyword arguments the training loop gives `cnnjax.models.create`
    (num_classes, dtype, bn_axis_name).
    """

    num_classes: int = 10
    width: int = 8
    dtype: Any = None
    bn_axis_name: str | None = None
    aux_head: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool):
        norm = functools.partial(
            cnn.BatchNorm,
            use_running_average=not train,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
        )
        x = cnn.Conv(self.width, 3, padding=1, use_bias=False, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        x = cnn.Conv(
            2 * self.width, 3, strides=2, padding=1, use_bias=False, dtype=self.dtype, name="conv2"
        )(x)
        x = nn.relu(norm(name="bn2")(x))
        x = cnn.GlobalAvgPool()(x)
        logits = cnn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        if self.aux_head and train:
            return logits, [cnn.Dense(self.num_classes, dtype=self.dtype, name="aux_fc")(x)]
        return logits


def digits_config(**fields):
    """A TrainConfig for TinyCNN on the embedded digits at 8x8, one channel, batch 32, per-channel
    normalisation, no progress bar; `fields` give the rest (and may replace these)."""
    from cnnjax.train import TrainConfig

    base = dict(
        model="tiny",
        dataset="digits",
        image_size=8,
        channels=1,
        global_batch_size=32,
        normalize="per_channel",
        progress_bar=False,
    )
    return TrainConfig(**{**base, **fields})
