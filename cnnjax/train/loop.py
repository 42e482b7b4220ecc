"""`train_and_evaluate(config, workdir)`: the training run, resumable, on any number of devices.

The workdir holds `config.json`, `metrics.jsonl` and `checkpoints/<step>/` (`cnnjax.train.workdir`:
one writer at a time, the run's config and data checked on resume, a damaged checkpoint moved
aside). Re-running with the same workdir resumes from the newest checkpoint that reads completely:
the data order is a function of (seed, epoch)
and the dropout keys of (seed, step), so a resumed run repeats exactly what an uninterrupted run
does. SIGTERM saves a checkpoint after the current compiled call and returns; a NaN or infinite
training loss raises `NonFiniteLossError` before anything after it is checkpointed. A run of
several members (`seeds`, `twins`) writes one metrics record per member and step, tagged with
its seed (and network), and checkpoints all members together. The compiled calls are
`cnnjax.train.engine`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cnnjax import data
from cnnjax._checks import is_int
from cnnjax.train import optim
from cnnjax.train import workdir as workdir_lib
from cnnjax.train.checkpoint import Checkpointer, checkpoint_steps
from cnnjax.train.config import TrainConfig
from cnnjax.train.engine import Engine, Member, initial_state, make_members
from cnnjax.train.metrics import Meter, MetricsWriter, NonFiniteLossError
from cnnjax.train.parallel import DataParallel
from cnnjax.train.state import TrainState

log = logging.getLogger("cnnjax.train")

Callback = Callable[[int, TrainState, dict], None]


@dataclasses.dataclass
class RunResult:
    """What `train_and_evaluate` returns.

    Attributes:
      step: the step the run stopped at.
      metrics: the final evaluation ('test_loss', 'test_error', 'test_top5_error'; the prefix is
        the evaluated split) of the first member, empty if the run was preempted.
      state: the train state at `step`, as NumPy arrays (with a leading member axis if several).
      resumed_from: the checkpoint step the run started from (0 for a fresh run).
      preempted: True if SIGTERM stopped the run early (a checkpoint of `step` was saved).
      members: each member's tag (seed, and network for twins) and final evaluation.
    """

    step: int
    metrics: dict[str, float]
    state: TrainState
    resumed_from: int
    preempted: bool
    members: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Setup:
    """A run's pieces, built from its config (shared by training and `evaluate_checkpoint`).

    `model` is what every member's step computes; `members` the independent runs (one unless
    the config has seeds > 1 or twins).
    """

    config: TrainConfig
    par: DataParallel
    pipeline: data.Pipeline
    model: nn.Module
    input_shape: tuple[int, int, int]
    learning_rate_fn: Callable
    tx: Any
    num_steps: int
    members: list[Member]


def build(config: TrainConfig, *, model_fn: Callable[..., nn.Module] | None = None) -> Setup:
    """Validates `config` and builds its devices, data pipeline, model and optimiser.

    Args:
      config: the run's configuration.
      model_fn: builds the model instead of `cnnjax.models.create(config.model, ...)`; called with
        `num_classes`, `bn_axis_name`, `dtype` (unless float32) and `config.model_kwargs`.
        Registry models that check their input channels also get `in_channels`.
    """
    config.validate(check_registries=model_fn is None)
    par = DataParallel(config.parallel)
    par.check_batch_size(config.global_batch_size)
    image_size, channels = config.image_size, config.channels
    takes_in_channels = False
    if model_fn is None:
        from cnnjax import models

        spec = models.get_spec(config.model)
        h, w, c = spec.input_shape
        image_size = (h, w) if image_size is None else image_size
        channels = c if channels is None else channels
        model_fn = functools.partial(models.create, config.model)
        takes_in_channels = "in_channels" in inspect.signature(spec.builder).parameters
    ds = data.load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        image_size=image_size,
        channels=channels,
        validation_size=config.validation_size,
        seed=config.seed,
    )
    pipeline = data.Pipeline(
        ds,
        config.global_batch_size,
        augment=config.augment,
        normalize=config.normalize,
        seed=config.seed,
        eval_split=config.eval_split,
    )
    if len(ds.splits[config.eval_split]) == 0:
        raise ValueError(
            f"the {config.eval_split} split of {ds.name} ({ds.origin}) is empty: the run "
            "could not be evaluated; give it examples, or evaluate on a validation split "
            "(validation_size=N, eval_split='validation')"
        )
    _check_model_kwargs(config, ds, takes_in_channels)
    kwargs = dict(config.model_kwargs, num_classes=ds.num_classes, bn_axis_name=par.axis_name)
    if takes_in_channels:  # models that check their input channels (MLP, AlexNet, GoogLeNet)
        kwargs.setdefault("in_channels", ds.image_shape[-1])
    if config.dtype != "float32":
        kwargs["dtype"] = jnp.dtype(config.dtype)
    try:
        model, members = make_members(config, model_fn, kwargs, tuple(ds.image_shape))
    except ValueError:
        raise  # models.create names the bad option or value
    except (TypeError, ArithmeticError) as e:
        raise ValueError(
            f"cannot build model {config.model!r}{_kwargs_text(config)}: {_one_line(e)} "
            "(check --model and --model_kwargs)"
        ) from e
    _check_model(config, model, tuple(ds.image_shape))
    if config.data_on_device:
        data.device.check_fits(pipeline, par.devices, (config.eval_split,), config.augment)
    lr_fn = optim.create_learning_rate_fn(config, pipeline.steps_per_epoch)
    return Setup(
        config=config,
        par=par,
        pipeline=pipeline,
        model=model,
        input_shape=tuple(ds.image_shape),
        learning_rate_fn=lr_fn,
        tx=optim.create_optimizer(config, lr_fn),
        num_steps=optim.num_train_steps(config, pipeline.steps_per_epoch),
        members=members,
    )


def _check_model_kwargs(config: TrainConfig, ds, takes_in_channels: bool) -> None:
    """ValueError for a model option the trainer sets itself, unless it agrees with the data."""
    kw = config.model_kwargs
    for name, field in (("dtype", "dtype"), ("bn_axis_name", "parallel")):
        if name in kw:
            raise ValueError(
                f"model_kwargs {name}={kw[name]!r}: the trainer sets {name} (from "
                f"TrainConfig.{field}); drop it from model_kwargs"
            )
    for name, value in (
        ("num_classes", ds.num_classes),
        ("in_channels", ds.image_shape[-1] if takes_in_channels else None),
    ):
        if name in kw and value is not None and kw[name] != value:
            raise ValueError(
                f"model_kwargs {name}={kw[name]!r}, but {ds.name} has {value} "
                f"{'classes' if name == 'num_classes' else 'channels'}: the model follows "
                f"the data; drop {name} from model_kwargs (or set --channels)"
            )


def _kwargs_text(config: TrainConfig) -> str:
    return f" with model_kwargs={config.model_kwargs}" if config.model_kwargs else ""


def _one_line(e: BaseException) -> str:
    """`e` as one short line: its message's first line, its type's name unless a ValueError."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = text if len(text) <= 300 else text[:297] + "..."
    return (
        text if isinstance(e, ValueError) and text else f"{type(e).__name__}: {text}".rstrip(": ")
    )


