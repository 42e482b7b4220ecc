"""A run's workdir kept safe: one writer, its identity checked on resume, a verified restore.

    workdir/
      config.json          the run's TrainConfig
      dataset.json         the data set's identity (`Dataset.identity`: name, sizes, fingerprint)
      config_history.jsonl the fields changed on resume with `allow_changes`, and at which step
      metrics.jsonl        one record per member and logged step
      checkpoints/<step>/  orbax checkpoints; one that cannot be read is moved to <step>.damaged
      .lock                held by the process that writes here (fcntl; the OS drops it on exit)

config.json and dataset.json are written only once the run's checkpoint (if any) has been
restored, so a command that cannot resume the run changes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
from jax.experimental import multihost_utils

from cnnjax.train.checkpoint import Checkpointer, latest_checkpoint_step, tree_shapes
from cnnjax.train.config import RESUMABLE_FIELDS, TrainConfig, field_names
from cnnjax.train.metrics import write_json_atomic

log = logging.getLogger("cnnjax.train")

LOCK = ".lock"
# Fields that `allow_changes` may change on resume: the optimisation's schedule and strength. The
# train state's structure does not depend on them (the optimiser and the model do).
ADJUSTABLE_FIELDS = frozenset(
    {
        "learning_rate",
        "base_batch_size",
        "schedule",
        "boundaries",
        "boundary_epochs",
        "decay_factor",
        "warmup_steps",
        "warmup",
        "warmup_lr",
        "weight_decay",
        "momentum",
        "nesterov",
        "label_smoothing",
        "aux_weight",
        "dtype",
        "eval_split",
    }
)


class WorkdirLocked(ValueError):
    """Another process is writing this workdir."""


class CheckpointError(ValueError):
    """No checkpoint of the workdir can be restored."""


def check_files(workdir: str) -> None:
    """ValueError naming the path when a file of the workdir has the wrong kind (a directory where
    a file belongs, or the reverse), before anything is read or written."""
    for name, want_dir in (
        ("checkpoints", True),
        ("config.json", False),
        ("dataset.json", False),
        ("metrics.jsonl", False),
        ("config_history.jsonl", False),
        (LOCK, False),
    ):
        path = os.path.join(workdir, name)
        if os.path.exists(path) and os.path.isdir(path) != want_dir:
            kind = "a file" if want_dir else "a directory"
            raise ValueError(
                f"{path} is {kind}, but the run keeps its {name} there as "
                f"{'a directory' if want_dir else 'a file'}: move it away or use another workdir"
            )


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Holds the workdir's lock for the block; WorkdirLocked at once if another process holds it.

    An OS file lock (flock): a killed holder's lock goes with its process. `enabled=False` (the
    other processes of a multi-process run, whose process 0 holds it) does nothing.
    """
    if not enabled:
        yield
        return
    path = os.path.join(workdir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkdirLocked(
            f"{workdir} is in use by another run (PID {holder}): wait for it to end, "
            "or stop it and re-run to resume, or use another workdir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def check_resumable(
    config: TrainConfig,
    workdir: str,
    *,
    allow_changes: Iterable[str] = (),
    restore_config: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Raises ValueError unless `config` may continue the run in `workdir`; returns the changes
    of `allow_changes` fields it makes ({field: (old, new)}).

    Args:
      config: the run's config now.
      workdir: its directory.
      allow_changes: fields of ADJUSTABLE_FIELDS that may differ from the run's config.json.
      restore_config: `config` replaces a missing config.json of a workdir with checkpoints.

    A workdir without checkpoints (a run that failed before its first one) takes any config.
    """
    allow = set(allow_changes)
    bad = sorted(allow - ADJUSTABLE_FIELDS)
    if bad:
        what = (
            "not TrainConfig fields"
            if set(bad) - set(field_names())
            else "not adjustable on resume"
        )
        raise ValueError(
            f"allow_changes {bad}: {what}; fields that may change on resume are "
            f"{sorted(ADJUSTABLE_FIELDS)} (and always {sorted(RESUMABLE_FIELDS)})"
        )
    path = os.path.join(workdir, "config.json")
    has_checkpoint = latest_checkpoint_step(os.path.join(workdir, "checkpoints")) is not None
    if not os.path.exists(path):
        if has_checkpoint and not restore_config:
            raise ValueError(
                f"{workdir} holds checkpoints but no config.json, so the settings they were "
                "trained with are unknown. Give the run's config to restore it: `cnnjax train "
                f"--workdir {workdir} --config THE_RUNS_CONFIG.json` "
                "(train_and_evaluate(..., restore_config=True)), or use a new workdir"
            )
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        old = e
    if not isinstance(old, dict):
        if has_checkpoint:
            what = f"{type(old).__name__}: {old}" if isinstance(old, Exception) else repr(old)
            raise ValueError(
                f"{workdir} holds checkpoints but its config file {path!r} is not a JSON "
                f"object of TrainConfig fields ({what}); restore it or use a new workdir"
            )
        return {}
    new = config.to_dict()
    changed = sorted(
        k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_FIELDS
    )
    if not changed or not has_checkpoint:
        if changed:
            log.warning(
                "%s holds the config of a run without checkpoints (%s): replacing it",
                workdir,
                ", ".join(changed),
            )
        return {}
    refused = [k for k in changed if k not in allow]
    if refused:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in refused)
        adjustable = [k for k in refused if k in ADJUSTABLE_FIELDS]
        hint = (
            f"; to change {adjustable} on purpose, allow it: --allow_change {' '.join(adjustable)}"
            if adjustable and len(adjustable) == len(refused)
            else ""
        )
        raise ValueError(
            f"{workdir} holds a run with a different config ({changes}); only "
            f"{sorted(RESUMABLE_FIELDS)} may change on resume{hint}. Otherwise use a new workdir."
        )
    return {k: (old.get(k), new.get(k)) for k in changed}


def check_dataset(workdir: str, identity: dict[str, Any]) -> None:
    """ValueError if the run in `workdir` trained on another data set than `identity`."""
    path = os.path.join(workdir, "dataset.json")
    has_checkpoint = latest_checkpoint_step(os.path.join(workdir, "checkpoints")) is not None
    if not (has_checkpoint and os.path.isfile(path)):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return  # unreadable: the checkpoint's own shapes still guard the restore
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in diff)
        raise ValueError(
            f"{workdir} holds a run on other data ({changes}): check --dataset and "
            "--data_dir, or use a new workdir"
        )


def restore_newest(
    ckpt: Checkpointer, template: Any, *, move_aside: bool = True
) -> tuple[Any, dict, int]:
    """The newest checkpoint that reads completely and matches `template`: (state, metadata, step).

    A checkpoint whose stored tree differs from the template's (another model or optimiser) is a
    ValueError, and nothing is moved. One that cannot be read (a truncated or missing file) is
    damaged: with `move_aside` it is renamed to <step>.damaged, with a warning, and the one before
    it is tried. When none can be read, CheckpointError naming each, and nothing is changed.
    Without checkpoints: (template, {}, 0).
    """
    want = tree_shapes(template)
    damaged: list[tuple[int, str]] = []
    for step in reversed(ckpt.all_steps()):
        try:
            ckpt.verify(step)  # first: orbax's own reads of a damaged checkpoint leave noise behind
            stored = ckpt.state_shapes(step)
        except Exception as e:  # noqa: BLE001 -- unreadable files or metadata: damaged
            damaged.append((step, _reason(e)))
            continue
        if stored != want:
            extra = sorted(set(stored) - set(want))[:3]
            missing = sorted(set(want) - set(stored))[:3]
            raise ValueError(
                f"checkpoint {step} in {ckpt.directory} holds another train state than this config "
                f"builds (stored only: {extra}; expected: {missing}): the model, its options or "
                "the optimiser differ from the run's; use the run's own config, or a new workdir"
            )
        try:
            state, meta = ckpt.restore(template, step)
        except Exception as e:  # noqa: BLE001 -- a read error: damaged
            damaged.append((step, _reason(e)))
            continue
        if damaged and move_aside:
            _move_aside(ckpt, damaged, step)
        elif damaged:
            for bad, why in damaged:
                log.warning(
                    "checkpoint %d in %s cannot be read (%s); using checkpoint %d",
                    bad,
                    ckpt.directory,
                    why,
                    step,
                )
        return state, meta, step
    if damaged:
        names = "; ".join(f"{s}: {why}" for s, why in damaged)
        raise CheckpointError(
            f"no checkpoint in {ckpt.directory} can be read ({names}); nothing was changed. To "
            f"start over, move {ckpt.directory} away (or remove it) and re-run, or use a new "
            "workdir"
        )
    return template, {}, 0


def _move_aside(ckpt: Checkpointer, damaged: list[tuple[int, str]], good: int) -> None:
    """Process 0 renames the damaged checkpoints; the others wait for it."""
    multi = jax.process_count() > 1
    if multi:
        multihost_utils.sync_global_devices("cnnjax: checkpoints verified")
    if jax.process_index() == 0:
        for step, why in damaged:
            moved = ckpt.move_aside(step)
            log.warning(
                "checkpoint %d cannot be read (%s): moved to %s; resuming from checkpoint %d",
                step,
                why,
                moved,
                good,
            )
    if multi:
        multihost_utils.sync_global_devices("cnnjax: damaged checkpoints moved aside")


def _reason(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(e).__name__}: {text}".rstrip(": ")


def write_identity(
    workdir: str,
    config: TrainConfig,
    identity: dict[str, Any],
    step: int,
    changes: dict[str, tuple[Any, Any]],
) -> None:
    """config.json, dataset.json and (for allowed changes) a line of config_history.jsonl."""
    write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    write_json_atomic(os.path.join(workdir, "dataset.json"), identity)
    if changes:
        line = json.dumps(
            {"step": step, "changed": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}},
            sort_keys=True,
        )
        with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.warning(
            "%s: resuming at step %d with changed %s",
            workdir,
            step,
            ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()),
        )
