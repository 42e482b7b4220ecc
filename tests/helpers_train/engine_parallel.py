"""The engine on 4 fake CPU devices against one device; prints JSON.

Run as a subprocess: the device count must be fixed before jax is imported.
Output: for each wrapper and data placement, the largest absolute difference of its members'
params and batch_stats from the same run on one device ('none'), two seeds and 4 steps per
call; and whether the batches gathered from the training split sharded over the 4 devices are
the host pipeline's.
"""

import functools
import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from cnnjax import data, train  # noqa: E402
from cnnjax.data import augment as aug  # noqa: E402
from cnnjax.data import device as device_data

from tiny import TinyCNN, digits_config  # noqa: E402

config = digits_config(
    num_steps=8,
    learning_rate=0.05,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="constant",
    augment="cifar",
    log_every=4,
    eval_every=8,
    checkpoint_every=8,
    seeds=2,
    steps_per_dispatch=4,
    rng_impl="rbg",
)


def diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


tmp = tempfile.mkdtemp()
ref = train.train_and_evaluate(
    config.replace(parallel="none"), os.path.join(tmp, "none"), model_fn=TinyCNN
)
out = {"devices": jax.device_count(), "members": ref.members}
for mode in ("shard_map", "pmap"):
    for on_device in (False, True):
        name = f"{mode}_{'device' if on_device else 'host'}"
        r = train.train_and_evaluate(
            config.replace(parallel=mode, data_on_device=on_device),
            os.path.join(tmp, name),
            model_fn=TinyCNN,
        )
        out[name] = {
            "params": diff(r.state.params, ref.state.params),
            "batch_stats": diff(r.state.batch_stats, ref.state.batch_stats),
            "test_error": [m["test_error"] for m in r.members],
            "step": r.step,
        }

# The gather itself: 1437 training digits sharded as 4 x 360 rows (3 rows of padding), each device
# making its quarter of the batch; against the host pipeline's global batch.
par = train.DataParallel("shard_map")
ds = data.load_dataset("digits", image_size=(8, 8), channels=3)
pipe = data.Pipeline(
    ds, 32, augment="cifar", normalize="per_pixel_mean", seed=2, process_index=0, process_count=1
)
resident, rows = device_data.put_train_split(par, pipe)
shift, scale = aug.normalization_constants(pipe.mean, pipe.std, pipe.image_shape)
make = functools.partial(
    device_data.make_train_batch, shift=shift, scale=scale, rows_per_device=rows, axis_name="batch"
)
gather = jax.jit(
    jax.shard_map(
        make,
        mesh=par.mesh,
        in_specs=(P("batch"), P("batch")),
        out_specs=P("batch"),
        check_vma=False,
    )
)
same = []
for _, (draws, want) in zip(range(3), zip(pipe.train_draws(1), pipe.train_batches(1))):
    got = gather(resident, par.shard_batch(draws))
    same.append(
        bool(
            np.array_equal(np.asarray(got["image"]), want["image"])
            and np.array_equal(np.asarray(got["label"]), want["label"])
        )
    )
out["gather"] = {"rows_per_device": rows, "same": same}
print(json.dumps(out))
sys.stdout.flush()
