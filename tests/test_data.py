"""Tests of cnnjax.data: sources, pipeline, augmentation, sharding, prefetch, errors.

Data come from scikit-learn's digits, `.npz` files written here, and `tfds.testing.mock_data`;
nothing is downloaded. References are written from definitions in plain NumPy / PIL / JAX.
"""

import math
import re
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cnnjax import data
from cnnjax.data import augment as aug


def write_npz(directory, name, n_train, n_test, shape=(6, 5, 3), labels=None, **overrides):
    """Random images whose first pixel-triple encodes the example's index (train, test apart)."""
    rng = np.random.default_rng(123)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
        x[:, 0, 0, 0], x[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
        arrays[f"x_{split}"] = x
        arrays[f"y_{split}"] = (np.arange(n) % 10 if labels is None else labels(n)).astype(np.uint8)
    arrays.update(overrides)
    np.savez(directory / f"{name}.npz", **arrays)
    return arrays


def decode_index(images_float, pipe):
    """Example index from a normalised image (normalize='scale', no crop)."""
    x = np.rint(images_float * 255).astype(np.int64)
    return x[:, 0, 0, 0] + 256 * x[:, 0, 1, 0]


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


# ----------------------------------------------------------------------------- sources


def test_list_datasets():
    assert data.list_datasets() == [
        "digits",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "imagenet2012",
    ]


def test_digits_default_shapes_and_split(digits):
    from sklearn.datasets import load_digits

    ref = load_digits()
    assert digits.image_shape == (32, 32, 3) and digits.num_classes == 10
    train, test = digits.splits["train"], digits.splits["test"]
    assert (len(train), len(test)) == (1797 - 360, 360)
    x, y = train.get(np.arange(len(train)))
    assert x.dtype == np.uint8 and x.shape == (1437, 32, 32, 3) and y.dtype == np.int32
    assert y.min() == 0 and y.max() == 9
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey replicated into RGB
    labels = np.concatenate([y, test.get(np.arange(360))[1]])
    np.testing.assert_array_equal(np.bincount(labels), np.bincount(ref.target))
    again = data.load_dataset("digits")
    np.testing.assert_array_equal(
        again.splits["test"].get(np.arange(360))[0], test.get(np.arange(360))[0]
    )


def test_digits_native_pixels_are_sklearns():
    from sklearn.datasets import load_digits

    ref = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    ds = data.load_dataset("digits", image_size=8, channels=1)
    got = np.concatenate(
        [ds.splits[s].get(np.arange(len(ds.splits[s])))[0][..., 0] for s in ("train", "test")]
    )
    # The two splits together are exactly the 1797 originals, each once.

    def key(images):
        return sorted(map(bytes, images))

    assert key(got) == key(ref)


def test_resize_matches_jax_image_resize():
    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    for size in [(32, 32), (5, 12), (8, 8)]:
        ref = np.asarray(
            jax.image.resize(x.astype(np.float32), (3,) + size + (1,), "linear", antialias=True)
        )
        got = aug.resize_images(x, size)
        assert got.dtype == np.uint8 and got.shape == (3,) + size + (1,)
        assert np.abs(got - ref).max() <= 0.5 + 1e-3  # equal up to rounding to uint8


def test_channel_conversion():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 3, 3, 3), dtype=np.uint8)
    grey = aug.convert_channels(rgb, 1)
    ref = np.rint(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2])
    np.testing.assert_array_equal(grey[..., 0], ref.astype(np.uint8))
    np.testing.assert_array_equal(aug.convert_channels(grey, 3), np.repeat(grey, 3, -1))


