"""The train state: parameters, BatchNorm statistics, optimiser state, step and RNG key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree of arrays (no functions).

    The model and optimiser are not stored: the step functions close over them, so a state
    can be checkpointed, replicated and donated as plain arrays.

    Args:
      step: number of updates applied so far (int32 scalar).
      params: the 'params' collection.
      batch_stats: the 'batch_stats' collection (empty dict for models without BatchNorm).
      opt_state: the optax state.
      rng: raw uint32 key data (`jax.random.key_data`); the step wraps it with the configured
        implementation and folds in the step number (and device index) for dropout.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self) -> dict[str, Any]:
        """The collections `model.apply` takes."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def create_train_state(
    rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...]
) -> TrainState:
    """Initialises a model and its optimiser on one device.

    Args:
      rng: PRNG key (typed, e.g. `jax.random.key(0, impl='rbg')`, or a raw `PRNGKey`); split
        into the init, dropout-init and training keys.
      model: linen module called as `model(x, train=...)`.
      tx: the optimiser.
      input_shape: shape of one image (H, W, C).

    The model is initialised in training mode, so that parts used only in training (auxiliary
    classifiers) get parameters too; BatchNorm does not update its statistics while initialising.
    """
    return train_state_initializer(model, tx, input_shape)(rng)


def train_state_initializer(
    model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...]
) -> Callable[[jax.Array], TrainState]:
    """`create_train_state` as a function of the key alone, compiled once for all its keys."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")

    @jax.jit
    def init(rng):
        init_key, dropout_key, train_key = jax.random.split(rng, 3)
        x = jnp.zeros((2, *input_shape), jnp.float32)
        variables = model.init({"params": init_key, "dropout": dropout_key}, x, train=True)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=jax.random.key_data(train_key) if _is_typed_key(train_key) else train_key,
        )

    return init


def _is_typed_key(key: jax.Array) -> bool:
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
