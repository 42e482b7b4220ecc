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
import tensorstore as ts

from cnnjax._checks import is_int
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

    def __init__(
        self, directory: str, *, max_to_keep: int = 3, async_save: bool = True, create: bool = True
    ):
        if not is_int(max_to_keep) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}")
        self.directory = os.path.abspath(directory)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, enable_async_checkpointing=async_save
        )
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        # The handlers let `state_shapes` read a checkpoint's tree without its arrays.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, options=self._options, item_handlers=handlers)

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
        self._manager.save(
            int(step),
            force=True,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(metadata)
            ),
        )

    def restore(
        self, template: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any]]:
        """The checkpoint `step` (default the latest), shaped like `template`, as NumPy arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise ValueError(
                f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}"
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_as_arrays(template)), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"] or {})

    def state_shapes(self, step: int) -> list[tuple[str, tuple[int, ...]]]:
        """The stored state's leaves as sorted (path, shape) pairs, read from its metadata alone."""
        shapes = tree_shapes(self._manager.item_metadata(step)["state"])
        if not shapes:
            raise ValueError(
                f"checkpoint {step} in {self.directory} has no readable state metadata"
            )
        return shapes

    def verify(self, step: int) -> None:
        """Reads every stored value of checkpoint `step`; raises on the first that does not read.

        The reads go through tensorstore's own futures, not orbax's asyncio restore: when one read
        of that fails, the others still in flight later call into a closed event loop and print a
        traceback each ("Event loop is closed"). A checkpoint that verifies restores cleanly.
        """
        state = os.path.join(self.directory, str(step), "state")
        for path in (
            os.path.join(self.directory, str(step), "meta", "metadata"),
            os.path.join(state, "_METADATA"),
        ):
            with open(path) as f:  # FileNotFoundError, or a JSON error, where one is damaged
                json.load(f)
        if not os.path.exists(os.path.join(state, "manifest.ocdbt")):
            return  # not an OCDBT checkpoint: the restore itself is the check
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
        keys = kv.list().result()
        if not keys:
            raise ValueError(f"{state} holds no values")
        for key, read in [(k, kv.read(k)) for k in keys]:
            if read.result().state != "value":
                raise ValueError(f"{state}: {key.decode(errors='replace')} is missing")

    def move_aside(self, step: int) -> str:
        """Renames checkpoint `step` to `<step>.damaged` (then `.damaged-2`, ...), where orbax no
        longer sees it; returns the new path. Nothing is deleted."""
        src = os.path.join(self.directory, str(step))
        dst, n = f"{src}.damaged", 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}.damaged-{n}"
        os.rename(src, dst)
        self._manager.close()
        self._manager = self._open()
        return dst

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
    """Steps of the complete checkpoints under `directory` ([] if there is none); creates nothing.

    Listed from the directory alone, without a CheckpointManager: building one synchronises all
    processes of a multi-process run, and so must not happen on some of them only.
    """
    if not os.path.isdir(directory):
        return []
    return sorted(ocp.utils.checkpoint_steps(directory))


def latest_checkpoint_step(directory: str) -> int | None:
    """Step of the newest complete checkpoint under `directory`, or None; creates nothing."""
    steps = checkpoint_steps(directory)
    return steps[-1] if steps else None


def tree_shapes(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Sorted (path, shape) of a pytree's leaves, paths as 'params/conv1/kernel' whatever the
    node types (dicts, dataclasses, tuples): a state and a checkpoint's metadata compare."""

    def name(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    return sorted(
        (
            "/".join(map(name, path)),
            tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape),
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    )


def _as_arrays(tree: Any) -> Any:
    # Orbax wants arrays, not NumPy scalars.
    return jax.tree.map(np.asarray, tree)