def test_npz_source(tmp_path):
    arrays = write_npz(tmp_path, "mnist", 30, 7, shape=(6, 5, 1))
    ds = data.load_dataset("mnist", data_dir=str(tmp_path))  # the local file wins over tfds
    assert ds.origin == str(tmp_path / "mnist.npz")
    assert ds.image_shape == (6, 5, 1) and ds.num_classes == 10
    x, y = ds.splits["test"].get(np.array([6, 0, 3]))
    np.testing.assert_array_equal(x, arrays["x_test"][[6, 0, 3]])
    assert y.dtype == np.int32 and list(y) == [6, 0, 3]
    resized = data.load_dataset("mnist", data_dir=str(tmp_path), image_size=(8, 4), channels=3)
    assert resized.splits["train"].get(np.arange(2))[0].shape == (2, 8, 4, 3)
    write_npz(tmp_path, "tiny", 20, 5, labels=lambda n: np.arange(n) % 13)
    assert data.load_dataset("tiny", data_dir=str(tmp_path)).num_classes == 13  # unknown name


def test_missing_tfds_is_one_clear_error(tmp_path, monkeypatch):
    # tensorflow-datasets is a dependency, but an image may lack it (the GPU machines' did): with
    # no local .npz the user is told both ways out, not shown an ImportError from deep inside.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
    with pytest.raises(
        ValueError, match=r"'mnist'.*mnist\.npz.*tensorflow-datasets.*not installed.*pip install"
    ):
        data.load_dataset("mnist", data_dir=str(tmp_path))
    write_npz(tmp_path, "mnist", 10, 4)
    assert data.load_dataset("mnist", data_dir=str(tmp_path)).origin == str(tmp_path / "mnist.npz")


def test_validation_split(tmp_path):
    arrays = write_npz(tmp_path, "cifar10", 50, 10)
    ds = data.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=12, seed=3)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 38, "validation": 12, "test": 10}
    ids = {
        s: decode_index(ds.splits[s].get(np.arange(len(ds.splits[s])))[0] / 255, None)
        for s in ("train", "validation")
    }
    assert not set(ids["train"]) & set(ids["validation"])
    assert sorted(np.concatenate(list(ids.values()))) == list(range(50))
    again = data.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=12, seed=3)
    other = data.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=12, seed=4)

    def val(d):
        return d.splits["validation"].get(np.arange(12))[0]

    np.testing.assert_array_equal(val(again), val(ds))
    assert not np.array_equal(val(other), val(ds))
    np.testing.assert_array_equal(
        ds.splits["validation"].get(np.arange(12))[0], arrays["x_train"][np.sort(ids["validation"])]
    )


def test_tfds_mock_small_dataset():
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset("mnist", data_dir="/nonexistent/tfds")
        x, y = ds.splits["train"].get(np.arange(10))
        assert ds.image_shape == (28, 28, 1) and x.dtype == np.uint8 and x.shape == (10, 28, 28, 1)
        assert y.dtype == np.int32 and 0 <= y.min() and y.max() < 10
        cifar = data.load_dataset("cifar100", image_size=16, channels=1)
        assert cifar.image_shape == (16, 16, 1) and cifar.num_classes == 100
        assert cifar.splits["test"].get(np.arange(3))[0].shape == (3, 16, 16, 1)
    assert "tensorflow" not in sys.modules


def test_tfds_mock_imagenet_is_lazy_and_augments():
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset("imagenet2012", image_size=24, num_threads=2)
        train = ds.splits["train"]
        assert isinstance(train, data.TfdsSource) and not train.in_memory
        raw, labels = train.get_raw(np.arange(4))
        assert len({im.shape for im in raw}) > 1  # mock images have random sizes
        x, _ = train.get(np.arange(4))
        assert x.shape == (4, 24, 24, 3) and x.dtype == np.uint8 and labels.max() < 1000
        pipe = data.Pipeline(
            ds,
            4,
            augment="imagenet",
            normalize="per_channel",
            num_threads=2,
            process_index=0,
            process_count=1,
        )
        batch = next(pipe.train_batches(0))
        assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
        again = next(
            data.Pipeline(
                ds, 4, augment="imagenet", normalize="per_channel", process_index=0, process_count=1
            ).train_batches(0)
        )
        np.testing.assert_array_equal(batch["image"], again["image"])
        ev = list(pipe.eval_batches())
        assert len(ev) == 3 and all(b["mask"].all() for b in ev)
    assert "tensorflow" not in sys.modules


