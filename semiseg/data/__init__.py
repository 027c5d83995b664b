"""Datasets, the built-in TinyShapes dataset and labeled/unlabeled split lists."""

from .datasets import (CLASS_NAMES, GTA5, IGNORE_INDEX, VOC, CamVid, Cityscapes, FolderDataset,
                       SegDataset, data_root)
from .registry import build_dataset
from .tiny import TinyShapes, camvid_or_tiny

_SPLIT_API = ("make_split", "num_labeled", "read_split", "split_dir", "write_split")

__all__ = ["CLASS_NAMES", "GTA5", "IGNORE_INDEX", "VOC", "CamVid", "Cityscapes", "FolderDataset",
           "SegDataset", "TinyShapes", "build_dataset", "camvid_or_tiny", "data_root", *_SPLIT_API]


def __getattr__(name):
    # Lazy, so that `python -m semiseg.data.splits` does not import the module twice.
    if name in _SPLIT_API:
        from . import splits
        return getattr(splits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
