"""Learning-rate schedules and optimisers (optax) built from a `TrainConfig`.

Step counts are update counts: `schedule(t)` is the rate of the (t+1)-th update, so with the
paper's boundaries `schedule(31_999) == 0.1` and `schedule(32_000) == 0.01`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cnnjax.train.config import TrainConfig


def num_train_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The run's length in steps (num_epochs rounded up to whole steps)."""
    if config.num_steps is not None:
        return config.num_steps
    return max(1, math.ceil(config.num_epochs * steps_per_epoch))


def step_boundaries(config: TrainConfig, steps_per_epoch: int) -> tuple[int, ...]:
    """Step-decay boundaries in steps, whether configured in steps or epochs."""
    if config.boundary_epochs:
        return tuple(int(round(e * steps_per_epoch)) for e in config.boundary_epochs)
    return tuple(config.boundaries)


def create_learning_rate_fn(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """The schedule of `config`: warm-up, then step decay, cosine or constant.

    Args:
      config: uses learning_rate, base_batch_size (linear scaling rule), schedule, boundaries or
        boundary_epochs, decay_factor, warmup_steps, warmup, warmup_lr and the run's length.
      steps_per_epoch: converts epochs to steps.

    Step-decay boundaries are absolute step numbers (the warm-up does not shift them); the cosine
    runs from the end of the warm-up to the last step.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    peak = config.peak_learning_rate
    total = num_train_steps(config, steps_per_epoch)
    warm = config.warmup_steps
    if config.schedule == "step":
        main = optax.piecewise_constant_schedule(
            peak, {b: config.decay_factor for b in step_boundaries(config, steps_per_epoch)}
        )
    elif config.schedule == "cosine":
        cosine = optax.cosine_decay_schedule(peak, decay_steps=max(1, total - warm))
        main = lambda count: cosine(count - warm)  # noqa: E731
    elif config.schedule == "constant":
        main = optax.constant_schedule(peak)
    else:
        raise ValueError(f"schedule={config.schedule!r} is not one of 'step', 'cosine', 'constant'")
    if warm == 0:
        return main

    def schedule(count):
        count = jnp.asarray(count)
        if config.warmup == "constant":
            w = jnp.full(count.shape, config.warmup_lr, jnp.float32)
        else:
            w = config.warmup_lr + (peak - config.warmup_lr) * count.astype(jnp.float32) / warm
        return jnp.where(count < warm, w, main(count))

    return schedule


def weight_decay_mask(params: Any, mode: str) -> Any:
    """Pytree of bools: which parameters get weight decay.

    'all' decays everything (the ResNet paper); 'no_bn_bias' skips parameters with fewer than
    two axes, i.e. BatchNorm scale and bias and every layer bias.
    """
    if mode == "all":
        return jax.tree.map(lambda _: True, params)
    if mode == "no_bn_bias":
        return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)
    raise ValueError(f"wd_mask={mode!r} is not one of 'all', 'no_bn_bias'")


def create_optimizer(
    config: TrainConfig, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """SGD (momentum, optional Nesterov) or Adam with L2 weight decay, or AdamW.

    For 'sgd' and 'adam' the decay is added to the gradient before the update (the loss gains
    wd/2 * |w|^2, as in the ResNet paper); 'adamw' decouples it (Loshchilov & Hutter).
    """
    mask = lambda params: weight_decay_mask(params, config.wd_mask)  # noqa: E731
    if config.optimizer == "adamw":
        return optax.adamw(
            learning_rate_fn, b1=config.momentum, weight_decay=config.weight_decay, mask=mask
        )
    if config.optimizer == "sgd":
        base = optax.sgd(
            learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov
        )
    elif config.optimizer == "adam":
        base = optax.adam(learning_rate_fn, b1=config.momentum)
    else:
        raise ValueError(f"optimizer={config.optimizer!r} is not one of 'sgd', 'adam', 'adamw'")
    if config.weight_decay == 0:
        return base
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask), base)