def test_missing_data_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    msg = str(e.value)
    for part in (
        "'cifar10'",
        str(tmp_path / "cifar10.npz"),
        "x_train, y_train, x_test, y_test",
        "--data_dir",
        "array_record",
    ):
        assert part in msg
    with pytest.raises(ValueError, match=r"ILSVRC2012_img_train.tar.*downloads/manual"):
        data.load_dataset("imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"Unknown data set 'nope'.*digits"):
        data.load_dataset("nope", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=0), "image_size"),
        (dict(image_size=(3, 4, 5)), "image_size"),
        (dict(channels=2), "channels"),
        (dict(validation_size=1437), "validation_size"),
        (dict(validation_size=-1), "validation_size"),
        (dict(seed=-1), "seed"),
    ],
)
def test_load_dataset_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset("digits", **kwargs)


def test_bad_npz_files(tmp_path):
    write_npz(tmp_path, "a", 5, 5, x_test=np.zeros((5, 6, 5, 3), np.float32))
    with pytest.raises(ValueError, match="x_test must be uint8"):
        data.load_dataset("a", data_dir=str(tmp_path))
    np.savez(tmp_path / "b.npz", x_train=np.zeros((2, 3, 3, 1), np.uint8))
    with pytest.raises(ValueError, match=r"missing arrays \['x_test', 'y_test', 'y_train'\]"):
        data.load_dataset("b", data_dir=str(tmp_path))
    write_npz(tmp_path, "cifar10", 5, 5, labels=lambda n: np.full(n, 10))
    with pytest.raises(ValueError, match=r"labels lie in \[10, 10\], outside \[0, 10\)"):
        data.load_dataset("cifar10", data_dir=str(tmp_path))


def test_download_must_be_a_bool(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(
        tfds.core.DatasetBuilder,
        "download_and_prepare",
        lambda self, *a, **k: started.append(self.name),
    )
    for bad in ("no", 1, "False", [0]):
        match = r"download must be True or False.*got " + re.escape(repr(bad))
        with pytest.raises(ValueError, match=match):
            data.load_dataset("cifar10", data_dir=str(tmp_path), download=bad)
    assert started == []  # rejected before tfds is asked for anything
    write_npz(tmp_path, "tiny", 5, 5)
    with pytest.raises(ValueError, match="download must be True or False"):
        data.load_dataset("tiny", data_dir=str(tmp_path), download="yes")
    assert data.load_dataset("tiny", data_dir=str(tmp_path), download=np.bool_(False))


def test_missing_data_message_names_every_spelling_of_data_dir(tmp_path):
    with pytest.raises(ValueError) as e:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    msg = str(e.value)
    # load_dataset / TrainConfig take data_dir=; `python -m cnnjax train` --data_dir; experiments
    # --data_dir: the message must not send a `cnnjax train` user to a flag it rejects.
    assert "data_dir=DIR" in msg and "--data_dir DIR" in msg and "--data_dir DIR" in msg
    assert "python -m cnnjax train" in msg
    assert "Provide it with --data_dir" not in msg


@pytest.mark.parametrize(
    "content, match",
    [
        ("truncated", r"is not a readable \.npz archive \(corrupt or truncated"),
        ("text", r"is not a readable \.npz archive"),
        ("empty", r"is not a readable \.npz archive"),
        ("npy", r"holds a single \.npy array, not a \.npz archive"),
        ("object", r"x_train holds Python objects \(dtype=object\)"),
    ],
)
def test_unreadable_npz_files(tmp_path, content, match):
    path = tmp_path / "bad.npz"
    if content == "truncated":
        write_npz(tmp_path, "bad", 5, 5)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "text":
        path.write_text("not an archive")
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "npy":
        np.save(tmp_path / "arr.npy", np.zeros((5, 6, 5, 3), np.uint8))
        (tmp_path / "arr.npy").rename(path)
    else:
        write_npz(tmp_path, "bad", 5, 5, x_train=np.array([{}, 1, 2, 3, 4], dtype=object))
    with pytest.raises(ValueError, match=match) as e:
        data.load_dataset("bad", data_dir=str(tmp_path))
    msg = str(e.value)
    assert str(path) in msg and "x_train, y_train, x_test, y_test" in msg
    assert "np.savez" in msg


def test_empty_training_split_and_empty_images(tmp_path):
    write_npz(tmp_path, "none", 0, 5)
    for kwargs in ({}, {"validation_size": 0}, {"validation_size": 2}):
        with pytest.raises(ValueError, match="x_train holds no examples") as e:
            data.load_dataset("none", data_dir=str(tmp_path), **kwargs)
        assert "validation_size" not in str(e.value)
    for shape in ((0, 0, 3), (0, 5, 3), (6, 5, 0)):
        x, y = np.zeros((5, *shape), np.uint8), np.zeros(5, np.uint8)
        np.savez(tmp_path / "flat.npz", x_train=x, y_train=y, x_test=x, y_test=y)
        with pytest.raises(ValueError, match=r"flat\.npz: x_train images must have positive"):
            data.load_dataset("flat", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="images must have positive height, width and channels"):
        data.ArraySource(np.zeros((2, 0, 0, 3), np.uint8), np.zeros(2, np.int32))


def test_array_source_accepts_array_likes():
    images = np.zeros((2, 3, 3, 1), np.uint8)
    src = data.ArraySource(images, [0, 1])
    assert src.labels.dtype == np.int32 and list(src.get([1, 0])[1]) == [1, 0]
    assert len(data.ArraySource(list(images), (4, 5))) == 2
    with pytest.raises(ValueError, match="labels must be integers"):
        data.ArraySource(images, [0.5, 1.5])
    with pytest.raises(ValueError, match=r"labels \(3,\) do not match 2 images"):
        data.ArraySource(images, [0, 1, 2])
    with pytest.raises(ValueError, match="images must be uint8 NHWC"):
        data.ArraySource([[1, 2]], [0])


# ---------------------------------------------------------------------------- pipeline


def make_pipe(tmp_path, n_train=40, n_test=13, batch=8, **kwargs):
    write_npz(tmp_path, "tiny", n_train, n_test, labels=lambda n: np.arange(n) % 10)
    ds = data.load_dataset("tiny", data_dir=str(tmp_path))
    kwargs = {"normalize": "scale", "process_index": 0, "process_count": 1, **kwargs}
    return data.Pipeline(ds, batch, **kwargs)


def epoch_ids(pipe, epoch, **kwargs):
    return np.concatenate(
        [decode_index(b["image"], pipe) for b in pipe.train_batches(epoch, **kwargs)]
    )


def test_train_epoch_order(tmp_path):
    pipe = make_pipe(tmp_path)
    assert pipe.steps_per_epoch == 5 and pipe.local_batch_size == 8
    batches = list(pipe.train_batches(0))
    assert len(batches) == 5
    assert all(
        b["image"].shape == (8, 6, 5, 3)
        and b["image"].dtype == np.float32
        and b["label"].dtype == np.int32
        for b in batches
    )
    ids = epoch_ids(pipe, 0)
    assert sorted(ids) == list(range(40))  # every example exactly once
    np.testing.assert_array_equal(ids, pipe.train_order(0))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), ids % 10)
    np.testing.assert_array_equal(epoch_ids(make_pipe(tmp_path), 0), ids)  # pure function
    assert not np.array_equal(epoch_ids(pipe, 1), ids)
    assert not np.array_equal(epoch_ids(make_pipe(tmp_path, seed=1), 0), ids)
    np.testing.assert_array_equal(epoch_ids(pipe, 0, start_step=2), ids[16:])  # resumption


def test_train_stream_resumes_across_epochs(tmp_path):
    pipe = make_pipe(tmp_path)
    epochs = [b["image"] for e in range(3) for b in pipe.train_batches(e)]
    stream = pipe.train_stream(start_step=3)
    resumed = [next(stream)["image"] for _ in range(10)]
    np.testing.assert_array_equal(np.stack(resumed), np.stack(epochs[3:13]))


def test_train_drops_the_last_partial_batch(tmp_path):
    pipe = make_pipe(tmp_path, n_train=43)
    ids = epoch_ids(pipe, 2)
    assert pipe.steps_per_epoch == 5 and len(ids) == 40 and len(set(ids)) == 40
    assert set(ids) <= set(range(43))


