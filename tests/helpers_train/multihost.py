"""Multi-process training on CPU (jax.distributed + gloo) and its single-process reference.

usage: multihost.py worker PROCESS_ID PORT WORKDIR OUT.npz [SIGTERM_STEP]
         (PORT 'env': from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID;
          SIGTERM_STEP: the process sends itself SIGTERM after that step)
       multihost.py reference WORKDIR OUT.npz
A worker is one of two processes training TinyCNN on 8x8 digits with `train_and_evaluate`
(shard_map over one CPU device per process, each process reading its own shard). The
reference is one process and one device stepping on the same global batches: each the
concatenation of the two processes' local batches. Each writes the final params to OUT.npz.
With $CNNJAX_TEST_ENGINE=1 the workers train two seeds as members of one program, from data on
the devices (sharded over both processes), 3 steps per call.
"""

import json
import os
import sys
import time

import numpy as np

NUM_STEPS = int(os.environ.get("CNNJAX_TEST_NUM_STEPS", 6))
STEP_SLEEP = float(
    os.environ.get("CNNJAX_TEST_STEP_SLEEP", 0)
)  # seconds per step, to let signals propagate


def config(parallel):
    from tiny import digits_config

    config = digits_config(
        num_steps=NUM_STEPS,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="constant",
        parallel=parallel,
        log_every=2,
        eval_every=0,
        checkpoint_every=3,
        rng_impl="rbg",
    )
    if os.environ.get("CNNJAX_TEST_ENGINE") == "1" and parallel != "none":
        config = config.replace(seeds=2, data_on_device=True, steps_per_dispatch=3, log_every=3)
    return config


def save_params(path, params):
    import jax

    flat = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    np.savez(path, **flat)


def worker(process_id, port, workdir, out, sigterm_step=None):
    import signal

    from cnnjax import train

    if port == "env":
        assert train.initialize_distributed()
    else:
        assert train.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    import jax

    from tiny import TinyCNN

    def sigterm(step, state, metrics):
        if step == sigterm_step:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(STEP_SLEEP)

    result = train.train_and_evaluate(
        config("shard_map"), workdir, model_fn=TinyCNN, callbacks=[sigterm]
    )
    save_params(out, result.state.params)
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "step": result.step,
                "metrics": result.metrics,
                "preempted": result.preempted,
                "resumed_from": result.resumed_from,
            }
        )
    )
    jax.distributed.shutdown()


def reference(workdir, out):
    import jax

    from cnnjax import data, train

    from tiny import TinyCNN

    setup = train.build(config("none"), model_fn=TinyCNN)
    pipes = [
        data.Pipeline(
            setup.pipeline.ds, 32, normalize="per_channel", process_index=i, process_count=2
        )
        for i in range(2)
    ]
    state = setup.par.replicate(train.initial_state(setup))
    step = setup.par.wrap_train_step(
        train.make_train_step(
            setup.model, setup.tx, setup.learning_rate_fn, axis_name=None, rng_impl="rbg"
        )
    )
    for local_batches in zip(*(p.train_batches(0) for p in pipes)):
        if int(state.step) == NUM_STEPS:
            break
        batch = {k: np.concatenate([b[k] for b in local_batches]) for k in local_batches[0]}
        state, _ = step(state, setup.par.shard_batch(batch))
    save_params(out, setup.par.to_host(state).params)
    print(json.dumps({"step": int(state.step), "devices": jax.device_count()}))


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], *map(int, sys.argv[6:]))
    else:
        reference(sys.argv[2], sys.argv[3])
