"""Batching: per-process shards, deterministic shuffles and augmentation, padded evaluation.

A `Pipeline` turns a `Dataset` into per-process batches of float32 images. Training batches are
a pure function of (seed, epoch, process_index, process_count): a resumed run sees the same data.
Each process reads only its own contiguous shard of a split (the even split of
`tfds.split_for_jax_process`) and yields its local part of the global batch; evaluation pads the
last batches and masks the padding, so that every example counts exactly once over all processes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np

from cnnjax._checks import is_int
from cnnjax.data import augment as aug
from cnnjax.data.sources import check_num_threads

AUGMENTATIONS = ("none", "flip", "cifar", "imagenet")
# The fixed (mean, std) per channel, in [0, 1] units, that published weights were trained with:
# torchvision's and most of timm's; Inception's (Google's TF-slim models, timm's inception_v4 and
# inception_resnet_v2); the DPN authors' MXNet models (mean 124, 117, 104; scale 0.0167 per unit).
FIXED_NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dpn": ((124 / 255, 117 / 255, 104 / 255), (1 / (0.0167 * 255),) * 3),
}
NORMALIZATIONS = ("per_pixel_mean", "per_channel", "scale", *FIXED_NORMALIZATIONS)
LAZY_STATS_EXAMPLES = 10_000  # sample for the statistics of data sets read lazily (ImageNet)
_SHUFFLE, _AUGMENT, _STATS = 1, 2, 3  # seed-sequence tags: independent streams per purpose


def shard_indices(n: int, process_index: int, process_count: int) -> np.ndarray:
    """Indices of process `process_index`'s contiguous shard of `n` examples.

    The same even split as `tfds.even_splits` / `tfds.split_for_jax_process` (no remainder
    dropped): the first `n % process_count` shards hold one example more.
    """
    if not (
        is_int(process_count)
        and process_count >= 1
        and is_int(process_index)
        and 0 <= process_index < process_count
    ):
        raise ValueError(
            f"process_index must lie in [0, process_count) with process_count >= 1, "
            f"got process_index={process_index!r}, process_count={process_count!r}"
        )
    per, extra = divmod(int(n), process_count)
    start = per * process_index + min(process_index, extra)
    return np.arange(start, start + per + (process_index < extra))


def training_statistics(source, mode: str, max_examples: int | None = None, chunk: int = 1024):
    """(mean, std) in [0, 1] units of a training split for `mode` (see `Pipeline`).

    'per_pixel_mean': mean image [H, W, C], std ones [C]; 'per_channel': mean and std [C] over all
    pixels; 'scale': zeros and ones [C]; a FIXED_NORMALIZATIONS name: its constants [C] (nothing
    is read). At most `max_examples` examples (a fixed sample) are read.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"mode must be one of {NORMALIZATIONS}, got {mode!r}")
    if max_examples is not None and (not is_int(max_examples) or max_examples < 1):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    h, w, c = source.image_shape
    if mode == "scale":
        return np.zeros(c, np.float32), np.ones(c, np.float32)
    if mode in FIXED_NORMALIZATIONS:
        mean, std = (np.asarray(v, np.float32) for v in FIXED_NORMALIZATIONS[mode])
        if c != 3:
            raise ValueError(
                f"normalize={mode!r} has constants for 3 channels (RGB); the images "
                f"have {c}: give channels=3 or another normalize"
            )
        return mean, std
    n = len(source)
    if n == 0:
        raise ValueError("the training split is empty: no normalisation statistics")
    idx = np.arange(n)
    if max_examples is not None and max_examples < n:
        rng = np.random.default_rng([_STATS])
        idx = np.sort(rng.choice(n, max_examples, replace=False))
    total, squares = np.zeros((h, w, c)), np.zeros(c)
    for i in range(0, len(idx), chunk):
        x = source.get(idx[i : i + chunk])[0].astype(np.float64)
        total += x.sum(axis=0)
        squares += np.einsum("nhwc,nhwc->c", x, x)
    pixel_mean = total / (len(idx) * 255.0)
    channel_mean = pixel_mean.mean(axis=(0, 1))
    channel_var = squares / (len(idx) * h * w * 255.0**2) - channel_mean**2
    if mode == "per_pixel_mean":
        return pixel_mean.astype(np.float32), np.ones(c, np.float32)
    return channel_mean.astype(np.float32), np.sqrt(np.maximum(channel_var, 0)).astype(np.float32)


