"""TinyShapes: a small built-in, procedurally generated segmentation dataset.

It lets the whole pipeline (training, evaluation, notebooks, tests) run with no downloads. Each
sample is generated on demand from a seed that depends only on the split and the sample index,
so it is fully deterministic. Images show a textured, noisy background with 2-4 overlapping
shapes; classes are background, rectangle, disk and triangle. Each shape class has its own base
colour and stripe texture, jittered per shape, so colour alone is a strong but imperfect cue.
"""

from __future__ import annotations

import numpy as np

from .datasets import SegDataset

TINY_CLASSES = ["background", "rectangle", "disk", "triangle"]
TINY_PALETTE = [(0, 0, 0), (230, 80, 60), (60, 180, 75), (70, 100, 230)]
_SPLIT_SEED = {"train": 0, "val": 100_000, "test": 200_000}
_DEFAULT_N = {"train": 48, "val": 16, "test": 16}
# Base colour of each shape class in the image (differs from the visualisation palette).
_BASE_COLOUR = np.array([[0, 0, 0], [200, 90, 70], [80, 170, 90], [90, 110, 200]], np.float32)


class TinyShapes(SegDataset):
    """``TinyShapes(split, n=None, size=(96, 72))``: ``n`` images of ``size`` = (width, height).

    Names are ``tiny_0000``, ``tiny_0001``, ...; sample ``i`` of a split is seeded by
    ``split offset + i``, so different splits contain different images.
    """

    num_classes = 4
    class_names = TINY_CLASSES
    palette = TINY_PALETTE

    def __init__(self, split: str = "train", n: int | None = None, size=(96, 72)):
        if split not in _SPLIT_SEED:
            raise ValueError(f"TinyShapes split must be one of {list(_SPLIT_SEED)}, got {split!r}")
        self.split, self.size = split, tuple(size)
        n = _DEFAULT_N[split] if n is None else int(n)
        super().__init__()
        self.names = [f"tiny_{i:04d}" for i in range(n)]

    def load_name(self, name: str):
        if not (name.startswith("tiny_") and name[5:].isdigit()):
            raise KeyError(f"not a TinyShapes sample name: {name!r}")
        return make_tiny_sample(_SPLIT_SEED[self.split] + int(name[5:]), self.size)


def make_tiny_sample(seed: int, size=(96, 72)) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 [H,W,3], label int64 [H,W]) sample, deterministic in ``seed``."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    label = np.zeros((h, w), np.int64)
    # background: smooth colour gradient
    c0, c1 = rng.uniform(40, 140, 3), rng.uniform(40, 140, 3)
    t = (xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1)) % 1.0
    image = c0 * (1 - t[..., None]) + c1 * t[..., None]
    for _ in range(rng.integers(2, 5)):
        cls = int(rng.integers(1, 4))
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        r = rng.uniform(0.1, 0.25) * min(w, h) + 3
        if cls == 1:  # rectangle
            rw, rh = r * rng.uniform(0.7, 1.5), r * rng.uniform(0.7, 1.5)
            mask = (np.abs(xx - cx) <= rw) & (np.abs(yy - cy) <= rh)
        elif cls == 2:  # disk
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:  # triangle: inside three half-planes
            ang = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3
            px, py = cx + 1.3 * r * np.cos(ang), cy + 1.3 * r * np.sin(ang)
            signs = []
            for k in range(3):
                ax, ay, bx, by = px[k], py[k], px[(k + 1) % 3], py[(k + 1) % 3]
                signs.append((bx - ax) * (yy - ay) - (by - ay) * (xx - ax) >= 0)
            mask = (signs[0] == signs[1]) & (signs[1] == signs[2])
        colour = _BASE_COLOUR[cls] + rng.uniform(-25, 25, 3)
        period = 3.0 + 2.0 * cls
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + (cls - 2) * yy) / period)
        texture = colour * (0.8 + 0.3 * stripes[..., None])
        image[mask] = texture[mask]
        label[mask] = cls
    image = image + rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


TINY_OVERRIDES = {"dataset": "tiny", "ratio": "1/4", "base_size": None, "eval_size": None}


def camvid_or_tiny(split="train"):
    """CamVid from ``$SEMISEG_DATA`` if it is there, else the built-in TinyShapes, said loudly.

    Returns ``(dataset, config overrides)``: no overrides for CamVid, ``TINY_OVERRIDES`` otherwise
    (used by the notebooks so they run on any machine).
    """
    from .datasets import CamVid

    try:
        return CamVid(None, split), {}
    except FileNotFoundError as err:
        print("=" * 78)
        print(f"CamVid NOT FOUND: {err}")
        print("FALLING BACK to the built-in TinyShapes data: the images below are synthetic shapes.")
        print("=" * 78)
        return TinyShapes(split), dict(TINY_OVERRIDES)
