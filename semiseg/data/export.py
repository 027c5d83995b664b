"""Write any dataset in the ``folder`` layout, with colour masks as real datasets ship them.

Used by the book's *Train on your own data* page to build a ``folder`` dataset offline (from
CamVid, or from the built-in TinyShapes)::

    <root>/palette.txt                       "name R G B" per line, "ignore R G B" -> 255
    <root>/<split>/images/<name>.png         RGB images
    <root>/<split>/masks/<name>.png          colour masks: RGB, or P-mode with a shuffled palette

Every ``p_mode_every``-th mask is a palette (P-mode) PNG whose embedded palette lists the colours
in a per-file shuffled order (no colour at its class's index), so its raw indices are *not*
class indices: :class:`semiseg.data.FolderDataset` must read it through its own palette.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import IGNORE_INDEX

IGNORE_COLOUR = (255, 255, 255)  # in neither the CamVid nor the TinyShapes palette


def write_palette(root, class_names, palette, ignore_colour=IGNORE_COLOUR) -> Path:
    """``<root>/palette.txt``: one "name R G B" line per class, then the ignore colour."""
    colours = [tuple(int(v) for v in c) for c in palette]
    if tuple(ignore_colour) in colours:
        raise ValueError(f"ignore colour {tuple(ignore_colour)} is also a class colour")
    lines = [f"{name} {r} {g} {b}" for name, (r, g, b) in zip(class_names, colours)]
    lines.append("ignore {} {} {}".format(*ignore_colour))
    path = Path(root) / "palette.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def derangement(n, rng) -> np.ndarray:
    """A random permutation of ``range(n)`` that leaves no element in place (n >= 2)."""
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


def colour_mask(label, palette, ignore_colour=IGNORE_COLOUR) -> Image.Image:
    """[H, W] class indices (255 = ignore) -> an RGB mask image."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    lut[IGNORE_INDEX] = ignore_colour
    return Image.fromarray(lut[np.asarray(label, np.int64)], mode="RGB")


def shuffled_palette_mask(label, palette, rng, ignore_colour=IGNORE_COLOUR) -> Image.Image:
    """[H, W] class indices -> a P-mode mask whose palette holds the class colours and the ignore
    colour in a shuffled order: colour k of ``palette`` sits at index ``slot[k]`` != k."""
    colours = [tuple(c) for c in palette] + [tuple(ignore_colour)]
    slot = derangement(len(colours), rng)  # colour k -> palette index slot[k]
    embedded = [None] * len(colours)
    for k, s in enumerate(slot):
        embedded[s] = colours[k]
    lut = np.zeros(256, np.uint8)
    lut[: len(palette)] = slot[: len(palette)]
    lut[IGNORE_INDEX] = slot[-1]
    image = Image.fromarray(lut[np.asarray(label, np.int64)], mode="P")
    image.putpalette([v for c in embedded for v in c])
    return image


def export_split(dataset, root, split, n, size=None, p_mode_every=3, seed=0):
    """Write ``n`` samples of ``dataset`` (evenly spread over its sorted names) to
    ``<root>/<split>/{images,masks}``, resized to ``size`` = [W, H] (None: as they are).

    Returns ``{name: (mask mode, class map as written)}``; the class map is uint8 (255 = ignore).
    """
    rng = np.random.default_rng(seed)
    img_dir, mask_dir = Path(root) / split / "images", Path(root) / split / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    picks = np.unique(np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int))
    written = {}
    for k, i in enumerate(picks.tolist()):
        name = dataset.names[i]
        image, label = dataset.load(i)
        image, label = Image.fromarray(image), Image.fromarray(label.astype(np.uint8), mode="L")
        if size is not None:
            image = image.resize(tuple(size), Image.BILINEAR)
            label = label.resize(tuple(size), Image.NEAREST)
        label = np.asarray(label)
        image.save(img_dir / f"{name}.png")
        if p_mode_every and k % p_mode_every == p_mode_every - 1:
            mask = shuffled_palette_mask(label, dataset.palette, rng)
        else:
            mask = colour_mask(label, dataset.palette)
        mask.save(mask_dir / f"{name}.png")
        written[name] = (mask.mode, label)
    return written
