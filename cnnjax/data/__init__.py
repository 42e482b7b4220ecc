"""Input pipelines: data sets (tfds, embedded digits, local .npz), batching, augmentation.

ds = data.load_dataset('cifar10', data_dir='shared/data', validation_size=5000)
pipe = data.Pipeline(ds, 128, augment='cifar', normalize='per_pixel_mean', seed=0)
for batch in data.prefetch_to_device(pipe.train_batches(epoch)): ...
for batch in pipe.eval_batches('test'): ...  # padded; batch['mask'] marks real examples
"""

from cnnjax.data import augment, device
from cnnjax.data.pipeline import (
    AUGMENTATIONS,
    FIXED_NORMALIZATIONS,
    NORMALIZATIONS,
    Pipeline,
    prefetch_to_device,
    shard_indices,
    training_statistics,
)
from cnnjax.data.sources import (
    ArraySource,
    Dataset,
    SubsetSource,
    TfdsSource,
    list_datasets,
    load_dataset,
)

__all__ = [
    "AUGMENTATIONS",
    "FIXED_NORMALIZATIONS",
    "NORMALIZATIONS",
    "ArraySource",
    "Dataset",
    "Pipeline",
    "SubsetSource",
    "TfdsSource",
    "augment",
    "device",
    "list_datasets",
    "load_dataset",
    "prefetch_to_device",
    "shard_indices",
    "training_statistics",
]
