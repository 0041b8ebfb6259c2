"""Data: data sets by name (load_data -> DataBundle), nested class-balanced
subsets, and device-side loaders (make_loaders) for the trainer.

- shapes.py    the built-in `shapes` task (generated, no download)
- datasets.py  names -> DataBundle (files, downloads, subsets, resizing)
- subsets.py   nested class-balanced subsets for data-size studies
- augment.py   on-device crop/flip, normalisation, mixup/CutMix
- loaders.py   the in-memory and ImageFolder loader pipelines
"""

from vitexp.data.augment import batch_mixer, normalize, random_crop_flip
from vitexp.data.datasets import DATASETS, DataBundle, check_data, dataset_info, default_data_dir, load_data, locate
from vitexp.data.loaders import make_loaders
from vitexp.data.shapes import make_shapes
from vitexp.data.subsets import balanced_subset, subset_size

__all__ = ["DATASETS", "DataBundle", "balanced_subset", "batch_mixer", "check_data", "dataset_info", "default_data_dir", "load_data", "locate",
           "make_loaders", "make_shapes", "normalize", "random_crop_flip", "subset_size"]
