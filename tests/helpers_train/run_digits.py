"""Trains TinyCNN on 8x8 digits with `train_and_evaluate`; optionally signals itself at a step.

usage: run_digits.py WORKDIR NUM_STEPS [--kill STEP SIGNAL] [--parallel MODE] [--devices N]
                     [--save_params OUT.npz] [--engine SEEDS STEPS_PER_DISPATCH]
(--engine: that many seeds as members of one program, data on the device, steps per call)
Prints one JSON line: the RunResult's step, resumed_from, preempted and metrics.
"""

import argparse
import json
import os
import signal
import sys

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("num_steps", type=int)
parser.add_argument("--kill", nargs=2, metavar=("STEP", "SIGNAL"))
parser.add_argument("--parallel", default="none")
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--save_params", help="write the final params to this .npz")
parser.add_argument("--engine", nargs=2, type=int, metavar=("SEEDS", "STEPS_PER_DISPATCH"))
args = parser.parse_args()
if args.devices > 1:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )

from cnnjax import train  # noqa: E402

from tiny import TinyCNN  # noqa: E402

config = train.TrainConfig(
    model="tiny",
    dataset="digits",
    image_size=8,
    channels=1,
    global_batch_size=32,
    num_steps=args.num_steps,
    learning_rate=args.lr,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_steps=5,
    warmup="linear",
    normalize="per_channel",
    parallel=args.parallel,
    log_every=5,
    eval_every=20,
    checkpoint_every=10,
    keep_checkpoints=2,
    rng_impl="rbg",
    progress_bar=False,
)
if args.engine:
    config = config.replace(
        seeds=args.engine[0],
        steps_per_dispatch=args.engine[1],
        data_on_device=True,
        augment="cifar",
    )
callbacks = []
if args.kill:
    kill_step, sig = int(args.kill[0]), getattr(signal, args.kill[1])

    def kill(step, state, metrics):
        if step == kill_step:
            os.kill(os.getpid(), sig)

    callbacks.append(kill)
result = train.train_and_evaluate(config, args.workdir, model_fn=TinyCNN, callbacks=callbacks)
if args.save_params:
    import jax
    import numpy as np

    np.savez(
        args.save_params,
        **{
            jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(result.state)
        },
    )
print(
    json.dumps(
        {
            "step": result.step,
            "resumed_from": result.resumed_from,
            "preempted": result.preempted,
            "metrics": result.metrics,
        }
    )
)
sys.stdout.flush()
