"""cnnjax.data.device: the batches made on the device are the host pipeline's, bit for bit; the
draws they are made from have the paper's distribution; what cannot live on a device is refused.
One device here; four in tests/test_train_parallel.py (the gather across devices)."""

import functools

import jax
import numpy as np
import pytest

from cnnjax import data
from cnnjax.data import augment as aug
from cnnjax.data import device as device_data
from cnnjax.train.parallel import DataParallel


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", image_size=(8, 8), channels=3)


def pipeline(ds, **kwargs):
    return data.Pipeline(
        ds, 32, normalize="per_pixel_mean", seed=5, process_index=0, process_count=1, **kwargs
    )


@pytest.mark.parametrize("augment", ["none", "flip", "cifar"])
def test_device_batches_are_the_host_pipelines_bit_for_bit(digits, augment):
    pipe = pipeline(digits, augment=augment)
    par = DataParallel("none")
    resident, rows = device_data.put_train_split(par, pipe)
    assert rows == len(digits.splits["train"])
    shift, scale = aug.normalization_constants(pipe.mean, pipe.std, pipe.image_shape)
    make = jax.jit(
        functools.partial(
            device_data.make_train_batch,
            shift=shift,
            scale=scale,
            rows_per_device=rows,
            axis_name=None,
        )
    )
    for epoch in (0, 3):
        for s, (draws, want) in enumerate(zip(pipe.train_draws(epoch), pipe.train_batches(epoch))):
            if s == 3:
                break
            got = make(resident, jax.tree.map(np.asarray, draws))
            np.testing.assert_array_equal(np.asarray(got["label"]), want["label"])
            np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])
    assert (
        set(draws)
        == {"none": {"index"}, "flip": {"index", "flip"}, "cifar": {"index", "offset", "flip"}}[
            augment
        ]
    )


def test_device_eval_batches_are_the_host_pipelines_bit_for_bit(digits):
    pipe = data.Pipeline(digits, 48, normalize="per_channel", process_index=0, process_count=1)
    resident = device_data.put_eval_split(DataParallel("none"), pipe, "test")
    shift, scale = aug.normalization_constants(pipe.mean, pipe.std, pipe.image_shape)
    want = list(pipe.eval_batches("test"))
    assert (
        len(want) == 8 and not want[-1]["mask"].all()
    )  # 360 test digits: the last batch is padded
    make = jax.jit(functools.partial(device_data.make_eval_batch, shift=shift, scale=scale))
    for i, batch in enumerate(want):
        got = make(jax.tree.map(lambda x: x[i], resident))
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.asarray(got[key]), batch[key], err_msg=key)


def test_pad_crop_flip_on_the_device_matches_numpy_at_every_corner():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((81, 7, 9, 2)).astype(np.float32)
    offsets = np.stack(np.meshgrid(np.arange(9), np.arange(9)), -1).reshape(81, 2)  # all corners
    flips = rng.random(81) < 0.5
    got = jax.jit(device_data.pad_crop_flip)(x, offsets.astype(np.int32), flips)
    np.testing.assert_array_equal(np.asarray(got), aug.pad_crop_flip(x, offsets, flips))
    np.testing.assert_array_equal(np.asarray(device_data.pad_crop_flip(x, None, None)), x)


def test_draws_are_uniform_corners_and_fair_flips_independent_per_example(digits):
    pipe = pipeline(digits, augment="cifar")
    draws = [d for epoch in range(6) for d in pipe.train_draws(epoch)]  # 6 x 44 steps of 32
    offsets = np.concatenate([d["offset"] for d in draws])
    flips = np.concatenate([d["flip"] for d in draws])
    n = len(flips)
    assert n == 6 * 44 * 32
    # Each corner coordinate uniform over 0..8: chi-square, 8 degrees of freedom (p = 0.001: 26.1).
    for column in offsets.T:
        counts = np.bincount(column, minlength=9)
        assert len(counts) == 9
        assert ((counts - n / 9) ** 2 / (n / 9)).sum() < 26.1, counts
    # The coordinates independent: chi-square of the 9x9 table against the product of its margins.
    table = np.zeros((9, 9))
    np.add.at(table, (offsets[:, 0], offsets[:, 1]), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    assert ((table - expected) ** 2 / expected).sum() < 102.7  # 64 degrees of freedom, p = 0.001
    # Flips with probability 1/2: within 4 standard deviations.
    assert abs(flips.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
    # The same example gets new draws each epoch, in a new order.
    first = [pipe.train_draws(e).__next__() for e in (0, 1)]
    assert not np.array_equal(first[0]["index"], first[1]["index"])


def test_what_cannot_live_on_a_device_is_refused(digits):
    devices = jax.devices()[:1]
    with pytest.raises(
        ValueError, match="augment='imagenet' runs on the host.*data_on_device=False"
    ):
        device_data.check_fits(pipeline(digits), devices, augment="imagenet")

    class Lazy:  # stands for imagenet2012's TfdsSource
        in_memory = False

    lazy = pipeline(digits)
    lazy.ds = data.Dataset(
        name="imagenet2012",
        splits={"train": Lazy()},
        num_classes=1000,
        image_shape=(8, 8, 3),
        origin="tfds",
    )
    with pytest.raises(ValueError, match="imagenet2012 is read lazily from disk.*host pipeline"):
        device_data.check_fits(lazy, devices)
    with pytest.raises(ValueError, match="draws are not per-example offsets"):
        pipeline(digits, augment="imagenet").train_draws(0)
    assert device_data.check_fits(pipeline(digits), devices) == len(digits.splits["train"]) * (
        8 * 8 * 3 + 4
    )
