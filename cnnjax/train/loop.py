"""`train_and_evaluate(config, workdir)`: the training run, resumable, on any number of devices.

The workdir holds `config.json`, `metrics.jsonl` and `checkpoints/<step>/`. Re-running with the
same workdir resumes from the newest checkpoint: the data order is a function of (seed, epoch)
and the dropout keys of (seed, step), so a resumed run repeats exactly what an uninterrupted run
does. SIGTERM saves a checkpoint at the next step and returns; a NaN or infinite training loss
raises `NonFiniteLossError` before anything after it is checkpointed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import json
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
from cnnjax.train import optim
from cnnjax.train.checkpoint import Checkpointer
from cnnjax.train.config import RESUMABLE_FIELDS, TrainConfig
from cnnjax.train.metrics import Meter, MetricsWriter, NonFiniteLossError, write_json_atomic
from cnnjax.train.parallel import DataParallel
from cnnjax.train.state import TrainState, create_train_state
from cnnjax.train.steps import make_eval_step, make_train_step

log = logging.getLogger("cnnjax.train")

Callback = Callable[[int, TrainState, dict], None]


@dataclasses.dataclass
class RunResult:
    """What `train_and_evaluate` returns.

    Attributes:
      step: the step the run stopped at.
      metrics: the final evaluation ('test_loss', 'test_error', 'test_top5_error'; the prefix is
        the evaluated split), empty if the run was preempted.
      state: the train state at `step`, as NumPy arrays.
      resumed_from: the checkpoint step the run started from (0 for a fresh run).
      preempted: True if SIGTERM stopped the run early (a checkpoint of `step` was saved).
    """

    step: int
    metrics: dict[str, float]
    state: TrainState
    resumed_from: int
    preempted: bool


@dataclasses.dataclass
class Setup:
    """A run's pieces, built from its config (shared by training and `evaluate_checkpoint`)."""

    config: TrainConfig
    par: DataParallel
    pipeline: data.Pipeline
    model: nn.Module
    input_shape: tuple[int, int, int]
    learning_rate_fn: Callable
    tx: Any
    num_steps: int


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
    ds = data.load_dataset(config.dataset, data_dir=config.data_dir, image_size=image_size, channels=channels,
                           validation_size=config.validation_size, seed=config.seed)
    pipeline = data.Pipeline(ds, config.global_batch_size, augment=config.augment, normalize=config.normalize,
                             seed=config.seed, eval_split=config.eval_split)
    kwargs = dict(config.model_kwargs, num_classes=ds.num_classes, bn_axis_name=par.axis_name)
    if takes_in_channels:  # models that check their input channels (MLP, AlexNet, GoogLeNet)
        kwargs.setdefault("in_channels", ds.image_shape[-1])
    if config.dtype != "float32":
        kwargs["dtype"] = jnp.dtype(config.dtype)
    model = model_fn(**kwargs)
    lr_fn = optim.create_learning_rate_fn(config, pipeline.steps_per_epoch)
    return Setup(config=config, par=par, pipeline=pipeline, model=model, input_shape=tuple(ds.image_shape),
                 learning_rate_fn=lr_fn, tx=optim.create_optimizer(config, lr_fn),
                 num_steps=optim.num_train_steps(config, pipeline.steps_per_epoch))


def initial_state(setup: Setup) -> TrainState:
    """The freshly initialised train state (host NumPy copy), from the config's seed."""
    key = jax.random.key(setup.config.seed, impl=setup.config.rng_impl)
    return jax.device_get(create_train_state(key, setup.model, setup.tx, setup.input_shape))