@pytest.mark.parametrize("count", [1, 3])
def test_eval_covers_split_once_with_masked_padding(tmp_path, count):
    pipes = [
        make_pipe(tmp_path, batch=6, process_index=p, process_count=count) for p in range(count)
    ]
    steps = {p.num_eval_steps() for p in pipes}
    assert steps == {math.ceil(math.ceil(13 / count) / (6 // count))}  # same on every process
    seen = []
    for p in pipes:
        batches = list(p.eval_batches())
        assert len(batches) == p.num_eval_steps()
        for b in batches:
            assert b["image"].shape[0] == b["label"].shape[0] == b["mask"].shape[0] == 6 // count
            assert not b["image"][~b["mask"]].any() and not b["label"][~b["mask"]].any()
            seen.extend(decode_index(b["image"][b["mask"]], p))
    assert sorted(seen) == list(range(13))


def test_shard_indices_match_tfds_split_for_jax_process():
    from tensorflow_datasets.core import splits as splits_lib

    for n, count in [(11, 3), (12, 4), (5, 8), (1000, 7)]:
        split_dict = splits_lib.SplitDict(
            [splits_lib.SplitInfo(name="train", shard_lengths=[n], num_bytes=0)]
        )
        shards = [data.shard_indices(n, i, count) for i in range(count)]
        np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))  # disjoint, covering
        for i, shard in enumerate(shards):
            (inst,) = tfds.split_for_jax_process(
                "train", process_index=i, process_count=count
            ).to_absolute(split_dict)
            assert (shard[0] if len(shard) else inst.from_ or 0) == (inst.from_ or 0)
            assert len(shard) == (n if inst.to is None else inst.to) - (inst.from_ or 0)


def test_processes_read_disjoint_shards(tmp_path):
    pipes = [
        make_pipe(tmp_path, n_train=41, batch=6, process_index=p, process_count=3) for p in range(3)
    ]
    assert {p.local_batch_size for p in pipes} == {2}
    assert {p.steps_per_epoch for p in pipes} == {41 // 3 // 2}
    orders = [p.train_order(1) for p in pipes]
    assert sorted(np.concatenate(orders)) == list(range(41))
    for p, order in zip(pipes, orders):
        assert set(epoch_ids(p, 1)) <= set(order)
        assert set(order) == set(data.shard_indices(41, p.process_index, 3))


# -------------------------------------------------------------------------- augmentation


def test_pad_crop_flip_matches_naive_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 7, 9, 2)).astype(np.float32)
    offsets, flips = aug.draw_cifar_params(rng, 40)
    offsets[:2], offsets[2:4] = 0, 8  # the extreme corners
    got = aug.pad_crop_flip(x, offsets, flips)
    for i in range(40):
        padded = np.pad(x[i], ((4, 4), (4, 4), (0, 0)))
        crop = padded[offsets[i, 0] : offsets[i, 0] + 7, offsets[i, 1] : offsets[i, 1] + 9]
        np.testing.assert_array_equal(got[i], crop[:, ::-1] if flips[i] else crop)


def test_cifar_params_cover_the_padded_range():
    offsets, flips = aug.draw_cifar_params(np.random.default_rng(0), 4000)
    assert set(np.unique(offsets)) == set(range(9))
    assert 0.45 < flips.mean() < 0.55


def test_cifar_crops_lie_inside_the_padded_image(tmp_path):
    pipe = make_pipe(tmp_path, augment="cifar")
    ds = pipe.ds.splits["train"]
    for b, idx in zip(pipe.train_batches(0), np.split(pipe.train_order(0), 5)):
        originals = ds.get(idx)[0]
        for out, orig in zip(np.rint(b["image"] * 255), originals):
            padded = np.pad(orig, ((4, 4), (4, 4), (0, 0)))
            candidates = [
                c
                for oy in range(9)
                for ox in range(9)
                for c in (
                    padded[oy : oy + 6, ox : ox + 5],
                    padded[oy : oy + 6, ox : ox + 5][:, ::-1],
                )
            ]
            assert any(np.array_equal(out, c) for c in candidates)


