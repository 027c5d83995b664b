"""``build_dataset(name, split, root)``: every dataset by name (the one module that knows them all)."""

from __future__ import annotations

from .datasets import GTA5, VOC, CamVid, Cityscapes, FolderDataset, SegDataset
from .tiny import TinyShapes


def build_dataset(name: str, split: str = "train", root=None) -> SegDataset:
    """Build a dataset by name: camvid, cityscapes, voc, gta5, folder, tiny."""
    builders = {"camvid": CamVid, "cityscapes": Cityscapes, "voc": VOC, "gta5": GTA5,
                "folder": FolderDataset}
    key = name.lower()
    if key == "tiny":
        return TinyShapes(split)
    if key not in builders:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join([*builders, 'tiny'])}")
    return builders[key](root, split)