def evaluate(setup: Setup, state: Any, eval_step: Callable, split: str | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 error over a whole split (padding masked out), keyed '<split>_<name>'."""
    split = split or setup.pipeline.eval_split
    totals: dict[str, float] = {}
    with contextlib.closing(setup.par.prefetch(setup.pipeline.eval_batches(split))) as batches:
        for batch in batches:
            for k, v in setup.par.to_host(eval_step(state, batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    return {f"{split}_{k}": v / count for k, v in totals.items()}


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


def _write_config(config: TrainConfig, workdir: str, is_main: bool) -> None:
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        new = config.to_dict()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_FIELDS)
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config ({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed)}); "
                f"only {sorted(RESUMABLE_FIELDS)} may change on resume. Use a new workdir.")
    if is_main:
        write_json_atomic(path, config.to_dict())


def train_and_evaluate(config: TrainConfig, workdir: str, *, model_fn: Callable[..., nn.Module] | None = None,
                       callbacks: Sequence[Callback] = ()) -> RunResult:
    """Trains `config` in `workdir`, resuming from its newest checkpoint, and evaluates.

    Args:
      config: the run's configuration (validated here).
      workdir: directory for config.json, metrics.jsonl and checkpoints/ (created).
      model_fn: optional model builder instead of the registry (see `build`).
      callbacks: called as `callback(step, state, metrics)` after every step on every process
        (device arrays; reading them synchronises with the device).

    Returns:
      A `RunResult`.

    Raises:
      ValueError: a bad config, or a workdir holding a run with a different config.
      NonFiniteLossError: the training loss became NaN or infinite; no checkpoint after the last
        finite step is written.
    """
    setup = build(config, model_fn=model_fn)
    par, pipe, num_steps = setup.par, setup.pipeline, setup.num_steps
    spe = pipe.steps_per_epoch
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    _write_config(config, workdir, is_main)
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), enabled=is_main)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)

    host_state = initial_state(setup)
    meta: dict[str, Any] = {}
    start = 0
    if ckpt.latest_step() is not None:
        host_state, meta = ckpt.restore(host_state)
        start = int(host_state.step)
        dropped = writer.truncate_after(start)
        log.info("resuming %s from step %d (%d later metric records dropped)", workdir, start, dropped)
    else:
        log.info("training %s on %s in %s: %d steps of %d examples on %d device(s), %d process(es)",
                 config.model, config.dataset, workdir, num_steps, config.global_batch_size, par.num_devices,
                 jax.process_count())
    state = par.replicate(host_state)
    train_step = par.wrap_train_step(make_train_step(
        setup.model, setup.tx, setup.learning_rate_fn, label_smoothing=config.label_smoothing,
        aux_weight=config.aux_weight, axis_name=par.axis_name, rng_impl=config.rng_impl))
    eval_step = par.wrap_eval_step(make_eval_step(setup.model, axis_name=par.axis_name))

    meter = Meter.from_state(meta.get("meter"))
    wall_offset = float(meta.get("wall_time", 0.0))
    t_start = time.perf_counter()
    t_window, window_steps = t_start, 0
    step, preempted, record = start, False, {}
    bar = _progress_bar(config, num_steps, start, enabled=is_main)

    def save(at: int) -> None:
        host = par.to_host(state)
        # A finite loss is computed before the update: the update itself may still overflow.
        if not all(np.isfinite(x).all() for x in jax.tree.leaves((host.params, host.batch_stats))):
            raise NonFiniteLossError(f"the parameters became non-finite at step {at}")
        ckpt.save(at, host, {"meter": meter.state(), "wall_time": wall_offset + time.perf_counter() - t_start})

    try:
        with _StopSignal() as stop_signal, contextlib.closing(par.prefetch(pipe.train_stream(start))) as batches:
            for batch in itertools.islice(batches, num_steps - start):
                state, metrics = train_step(state, batch)
                step += 1
                window_steps += 1
                meter.add(step, metrics)
                for callback in callbacks:
                    callback(step, state, metrics)
                bar.update(1)
                preempted = stop_signal.should_stop(step)
                final = step == num_steps
                do_log = step % config.log_every == 0 or final
                do_eval = (config.eval_every > 0 and step % config.eval_every == 0) or final
                do_ckpt = (config.checkpoint_every > 0 and step % config.checkpoint_every == 0) or final or preempted
                if not (do_log or do_eval or do_ckpt):
                    continue
                meter.flush(par.to_host)  # raises on a non-finite loss, before anything is saved
                record = {}
                if do_log:
                    elapsed = time.perf_counter() - t_window
                    record.update({f"train_{k}": v for k, v in meter.means().items() if k != "lr"})
                    record.update(lr=meter.last["lr"], images_per_sec=window_steps * config.global_batch_size / elapsed)
                    bar.set_postfix(loss=f"{record['train_loss']:.4f}", err=f"{record['train_error']:.4f}",
                                    img_s=f"{record['images_per_sec']:.0f}")
                    meter.reset()
                if do_eval:
                    record.update(evaluate(setup, state, eval_step))
                if record:
                    record.update(step=step, epoch=step / spe, wall_time=wall_offset + time.perf_counter() - t_start)
                    if final:
                        record["final"] = True
                    writer.write(record)
                if do_ckpt:
                    save(step)
                t_window, window_steps = time.perf_counter(), 0
                if preempted:
                    break
    except NonFiniteLossError as e:
        ckpt.wait()
        raise NonFiniteLossError(
            f"{e}. Training stopped; the last good checkpoint (step {ckpt.latest_step()}) in "
            f"{ckpt.directory} is kept. Lower the learning rate or add warm-up, then re-run with the "
            "same workdir to resume from it.") from None
    finally:
        bar.close()
        ckpt.close()

    host_state = par.to_host(state)
    if preempted:
        log.info("SIGTERM: saved a checkpoint at step %d in %s and stopped", step, ckpt.directory)
        return RunResult(step=step, metrics={}, state=host_state, resumed_from=start, preempted=True)
    if start >= num_steps:  # nothing left to train: report the final evaluation
        final_metrics = evaluate(setup, state, eval_step)
    else:
        final_metrics = {k: v for k, v in record.items() if k.startswith(pipe.eval_split + "_")}
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in final_metrics.items()))
    return RunResult(step=step, metrics=final_metrics, state=host_state, resumed_from=start, preempted=False)


def evaluate_checkpoint(workdir: str, *, step: int | None = None, split: str | None = None,
                        model_fn: Callable[..., nn.Module] | None = None) -> dict[str, float]:
    """Restores a run's checkpoint (default: the newest) and evaluates it on `split`.

    Args:
      workdir: a run's workdir (with config.json and checkpoints/).
      step: which checkpoint; None for the newest.
      split: 'test' or 'validation' (default: the config's eval_split).
      model_fn: the model builder the run used, if not the registry.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{workdir} has no config.json: not a training workdir")
    with open(path) as f:
        config = TrainConfig.from_dict(json.load(f))
    setup = build(config, model_fn=model_fn)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    try:
        if ckpt.latest_step() is None:
            raise ValueError(f"{workdir} has no checkpoint to evaluate")
        host_state, _ = ckpt.restore(initial_state(setup), step)
    finally:
        ckpt.close()
    eval_step = setup.par.wrap_eval_step(make_eval_step(setup.model, axis_name=setup.par.axis_name))
    metrics = evaluate(setup, setup.par.replicate(host_state), eval_step, split)
    return {"step": int(host_state.step), **metrics}


def _progress_bar(config: TrainConfig, total: int, initial: int, *, enabled: bool):
    if not (enabled and config.progress_bar):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=config.model)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass
