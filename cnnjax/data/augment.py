"""Image transforms in NumPy: resizing, channel conversion, normalisation and augmentation.

Everything here is a pure function of its arguments; the random parameters (crop offsets, flips,
scales) are drawn by the caller from a seeded `np.random.Generator`, so that a batch is a pure
function of (seed, epoch, step). Images are uint8 or float32 NHWC (or HWC for one image).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CIFAR_PAD = 4  # He et al. 2016, sec. 4.2: "4 pixels are padded on each side"
IMAGENET_SCALE = (256, 480)  # He et al. 2016, sec. 3.4: shorter side sampled in [256, 480] ...
IMAGENET_CROP = 224  # ... and a 224x224 crop sampled from it or its horizontal flip
EVAL_RESIZE_RATIO = 256 / 224  # evaluation: shorter side to 256, centre 224 crop
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL's RGB -> L


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) triangle-filter weights, half-pixel centres, antialiased when shrinking."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def resize_images(images: np.ndarray, size: tuple[int, int], chunk: int = 4096) -> np.ndarray:
    """Bilinear resize of uint8 NHWC images (antialiased when shrinking, as `jax.image.resize`).

    Args:
      images: uint8 array [N, H, W, C].
      size: output (height, width).
      chunk: images resized at once (bounds the float64 temporaries).

    Returns:
      uint8 array [N, size[0], size[1], C], rounded to nearest.
    """
    if images.ndim != 4:
        raise ValueError(f"resize_images: images must be NHWC, got shape {images.shape}")
    n, h, w, c = images.shape
    if (h, w) == tuple(size):
        return images
    wh, ww = _linear_weights(h, size[0]), _linear_weights(w, size[1])
    out = np.empty((n, size[0], size[1], c), np.uint8)
    for i in range(0, n, chunk):
        y = np.einsum("oh,nhwc->nowc", wh, images[i : i + chunk].astype(np.float64))
        y = np.einsum("pw,nowc->nopc", ww, y)
        out[i : i + chunk] = np.clip(np.rint(y), 0, 255)
    return out


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Grey <-> RGB for uint8 [..., C] images: replicate grey, or BT.601 luminance of RGB."""
    c = images.shape[-1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if c == 3 and channels == 1:
        return np.clip(np.rint(images @ _LUMA), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(
        f"channels: cannot convert images with {c} channels to {channels}; "
        "only 1 <-> 3 is supported"
    )


def normalization_constants(mean, std, image_shape) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) float32 [H, W, C] of `normalize`: 255 * mean, and 1 / (255 * std)."""
    std = np.asarray(std, np.float64)
    # Contiguous full-image operands: broadcasting along a 3-long last axis is ~10x slower.
    shift = np.broadcast_to(255.0 * np.asarray(mean, np.float64), image_shape)
    shift = shift.astype(np.float32, "C")
    scale = np.broadcast_to(1.0 / (255.0 * std), image_shape).astype(np.float32, "C")
    return shift, scale


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 `(images - 255 * mean) / (255 * std)`; mean and std broadcast against [H, W, C].

    Subtract, then multiply, each rounded once: a compiler cannot contract the pair into one
    fused multiply-add (XLA does so for `x * a - b`), so `cnnjax.data.device.normalize` gives
    these very bits inside a compiled step.
    """
    shift, scale = normalization_constants(mean, std, images.shape[1:])
    out = images.astype(np.float32)
    out -= shift
    out *= scale
    return out


def pad_crop_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int = CIFAR_PAD
) -> np.ndarray:
    """Crops of the zero-padded images at `offsets`, mirrored where `flips` (CIFAR augmentation).

    Args:
      images: [B, H, W, C] array (any dtype; padding is with zeros of that dtype).
      offsets: int [B, 2] top-left corners (row, column) in the padded image, in [0, 2 * pad].
      flips: bool [B]; True mirrors the crop left-right.
      pad: zero padding on each side.

    Returns:
      [B, H, W, C] array: `padded[b, y:y+H, x:x+W]`, flipped where asked.
    """
    b, h, w, _ = images.shape
    offsets, flips = np.asarray(offsets), np.asarray(flips, bool)
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(
            f"pad_crop_flip: offsets {offsets.shape} / flips {flips.shape} do not "
            f"match a batch of {b}; expected ({b}, 2) and ({b},)"
        )
    if offsets.size and (offsets.min() < 0 or offsets.max() > 2 * pad):
        raise ValueError(
            f"pad_crop_flip: offsets must lie in [0, {2 * pad}], "
            f"got [{offsets.min()}, {offsets.max()}]"
        )
    # One slice copy per image (mirrored in the copy) into a zeroed output: 1.7 ms for 128 CIFAR
    # images, against 4-5 ms for a fancy-index gather over the padded batch.
    out = np.zeros_like(images)
    for i, ((oy, ox), flip) in enumerate(zip((offsets - pad).tolist(), flips.tolist())):
        y0, y1, x0, x1 = max(0, oy), min(h, h + oy), max(0, ox), min(w, w + ox)
        src, left, right = images[i, y0:y1, x0:x1], x0 - ox, x1 - ox
        if flip:
            out[i, y0 - oy : y1 - oy, w - right : w - left] = src[:, ::-1]
        else:
            out[i, y0 - oy : y1 - oy, left:right] = src
    return out


