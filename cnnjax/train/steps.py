"""Per-device training and evaluation steps, written against the named axis 'batch'.

Each step sees its device's slice of the global batch. Gradients and metrics are `lax.pmean`ed
over the axis and BatchNorm (built with `bn_axis_name=axis_name`) normalises with the statistics
of the global batch, so N devices compute what one device would on the whole batch. With
`axis_name=None` the same code is an ordinary single-device step. `cnnjax.train.parallel` wraps
these functions in `jax.pmap` or `jax.jit(jax.shard_map(...))`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from cnnjax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing.

    Smoothing mixes the one-hot target with the uniform distribution:
    (1 - eps) * onehot + eps / num_classes (Szegedy et al. 2016).
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (N, classes) and labels (N,), got {logits.shape} and {labels.shape}"
        )
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def top_k_error(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example 1.0 where the label is not among the k highest logits (ties count against)."""
    k = min(k, logits.shape[-1])
    logits = logits.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    # The label is in the top k iff fewer than k classes score strictly higher.
    rank = jnp.sum(logits > label_logit, axis=-1)
    return (rank >= k).astype(jnp.float32)


def split_outputs(outputs: Any) -> tuple[jax.Array, list[jax.Array]]:
    """(logits, [aux_logits, ...]) from a model's output: an array, or (logits, aux list)."""
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 2:
            raise ValueError(
                "a model returns logits or (logits, [aux_logits, "
                f"...]); got a tuple of {len(outputs)}"
            )
        logits, aux = outputs
        aux = [aux] if isinstance(aux, jax.Array) else list(aux)
        return logits, aux
    return outputs, []


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    learning_rate_fn: optax.Schedule,
    *,
    label_smoothing: float = 0.0,
    aux_weight: float = 0.3,
    axis_name: str | None = "batch",
    rng_impl: str | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Builds the per-device training step `(state, batch, apply_kwargs=None) -> (state, metrics)`.

    Args:
      model: linen module; its BatchNorm must use `axis_name` for global-batch statistics.
      tx: the optimiser.
      learning_rate_fn: the schedule (only reported in the metrics; tx holds its own).
      label_smoothing: epsilon for the main and auxiliary losses.
      aux_weight: weight of each auxiliary classifier's loss (GoogLeNet: 0.3).
      axis_name: the mapped device axis to average over, or None on one device.
      rng_impl: PRNG implementation of `state.rng` ('threefry2x32', 'rbg', ...;
          None: JAX's default).

    batch: {'image': [b, H, W, C] float, 'label': [b] int}; apply_kwargs: extra arguments of the
    model's call (a twin's `shortcut_scale`). The metrics (loss of the main classifier, top-1 and
    top-5 error, learning rate, and aux_loss for models with auxiliary heads) are averages over
    the global batch.
    """

    def train_step(
        state: TrainState, batch: Batch, apply_kwargs: dict | None = None
    ) -> tuple[TrainState, Metrics]:
        images, labels = batch["image"], batch["label"]
        dropout_key = jax.random.fold_in(
            jax.random.wrap_key_data(state.rng, impl=rng_impl), state.step
        )
        if axis_name is not None:
            dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(axis_name))

        def loss_fn(params):
            variables = (
                {"params": params, "batch_stats": state.batch_stats}
                if state.batch_stats
                else {"params": params}
            )
            outputs, updates = model.apply(
                variables,
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
                **(apply_kwargs or {}),
            )
            logits, aux = split_outputs(outputs)
            loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
            aux_losses = [jnp.mean(cross_entropy(a, labels, label_smoothing)) for a in aux]
            total = loss + aux_weight * sum(aux_losses) if aux_losses else loss
            return total, (logits, loss, aux_losses, updates.get("batch_stats", {}))

        grads, (logits, loss, aux_losses, batch_stats) = jax.grad(loss_fn, has_aux=True)(
            state.params
        )
        if axis_name is not None:
            grads = lax.pmean(grads, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "error": jnp.mean(top_k_error(logits, labels, 1)),
            "top5_error": jnp.mean(top_k_error(logits, labels, 5)),
        }
        if aux_losses:
            metrics["aux_loss"] = sum(aux_losses) / len(aux_losses)
        if axis_name is not None:
            metrics = lax.pmean(metrics, axis_name)
        metrics["lr"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, *, axis_name: str | None = "batch") -> Callable[..., Metrics]:
    """Builds the per-device evaluation step `(state, batch, apply_kwargs=None) -> sums`.

    batch: {'image', 'label', 'mask'}; 'mask' (bool [b], optional) marks real examples in a
    padded batch. Returns sums over real examples of the whole global batch ('loss', 'error',
    'top5_error', 'count'); divide by the summed 'count' after the last batch.
    """

    def eval_step(state: TrainState, batch: Batch, apply_kwargs: dict | None = None) -> Metrics:
        images, labels = batch["image"], batch["label"]
        mask = batch.get("mask")
        mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        outputs = model.apply(state.variables, images, train=False, **(apply_kwargs or {}))
        logits, _ = split_outputs(outputs)
        sums = {
            "loss": jnp.sum(cross_entropy(logits, labels) * mask),
            "error": jnp.sum(top_k_error(logits, labels, 1) * mask),
            "top5_error": jnp.sum(top_k_error(logits, labels, 5) * mask),
            "count": jnp.sum(mask),
        }
        if axis_name is not None:
            sums = lax.psum(sums, axis_name)
        return sums

    return eval_step
