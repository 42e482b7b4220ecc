"""Trains a tiny BatchNorm CNN for k steps in several ways on 4 fake CPU devices; prints JSON.

Run as a subprocess: the device count must be fixed before jax is imported.
Output: for each variant, the largest absolute difference of its params and batch_stats from
one device stepping on the whole global batch.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from cnnjax.train import optim, parallel, steps  # noqa: E402
from cnnjax.train import state as state_lib
from cnnjax.train.config import TrainConfig  # noqa: E402

from tiny import TinyCNN  # noqa: E402

K = int(sys.argv[1]) if len(sys.argv) > 1 else 3
BATCH, SHAPE, CLASSES = 16, (8, 8, 3), 10
config = TrainConfig(
    model="tiny",
    num_steps=K,
    learning_rate=0.1,
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-4,
    schedule="constant",
)
lr_fn = optim.create_learning_rate_fn(config, 1)
tx = optim.create_optimizer(config, lr_fn)
rs = np.random.RandomState(0)
# Per-example scale and offset so that local batch statistics differ from the global ones.
batches = [
    {
        "image": (
            rs.randn(BATCH, *SHAPE) * np.linspace(0.2, 3, BATCH)[:, None, None, None]
            + np.linspace(-2, 2, BATCH)[:, None, None, None]
        ).astype(np.float32),
        "label": rs.randint(0, CLASSES, BATCH).astype(np.int32),
    }
    for _ in range(K)
]
# rbg: the default threefry takes seconds to compile on a CPU; the keys do not matter here.
init = jax.device_get(
    state_lib.create_train_state(jax.random.key(0, impl="rbg"), TinyCNN(CLASSES), tx, SHAPE)
)


def run(mode, *, bn_sync=True, check_vma=None):
    par = parallel.DataParallel(mode)
    model = TinyCNN(CLASSES, bn_axis_name=par.axis_name if bn_sync else None)
    step_fn = steps.make_train_step(model, tx, lr_fn, axis_name=par.axis_name, rng_impl="rbg")
    if check_vma is None:
        step = par.wrap_train_step(step_fn)
    else:
        step = jax.jit(
            jax.shard_map(
                step_fn,
                mesh=par.mesh,
                in_specs=(P(), P("batch")),
                out_specs=P(),
                check_vma=check_vma,
            )
        )
    s = par.replicate(init)
    losses = []
    for b in batches:
        s, m = step(s, par.shard_batch(b))
        losses.append(float(par.to_host(m)["loss"]))
    return par.to_host(s), losses


def diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


ref, ref_losses = run("none")
out = {
    "devices": jax.device_count(),
    "steps": int(ref.step),
    "param_change": diff(ref.params, init.params),
}
for name, kw in {
    "pmap": dict(mode="pmap"),
    "shard_map": dict(mode="shard_map"),
    "shard_map_no_bn_sync": dict(mode="shard_map", bn_sync=False),
    "shard_map_check_vma": dict(mode="shard_map", check_vma=True),
}.items():
    s, losses = run(**kw)
    out[name] = {
        "params": diff(s.params, ref.params),
        "batch_stats": diff(s.batch_stats, ref.batch_stats),
        "opt_state": diff(s.opt_state, ref.opt_state),
        "loss": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "step": int(s.step),
    }
try:
    parallel.DataParallel("shard_map").check_batch_size(18)
except ValueError as e:
    out["batch_error"] = str(e)
print(json.dumps(out))
