"""Labeled / unlabeled split lists.

A split is two sorted lists of sample names stored as text files::

    data/splits/<dataset>/<ratio, "/" -> "-">/split<k>/{labeled,unlabeled}.txt

e.g. ``data/splits/camvid/1-8/split0/labeled.txt``. Lists are made by :func:`make_split`, which
sorts the names before drawing a seeded permutation, so a split depends only on the set of names,
the labeled count and the seed -- never on directory-walk order. **Split k uses seed k.**
The number of labeled images is ``ceil(n_total * a / b)`` for ratio ``a/b``, which gives the
paper's counts (Cityscapes 1/8 -> 372, VOC 1/50 -> 212, CamVid 1/8 -> 46, ...).

Generate lists with::

    python -m semiseg.data.splits camvid --ratios 1/4 1/8 1/16 --splits 0 1 2
    python -m semiseg.data.splits folder --root /path/to/mydata --ratios 1/8   # names from train/

The lists live in the repo's ``data/splits``; set ``SEMISEG_SPLITS`` to use another folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np


def splits_root() -> Path:
    """Folder holding the split lists: ``$SEMISEG_SPLITS`` or ``<repo>/data/splits``."""
    env = os.environ.get("SEMISEG_SPLITS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "splits"


def parse_ratio(ratio: str) -> tuple[int, int]:
    """``"1/8"`` or ``"1-8"`` -> ``(1, 8)``."""
    try:
        a, b = str(ratio).replace("-", "/").split("/")
        a, b = int(a), int(b)
        assert 0 < a <= b
    except (ValueError, AssertionError):
        raise ValueError(f"ratio must look like '1/8', got {ratio!r}") from None
    return a, b


def num_labeled(dataset_name: str, n_total: int, ratio: str) -> int:
    """Number of labeled images for ``ratio`` (``"a/b"``): ``ceil(n_total * a / b)``.

    ``dataset_name`` is only used in error messages.
    """
    a, b = parse_ratio(ratio)
    n = -(-n_total * a // b)
    if not 1 <= n <= n_total:
        raise ValueError(f"{dataset_name}: ratio {ratio} of {n_total} images gives {n} labeled")
    return n


def make_split(names, n_labeled: int, seed: int) -> tuple[list[str], list[str]]:
    """Draw ``n_labeled`` names at random (seeded); returns sorted ``(labeled, unlabeled)``."""
    names = sorted(names)
    if len(set(names)) != len(names):
        raise ValueError("make_split: duplicate sample names")
    if not 0 < n_labeled <= len(names):
        raise ValueError(f"make_split: n_labeled={n_labeled} but {len(names)} names")
    perm = np.random.default_rng(seed).permutation(len(names))
    chosen = set(perm[:n_labeled].tolist())
    labeled = [n for i, n in enumerate(names) if i in chosen]
    unlabeled = [n for i, n in enumerate(names) if i not in chosen]
    return labeled, unlabeled


def split_dir(dataset: str, ratio: str, split: int) -> Path:
    """``<splits root>/<dataset>/<ratio with / -> ->/split<k>``."""
    return splits_root() / dataset / str(ratio).replace("/", "-") / f"split{int(split)}"


def _write_atomic(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{n}\n" for n in lines))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_split(dataset: str, ratio: str, split: int, labeled, unlabeled) -> Path:
    """Write ``labeled.txt`` and ``unlabeled.txt`` atomically; returns the split folder."""
    d = split_dir(dataset, ratio, split)
    _write_atomic(d / "labeled.txt", list(labeled))
    _write_atomic(d / "unlabeled.txt", list(unlabeled))
    return d


def _gen_command(dataset: str, ratio: str, split: int) -> str:
    return f"python -m semiseg.data.splits {dataset} --ratios {ratio} --splits {split}"


def read_split(dataset: str, ratio: str, split: int) -> tuple[list[str], list[str]]:
    """Read ``(labeled, unlabeled)`` name lists written by :func:`write_split`."""
    d = split_dir(dataset, ratio, split)
    out = []
    for fname in ("labeled.txt", "unlabeled.txt"):
        path = d / fname
        if not path.is_file():
            raise FileNotFoundError(f"split list not found: {path} (generate it with: "
                                    f"{_gen_command(dataset, ratio, split)})")
        out.append([ln.strip() for ln in path.read_text().splitlines() if ln.strip()])
    if not out[0]:
        raise ValueError(f"{d / 'labeled.txt'}: labeled split list is empty")
    return out[0], out[1]


def generate(dataset: str, ratios, splits, root=None, image_split: str = "train") -> list[Path]:
    """Make and write split lists for every ratio and split index (split k uses seed k)."""
    from .registry import build_dataset

    names = build_dataset(dataset, image_split, root).names
    written = []
    for ratio in ratios:
        n = num_labeled(dataset, len(names), ratio)
        for k in splits:
            written.append(write_split(dataset, ratio, k, *make_split(names, n, seed=int(k))))
    return written


def main(argv=None) -> None:
    """Command line: write the lists and print their counts; bad data exits with one line."""
    from ..config import one_line_errors

    p = argparse.ArgumentParser(prog="python -m semiseg.data.splits",
                                description="Generate labeled/unlabeled split lists "
                                            "(split k is drawn with seed k).")
    p.add_argument("dataset", help="camvid, cityscapes, voc, gta5, folder or tiny")
    p.add_argument("--ratios", nargs="+", default=["1/8"], help="labeled ratios, e.g. 1/8 1/4")
    p.add_argument("--splits", nargs="+", type=int, default=[0], help="split indices (= seeds)")
    p.add_argument("--root", default=None, help="data root (default $SEMISEG_DATA or ./data); for "
                                                "folder, the dataset folder ($SEMISEG_DATA/folder)")
    p.add_argument("--image-split", default="train", help="dataset split to draw names from")
    args = p.parse_args(argv)
    with one_line_errors():
        written = generate(args.dataset, args.ratios, args.splits, args.root, args.image_split)
    for d in written:
        n_lab = len((d / "labeled.txt").read_text().splitlines())
        n_unl = len((d / "unlabeled.txt").read_text().splitlines())
        print(f"{d}: {n_lab} labeled, {n_unl} unlabeled")


if __name__ == "__main__":
    main()
