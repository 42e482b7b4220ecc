"""Input validation shared by the image models: one wording for every network's errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cnnjax import _checks as C


def check_image_input(
    x: Any,
    model: str,
    *,
    min_size: int,
    in_channels: int | None = None,
    size_note: str = "",
    fix: str = "resize or pad the images",
) -> None:
    """Raises ValueError naming `model` unless `x` is an NHWC batch with `in_channels` channels
    (when given) and height and width of at least `min_size`. `size_note` follows the size in
    the message (e.g. " (224x224 natively)"), `fix` says what to do about a too-small input."""
    shape = tuple(x.shape)
    if len(shape) != 4:
        fix = (
            "add a batch axis with x[None]"
            if len(shape) == 3
            else "give one batch of images, (N, H, W, C)"
        )
        raise ValueError(f"{model} input must be NHWC (rank 4), got shape {shape}; {fix}")
    if in_channels is not None and shape[-1] != in_channels:
        raise ValueError(
            f"{model} expects {in_channels} input channel(s), got shape {shape}; "
            f"pass in_channels={shape[-1]} to create() or fix the layout (NHWC)"
        )
    if min(shape[1:3]) < min_size:
        raise ValueError(
            f"{model} needs inputs of at least {min_size}x{min_size} pixels{size_note}, "
            f"got {shape[1]}x{shape[2]}; {fix}"
        )


def check_positive_int(model: str, name: str, value: Any) -> None:
    """Raises ValueError naming `model`'s option `name` unless `value` is an int >= 1."""
    C.positive_int(value, f"{model}: {name}")


def _is_width(v: Any) -> bool:
    i = C.index(v)  # an exact int (NumPy ints too), else None
    return i is not None and i >= 1


def check_widths(
    model: str, name: str, value: Any, *, empty_ok: bool = False, words: tuple[str, ...] = ()
) -> None:
    """Raises ValueError naming `model`'s option `name` unless `value` is a sequence of positive
    ints (layer widths), each of which may also be one of `words` (e.g. VGG's 'M' pools)."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and (empty_ok or len(value) > 0)
    if not ok or not all(_is_width(v) or (isinstance(v, str) and v in words) for v in value):
        kinds = "positive ints" + "".join(f" or {w!r}" for w in words)
        example = "(20, 50)" if not words else "(64, 'M', 128, 'M')"
        raise ValueError(
            f"{model}: {name} must be a {'possibly empty ' if empty_ok else ''}sequence of "
            f"{kinds}, e.g. {example}; got {value!r}"
        )
