"""Input pipeline throughput next to the train step's consumption, same model and batch.

    python experiments/bench_data.py --steps 50 [--data_dir ../shared/data] [--batch_size 128]

For each data set (the embedded digits at 32x32x3, and cifar10 when --data_dir holds
cifar10.npz), both with the CIFAR augmentation and per-pixel mean subtraction, it prints:
  pipeline   host images/s of `Pipeline.train_stream()` alone;
  train      images/s of the train step (forward, backward, SGD) on one fixed device batch;
  fed        images/s of the train step fed by the pipeline through `prefetch_to_device`;
and the ratios pipeline / train and fed / train. The pipeline is not the bottleneck when
pipeline / train is well above 1 and fed / train is close to 1. The train columns use
`--model` (default resnet20); `--no_train` measures the pipeline alone.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import optax

from cnnjax import data
from cnnjax.cli import ArgumentParser


def pipeline_rate(pipe: data.Pipeline, steps: int, warmup: int = 2) -> float:
    """Host images/s of `steps` training batches (after `warmup`), crossing epochs as needed."""
    it = pipe.train_stream()
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * pipe.local_batch_size / (time.perf_counter() - start)


def make_train_step(model, lr: float = 0.1):
    """A jitted SGD-momentum step on softmax cross-entropy, the ResNet paper's recipe."""
    tx = optax.sgd(lr, momentum=0.9)

    @jax.jit
    def step(params, batch_stats, opt_state, image, label):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats},
                image,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.key(0)},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
            return loss, updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return tx, step


def train_rates(model_name: str, pipe: data.Pipeline, steps: int):
    """(images/s on a fixed device batch, images/s fed by the pipeline with prefetch)."""
    from cnnjax import models

    model = models.create(model_name, num_classes=pipe.ds.num_classes)
    batch = next(pipe.train_batches(0))
    variables = model.init(jax.random.key(0), jnp.asarray(batch["image"]), train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx, step = make_train_step(model)
    state = (params, stats, tx.init(params))
    image, label = jax.device_put(batch["image"]), jax.device_put(batch["label"])
    for _ in range(2):  # compile and warm up
        *state, loss = step(*state, image, label)
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        *state, loss = step(*state, image, label)
    loss.block_until_ready()
    fixed = steps * len(label) / (time.perf_counter() - start)

    it = data.prefetch_to_device(pipe.train_stream(), size=2)
    for _ in range(2):
        b = next(it)
        *state, loss = step(*state, b["image"], b["label"])
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        *state, loss = step(*state, b["image"], b["label"])
    loss.block_until_ready()
    fed = steps * len(label) / (time.perf_counter() - start)
    it.close()
    return fixed, fed


def main(argv=None) -> None:
    from cnnjax import xla_flags

    # the measured CPU fast path, before JAX starts (CNNJAX_CPU_FAST=0: off)
    xla_flags.configure_cpu()
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--data_dir", default=None, help="directory holding cifar10.npz")
    parser.add_argument("--model", default="resnet20", help="registry name for the train step")
    parser.add_argument("--no_train", action="store_true", help="measure the pipeline only")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error("--steps and --batch_size must be positive")

    configs = [("digits", {"image_size": 32, "channels": 3})]
    if args.data_dir:
        if not os.path.isfile(os.path.join(args.data_dir, "cifar10.npz")):
            parser.error(f"--data_dir {args.data_dir} holds no cifar10.npz")
        configs.append(("cifar10", {"data_dir": args.data_dir}))
    train = not args.no_train
    if train:
        try:
            from cnnjax import models

            models.get_spec(args.model)
        except (ImportError, ValueError) as e:
            print(f"train step not measured: {e}")
            train = False

    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch_size}, "
        f"{args.steps} steps, {os.cpu_count()} CPUs"
    )
    header = f"{'data set':10s} {'pipeline':>10s}"
    if train:
        header += (
            f" {args.model + ' train':>16s} {'fed':>10s} {'pipe/train':>10s} {'fed/train':>9s}"
        )
    print(header + "   (images/s)")
    try:
        _measure(configs, args, train)
    except ValueError as e:  # e.g. a batch larger than the split, an unreadable data file
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def _measure(configs, args, train: bool) -> None:
    for name, kwargs in configs:
        ds = data.load_dataset(name, **kwargs)
        pipe = data.Pipeline(
            ds,
            args.batch_size,
            augment="cifar",
            normalize="per_pixel_mean",
            process_index=0,
            process_count=1,
        )
        rate = pipeline_rate(pipe, args.steps)
        line = f"{name:10s} {rate:10.0f}"
        if train:
            fixed, fed = train_rates(args.model, pipe, args.steps)
            line += f" {fixed:16.0f} {fed:10.0f} {rate / fixed:10.1f} {fed / fixed:9.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
