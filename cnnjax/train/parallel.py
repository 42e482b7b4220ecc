"""Data parallelism: the same per-device step under `jax.pmap` or `jax.jit(jax.shard_map(...))`.

`DataParallel(mode)` places the train state (replicated) and each batch (split over the named
axis 'batch') on the devices of all processes, and wraps the per-device step functions of
`cnnjax.train.steps` with the state buffers donated.

shard_map is called with `check_vma=False`: with the check on, autodiff already sums the
gradient of a replicated (`P()`) parameter over the axis, and the step's own `lax.pmean` would
then leave it N times too large (see DESIGN.md, "Data parallelism"). With the check off,
shard_map has pmap's semantics and one step function serves both wrappers.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"
MODES = ("shard_map", "pmap", "none")

log = logging.getLogger(__name__)


class DataParallel:
    """Runs per-device steps on all devices of all processes.

    Args:
      mode: 'shard_map' (jit over shard_map on a 1-D mesh, the default), 'pmap', or 'none'
        (the first local device, no named axis; one process only).
      devices: the devices of the mesh (default: `jax.devices()`, all processes).
    """

    def __init__(self, mode: str = "shard_map", devices: Iterable[jax.Device] | None = None):
        if mode not in MODES:
            raise ValueError(f"parallel mode {mode!r} is not one of {list(MODES)}")
        if mode == "none":
            if jax.process_count() > 1:
                raise ValueError(
                    "parallel='none' runs on one device of one process; with "
                    f"{jax.process_count()} processes use 'shard_map' or 'pmap'"
                )
            devices = [jax.local_devices()[0]] if devices is None else list(devices)[:1]
        self.mode = mode
        self.devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        if mode == "pmap":
            self._local_mesh = Mesh(np.array(self.local_devices), (AXIS,))

    @property
    def axis_name(self) -> str | None:
        """The named axis the steps and BatchNorm use ('batch'), or None in mode 'none'."""
        return None if self.mode == "none" else AXIS

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def check_batch_size(self, global_batch_size: int) -> None:
        """ValueError unless the global batch splits evenly over devices and processes."""
        n = self.num_devices
        if global_batch_size % n:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by the {n} devices "
                f"({jax.process_count()} process(es)); use a multiple of {n}, e.g. "
                f"{max(n, global_batch_size // n * n)}"
            )

    # -- placing data ---------------------------------------------------------------------------

    def replicate(self, tree: Any) -> Any:
        """Host pytree (identical on every process) -> the state layout the wrapped steps take."""
        if self.mode == "pmap":
            sharding = NamedSharding(self._local_mesh, P(AXIS))
            n = len(self.local_devices)
            return jax.tree.map(
                lambda x: jax.device_put(np.stack([np.asarray(x)] * n), sharding), tree
            )
        sharding = NamedSharding(self.mesh, P())

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, tree)

    def to_host(self, tree: Any) -> Any:
        """Replicated device pytree (state or metrics) -> NumPy pytree of one copy."""

        def get(x):
            shard = np.array(x.addressable_data(0))  # a copy: the device buffer may be donated next
            return shard[0] if self.mode == "pmap" else shard

        return jax.tree.map(get, tree)

    @property
    def batch_sharding(self) -> jax.sharding.Sharding:
        """Sharding of a batch (after `host_layout`): split over the 'batch' axis."""
        return self.split_sharding(0)

    def split_sharding(self, axis: int = 0) -> jax.sharding.Sharding:
        """Sharding of arrays split over 'batch' at dimension `axis` (after `host_layout`)."""
        if self.mode == "pmap":  # pmap's layout puts the device axis first
            return NamedSharding(self._local_mesh, P(AXIS))
        return NamedSharding(self.mesh, P(*[None] * axis, AXIS))

    def host_layout(self, batch: Any, axis: int = 0) -> Any:
        """pmap takes [local devices, ...] with dimension `axis` split; the other modes take arrays
        as they are."""
        if self.mode != "pmap":
            return batch
        n = len(self.local_devices)

        def split(x):
            x = np.asarray(x)
            if x.shape[axis] % n:
                raise ValueError(
                    f"local batch of {x.shape[axis]} does not split over {n} local devices"
                )
            x = x.reshape(*x.shape[:axis], n, x.shape[axis] // n, *x.shape[axis + 1 :])
            return np.moveaxis(x, axis, 0)

        return jax.tree.map(split, batch)

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's slice of the global batch -> arrays split over the 'batch' axis."""
        return self.put_local(batch)

    def put_local(self, tree: Any, axis: int = 0) -> Any:
        """This process's part of arrays split at dimension `axis` -> global arrays split over
        'batch'."""
        from cnnjax import (
            data,
        )  # the train package sits above data; imported late to keep this light

        put = data.pipeline.device_put_fn(self.split_sharding(axis))
        return jax.tree.map(put, self.host_layout(tree, axis))

    def put_global(self, tree: Any, axis: int = 0) -> Any:
        """Arrays every process holds whole -> split over 'batch' at dimension `axis`: device d of D
        gets the d-th of D equal slices (the dimension must divide)."""

        def put(x):
            x = np.asarray(x)
            if x.shape[axis] % self.num_devices:
                raise ValueError(
                    f"dimension {axis} of {x.shape} does not split over {self.num_devices} devices"
                )
            if self.mode != "pmap":
                sharding = self.split_sharding(axis)
                return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
            size = x.shape[axis] // self.num_devices
            parts = [
                np.take(x, range(g * size, (g + 1) * size), axis=axis)
                for g in (self.devices.index(d) for d in self.local_devices)
            ]
            return jax.device_put(np.stack(parts), self.split_sharding(axis))

        return jax.tree.map(put, tree)

    def prefetch(self, batches: Iterable[Any], size: int = 2, axis: int = 0) -> Iterator[Any]:
        """Sharded batches, copied to the devices in a background thread `size` steps ahead;
        dimension `axis` of every array is the one split over the devices."""
        from cnnjax import data

        layout = functools.partial(self.host_layout, axis=axis)
        return data.prefetch_to_device(map(layout, batches), size, self.split_sharding(axis))

    # -- wrapping steps -------------------------------------------------------------------------

    def wrap_train_step(self, step_fn: Callable) -> Callable:
        """(state, batch) -> (state, metrics) on all devices; the input state is donated."""
        return self.wrap(step_fn, (0,), donate=True)

    def wrap_eval_step(self, step_fn: Callable) -> Callable:
        """(state, batch) -> summed metrics on all devices."""
        return self.wrap(step_fn, (0,), donate=False)

    def wrap(self, step_fn: Callable, split: Sequence[int | None], *, donate: bool) -> Callable:
        """`step_fn(state, *args)` on all devices: the state replicated (and donated if `donate`),
        each of `args` split over the axis at dimension `split[i]` (None: replicated); every output
        is replicated, which the step makes sure of (pmean, psum)."""
        donate_argnums = (0,) if donate else ()
        if self.mode == "none":
            return jax.jit(step_fn, donate_argnums=donate_argnums)
        if self.mode == "pmap":
            return jax.pmap(
                step_fn,
                axis_name=AXIS,
                donate_argnums=donate_argnums,
                in_axes=(0, *[None if a is None else 0 for a in split]),
                devices=self.devices if self.devices != jax.devices() else None,
            )
        specs = [P() if a is None else P(*[None] * a, AXIS) for a in split]
        mapped = jax.shard_map(
            step_fn, mesh=self.mesh, in_specs=(P(), *specs), out_specs=P(), check_vma=False
        )
        return jax.jit(mapped, donate_argnums=donate_argnums)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when this is a multi-process run; returns whether it did.

    Args:
      coordinator_address: 'host:port' of process 0; else $JAX_COORDINATOR_ADDRESS.
      num_processes: else $JAX_NUM_PROCESSES.
      process_id: else $JAX_PROCESS_ID.

    With none of these, a SLURM or Open MPI job of several tasks, or a Cloud TPU pod slice
    ($TPU_WORKER_HOSTNAMES with several hosts), is initialised by JAX's auto-detection; otherwise
    the run is single-process and nothing is done. Must run before any other JAX call.
    On CPU, cross-process collectives use gloo.
    """
    env = os.environ
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    explicit = address is not None or n is not None or pid is not None
    cluster = (
        _env_int("SLURM_NTASKS", 1) > 1
        or _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1
        or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    )
    if not explicit and not cluster:
        return False
    if explicit and n is not None and n <= 1 and address is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} must be an integer") from None