def draw_cifar_params(rng: np.random.Generator, batch: int, pad: int = CIFAR_PAD):
    """Crop offsets uniform in [0, 2 * pad] and fair-coin flips for a batch."""
    return rng.integers(0, 2 * pad + 1, size=(batch, 2)), rng.random(batch) < 0.5


def resize_crop(
    image: np.ndarray, out_hw: tuple[int, int], short_side: float, top: int, left: int
) -> np.ndarray:
    """The `out_hw` crop at (top, left) of `image` resized so that its shorter side is `short_side`.

    Only the cropped region is resampled (PIL bilinear with a source box, antialiased when
    shrinking), which equals resizing the whole image and slicing, up to the filter's border.

    Args:
      image: uint8 [H, W, C] with C in {1, 3}.
      out_hw: crop (height, width).
      short_side: length of the shorter side after resizing (aspect ratio kept).
      top, left: crop corner in the resized image.

    Returns:
      uint8 [out_h, out_w, C].
    """
    h, w, c = image.shape
    s = short_side / min(h, w)
    rh, rw = max(out_hw[0], round(h * s)), max(out_hw[1], round(w * s))
    if not (0 <= top <= rh - out_hw[0] and 0 <= left <= rw - out_hw[1]):
        raise ValueError(
            f"resize_crop: crop {out_hw} at ({top}, {left}) leaves the resized image of {(rh, rw)}"
        )
    sy, sx = rh / h, rw / w
    box = (left / sx, top / sy, (left + out_hw[1]) / sx, (top + out_hw[0]) / sy)
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    out = np.asarray(pil.resize((out_hw[1], out_hw[0]), Image.BILINEAR, box=box))
    return out[..., None] if c == 1 else out


def _resized_hw(hw: tuple[int, int], short_side: float, out_hw: tuple[int, int]):
    s = short_side / min(hw)
    return max(out_hw[0], round(hw[0] * s)), max(out_hw[1], round(hw[1] * s))


def center_view(
    image: np.ndarray, out_hw: tuple[int, int], ratio: float = EVAL_RESIZE_RATIO
) -> np.ndarray:
    """Evaluation view: shorter side to `ratio * max(out_hw)`, then the centre crop."""
    short = round(ratio * max(out_hw))
    rh, rw = _resized_hw(image.shape[:2], short, out_hw)
    return resize_crop(image, out_hw, short, (rh - out_hw[0]) // 2, (rw - out_hw[1]) // 2)


def random_scale_crop(
    image: np.ndarray, out_hw: tuple[int, int], short_side: int, u: np.ndarray, flip: bool
) -> np.ndarray:
    """ImageNet training view: shorter side to `short_side`, crop at fractions `u`, maybe mirror.

    Args:
      image: uint8 [H, W, C].
      out_hw: crop (height, width).
      short_side: shorter side after resizing (ResNet: uniform in [256, 480] for 224 crops).
      u: two floats in [0, 1): the crop corner as a fraction of the free range in each axis.
      flip: mirror the crop left-right.
    """
    rh, rw = _resized_hw(image.shape[:2], short_side, out_hw)
    top = int(u[0] * (rh - out_hw[0] + 1))
    left = int(u[1] * (rw - out_hw[1] + 1))
    out = resize_crop(image, out_hw, short_side, top, left)
    return out[:, ::-1] if flip else out


def draw_imagenet_params(
    rng: np.random.Generator,
    batch: int,
    out_size: int,
    scale: tuple[int, int] = IMAGENET_SCALE,
    crop: int = IMAGENET_CROP,
):
    """Shorter sides uniform in `scale` (scaled by out_size / crop), corner fractions, flips."""
    lo, hi = (round(s * out_size / crop) for s in scale)
    return rng.integers(lo, hi + 1, size=batch), rng.random((batch, 2)), rng.random(batch) < 0.5
