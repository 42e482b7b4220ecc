"""Data sets as random-access sources: embedded digits, local `.npz` files, tensorflow-datasets.

`load_dataset(name, ...)` returns a `Dataset` whose splits ('train', 'test', optionally
'validation') are sources with `len()`, `get(indices) -> (uint8 NHWC images, int32 labels)` and
`get_raw(indices) -> (list of uint8 HWC images, int32 labels)`. The small data sets live in
memory as arrays (`ArraySource`); imagenet2012 is read lazily through `tfds.data_source`
(`TfdsSource`, decoded on the fly), never loaded whole. TensorFlow is never imported.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from cnnjax._checks import is_int
from cnnjax.data import augment

# name -> (num_classes, tfds name of our 'test' split); 'digits' is embedded (scikit-learn).
_DATASETS = {
    "digits": (10, None),
    "mnist": (10, "test"),
    "fashion_mnist": (10, "test"),
    "cifar10": (10, "test"),
    "cifar100": (100, "test"),
    "imagenet2012": (1000, "validation"),  # tfds 'test' is unlabelled; 'validation' is the 50k set
}
_LAZY = ("imagenet2012",)  # too large for memory: read and decode per example
DIGITS_TEST_SIZE = 360  # of scikit-learn's 1797 digits (20%), chosen by a fixed permutation
DIGITS_DEFAULT_SIZE = (32, 32, 3)  # the CIFAR networks' input: `digits` runs them unchanged
IMAGENET_DEFAULT_SIZE = (224, 224, 3)


class Source(Protocol):
    """A random-access split: `len()`, `get(indices)`, `get_raw(indices)`, `in_memory`."""

    in_memory: bool
    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def get_raw(self, indices: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]: ...


def _check_indices(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    return idx


class ArraySource:
    """A split held in memory: uint8 images [N, H, W, C] and int32 labels [N]."""

    in_memory = True

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 NHWC, got {images.dtype} {images.shape}")
        if min(images.shape[1:]) < 1:
            raise ValueError(
                f"images must have positive height, width and channels, got {images.shape}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels {labels.shape} do not match {len(images)} images")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers (class indices), got {labels.dtype}")
        self.images, self.labels = images, labels.astype(np.int32)
        self.image_shape = tuple(int(s) for s in images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def get(self, indices):
        idx = _check_indices(indices, len(self))
        return self.images[idx], self.labels[idx]

    def get_raw(self, indices):
        images, labels = self.get(indices)
        return list(images), labels


class SubsetSource:
    """The examples `indices` of another source, in that order."""

    def __init__(self, base, indices: np.ndarray):
        self.base, self.indices = base, _check_indices(indices, len(base))
        self.in_memory, self.image_shape = base.in_memory, base.image_shape

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, indices):
        return self.base.get(self.indices[_check_indices(indices, len(self))])

    def get_raw(self, indices):
        return self.base.get_raw(self.indices[_check_indices(indices, len(self))])


class TfdsSource:
    """A tfds split read through `tfds.data_source`, decoded per example by a thread pool.

    `get` returns the evaluation view (shorter side to 256/224 of the crop, centre crop) at
    `image_shape`; `get_raw` the decoded images at their own sizes (for scale augmentation).
    """

    in_memory = False

    def __init__(self, data_source: Sequence, image_shape: tuple[int, int, int], num_threads: int):
        self.data_source, self.image_shape = data_source, tuple(int(s) for s in image_shape)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))

    def __len__(self) -> int:
        return len(self.data_source)

    def _read(self, i: int):
        ex = self.data_source[int(i)]
        return augment.convert_channels(np.asarray(ex["image"]), self.image_shape[2]), ex["label"]

    def get_raw(self, indices):
        items = list(self._pool.map(self._read, _check_indices(indices, len(self))))
        return [im for im, _ in items], np.array([lab for _, lab in items], np.int32)

    def get(self, indices):
        images, labels = self.get_raw(indices)
        if not images:
            return np.zeros((0, *self.image_shape), np.uint8), labels
        views = self._pool.map(augment.center_view, images, [self.image_shape[:2]] * len(images))
        return np.stack(list(views)), labels


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded data set.

    Attributes:
      name: data set name.
      num_classes: number of classes; labels lie in [0, num_classes).
      image_shape: (H, W, C) of the images `get` returns.
      splits: 'train', 'test' and, when asked for, 'validation' (carved from the training set).
      origin: where the data came from ('scikit-learn', the `.npz` path or the tfds data_dir).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    splits: dict[str, Source]
    origin: str

    def identity(self, sample: int = 64) -> dict:
        """What a resumed run checks it trains on the same data: the name, classes, image shape,
        split sizes and a fingerprint (SHA-256 of `sample` evenly spaced training examples)."""
        train = self.splits["train"]
        idx = np.unique(np.linspace(0, len(train) - 1, min(sample, len(train))).astype(np.int64))
        images, labels = train.get(idx)
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
        digest.update(np.asarray(labels, np.int64).tobytes())
        return {
            "name": self.name,
            "num_classes": int(self.num_classes),
            "image_shape": [int(s) for s in self.image_shape],
            "sizes": {k: len(v) for k, v in sorted(self.splits.items())},
            "fingerprint": digest.hexdigest()[:16],
        }


def list_datasets() -> list[str]:
    """Names `load_dataset` knows; any `<name>.npz` in `data_dir` loads as well."""
    return list(_DATASETS)


def _parse_size(image_size, channels, default: tuple[int, int, int] | None):
    """Validated (h, w) or None, and channels or None; `default` fills the unset parts."""
    if image_size is None:
        hw = default[:2] if default else None
    else:
        hw = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
        if not (
            isinstance(hw, (tuple, list))
            and len(hw) == 2
            and all(
                isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in hw
            )
        ):
            raise ValueError(
                f"image_size must be a positive int or (height, width), got {image_size!r}"
            )
        hw = (int(hw[0]), int(hw[1]))
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(
            f"channels must be 1 or 3 (or None to keep the data set's), got {channels!r}"
        )
    return hw, channels if channels is not None else (default[2] if default else None)


def _fit(images: np.ndarray, hw, channels) -> np.ndarray:
    if hw is not None:
        images = augment.resize_images(images, hw)
    return augment.convert_channels(images, channels) if channels is not None else images


def _load_digits(hw, channels):
    from sklearn.datasets import load_digits  # sklearn takes seconds to import: only here

    d = load_digits()
    # Pixel values are counts 0..16 of set bits in 4x4 blocks of the 32x32 scans.
    images = np.rint(d.images * (255 / 16)).astype(np.uint8)[..., None]
    images, labels = _fit(images, hw, channels), d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(images))
    test, train = np.sort(perm[:DIGITS_TEST_SIZE]), np.sort(perm[DIGITS_TEST_SIZE:])
    return {
        "train": ArraySource(images[train], labels[train]),
        "test": ArraySource(images[test], labels[test]),
    }


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_CONTENT = (
    "a data set file is a NumPy .npz archive (np.savez or np.savez_compressed) holding "
    "x_train, y_train, x_test, y_test (uint8 images NHWC or NHW, integer labels)"
)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The four arrays of a data set `.npz`; one ValueError naming the file for any defect."""
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # BadZipFile, EOFError, "pickled data", OSError: all unreadable
        raise ValueError(
            f"{path} is not a readable .npz archive (corrupt or truncated: "
            f"{type(e).__name__}: {e}); {_NPZ_CONTENT}. Rewrite it, or remove it to fall back "
            "to tfds"
        ) from e
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} holds a single .npy array, not a .npz archive; {_NPZ_CONTENT}. Rewrite it "
            "with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        )
    with f:
        missing = set(_NPZ_KEYS) - set(f.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; {_NPZ_CONTENT}")
        arrays = {}
        for k in _NPZ_KEYS:
            try:
                arrays[k] = f[k]
            except ValueError as e:
                if "allow_pickle" not in str(e):
                    raise ValueError(
                        f"{path}: array {k} cannot be read ({e}); {_NPZ_CONTENT}"
                    ) from e
                raise ValueError(
                    f"{path}: {k} holds Python objects (dtype=object), which are not loaded "
                    f"(that would unpickle arbitrary code); {_NPZ_CONTENT}. Save {k} as a "
                    "numeric array, e.g. np.stack(images).astype(np.uint8)"
                ) from e
            except Exception as e:  # a damaged member: bad CRC, zlib error, truncated data
                raise ValueError(
                    f"{path} is not a readable .npz archive (array {k} is corrupt or truncated: "
                    f"{type(e).__name__}: {e}); {_NPZ_CONTENT}. Rewrite it"
                ) from e
    return arrays


def _load_npz(path: str, hw, channels):
    arrays = _read_npz(path)
    splits = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:  # NHW grey
            x = x[..., None]
        if (
            x.dtype != np.uint8
            or x.ndim != 4
            or not np.issubdtype(y.dtype, np.integer)
            or y.shape != x.shape[:1]
        ):
            raise ValueError(
                f"{path}: x_{split} must be uint8 [N, H, W, C] and y_{split} integer [N]; "
                f"got {x.dtype} {x.shape} and {y.dtype} {y.shape}"
            )
        if min(x.shape[1:]) < 1:
            raise ValueError(
                f"{path}: x_{split} images must have positive height, width and channels, "
                f"got shape {x.shape}"
            )
        if split == "train" and len(x) == 0:
            raise ValueError(
                f"{path}: the training split is empty (x_train holds no examples); "
                "a data set needs at least one training example"
            )
        splits[split] = ArraySource(_fit(x, hw, channels), y)
    if splits["train"].images.shape[1:] != splits["test"].images.shape[1:]:
        raise ValueError(
            f"{path}: train images {splits['train'].images.shape[1:]} and test images "
            f"{splits['test'].images.shape[1:]} differ in shape"
        )
    return splits


def _missing_message(name: str, data_dir, tfds_dir: str, version_dir: str, cause: str) -> str:
    npz = _npz_path(name, data_dir)
    msg = (
        f"Data set {name!r} is not available offline. Looked for the local file {npz} "
        f"and for a prepared tfds data set in {tfds_dir} (expected {version_dir}: {cause}). "
        f"Provide it as DIR/{name}.npz holding x_train, y_train, x_test, y_test "
        f"(uint8 NHWC images, integer labels) and pass the directory as data_dir=DIR "
        f"(load_dataset, TrainConfig), --data_dir DIR (python -m cnnjax train) or "
        f"--data_dir DIR (the experiments scripts, python -m experiments.*); or prepare it "
        f"for tfds in array_record format "
        f'(`builder.download_and_prepare(file_format="array_record")` with network access, or '
        f"load_dataset(..., download=True))."
    )
    if name == "imagenet2012":
        msg += (
            f" imagenet2012 cannot be downloaded: put ILSVRC2012_img_train.tar and "
            f"ILSVRC2012_img_val.tar in the tfds manual directory "
            f"{os.path.join(tfds_dir, 'downloads', 'manual')} and prepare it there."
        )
    return msg


def _tfds_splits(name: str, data_dir, shape: tuple, download: bool, num_threads: int):
    """Splits from `tfds.data_source`; `shape` is ((h, w) or None, channels or None)."""
    try:
        import tensorflow_datasets as tfds  # only the tfds path pays for its import
    except (
        ImportError
    ) as e:  # a declared dependency, but an image may lack it (seen on a GPU machine)
        npz = _npz_path(name, data_dir)
        raise ValueError(
            f"Data set {name!r}: no local file {npz}, and tensorflow-datasets, "
            f"which reads the prepared tfds copies, is not installed ({e}). "
            "Install it (pip install tensorflow-datasets) or provide "
            f"DIR/{name}.npz ({_NPZ_CONTENT}) and pass data_dir=DIR."
        ) from e

    builder = tfds.builder(name, data_dir=data_dir)
    tfds_dir = os.path.dirname(os.path.dirname(builder.data_dir))
    missing = functools.partial(_missing_message, name, data_dir, tfds_dir, builder.data_dir)
    if download and not builder.is_prepared():
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # network, manual files, missing TensorFlow: all end the same way
            raise ValueError(missing(f"download failed: {e}")) from e
    names = {"train": "train", "test": _DATASETS[name][1]}
    try:
        raw = {
            k: tfds.data_source(name, split=v, data_dir=data_dir, download=False)
            for k, v in names.items()
        }
    except Exception as e:  # tfds reports a missing data set as a file-format error
        cause = "not prepared" if not builder.is_prepared() else f"cannot be read: {e}"
        raise ValueError(missing(cause)) from e
    if name in _LAZY:
        image_shape = (*shape[0], shape[1])
        return {k: TfdsSource(v, image_shape, num_threads) for k, v in raw.items()}, tfds_dir
    splits = {}
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:  # small: decode once
        for k, v in raw.items():
            items = list(pool.map(v.__getitem__, range(len(v))))
            images = np.stack([np.asarray(ex["image"]) for ex in items])
            labels = np.array([ex["label"] for ex in items], np.int32)
            splits[k] = ArraySource(_fit(images, *shape), labels)
    return splits, tfds_dir


def check_num_threads(num_threads) -> None:
    """Decoding threads: a positive int, or None for min(16, CPU count)."""
    if num_threads is not None and (not is_int(num_threads) or num_threads < 1):
        raise ValueError(
            f"num_threads must be a positive int (or None for min(16, CPU count)), "
            f"got {num_threads!r}"
        )


def _npz_path(name: str, data_dir) -> str:
    """Where a data set's local file is looked for (a placeholder when there is no data_dir)."""
    return os.path.join(data_dir, f"{name}.npz") if data_dir else f"<data_dir>/{name}.npz"


def _carve_validation(splits: dict, validation_size, seed: int) -> dict:
    train = splits["train"]
    if not is_int(validation_size) or not 0 <= validation_size < len(train):
        raise ValueError(
            f"validation_size must be an int in [0, {len(train)}) (the training set "
            f"has {len(train)} examples), got {validation_size!r}"
        )
    if validation_size == 0:
        return splits
    perm = np.random.default_rng(seed).permutation(len(train))
    val, rest = np.sort(perm[:validation_size]), np.sort(perm[validation_size:])
    if isinstance(train, ArraySource):
        new = {
            "train": ArraySource(train.images[rest], train.labels[rest]),
            "validation": ArraySource(train.images[val], train.labels[val]),
        }
    else:
        new = {"train": SubsetSource(train, rest), "validation": SubsetSource(train, val)}
    return {**splits, **new}


def _inferred_num_classes(splits: dict, origin) -> int:
    """1 + the largest label of a set that declares no class count; ValueError when that count is
    implausible: more than twice the distinct labels plus 10 (one stray label, say 1000000, would
    ask for a classifier of a million classes)."""
    labels = {
        k: s.labels for k, s in splits.items() if isinstance(s, ArraySource) and s.labels.size
    }
    num_classes = 1 + max((int(v.max()) for v in labels.values()), default=0)
    distinct = np.unique(np.concatenate(list(labels.values()))) if labels else np.zeros(0)
    if num_classes > 2 * len(distinct) + 10:
        split, y = max(labels.items(), key=lambda kv: kv[1].max())
        i = int(np.argmax(y))
        raise ValueError(
            f"{origin}: the labels imply {num_classes} classes (y_{split}[{i}] = {y[i]}), but only "
            f"{len(distinct)} distinct labels occur; labels must be class indices 0..K-1: fix the "
            "stray label or renumber the classes"
        )
    return num_classes


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    image_size=None,
    channels=None,
    validation_size: int = 0,
    seed: int = 0,
    download: bool = False,
    num_threads: int | None = None,
) -> Dataset:
    """Loads a data set as random-access splits.

    Args:
      name: one of `list_datasets()`, or any name with a `<data_dir>/<name>.npz`.
      data_dir: a directory holding `<name>.npz` (x_train, y_train, x_test, y_test; uint8 NHWC),
        which takes precedence when the file exists, else the tfds data_dir (default: tfds's,
        `$TFDS_DATA_DIR` or ~/tensorflow_datasets).
      image_size: int or (height, width) to resize to (bilinear, antialiased); None keeps the
        native size, except `digits` (8x8 originals) which defaults to 32x32 and imagenet2012
        whose crops default to 224.
      channels: 1 or 3 to convert to (grey replicated, or BT.601 luminance); None keeps the
        native channels, except `digits`, which defaults to 3 (the CIFAR networks' input).
      validation_size: examples carved from the training set (chosen by a permutation seeded
        with `seed`) into a 'validation' split; the 'train' split shrinks accordingly.
      seed: seed of the validation carve-out.
      download: True lets tfds download and prepare a missing data set (needs network; TensorFlow
        may be needed to prepare). Must be a bool; by default nothing is downloaded.
      num_threads: decoding threads for lazily read data sets (default: min(16, CPU count)).

    Returns:
      A `Dataset`.

    Raises:
      ValueError: unknown name, bad arguments, malformed files, or data not available offline
        (the message says where it looked and how to provide the data).
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {name!r}")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(download, (bool, np.bool_)):  # "no" is truthy: it would start a download
        raise ValueError(
            f"download must be True or False (True lets tfds download the data set), "
            f"got {download!r}"
        )
    check_num_threads(num_threads)
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise ValueError(f"data_dir must be a directory path (str) or None, got {data_dir!r}")
    npz = os.path.join(data_dir, f"{name}.npz") if data_dir else None
    if data_dir is not None and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ValueError(
            f"data_dir {data_dir!r} is a file; pass the directory that holds "
            f"{name}.npz or the tfds data"
        )
    if name not in _DATASETS and not (npz and os.path.isfile(npz)):
        where = f"and there is no {npz}" if npz else "(pass data_dir to load <data_dir>/<name>.npz)"
        raise ValueError(f"Unknown data set {name!r}: known are {list_datasets()} {where}")
    num_threads = num_threads or min(16, os.cpu_count() or 1)
    default = {"digits": DIGITS_DEFAULT_SIZE, "imagenet2012": IMAGENET_DEFAULT_SIZE}.get(name)
    hw, ch = _parse_size(image_size, channels, default)
    if npz and os.path.isfile(npz):
        splits, origin = _load_npz(npz, hw, ch), npz
    elif name == "digits":
        splits, origin = _load_digits(hw, ch), "scikit-learn load_digits"
    else:
        splits, origin = _tfds_splits(name, data_dir, (hw, ch), bool(download), num_threads)
    if len(splits["train"]) == 0:
        raise ValueError(
            f"{origin}: the training split is empty (it holds no examples); a data set "
            "needs at least one training example"
        )
    splits = _carve_validation(splits, validation_size, seed)
    num_classes = _DATASETS[name][0] if name in _DATASETS else _inferred_num_classes(splits, origin)
    for split, src in splits.items():
        if (
            isinstance(src, ArraySource)
            and src.labels.size
            and (src.labels.min() < 0 or src.labels.max() >= num_classes)
        ):
            raise ValueError(
                f"{origin}: {split} labels lie in [{src.labels.min()}, "
                f"{src.labels.max()}], outside [0, {num_classes}) for {name!r}"
            )
    return Dataset(name, num_classes, splits["train"].image_shape, splits, str(origin))