def test_flips_are_exact_mirrors(tmp_path):
    pipe = make_pipe(tmp_path, augment="flip")
    flipped = 0
    for b, idx in zip(pipe.train_batches(0), np.split(pipe.train_order(0), 5)):
        originals = pipe.ds.splits["train"].get(idx)[0]
        images = np.rint(b["image"] * 255)
        is_flip = np.array([np.array_equal(o[:, ::-1], x) for o, x in zip(originals, images)])
        is_same = np.array([np.array_equal(o, x) for o, x in zip(originals, images)])
        assert np.all(is_flip ^ is_same)
        flipped += is_flip.sum()
    assert 0 < flipped < 40


def test_augmentation_is_reproducible(tmp_path):
    first = [b["image"] for b in make_pipe(tmp_path, augment="cifar").train_batches(3)]
    again = [b["image"] for b in make_pipe(tmp_path, augment="cifar").train_batches(3)]
    other = [b["image"] for b in make_pipe(tmp_path, augment="cifar", seed=9).train_batches(3)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))


def test_per_pixel_mean_is_the_training_sets(tmp_path):
    arrays = write_npz(tmp_path, "cifar10", 30, 9)
    ds = data.load_dataset("cifar10", data_dir=str(tmp_path), validation_size=10)
    train_ids = decode_index(ds.splits["train"].get(np.arange(20))[0] / 255, None)
    x_train = arrays["x_train"][train_ids].astype(np.float64) / 255  # validation excluded
    pipes = [
        data.Pipeline(ds, 2, normalize="per_pixel_mean", process_index=p, process_count=2)
        for p in range(2)
    ]
    for pipe in pipes:  # every process normalises with the whole training split's mean
        np.testing.assert_allclose(pipe.mean, x_train.mean(axis=0), atol=1e-6)
        np.testing.assert_array_equal(pipe.std, np.ones(3))
    test = next(pipes[0].eval_batches())
    x_test = arrays["x_test"][:1].astype(np.float64) / 255
    np.testing.assert_allclose(test["image"], x_test - x_train.mean(axis=0), atol=1e-6)