def _check_model(config: TrainConfig, model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Traces the model's initialisation on `input_shape` (shapes only, nothing is computed).

    A model that cannot take these inputs (too small for its downsampling, a zero-width layer,
    ...) then fails here, with a ValueError naming the model, its options and the input shape,
    before a workdir is created or any data is read into the training loop.
    """

    def init(x):
        key = jax.random.key(0, impl=config.rng_impl)
        init_key, dropout_key = jax.random.split(key)
        return model.init({"params": init_key, "dropout": dropout_key}, x, train=True)

    try:
        jax.eval_shape(init, jax.ShapeDtypeStruct((2, *input_shape), jnp.float32))
    except Exception as e:  # any error while tracing is the model's, on these inputs
        shape = "x".join(map(str, input_shape))
        raise ValueError(
            f"model {config.model!r}{_kwargs_text(config)} cannot take {shape} inputs: "
            f"{_one_line(e)} (check --model, --model_kwargs, --image_size and --channels)"
        ) from e


def check_workdir(workdir: str, name: str = "workdir") -> None:
    """Raises ValueError (naming the argument `name`) unless `workdir` is or can become a directory.

    Checked before any data is loaded or anything is written.
    """
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise ValueError(f"{name} must be a directory path, got {workdir!r}")
    path = os.path.abspath(os.fspath(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"{name} {os.fspath(workdir)!r} is an existing file, not a directory; give a new "
            "directory or a run's workdir"
        )
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(
            f"{name} {os.fspath(workdir)!r} cannot be created: {parent!r} is a file, "
            "not a directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {os.fspath(workdir)!r}: {parent!r} is not writable")


class _StopSignal:
    """SIGTERM asks the run to checkpoint and stop at the next step boundary.

    One process: a Python handler sets a flag. Several processes: JAX's preemption service
    (started by `jax.distributed.initialize`) catches the signal and agrees on a common step.
    """

    def __init__(self):
        self.received = False
        self._previous = None
        self._multi = False

    def __enter__(self):
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def should_stop(self, step: int) -> bool:
        if self._multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service disabled
                return False
        return self.received

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(
    config: TrainConfig,
    workdir: str,
    *,
    model_fn: Callable[..., nn.Module] | None = None,
    callbacks: Sequence[Callback] = (),
    allow_changes: Sequence[str] = (),
    restore_config: bool = False,
) -> RunResult:
    """Trains `config` in `workdir`, resuming from its newest checkpoint, and evaluates.

    Args:
      config: the run's configuration (validated here).
      workdir: directory for config.json, metrics.jsonl and checkpoints/ (created; see
        `cnnjax.train.workdir` for what it holds).
      model_fn: optional model builder instead of the registry (see `build`).
      callbacks: called as `callback(step, state, metrics)` after every compiled call (every
        `steps_per_dispatch` steps) on every process, with the step reached and device arrays
        (reading them synchronises with the device; the metrics have the axes [members][steps]
        in front where the run has several).
      allow_changes: fields of `cnnjax.train.workdir.ADJUSTABLE_FIELDS` (the learning rate and
        its schedule, ...) that may differ from the run's config.json on resume; the change is
        recorded in config_history.jsonl.
      restore_config: take `config` as the run's own where config.json is missing but
        checkpoints are present.

    Returns:
      A `RunResult`.

    Raises:
      ValueError: a bad config, a model that cannot be built or cannot take the configured inputs,
        an empty evaluation split, a workdir that cannot be one, one that another process is
        writing (`WorkdirLocked`), or one holding a run with another config or data set, or
        whose checkpoints all fail to read (`CheckpointError`). All of these are raised before
        anything is written; a damaged newest checkpoint is moved aside and the run resumes from
        the newest that reads (a warning names it).
      NonFiniteLossError: the training loss became NaN or infinite; no checkpoint after the last
        finite step is written.
    """
    check_workdir(workdir)
    workdir_lib.check_files(workdir)
    check = functools.partial(
        workdir_lib.check_resumable,
        config,
        workdir,
        allow_changes=allow_changes,
        restore_config=restore_config,
    )
    check()  # at once, before the data is loaded
    # Everything that can fail on a bad config (fields, data, model, input shape), before anything
    # is written.
    setup = build(config, model_fn=model_fn)
    identity = setup.pipeline.ds.identity()
    workdir_lib.check_dataset(workdir, identity)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    with workdir_lib.lock(workdir, enabled=is_main):
        changes = {}
        if is_main:  # again, now that no other writer can change the workdir (the others do not
            # look: process 0 may be creating checkpoints/ as they would, out of step with orbax)
            changes = check()
            workdir_lib.check_dataset(workdir, identity)
        with Checkpointer(
            os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
        ) as ckpt:
            host_state, meta, start = workdir_lib.restore_newest(ckpt, initial_state(setup))
            if is_main:
                workdir_lib.write_identity(workdir, config, identity, start, changes)
            return _train(setup, workdir, ckpt, host_state, meta, start, callbacks)


def _train(
    setup: Setup,
    workdir: str,
    ckpt: Checkpointer,
    host_state: TrainState,
    meta: dict[str, Any],
    start: int,
    callbacks: Sequence[Callback],
) -> RunResult:
    """The training loop of `train_and_evaluate`, from the restored state at `start`."""
    config = setup.config
    par, pipe, num_steps, members = setup.par, setup.pipeline, setup.num_steps, setup.members
    spe = pipe.steps_per_epoch
    is_main = jax.process_index() == 0
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), enabled=is_main)
    # Records after the checkpoint (from 0: of an attempt that ended before its first checkpoint).
    dropped = writer.truncate_after(start)
    if start:
        log.info(
            "resuming %s from step %d (%d later metric records dropped)", workdir, start, dropped
        )
    else:
        log.info(
            "training %s on %s in %s: %d steps of %d examples on %d device(s), %d process(es), "
            "%d member(s)",
            config.model,
            config.dataset,
            workdir,
            num_steps,
            config.global_batch_size,
            par.num_devices,
            jax.process_count(),
            len(members),
        )
    engine = Engine(setup)
    state = engine.place(host_state)
    meters = [Meter.from_state(m) for m in meta.get("meters", [meta.get("meter")] * len(members))]
    pending: list[tuple[int, int, Any]] = []  # (first step, last step, device metrics) of each call
    wall_offset = float(meta.get("wall_time", 0.0))
    t_start = time.perf_counter()
    t_window, window_steps = t_start, 0
    step, preempted, records = start, False, [{} for _ in members]
    bar = _progress_bar(config, num_steps, start, enabled=is_main)

    def save(at: int) -> None:
        host = engine.to_host(state)
        # A finite loss is computed before the update: the update itself may still overflow.
        leaves = jax.tree.leaves((host.params, host.batch_stats))
        for i in range(len(members)):
            if not all(np.isfinite(x[i] if len(members) > 1 else x).all() for x in leaves):
                raise NonFiniteLossError(
                    f"the parameters became non-finite at step {at}{_member_text(members, i)}"
                )
        ckpt.save(
            at,
            host,
            {
                "meters": [m.state() for m in meters],
                "wall_time": wall_offset + time.perf_counter() - t_start,
            },
        )

    def write(records: list[dict[str, Any]], final: bool) -> None:
        for record, member in zip(records, members):
            record.update(
                step=step,
                epoch=step / spe,
                wall_time=wall_offset + time.perf_counter() - t_start,
                **member.tag,
            )
            if final:
                record["final"] = True
            writer.write(record)

    try:
        with (
            _StopSignal() as stop_signal,
            contextlib.closing(engine.run(state, start, num_steps)) as calls,
        ):
            for end, state, metrics in calls:
                pending.append((step + 1, end, metrics))
                window_steps += end - step
                bar.update(end - step)
                step = end
                for callback in callbacks:
                    callback(step, state, metrics)
                preempted = stop_signal.should_stop(step)
                final = step == num_steps
                do_log = step % config.log_every == 0 or final
                do_eval = (config.eval_every > 0 and step % config.eval_every == 0) or final
                do_ckpt = (
                    (config.checkpoint_every > 0 and step % config.checkpoint_every == 0)
                    or final
                    or preempted
                )
                if not (do_log or do_eval or do_ckpt):
                    continue
                # Raises on a non-finite loss, before anything is saved.
                _flush(par, pending, meters, members)
                pending = []
                records = [{} for _ in members]
                if do_log:
                    elapsed = time.perf_counter() - t_window
                    for record, meter in zip(records, meters):
                        record.update(
                            {f"train_{k}": v for k, v in meter.means().items() if k != "lr"}
                        )
                        record.update(
                            lr=meter.last["lr"],
                            images_per_sec=window_steps * config.global_batch_size / elapsed,
                        )
                        meter.reset()
                    bar.set_postfix(
                        loss=f"{records[0]['train_loss']:.4f}",
                        err=f"{records[0]['train_error']:.4f}",
                        img_s=f"{records[0]['images_per_sec'] * len(members):.0f}",
                    )
                if do_eval:
                    try:
                        evaluated = engine.evaluate(state)
                    except BaseException:
                        # Whatever stops the evaluation, the training up to here is kept.
                        if records[0]:
                            write(records, False)
                        save(step)
                        raise
                    for record, metrics in zip(records, evaluated):
                        record.update(metrics)
                if records[0]:
                    write(records, final)
                if do_ckpt:
                    save(step)
                t_window, window_steps = time.perf_counter(), 0
                if preempted:
                    break
    except NonFiniteLossError as e:
        ckpt.wait()
        raise NonFiniteLossError(
            _divergence_message(e, workdir, ckpt.latest_step(), config)
        ) from None
    finally:
        bar.close()

    host_state = engine.to_host(state)
    if preempted:
        log.info("SIGTERM: saved a checkpoint at step %d in %s and stopped", step, ckpt.directory)
        return RunResult(
            step=step, metrics={}, state=host_state, resumed_from=start, preempted=True
        )
    if start >= num_steps:  # nothing left to train: report the final evaluation
        final_metrics = engine.evaluate(state)
    else:
        final_metrics = [
            {k: v for k, v in r.items() if k.startswith(pipe.eval_split + "_")} for r in records
        ]
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in final_metrics[0].items()))
    return RunResult(
        step=step,
        metrics=final_metrics[0],
        state=host_state,
        resumed_from=start,
        preempted=False,
        members=[{**m.tag, **f} for m, f in zip(members, final_metrics)],
    )


def _divergence_message(
    error: Exception, workdir: str, kept: int | None, config: TrainConfig
) -> str:
    """What a diverged run says: where it stopped, what is kept, and the command that continues."""
    lower = f"{config.learning_rate / 10:g}"
    if kept is None:
        return (
            f"{error}. Training stopped; no checkpoint was written before it, so there is nothing "
            f"to resume: lower the learning rate (e.g. --learning_rate {lower}) or add warm-up "
            f"(--warmup_steps, --warmup_lr) and run again (the workdir {workdir} may be reused)"
        )
    return (
        f"{error}. Training stopped; the last good checkpoint (step {kept}) in "
        f"{os.path.join(workdir, 'checkpoints')} is kept. To continue from it at a lower rate, "
        f"re-run with the same workdir and allow the change: --learning_rate {lower} "
        "--allow_change learning_rate (the same for warmup_steps and warmup_lr; "
        "config_history.jsonl records it)"
    )


def _member_text(members: Sequence[Member], i: int) -> str:
    if len(members) == 1:
        return ""
    return " (member " + ", ".join(f"{k} {v}" for k, v in members[i].tag.items()) + ")"


def _flush(
    par: DataParallel,
    pending: list[tuple[int, int, Any]],
    meters: list[Meter],
    members: Sequence[Member],
) -> None:
    """Adds the pending calls' per-step metrics to each member's meter, step by step.

    NonFiniteLossError names the first step (and member) whose loss is not finite.
    """
    for (first, last, _), metrics in zip(pending, par.to_host([m for _, _, m in pending])):
        n = last - first + 1
        metrics = {k: np.reshape(v, (len(members), n)) for k, v in metrics.items()}
        bad = ~np.isfinite(metrics["loss"])
        if bad.any():
            i, j = np.argwhere(bad.T)[0][::-1]
            raise NonFiniteLossError(
                f"the training loss is {metrics['loss'][i, j]} at step {first + j}"
                f"{_member_text(members, i)}"
            )
        for i, meter in enumerate(meters):
            for j in range(n):
                meter.add(first + j, {k: v[i, j] for k, v in metrics.items()})
            meter.flush(lambda tree: tree)


def evaluate_checkpoint(
    workdir: str,
    *,
    step: int | None = None,
    split: str | None = None,
    model_fn: Callable[..., nn.Module] | None = None,
) -> dict[str, Any]:
    """Restores a run's checkpoint (default: the newest) and evaluates it on `split`.

    Args:
      workdir: a run's workdir (with config.json and checkpoints/).
      step: which checkpoint; None for the newest.
      split: 'test' or 'validation' (default: the config's eval_split).
      model_fn: the model builder the run used, if not the registry.

    Returns:
      {'step', '<split>_loss', '<split>_error', '<split>_top5_error'}; for a run of several
      members {'step', 'members': [{'seed', ('network',) '<split>_loss', ...}, ...]}.
    """
    if step is not None and (not is_int(step) or step < 0):
        raise ValueError(
            f"step must be a checkpoint's step (an int >= 0) or None for the newest, got {step!r}"
        )
    if split not in (None, "test", "validation"):
        raise ValueError(
            f"split must be 'test', 'validation' or None (the run's eval_split), got {split!r}"
        )
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{workdir} has no config.json: not a training workdir")
    config = TrainConfig.from_json_file(path)
    # Nothing is created here: a workdir without checkpoints is left as it is.
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = checkpoint_steps(ckpt_dir)
    if not steps:
        raise ValueError(f"{workdir} has no checkpoint to evaluate")
    if step is not None and step not in steps:
        raise ValueError(f"{workdir} has no checkpoint of step {step}; its checkpoints: {steps}")
    setup = build(config, model_fn=model_fn)
    with Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints, create=False) as ckpt:
        if step is None:  # the newest that reads; eval changes nothing in the workdir
            host_state, _, _ = workdir_lib.restore_newest(
                ckpt, initial_state(setup), move_aside=False
            )
        else:
            host_state, _ = ckpt.restore(initial_state(setup), step)
    engine = Engine(setup)
    results = engine.evaluate(engine.place(host_state), split)
    at = int(np.max(host_state.step))
    if len(setup.members) == 1:
        return {"step": at, **results[0]}
    return {"step": at, "members": [{**m.tag, **r} for m, r in zip(setup.members, results)]}


def evaluate_weights(
    config: TrainConfig,
    variables: dict[str, Any],
    *,
    split: str | None = None,
    model_fn: Callable[..., nn.Module] | None = None,
) -> dict[str, Any]:
    """Evaluates given variables ({'params', 'batch_stats'}, e.g. from `cnnjax.weights.load`) on
    `split` of `config`'s data set, as `evaluate_checkpoint` evaluates a run's checkpoint.

    Only the data and model fields of `config` matter (model, dataset, data_dir, image_size,
    channels, normalize, global_batch_size, model_kwargs, dtype). Returns {'<split>_loss',
    '<split>_error', '<split>_top5_error'}.
    """
    if split not in (None, "test", "validation"):
        raise ValueError(
            f"split must be 'test', 'validation' or None (the config's eval_split), got {split!r}"
        )
    if config.seeds != 1:
        raise ValueError(f"one set of variables is one member: seeds must be 1, got {config.seeds}")
    setup = build(config, model_fn=model_fn)
    member = setup.members[0]
    shapes = jax.eval_shape(
        lambda: member.init_model.init(
            jax.random.key(0), jnp.zeros((1, *setup.input_shape)), train=False
        )
    )
    want = jax.tree.map(
        lambda a: (a.shape, a.dtype),
        {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})},
    )
    given = {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}
    got = jax.tree.map(lambda a: (np.shape(a), np.asarray(a).dtype), given)
    if jax.tree.structure(want) != jax.tree.structure(got) or (
        jax.tree.leaves(want) != jax.tree.leaves(got)
    ):
        raise ValueError(
            f"the variables do not fit {config.model!r} on {config.dataset} "
            f"({setup.input_shape}, {setup.pipeline.dataset.num_classes} classes): load them for "
            "this model and number of classes (cnnjax.weights.load(..., num_classes=N))"
        )
    params = jax.tree.map(np.asarray, given["params"])
    state = TrainState(
        step=np.zeros((), np.int32),
        params=params,
        batch_stats=jax.tree.map(np.asarray, given["batch_stats"]),
        opt_state=jax.tree.map(
            lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(setup.tx.init, params)
        ),
        rng=np.asarray(jax.random.key_data(jax.random.key(0, impl=config.rng_impl))),
    )
    engine = Engine(setup)
    return engine.evaluate(engine.place(state), split)[0]


def _progress_bar(config: TrainConfig, total: int, initial: int, *, enabled: bool):
    if not (enabled and config.progress_bar):
        return _NoBar()
    from tqdm.auto import tqdm

    desc = (
        config.model
        + (" twins" if config.twins else "")
        + (f" x{config.seeds} seeds" if config.seeds > 1 else "")
    )
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass
