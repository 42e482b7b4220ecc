"""Data sets resident on the devices, and the batch making that runs inside the compiled step.

The host draws what is random per example (the order, the crop corners, the flips: a few bytes
per image, the very draws of the host pipeline, `Pipeline.train_draws`); the devices hold the
uint8 images and do the pixel work: gather the rows, normalise, zero-pad, crop, flip. A run with
data on the device therefore trains on exactly the batches of the host pipeline.

The training split is sharded by rows over the data axis: device d of D holds rows
[d * S, (d + 1) * S), S = ceil(N / D). A step's global batch is gathered with one reduce-scatter:
every device fills the rows of the whole batch that it holds (zeros elsewhere), and the sum over
devices, scattered, leaves each device its own part (only one device contributes to any row,
so the integer sum is exact).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.data import augment as aug

AUGMENTATIONS = ("none", "flip", "cifar")  # what runs on the device; 'imagenet' stays on the host
MEMORY_FRACTION = (
    0.5  # resident data may take this much of a device's free memory: the rest is the model's
)


def normalize(images: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 `(images - shift) * scale`: `cnnjax.data.augment.normalize`, bit for bit."""
    return (images.astype(jnp.float32) - shift) * scale


def pad_crop_flip(
    images: jax.Array, offsets: jax.Array | None, flips: jax.Array | None, pad: int = aug.CIFAR_PAD
) -> jax.Array:
    """`cnnjax.data.augment.pad_crop_flip` on the device: the [B, H, W, C] crops of the images
    zero-padded by `pad` at corners `offsets` [B, 2], mirrored where `flips` [B]. Either may be
    None (no crop, no flip)."""
    if offsets is not None:
        _, h, w, c = images.shape
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

        def crop(image, corner):
            return lax.dynamic_slice(image, (corner[0], corner[1], 0), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flips is not None:
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return images


def gather_rows(
    shard: jax.Array, index: jax.Array, rows_per_device: int, axis_name: str | None
) -> jax.Array:
    """Rows `index` of an array sharded by rows over `axis_name`, for this device's part of a batch.

    Args:
      shard: this device's rows [S, ...] of the global array (rows d * S ... of device d).
      index: this device's part of the batch's global row numbers [b].
      rows_per_device: S.
      axis_name: the data axis, or None on one device (a plain gather).
    """
    if axis_name is None:
        return shard[index]
    index = lax.all_gather(index, axis_name, tiled=True)  # the whole batch's rows, on every device
    mine = index // rows_per_device == lax.axis_index(axis_name)
    rows = shard[jnp.where(mine, index % rows_per_device, 0)]
    rows = jnp.where(mine.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, jnp.zeros((), rows.dtype))
    return lax.psum_scatter(rows, axis_name, scatter_dimension=0, tiled=True)


def make_train_batch(
    resident: dict[str, jax.Array],
    draws: dict[str, jax.Array],
    *,
    shift: np.ndarray,
    scale: np.ndarray,
    rows_per_device: int,
    axis_name: str | None,
) -> dict[str, jax.Array]:
    """A training batch {'image' float32, 'label' int32} from the resident split and the draws.

    resident: this device's rows {'image' uint8, 'label' int32} (`put_train_split`); draws: one
    step's `Pipeline.train_draws` for this device; shift, scale: `normalization_constants`.
    """
    index = draws["index"]
    images = gather_rows(resident["image"], index, rows_per_device, axis_name)
    labels = gather_rows(resident["label"], index, rows_per_device, axis_name)
    images = normalize(images, shift, scale)
    return {"image": pad_crop_flip(images, draws.get("offset"), draws.get("flip")), "label": labels}


def make_eval_batch(
    arrays: dict[str, jax.Array], *, shift: np.ndarray, scale: np.ndarray
) -> dict[str, jax.Array]:
    """One evaluation batch of a resident split (`put_eval_split`), as `Pipeline.eval_batches`."""
    mask = arrays["mask"]
    images = normalize(arrays["image"], shift, scale)
    images = jnp.where(mask[:, None, None, None], images, 0.0)  # padding rows are zeros
    return {"image": images, "label": arrays["label"], "mask": mask}


def put_train_split(par, pipeline) -> tuple[dict[str, jax.Array], int]:
    """The pipeline's training split on the devices, sharded by rows; and the rows per device.

    Every process holds the whole split in memory (`ArraySource`); each device gets its rows.
    """
    source = pipeline.ds.splits["train"]
    n = len(source)
    rows = -(-n // par.num_devices)
    images, labels = source.get(np.arange(n))
    pad = rows * par.num_devices - n
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return par.put_global({"image": images, "label": labels.astype(np.int32)}), rows


def put_eval_split(par, pipeline, split: str | None = None) -> dict[str, jax.Array]:
    """The pipeline's evaluation batches of `split` on the devices (uint8), split like batches:
    {'image' [steps, B, H, W, C], 'label', 'mask' [steps, B]}."""
    return par.put_local(pipeline.eval_arrays(split), axis=1)


def resident_bytes(pipeline, num_devices: int, eval_splits: tuple[str, ...] = ()) -> int:
    """Bytes per device of the training split, and of the evaluation splits, once resident."""
    h, w, c = pipeline.image_shape
    per_image = h * w * c + 4  # uint8 pixels and an int32 label
    total = -(-pipeline.num_train_examples // num_devices) * per_image
    for split in eval_splits:  # and a bool mask
        total += (
            pipeline.num_eval_steps(split)
            * pipeline.global_eval_batch_size
            // num_devices
            * (per_image + 1)
        )
    return total


def free_memory(device: jax.Device) -> int | None:
    """Bytes a device can still allocate: its allocator's limit less what is in use (GPU, TPU),
    or the host's available memory shared by its CPU devices; None where neither is known."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        if "MemAvailable" in info:
            cpus = sum(d.platform == "cpu" for d in jax.local_devices())
            return int(info["MemAvailable"].split()[0]) * 1024 // max(1, cpus)
    return None


def check_fits(pipeline, devices, eval_splits: tuple[str, ...] = (), augment: str = "none") -> int:
    """Raises ValueError unless the data can live on `devices`; returns the bytes per device.

    Refused: a set read lazily (ImageNet), augmentation that needs the host ('imagenet'), and a
    set whose resident size exceeds MEMORY_FRACTION of a device's free memory.
    """
    train = pipeline.ds.splits["train"]
    fix = "use the host pipeline (data_on_device=False)"
    if not getattr(train, "in_memory", False):
        raise ValueError(
            f"data_on_device: {pipeline.ds.name} is read lazily from disk, not held in memory; "
            f"{fix}"
        )
    if augment not in AUGMENTATIONS:
        raise ValueError(
            f"data_on_device: augment={augment!r} runs on the host; the device runs "
            f"{list(AUGMENTATIONS)}; {fix}"
        )
    need = resident_bytes(pipeline, len(devices), eval_splits)
    local = [d for d in devices if d.process_index == jax.process_index()]
    for device in local:
        free = free_memory(device)
        if free is not None and need > MEMORY_FRACTION * free:
            raise ValueError(
                f"data_on_device: {pipeline.ds.name} needs {_gib(need)} per device, more than "
                f"{MEMORY_FRACTION:.0%} of the {_gib(free)} free on {device} (the rest is for the "
                f"model); {fix}"
            )
    return need


def _gib(n: Any) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"