def test_per_channel_statistics(tmp_path):
    arrays = write_npz(tmp_path, "cifar10", 30, 9)
    pipe = data.Pipeline(
        data.load_dataset("cifar10", data_dir=str(tmp_path)),
        5,
        normalize="per_channel",
        process_index=0,
        process_count=1,
    )
    x = arrays["x_train"].astype(np.float64) / 255
    np.testing.assert_allclose(pipe.mean, x.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(pipe.std, x.std(axis=(0, 1, 2)), rtol=1e-5)
    b = next(pipe.train_batches(0))
    ref = (arrays["x_train"][pipe.train_order(0)[:5]] / 255 - x.mean((0, 1, 2))) / x.std((0, 1, 2))
    np.testing.assert_allclose(b["image"], ref, atol=1e-5)


def test_imagenet_views_match_full_resize_then_slice():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    # Shorter side unchanged, no flip: the exact slice of the original.
    np.testing.assert_array_equal(
        aug.random_scale_crop(img, (20, 30), 50, np.array([0.5, 0.5]), False), img[15:35, 20:50]
    )
    for short in (30, 100):  # shrinking and enlarging
        full = np.asarray(
            Image.fromarray(img).resize((round(70 * short / 50), short), Image.BILINEAR)
        ).astype(int)
        u = np.array([0.99, 0.0])
        top, left = int(0.99 * (short - 20 + 1)), 0
        crop = aug.random_scale_crop(img, (20, 30), short, u, True)
        assert np.abs(crop - full[top : top + 20, left : left + 30][:, ::-1]).max() <= 1
    centre = aug.center_view(img, (24, 24), ratio=256 / 224)
    full = np.asarray(Image.fromarray(img).resize((38, 27), Image.BILINEAR)).astype(int)
    assert np.abs(centre - full[1:25, 7:31]).max() <= 1
    shorts, corners, _ = aug.draw_imagenet_params(rng, 2000, 224)
    assert shorts.min() == 256 and shorts.max() == 480 and corners.max() < 1


# ------------------------------------------------------------------ prefetch, bad arguments


def test_prefetch_to_device(tmp_path):
    pipe = make_pipe(tmp_path)
    host = list(pipe.train_batches(0))
    sharding = jax.sharding.NamedSharding(
        jax.make_mesh((1,), ("batch",)), jax.sharding.PartitionSpec("batch")
    )
    for kwargs in ({}, {"sharding": sharding, "size": 1}):
        dev = list(data.prefetch_to_device(pipe.train_batches(0), **kwargs))
        assert len(dev) == 5 and isinstance(dev[0]["image"], jax.Array)
        for h, d in zip(host, dev):
            np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
    import threading

    def endless():
        while True:
            yield {"x": np.zeros((4, 8), np.float32)}

    it = data.prefetch_to_device(endless(), size=1)
    next(it)
    it.close()  # leaving early must not hang, and must not leave the producer running: a daemon
    # thread still inside device_put at interpreter exit aborts the process (seen
    # in the resume tests)
    assert not [t for t in threading.enumerate() if t.name == "prefetch_to_device"]

    def failing():
        yield {"x": np.zeros(2)}
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        list(data.prefetch_to_device(failing()))
    with pytest.raises(ValueError, match="size"):
        data.prefetch_to_device(iter([]), size=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch=7, process_count=2), "global_batch_size must be a positive multiple"),
        (dict(batch=48), "no full global batch of 48"),
        (dict(augment="mixup"), "augment must be one of"),
        (dict(normalize="zca"), "normalize must be one of"),
        (dict(process_index=2, process_count=2), "process_index must lie in"),
        (dict(eval_split="validation"), "validation_size=N"),
        (dict(mean=np.zeros(3)), "both mean and std"),
        (dict(mean=np.zeros(4), std=np.ones(4)), "must broadcast"),
        (dict(mean=np.zeros((2, 1, 1, 1)), std=np.ones(3)), "must broadcast"),
        (dict(eval_batch_size=0), "eval_batch_size"),
    ],
)
def test_pipeline_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_pipe(tmp_path, **kwargs)


@pytest.mark.parametrize("num_threads", [-1, 0, 1.5, "4", True])
def test_pipeline_num_threads_is_validated(tmp_path, num_threads):
    with pytest.raises(ValueError, match=r"num_threads must be a positive int \(or None"):
        make_pipe(tmp_path, num_threads=num_threads)
    with pytest.raises(ValueError, match=r"num_threads must be a positive int \(or None"):
        data.load_dataset("digits", num_threads=num_threads)


def test_per_channel_on_a_constant_channel_says_what_to_do(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    x[..., 1] = 7  # channel 1 constant
    src = data.ArraySource(x, np.zeros(8, np.int32))
    ds = data.Dataset("c", 10, (4, 4, 3), {"train": src, "test": src}, "")
    with pytest.raises(ValueError) as e:
        data.Pipeline(ds, 4, normalize="per_channel", process_index=0, process_count=1)
    msg = str(e.value)
    assert "channel 1" in msg and "constant" in msg
    for fix in ("normalize='scale'", "normalize='per_pixel_mean'", "mean=", "std="):
        assert fix in msg
    data.Pipeline(ds, 4, normalize="scale", process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"std must be positive and finite.*channel\(s\) \[2\]"):
        data.Pipeline(
            ds, 4, mean=np.zeros(3), std=[1.0, 1.0, 0.0], process_index=0, process_count=1
        )


def test_bad_epoch_step_and_split(tmp_path):
    pipe = make_pipe(tmp_path)
    with pytest.raises(ValueError, match="epoch"):
        pipe.train_batches(-1)
    with pytest.raises(ValueError, match=r"start_step must be an int in \[0, 5\]"):
        pipe.train_batches(0, start_step=6)
    with pytest.raises(ValueError, match="split must be one of"):
        pipe.eval_batches("val")
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 40\)"):
        pipe.ds.splits["train"].get(np.array([40]))
