"""The compiled training engine: many steps per call, many runs per program, data on the device.

One call of the compiled dispatch trains every member of a run for n steps:

    vmap over the members (seeds; the plain and residual twins of one depth)
      lax.scan over n steps
        the step's batch: fed by the host, or gathered, normalised and augmented on the device
        the per-device train step of `cnnjax.train.steps` (pmean over the data axis)

inside the data-parallel wrapper of `cnnjax.train.parallel`: the member axis is not split over
the devices, the batch is, and each member's BatchNorm statistics are those of its global batch.
The host makes each call's inputs (the batches; with data on the device only the draws: rows,
crop corners and flips) in a background thread ahead of the devices, and reads the metrics only
at log, evaluation and checkpoint boundaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.data import augment
from cnnjax.data import device as device_data
from cnnjax.train.state import TrainState, train_state_initializer
from cnnjax.train.steps import make_eval_step, make_train_step

_TWIN_NAME = re.compile(r"^(plain|resnet)(\d+)$")


@dataclasses.dataclass(frozen=True)
class Member:
    """One of the independent runs trained in one program.

    Attributes:
      seed: seeds its initialisation, data order, augmentation and dropout.
      network: its network's name where the members are different networks (twins), else None.
      init_model: the module its parameters are initialised from.
      apply_kwargs: its arguments of the shared model's call ({'shortcut_scale': 0.0}: plain twin).
    """

    seed: int
    network: str | None
    init_model: nn.Module
    apply_kwargs: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def tag(self) -> dict[str, Any]:
        """What its metric records carry: the seed, and the network where members differ."""
        return (
            {"seed": self.seed}
            if self.network is None
            else {"seed": self.seed, "network": self.network}
        )


def make_members(
    config,
    build_model: Callable[..., nn.Module],
    kwargs: dict[str, Any],
    input_shape: tuple[int, ...],
) -> tuple[nn.Module, list[Member]]:
    """The model every member's step computes, and the members of `config` (seeds x twins).

    With `config.twins`, the model is the residual net and the plain members call it with
    `shortcut_scale=0`; the plain net must have the same parameters (option A shortcuts).
    """
    seeds = range(config.seed, config.seed + config.seeds)
    if not config.twins:
        model = build_model(**kwargs)
        return model, [Member(s, None, model) for s in seeds]
    match = _TWIN_NAME.match(config.model)
    if match is None:
        raise ValueError(
            f"twins trains a plain and a residual net of one depth: model {config.model!r} is "
            "neither (use plainN or resnetN, e.g. resnet56)"
        )
    residual = build_model(**{**kwargs, "plain": False})
    plain = build_model(
        **{k: v for k, v in kwargs.items() if k != "zero_init_residual"}, plain=True
    )
    if "shortcut_scale" not in inspect.signature(type(residual).__call__).parameters:
        raise ValueError(
            f"twins: {type(residual).__name__} cannot scale its shortcuts (no shortcut_scale)"
        )

    def param_shapes(model):
        x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
        return jax.tree.map(
            lambda a: a.shape,
            jax.eval_shape(
                lambda x: model.init(
                    {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=True
                ),
                x,
            ),
        )

    if param_shapes(plain) != param_shapes(residual):
        raise ValueError(
            f"twins: the plain and residual {config.model} have different parameters (shortcut="
            f"{getattr(residual, 'shortcut', '?')!r}); twins need option A shortcuts "
            '(model_kwargs {"shortcut": "A"})'
        )
    depth = getattr(residual, "depth", int(match.group(2)))
    return residual, (
        [Member(s, f"plain{depth}", plain, {"shortcut_scale": 0.0}) for s in seeds]
        + [Member(s, f"resnet{depth}", residual, {"shortcut_scale": 1.0}) for s in seeds]
    )


def initial_state(setup) -> TrainState:
    """The members' freshly initialised train states (host NumPy), stacked on a leading member
    axis when there are several; each from its own seed, as a run of that seed alone."""
    inits: dict[str | None, Callable] = {}
    states = []
    for m in setup.members:
        if m.network not in inits:
            inits[m.network] = train_state_initializer(m.init_model, setup.tx, setup.input_shape)
        states.append(
            jax.device_get(inits[m.network](jax.random.key(m.seed, impl=setup.config.rng_impl)))
        )
    return stack(states) if len(states) > 1 else states[0]


def stack(trees: Sequence[Any]) -> Any:
    """Pytrees of equal structure -> one pytree of NumPy arrays stacked on a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def chunk_ends(start: int, stop: int, steps_per_dispatch: int) -> list[int]:
    """The step after each compiled call from `start` to `stop`: the multiples of
    steps_per_dispatch in between and `stop` (a run resumed off the grid rejoins it)."""
    n = steps_per_dispatch
    return [*range((start // n + 1) * n, stop, n), stop] if stop > start else []


class Engine:
    """A run's compiled training and evaluation, over its members and devices.

    Args:
      setup: the run's pieces (`cnnjax.train.build`): config, devices, pipeline, model, members.

    With `config.data_on_device` the training split goes to the devices on the first `run`, and
    each evaluated split on its first `evaluate`.
    """

    def __init__(self, setup):
        config = setup.config
        self.setup, self.config, self.par = setup, config, setup.par
        self.members = list(setup.members)
        self.stacked = len(self.members) > 1
        self.steps_per_dispatch = config.steps_per_dispatch
        # Axes in front of an input's batch axis: [members] if stacked, [steps] if several per call.
        self.lead = int(self.stacked) + int(self.steps_per_dispatch > 1)
        member_map = config.member_map
        if member_map == "auto":
            member_map = "loop" if self.par.devices[0].platform == "cpu" else "vmap"
        self.member_map = member_map
        axis = self.par.axis_name
        self._train_step = make_train_step(
            setup.model,
            setup.tx,
            setup.learning_rate_fn,
            label_smoothing=config.label_smoothing,
            aux_weight=config.aux_weight,
            axis_name=axis,
            rng_impl=config.rng_impl,
        )
        self._eval_step = make_eval_step(setup.model, axis_name=axis)
        # Each member's call arguments, stacked: {'shortcut_scale': [members]} for twins.
        self._kwargs = {
            k: np.array([m.apply_kwargs[k] for m in self.members], np.float32)
            for k in self.members[0].apply_kwargs
        }
        pipe = setup.pipeline
        self.pipelines = {s: pipe.with_seed(s) for s in dict.fromkeys(m.seed for m in self.members)}
        self._normalization = augment.normalization_constants(pipe.mean, pipe.std, pipe.image_shape)
        self._resident: dict[str, Any] | None = None
        self._rows = 0
        self._eval_resident: dict[str, Any] = {}
        self._dispatch = self.par.wrap(self._dispatch_per_device, (self.lead, 0), donate=True)
        self._eval_batch = self.par.wrap(self._eval_batch_per_device, (0,), donate=False)
        self._eval_split = self.par.wrap(self._eval_split_per_device, (1,), donate=False)

    # -- state ------------------------------------------------------------------------------------

    def place(self, host_state: TrainState) -> TrainState:
        """Host state -> the layout the compiled calls take (replicated over the devices)."""
        return self.par.replicate(host_state)

    def to_host(self, state: TrainState) -> TrainState:
        return self.par.to_host(state)

    # -- training ---------------------------------------------------------------------------------

    def run(
        self, state: TrainState, start: int, stop: int
    ) -> Iterator[tuple[int, TrainState, Any]]:
        """Trains from step `start` to `stop`; yields (step, state, metrics) after each call.

        The metrics are device arrays with the axes [members][steps] in front (each where the run
        has more than one); the state passed in, and each yielded, is donated to the next call.
        """
        if self.config.data_on_device and self._resident is None:
            self._resident, self._rows = device_data.put_train_split(self.par, self.setup.pipeline)
        resident = self._resident or {}
        ends = chunk_ends(start, stop, self.steps_per_dispatch)
        with contextlib.closing(
            self.par.prefetch(self._inputs(start, ends), axis=self.lead)
        ) as inputs:
            for end, x in zip(ends, inputs):
                state, metrics = self._dispatch(state, x, resident)
                yield end, state, metrics

    def _inputs(self, start: int, ends: Sequence[int]) -> Iterator[Any]:
        """Each call's inputs on the host: per member, its batches (or draws) for the call."""
        on_device = self.config.data_on_device
        streams = {
            s: p.draw_stream(start) if on_device else p.train_stream(start)
            for s, p in self.pipelines.items()
        }
        step = start
        for end in ends:
            per_seed = {}
            for seed, stream in streams.items():  # twins of one seed share their draws
                items = [next(stream) for _ in range(end - step)]
                per_seed[seed] = stack(items) if self.steps_per_dispatch > 1 else items[0]
            step = end
            yield (
                stack([per_seed[m.seed] for m in self.members])
                if self.stacked
                else per_seed[self.members[0].seed]
            )

    def _dispatch_per_device(self, state, inputs, resident):
        if self.config.data_on_device:
            shift, scale = self._normalization
            make_batch = functools.partial(
                device_data.make_train_batch,
                resident,
                shift=shift,
                scale=scale,
                rows_per_device=self._rows,
                axis_name=self.par.axis_name,
            )
        else:
            make_batch = lambda batch: batch  # noqa: E731

        def member(state, inputs, kwargs):
            def step(state, x):
                return self._train_step(state, make_batch(x), kwargs)

            return (
                lax.scan(step, state, inputs)
                if self.steps_per_dispatch > 1
                else step(state, inputs)
            )

        return self._over_members(member, state, inputs)

    def _over_members(self, fn, state, *args):
        """`fn(state, *args, kwargs)` for each member: state and args have a leading member axis
        where the run has several members; vmapped, or computed one by one and stacked."""
        if not self.stacked:
            return fn(state, *args, {})
        if self.member_map == "vmap":
            return jax.vmap(fn)(state, *args, self._kwargs)
        outs = [
            fn(*jax.tree.map(lambda x: x[i], (state, *args, self._kwargs)))
            for i in range(len(self.members))
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, state: TrainState, split: str | None = None) -> list[dict[str, float]]:
        """Each member's loss, top-1 and top-5 error over a whole split, keyed '<split>_<name>'.

        Padding is masked out; per-batch sums are added on the host in float64, in batch order,
        whether the split is fed by the host or resident on the devices.
        """
        pipe = self.setup.pipeline
        split = split or pipe.eval_split
        if self.config.data_on_device:
            if split not in self._eval_resident:
                self._eval_resident[split] = device_data.put_eval_split(self.par, pipe, split)
            sums = self.par.to_host(self._eval_split(state, self._eval_resident[split]))
            steps = pipe.num_eval_steps(split)
            batches = [
                {k: np.reshape(v, (len(self.members), steps))[:, i] for k, v in sums.items()}
                for i in range(steps)
            ]
        else:
            with contextlib.closing(self.par.prefetch(pipe.eval_batches(split))) as feed:
                batches = [
                    {
                        k: np.reshape(v, len(self.members))
                        for k, v in self.par.to_host(self._eval_batch(state, batch)).items()
                    }
                    for batch in feed
                ]
        results = []
        for i in range(len(self.members)):
            totals: dict[str, float] = {}
            for sums in batches:
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + float(v[i])
            count = totals.pop("count", 0.0)
            if not count:
                raise ValueError(f"the {split} split is empty: nothing to evaluate")
            results.append({f"{split}_{k}": v / count for k, v in totals.items()})
        return results

    def _eval_batch_per_device(self, state, batch):
        return self._over_members(lambda s, kwargs: self._eval_step(s, batch, kwargs), state)

    def _eval_split_per_device(self, state, resident):
        shift, scale = self._normalization

        def member(state, kwargs):
            def step(_, arrays):
                batch = device_data.make_eval_batch(arrays, shift=shift, scale=scale)
                return None, self._eval_step(state, batch, kwargs)

            return lax.scan(step, None, resident)[1]  # per-batch sums, [steps]

        return self._over_members(member, state)
