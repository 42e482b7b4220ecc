"""Orbax checkpoints of the train state plus the loop's own small state (JSON).

A checkpoint is written to a temporary directory and renamed once complete (orbax's atomic
commit), so a process killed while saving leaves the previous checkpoints intact and no partial
one is ever restored. Every process calls `save`: orbax coordinates them (process 0 writes the
replicated arrays and the metadata), so checkpoints are written collectively across hosts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnnjax.functional import is_int
from cnnjax.train.state import TrainState


class Checkpointer:
    """Saves and restores `(TrainState, metadata)` pairs under `directory/<step>/`.

    Args:
      directory: where step directories go (created if missing, unless `create` is False).
      max_to_keep: how many of the most recent checkpoints to keep.
      async_save: write in a background thread while training continues (`wait` joins it).
      create: create `directory` if missing (False: a missing directory has no checkpoints, and
        nothing is created until a `save`).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
        if not is_int(max_to_keep) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, metadata: dict[str, Any] | None = None) -> None:
        """Saves a host (NumPy) copy of `state` and JSON-able `metadata` as checkpoint `step`."""
        state = _as_arrays(state)
        # Saving is asynchronous: snapshot the metadata now, or later changes to the caller's
        # objects end up in the checkpoint (a resumed run then logged doubled metrics).
        metadata = json.loads(json.dumps(metadata or {}))
        self._manager.save(int(step), force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata)))

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The checkpoint `step` (default the latest), shaped like `template`, as NumPy arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise ValueError(f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_as_arrays(template)), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"] or {})

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints under `directory` ([] if it does not exist); creates nothing."""
    if not os.path.isdir(directory):
        return []
    with Checkpointer(directory, async_save=False, create=False) as ckpt:
        return ckpt.all_steps()


def latest_checkpoint_step(directory: str) -> int | None:
    """Step of the newest complete checkpoint under `directory`, or None; creates nothing."""
    steps = checkpoint_steps(directory)
    return steps[-1] if steps else None


def _as_arrays(tree: Any) -> Any:
    # Orbax wants arrays, not NumPy scalars.
    return jax.tree.map(np.asarray, tree)