class Pipeline:
    """Per-process training and evaluation batches of a `Dataset`.

    Args:
      ds: a `Dataset` from `load_dataset`.
      global_batch_size: examples per step over all processes; each process yields
        `global_batch_size // process_count` (must divide).
      augment: 'none'; 'flip' (horizontal flips); 'cifar' (4-pixel zero pad, random crop, flip;
        He et al. 2016); 'imagenet' (shorter side uniform in [256, 480] scaled by crop / 224,
        random crop, flip; evaluation sees the centre crop of the shorter side resized to 256/224
        of the crop).
      normalize: 'per_pixel_mean' (subtract the training set's mean image, He et al. 2016),
        'per_channel' (subtract the mean and divide by the std of each channel), 'scale'
        (pixels / 255 only), or a FIXED_NORMALIZATIONS name ('imagenet': the constants that
        torchvision's weights expect; 'inception'; 'dpn'). Statistics come from the training split
        only (after any validation carve-out) and apply to every split. Zero padding happens after
        normalising, so in pixel space it pads with the mean.
      seed: seed of shuffling and augmentation.
      process_index, process_count: this process and how many there are (default: JAX's).
      eval_split: the split `eval_batches()` reads by default.
      eval_batch_size: global evaluation batch (default: `global_batch_size`).
      mean, std: normalisation statistics to use instead of computing them (e.g. restored from a
        run's config); both or neither, broadcastable to the image shape, in [0, 1] units.
      stats_examples: examples read for the statistics (default: all, or 10,000 for lazily read
        data sets).
      num_threads: threads for per-image ImageNet work (default: min(16, CPU count)).
    """

    def __init__(
        self,
        ds,
        global_batch_size: int,
        *,
        augment: str = "none",
        normalize: str = "per_pixel_mean",
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        eval_split: str = "test",
        eval_batch_size: int | None = None,
        mean=None,
        std=None,
        stats_examples: int | None = None,
        num_threads: int | None = None,
    ):
        if not hasattr(ds, "splits") or "train" not in getattr(ds, "splits", {}):
            raise ValueError(
                f"ds must be a Dataset from load_dataset with a train split, got {ds!r}"
            )
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        check_num_threads(num_threads)
        if stats_examples is not None and (not is_int(stats_examples) or stats_examples < 1):
            raise ValueError(
                f"stats_examples must be a positive int (or None for the default), "
                f"got {stats_examples!r}"
            )
        if process_index is None or process_count is None:
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        shard_indices(0, process_index, process_count)  # validates both
        eval_batch_size = global_batch_size if eval_batch_size is None else eval_batch_size
        for arg, b in (
            ("global_batch_size", global_batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if not is_int(b) or b <= 0 or b % process_count:
                raise ValueError(
                    f"{arg} must be a positive multiple of process_count={process_count}, got {b!r}"
                )
        self.ds, self.augment, self.normalize, self.seed = ds, augment, normalize, int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.global_batch_size, self.global_eval_batch_size = global_batch_size, eval_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.local_eval_batch_size = eval_batch_size // process_count
        self.eval_split = self._check_split(eval_split, "eval_split")
        self.image_shape = tuple(ds.image_shape)
        train = ds.splits["train"]
        self.num_train_examples = len(train)
        self._train_shard = shard_indices(len(train), self.process_index, self.process_count)
        # Every process takes the same number of steps: that of the smallest shard.
        self.steps_per_epoch = (len(train) // process_count) // self.local_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split of {len(train)} examples gives no full global batch "
                f"of {global_batch_size} over {process_count} process(es); lower "
                "global_batch_size"
            )
        if (mean is None) != (std is None):
            raise ValueError(
                "pass both mean and std, or neither (to compute them from the training split)"
            )
        computed = mean is None
        if computed:
            if stats_examples is None and not train.in_memory:
                stats_examples = LAZY_STATS_EXAMPLES
            mean, std = training_statistics(train, normalize, stats_examples)
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        try:
            fits = np.broadcast_shapes(mean.shape, std.shape, self.image_shape) == self.image_shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"mean {mean.shape} and std {std.shape} must broadcast to the image shape "
                f"{self.image_shape}"
            )
        bad_std = ~(np.isfinite(std) & (std > 0))
        if computed and normalize == "per_channel" and bad_std.any():
            channels = np.flatnonzero(np.broadcast_to(bad_std, self.image_shape[-1:])).tolist()
            which = ", ".join(map(str, channels))
            raise ValueError(
                f"normalize='per_channel': channel{'s' if len(channels) > 1 else ''} {which} of "
                f"the training images {'are' if len(channels) > 1 else 'is'} constant (std 0), "
                "so they cannot be divided by their std. Use normalize='scale' or "
                "normalize='per_pixel_mean', or pass explicit mean= and std= (positive)"
            )
        if bad_std.any():
            full = np.broadcast_to(bad_std, self.image_shape)
            channels = np.flatnonzero(full.any(axis=(0, 1))).tolist()
            raise ValueError(
                f"std must be positive and finite everywhere (in [0, 1] pixel units), got "
                f"{np.unique(std[bad_std]).tolist()} in channel(s) {channels}; pass std > 0 "
                "for every channel"
            )
        if not np.all(np.isfinite(mean)):
            raise ValueError(f"mean must be finite, got {mean}")
        self.mean, self.std = mean, std
        self._pool = concurrent.futures.ThreadPoolExecutor(
            num_threads or min(16, os.cpu_count() or 1)
        )

    def __repr__(self) -> str:
        return (
            f"Pipeline({self.ds.name}, global_batch_size={self.global_batch_size}, "
            f"augment={self.augment!r}, normalize={self.normalize!r}, seed={self.seed}, "
            f"process {self.process_index}/{self.process_count}, "
            f"steps_per_epoch={self.steps_per_epoch})"
        )

    def with_seed(self, seed: int) -> "Pipeline":
        """This pipeline with another seed (order and augmentation): the same data set, batch sizes
        and normalisation statistics; itself for its own seed."""
        if seed == self.seed:
            return self
        return Pipeline(
            self.ds,
            self.global_batch_size,
            augment=self.augment,
            normalize=self.normalize,
            seed=seed,
            process_index=self.process_index,
            process_count=self.process_count,
            eval_split=self.eval_split,
            eval_batch_size=self.global_eval_batch_size,
            mean=self.mean,
            std=self.std,
        )

    def _check_split(self, split, arg="split") -> str:
        if split not in self.ds.splits:
            raise ValueError(
                f"{arg} must be one of {sorted(self.ds.splits)}, got {split!r}"
                + (
                    " (load_dataset(..., validation_size=N) carves it from train)"
                    if split == "validation"
                    else ""
                )
            )
        return split

    def _normalize(self, images: np.ndarray) -> np.ndarray:
        return aug.normalize(images, self.mean, self.std)

    def train_order(self, epoch: int) -> np.ndarray:
        """Training-split indices this process reads in `epoch`, in order (remainder included)."""
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        rng = np.random.default_rng([self.seed, epoch, self.process_index, _SHUFFLE])
        return self._train_shard[rng.permutation(len(self._train_shard))]

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """The `steps_per_epoch` training batches of `epoch` from `start_step` on.

        Yields dicts: image float32 [local_batch_size, H, W, C], label int32 [local_batch_size].
        The shuffle is a permutation of this process's shard seeded by (seed, epoch, process); the
        last partial batch is dropped; augmentation is seeded by (seed, epoch, process, step).
        """
        return map(self._train_batch, self._epoch_draws(epoch, start_step))

    def train_draws(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """What is random in the training batches of `epoch` from `start_step` on, per example.

        Yields dicts: 'index' int32 [local_batch_size] (rows of the training split); with
        augment='cifar' also 'offset' int32 [local_batch_size, 2] (the crop's corner in the padded
        image) and 'flip' bool [local_batch_size]; with augment='flip' 'flip' only.
        `train_batches` makes its batches from exactly these draws, and `cnnjax.data.device` the
        same batches on the devices.
        """
        if self.augment == "imagenet":
            raise ValueError(
                "augment='imagenet' resizes each image on the host: its draws are not "
                "per-example offsets and flips (use the host pipeline)"
            )
        return self._epoch_draws(epoch, start_step)

    def _epoch_draws(self, epoch: int, start_step: int) -> Iterator[dict]:
        order = self.train_order(epoch)
        if not is_int(start_step) or not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(
                f"start_step must be an int in [0, {self.steps_per_epoch}], got {start_step!r}"
            )
        b = self.local_batch_size
        return (
            self._draws(order[s * b : (s + 1) * b], epoch, s)
            for s in range(start_step, self.steps_per_epoch)
        )

    def train_stream(self, start_step: int = 0) -> Iterator[dict]:
        """Training batches over consecutive epochs from global step `start_step`, endlessly.

        Step `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`, so a run
        resumed at step `s` continues with exactly the batches it would have seen.
        """
        return self._stream(start_step, self.train_batches)

    def draw_stream(self, start_step: int = 0) -> Iterator[dict]:
        """`train_draws` over consecutive epochs from global step `start_step`, endlessly."""
        return self._stream(start_step, self.train_draws)

    def _stream(self, start_step, per_epoch) -> Iterator[dict]:
        if not is_int(start_step) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        epoch, step = divmod(int(start_step), self.steps_per_epoch)

        def stream():
            yield from per_epoch(epoch, step)
            for e in itertools.count(epoch + 1):
                yield from per_epoch(e)

        return stream()

    def _draws(self, idx: np.ndarray, epoch: int, step: int) -> dict:
        rng = np.random.default_rng([self.seed, epoch, self.process_index, step, _AUGMENT])
        draws = {"index": idx.astype(np.int32)}
        if self.augment == "cifar":
            offsets, flips = aug.draw_cifar_params(rng, len(idx))
            draws.update(offset=offsets.astype(np.int32), flip=flips)
        elif self.augment == "flip":
            draws["flip"] = rng.random(len(idx)) < 0.5
        elif self.augment == "imagenet":
            draws["imagenet"] = aug.draw_imagenet_params(rng, len(idx), self.image_shape[0])
        return draws

    def _train_batch(self, draws: dict) -> dict:
        source, idx = self.ds.splits["train"], draws["index"]
        if self.augment == "imagenet":
            raw, labels = source.get_raw(idx)
            shorts, corners, flips = draws["imagenet"]
            crops = self._pool.map(
                aug.random_scale_crop,
                raw,
                [self.image_shape[:2]] * len(idx),
                shorts,
                corners,
                flips,
            )
            return {"image": self._normalize(np.stack(list(crops))), "label": labels}
        images, labels = source.get(idx)
        images = self._normalize(images)
        if self.augment == "cifar":
            images = aug.pad_crop_flip(images, draws["offset"], draws["flip"])
        elif self.augment == "flip":
            flips = draws["flip"]
            images[flips] = images[flips, :, ::-1]
        return {"image": images, "label": labels}

    def num_eval_steps(self, split: str | None = None) -> int:
        """Evaluation steps over `split`, the same on every process."""
        n = len(self.ds.splits[self._check_split(split or self.eval_split)])
        largest_shard = -(-n // self.process_count)
        return -(-largest_shard // self.local_eval_batch_size)

    def eval_batches(self, split: str | None = None) -> Iterator[dict]:
        """This process's evaluation batches of `split` (default `eval_split`), in order, padded.

        Yields dicts: image float32 [local_eval_batch_size, H, W, C], label int32, mask bool;
        padding rows are zeros with mask False, so every example counts once over all processes.
        """
        split = self._check_split(split or self.eval_split)
        source = self.ds.splits[split]
        shard = shard_indices(len(source), self.process_index, self.process_count)
        return (
            self._eval_batch(
                source, shard[s * self.local_eval_batch_size : (s + 1) * self.local_eval_batch_size]
            )
            for s in range(self.num_eval_steps(split))
        )

    def eval_arrays(self, split: str | None = None) -> dict:
        """This process's evaluation batches of `split`, stacked and not normalised.

        Returns image uint8 [num_eval_steps, local_eval_batch_size, H, W, C], label int32 and
        mask bool [num_eval_steps, local_eval_batch_size]: `eval_batches` before `_normalize`.
        """
        split = self._check_split(split or self.eval_split)
        source = self.ds.splits[split]
        shard = shard_indices(len(source), self.process_index, self.process_count)
        b = self.local_eval_batch_size
        batches = [
            self._raw_eval_batch(source, shard[s * b : (s + 1) * b])
            for s in range(self.num_eval_steps(split))
        ]
        return {k: np.stack([batch[k] for batch in batches]) for k in ("image", "label", "mask")}

    def _eval_batch(self, source, idx: np.ndarray) -> dict:
        batch = self._raw_eval_batch(source, idx)
        batch["image"] = self._normalize(batch["image"])
        batch["image"][len(idx) :] = 0  # padding rows are zeros after normalising too
        return batch

    def _raw_eval_batch(self, source, idx: np.ndarray) -> dict:
        b, k = self.local_eval_batch_size, len(idx)
        batch = {
            "image": np.zeros((b,) + self.image_shape, np.uint8),
            "label": np.zeros(b, np.int32),
            "mask": np.arange(b) < k,
        }
        if k:
            batch["image"][:k], batch["label"][:k] = source.get(idx)
        return batch


_END = object()


def device_put_fn(sharding=None):
    """NumPy array (a process's local part) -> `jax.Array` with `sharding` (None: default device).

    When the sharding spans several processes, the global array is assembled from each process's
    local part with `jax.make_array_from_process_local_data`.
    """
    if sharding is None:
        return jax.device_put
    if sharding.is_fully_addressable:  # one process, or a mesh of this process's devices
        return functools.partial(jax.device_put, device=sharding)
    return functools.partial(jax.make_array_from_process_local_data, sharding)


def prefetch_to_device(iterator, size: int = 2, sharding=None) -> Iterator:
    """Moves batches to device in a background thread, keeping `size` of them in flight.

    The host pipeline runs in the thread while the consumer's step runs, so the two overlap
    (`size=2` is double buffering). Exceptions from `iterator` are re-raised to the consumer.

    Args:
      iterator: yields pytrees of NumPy arrays (a process's local batches).
      size: batches on device ahead of the consumer (>= 1).
      sharding: a `jax.sharding.Sharding` for every leaf (e.g. `NamedSharding(mesh, P('batch'))`).
        When it spans several processes, the global arrays are assembled from each process's
        local batch with `jax.make_array_from_process_local_data`. None: the default device.

    Yields:
      The same pytrees with `jax.Array` leaves.
    """
    if not is_int(size) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    put = device_put_fn(sharding)
    buffer, stop = queue.Queue(maxsize=size), threading.Event()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for batch in iterator:
                if not offer(jax.tree.map(put, batch)):
                    return
            offer(_END)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer's thread
            offer(e)

    def consume():
        thread = threading.Thread(target=produce, daemon=True, name="prefetch_to_device")
        thread.start()
        try:
            while (item := buffer.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            # Wait for the producer to leave JAX/NumPy code: a daemon thread still inside a C++ call
            # when the interpreter finalises aborts the process ("FATAL: exception not rethrown").
            thread.join(timeout=60.0)

    return consume()
