"""Dataset parsing on tiny fixture trees (8x6 images) plus checks on the real CamVid if present."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.data import (CamVid, Cityscapes, FolderDataset, GTA5, TinyShapes, VOC, build_dataset,
                          data_root)

W, H = 8, 6


def rgb(seed=0, w=W, h=H):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(path, arr, mode=None, palette=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(arr, dtype=np.uint8))
    if mode == "P":
        im = im.convert("L").convert("P")  # keeps indices; then give it a colourful palette
        im.putpalette(palette or list(np.random.default_rng(1).integers(0, 256, 768)))
    im.save(path)


def mask(values, w=W, h=H):
    """A mask whose first pixels hold ``values``, the rest 0."""
    m = np.zeros(h * w, np.uint8)
    m[: len(values)] = values
    return m.reshape(h, w)


# ----------------------------------------------------------------------------------- builders

def camvid_tree(root, with_list=True):
    base = root / "camvid"
    lines = []
    for stem, vals in [("0001TP_000010", [0, 11, 10]), ("0006R0_000020", [3, 4])]:
        save(base / "train" / f"{stem}.png", rgb())
        save(base / "trainannot" / f"{stem}.png", mask(vals))
        lines.append(f"/SegNet/CamVid/train/{stem}.png /SegNet/CamVid/trainannot/{stem}.png")
    if with_list:
        (base / "train.txt").write_text("\n".join(lines) + "\n")
    return base


def cityscapes_tree(root):
    base = root / "cityscapes"
    for city, stem, vals in [("bremen", "bremen_000001_000019", [7, 26, 0]),
                             ("aachen", "aachen_000000_000019", [33, 1, 255])]:
        save(base / "leftImg8bit/train" / city / f"{stem}_leftImg8bit.png", rgb())
        save(base / "gtFine/train" / city / f"{stem}_gtFine_labelIds.png", mask(vals))
    return base


def voc_tree(root, two_column=False):
    base = root / "voc"
    ids = ["2007_000033", "2007_000032"]
    for sid, vals in zip(ids, [[0, 20, 255], [15]]):
        save(base / "JPEGImages" / f"{sid}.jpg", rgb())
        save(base / "SegmentationClassAug" / f"{sid}.png", mask(vals), mode="P")
    lst = base / "ImageSets/Segmentation/train_aug.txt"
    lst.parent.mkdir(parents=True)
    lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" if two_column else i for i in ids]
    lst.write_text("\n".join(lines) + "\n")
    return base


def gta5_tree(root):
    base = root / "gta5"
    save(base / "images/00001.png", rgb())
    save(base / "labels/00001.png", mask([7, 26, 24, 3]), mode="P")
    return base


PALETTE_TXT = "background 0 0 0\nroad surface 128 64 128\ncar 0 0 142\nignore 255 255 255\n"


def folder_tree(root, colour=False):
    save(root / "images/b.jpg", rgb())
    save(root / "images/a.png", rgb())
    if colour:
        (root / "palette.txt").write_text(PALETTE_TXT)
        m = np.zeros((H, W, 3), np.uint8)
        m[0, 0] = (128, 64, 128)
        m[0, 1] = (0, 0, 142)
        m[0, 2] = (255, 255, 255)
        save(root / "masks/a.png", m)
        save(root / "masks/b.png", np.zeros((H, W, 3), np.uint8))
    else:
        (root / "classes.txt").write_text("background\nroad\ncar\n")
        save(root / "masks/a.png", mask([1, 2, 255]))
        save(root / "masks/b.png", mask([0]), mode="P")
    return root


# ---------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("with_list", [True, False])
def test_camvid_fixture(tmp_path, with_list):
    camvid_tree(tmp_path, with_list)
    ds = CamVid(tmp_path, "train")
    assert ds.names == ["0001TP_000010", "0006R0_000020"]
    img, lbl = ds[0]
    assert img.shape == (H, W, 3) and img.dtype == np.uint8 and lbl.dtype == np.int64
    assert lbl.flat[:3].tolist() == [0, 255, 10]
    assert CamVid.sequence_of(ds.names[1]) == "0006R0"
    assert len(ds.class_names) == len(ds.palette) == ds.num_classes == 11


def test_cityscapes_fixture(tmp_path):
    cityscapes_tree(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    assert ds.names == ["aachen/aachen_000000_000019", "bremen/bremen_000001_000019"]
    assert ds[1][1].flat[:3].tolist() == [0, 13, 255]
    assert ds[0][1].flat[:3].tolist() == [18, 255, 255]
    assert ds.num_classes == 19 and len(ds.palette) == 19


@pytest.mark.parametrize("two_column", [False, True])
def test_voc_fixture(tmp_path, two_column):
    voc_tree(tmp_path, two_column)
    ds = build_dataset("voc", "train", tmp_path)
    assert ds.names == ["2007_000032", "2007_000033"]
    assert ds[1][1].flat[:3].tolist() == [0, 20, 255]
    assert ds.palette[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)] and len(ds.palette) == 21


def test_gta5_reads_raw_palette_indices(tmp_path):
    gta5_tree(tmp_path)
    ds = GTA5(tmp_path)
    assert Image.open(tmp_path / "gta5/labels/00001.png").mode == "P"
    assert ds.names == ["00001"]
    assert ds[0][1].flat[:4].tolist() == [0, 13, 11, 255]


def test_folder_index_masks(tmp_path):
    folder_tree(tmp_path)
    ds = FolderDataset(tmp_path)
    assert ds.names == ["a", "b"] and ds.class_names == ["background", "road", "car"]
    assert ds[0][1].flat[:4].tolist() == [1, 2, 255, 0]
    assert ds[1][1].max() == 0


def test_folder_colour_masks(tmp_path):
    folder_tree(tmp_path, colour=True)
    ds = build_dataset("folder", "train", tmp_path)
    assert ds.class_names == ["background", "road surface", "car"] and ds.num_classes == 3
    assert ds.palette[2] == (0, 0, 142)
    assert ds[0][1].flat[:4].tolist() == [1, 2, 255, 0]


def test_subset_and_unknown_name(tmp_path):
    cityscapes_tree(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    sub = ds.subset(["bremen/bremen_000001_000019"])
    assert len(sub) == 1 and len(ds) == 2
    np.testing.assert_array_equal(sub[0][1], ds[1][1])
    with pytest.raises(ValueError, match="nope"):
        ds.subset(["nope"])


def test_build_dataset_unknown_name():
    with pytest.raises(ValueError, match="camvid.*tiny"):
        build_dataset("kitti", "train")


def test_data_root_env(monkeypatch):
    monkeypatch.setenv("SEMISEG_DATA", "/x/y")
    assert data_root() == Path("/x/y")


# ----------------------------------------------------------------------------------- errors

def one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        CamVid(tmp_path / "nowhere", "train")
    msg = one_line(e)
    assert str(tmp_path / "nowhere" / "camvid") in msg
    assert "SEMISEG_DATA" in msg and "download_camvid.sh" in msg


def test_image_without_label(tmp_path):
    base = camvid_tree(tmp_path, with_list=False)
    save(base / "train/0016E5_000001.png", rgb())
    with pytest.raises(ValueError, match="0016E5_000001.png") as e:
        CamVid(tmp_path, "train")
    assert "no label" in one_line(e)


def test_size_mismatch(tmp_path):
    base = gta5_tree(tmp_path)
    save(base / "labels/00001.png", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(ValueError) as e:
        GTA5(tmp_path)[0]
    msg = one_line(e)
    assert "images/00001.png" in msg and "labels/00001.png" in msg
    assert f"{W}x{H}" in msg and f"{W}x{H + 1}" in msg


def test_label_out_of_range(tmp_path):
    base = camvid_tree(tmp_path)
    save(base / "trainannot/0006R0_000020.png", mask([3, 12, 40]))
    with pytest.raises(ValueError) as e:
        CamVid(tmp_path, "train")[1]
    msg = one_line(e)
    assert "trainannot/0006R0_000020.png" in msg and "[12, 40]" in msg


def test_corrupt_image(tmp_path):
    base = voc_tree(tmp_path)
    (base / "JPEGImages/2007_000032.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="2007_000032.jpg") as e:
        VOC(tmp_path, "train")[0]
    one_line(e)


def test_colour_not_in_palette(tmp_path):
    folder_tree(tmp_path, colour=True)
    m = np.zeros((H, W, 3), np.uint8)
    m[2, 3] = (12, 34, 56)
    save(tmp_path / "masks/b.png", m)
    with pytest.raises(ValueError) as e:
        FolderDataset(tmp_path)[1]
    assert "masks/b.png: colour (12, 34, 56) is not in palette.txt" in one_line(e)


def test_folder_image_without_mask(tmp_path):
    folder_tree(tmp_path)
    save(tmp_path / "images/c.jpeg", rgb())
    with pytest.raises(ValueError, match="c.jpeg"):
        FolderDataset(tmp_path)


# ------------------------------------------------------------- your own data: palettes, splits

BG, ROAD, CAR, IGN = (0, 0, 0), (128, 64, 128), (0, 0, 142), (255, 255, 255)  # PALETTE_TXT order


def p_mask(path, indices, colours):
    """A P-mode mask: first pixels hold ``indices`` (rest 0), its embedded palette ``colours``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (W, H), mask(indices).tobytes())
    im.putpalette([v for c in colours for v in c])
    im.save(path)


def split_tree(root, splits=("train", "val"), palette_at=("",), n=2):
    """``root/<split>/{images,masks}`` with P-mode masks; palette.txt written to ``palette_at``."""
    for split in splits:
        for i in range(n):
            save(root / split / f"images/{split}{i}.png", rgb(i))
            p_mask(root / split / f"masks/{split}{i}.png", [0, 1, 2, 3], [ROAD, CAR, IGN, BG])
    for where in palette_at:
        (root / where / "palette.txt").write_text(PALETTE_TXT)
    return root


def test_folder_p_masks_read_through_their_own_palette(tmp_path):
    folder_tree(tmp_path, colour=True)
    # two embedded palettes, each in another order than palette.txt (bg, road, car; ignore)
    p_mask(tmp_path / "masks/a.png", [0, 1, 2, 3], [ROAD, CAR, IGN, BG])
    p_mask(tmp_path / "masks/b.png", [3, 0, 2, 1, 1], [IGN, BG, CAR, ROAD])
    with Image.open(tmp_path / "masks/b.png") as im:  # a raw index read would give 3, 0, 2, 1
        assert im.mode == "P" and np.asarray(im).flat[:4].tolist() == [3, 0, 2, 1]
    ds = FolderDataset(tmp_path)
    assert ds[0][1].flat[:5].tolist() == [1, 2, 255, 0, 1]
    assert ds[1][1].flat[:5].tolist() == [1, 255, 2, 0, 0]


def test_folder_p_masks_are_indices_without_palette_txt(tmp_path):
    folder_tree(tmp_path)  # classes.txt only
    p_mask(tmp_path / "masks/b.png", [2, 1, 255], [ROAD, CAR, IGN] + [(9, 9, 9)] * 253)
    assert FolderDataset(tmp_path)[1][1].flat[:4].tolist() == [2, 1, 255, 0]


@pytest.mark.parametrize("kind", ["palette", "classes"])
def test_folder_class_list_at_root_serves_splits(tmp_path, kind):
    split_tree(tmp_path, palette_at=())
    if kind == "palette":
        (tmp_path / "palette.txt").write_text(PALETTE_TXT)
    else:
        (tmp_path / "classes.txt").write_text("background\nroad surface\ncar\n")
        for split in ("train", "val"):
            for i in range(2):
                save(tmp_path / split / f"masks/{split}{i}.png", mask([1, 2, 255]))
    for split in ("train", "val"):
        ds = build_dataset("folder", split, tmp_path)
        assert ds.root == tmp_path / split and ds.names == [f"{split}0", f"{split}1"]
        assert ds.class_names == ["background", "road surface", "car"]
        assert ds.class_file == tmp_path / f"{kind}.txt"
        assert ds[1][1].flat[:4].tolist() == [1, 2, 255, 0]


def test_folder_split_palette_equal_to_root_is_used(tmp_path):
    split_tree(tmp_path, palette_at=("", "val"))
    val = FolderDataset(tmp_path, "val")
    assert val.class_file == tmp_path / "val/palette.txt"
    assert val[0][1].flat[:4].tolist() == [1, 2, 255, 0]
    assert FolderDataset(tmp_path, "train").class_file == tmp_path / "palette.txt"


def test_folder_no_class_list_names_both_folders(tmp_path):
    split_tree(tmp_path, palette_at=())
    with pytest.raises(FileNotFoundError) as e:
        FolderDataset(tmp_path, "train")
    assert f"no class list in {tmp_path / 'train'} or {tmp_path}:" in one_line(e)


def test_palette_duplicate_colour(tmp_path):
    folder_tree(tmp_path, colour=True)
    (tmp_path / "palette.txt").write_text(PALETTE_TXT + "truck 0 0 142\n")
    with pytest.raises(ValueError) as e:
        FolderDataset(tmp_path)
    assert one_line(e) == (f"{tmp_path / 'palette.txt'}:5: duplicate colour (0, 0, 142) for "
                           f"'truck' (already line 3, 'car')")


@pytest.mark.parametrize("case", ["split_vs_root", "train_vs_val", "ignore", "classes"])
def test_split_class_lists_differ(tmp_path, case):
    swapped = "background 0 0 0\ncar 0 0 142\nroad surface 128 64 128\nignore 255 255 255\n"
    if case == "split_vs_root":  # train's own palette disagrees with the root one val uses
        split_tree(tmp_path, palette_at=("",))
        (tmp_path / "train/palette.txt").write_text(swapped)
        files, what = ("train/palette.txt", "palette.txt"), ("class 1 is ", "'car' (0, 0, 142)",
                                                             "'road surface' (128, 64, 128)")
    elif case == "train_vs_val":
        split_tree(tmp_path, palette_at=("train",))
        (tmp_path / "val/palette.txt").write_text(PALETTE_TXT.replace("0 0 142", "0 0 70"))
        files, what = ("train/palette.txt", "val/palette.txt"), ("class 2 is ", "'car' (0, 0, 142)",
                                                                 "'car' (0, 0, 70)")
    elif case == "ignore":
        split_tree(tmp_path, palette_at=("train", "val"))
        (tmp_path / "val/palette.txt").write_text(PALETTE_TXT + "ignore 1 2 3\n")
        files, what = ("val/palette.txt", "train/palette.txt"), ("ignore colour (1, 2, 3) is in "
                                                                 f"{tmp_path / 'val/palette.txt'}",)
    else:
        split_tree(tmp_path, palette_at=())
        (tmp_path / "train/classes.txt").write_text("background\nroad\ncar\n")
        (tmp_path / "val/classes.txt").write_text("background\nroad\n")
        files, what = ("train/classes.txt", "val/classes.txt"), ("class 2 is ", "'car'", "missing")
    for split in ("train", "val"):  # both sides refuse, each naming both files and the class
        with pytest.raises(ValueError) as e:
            FolderDataset(tmp_path, split)
        msg = one_line(e)
        assert msg.startswith("class lists differ: "), msg
        assert all(str(tmp_path / f) in msg for f in files) and all(w in msg for w in what), msg


def test_p_mask_colour_not_in_palette(tmp_path):
    split_tree(tmp_path)
    p_mask(tmp_path / "val/masks/val1.png", [0, 1], [BG, (12, 34, 56)])
    ds = FolderDataset(tmp_path, "val")
    assert ds[0][1].flat[:4].tolist() == [1, 2, 255, 0]
    with pytest.raises(ValueError) as e:
        ds[1]
    assert (f"val/masks/val1.png: colour (12, 34, 56) is not in palette.txt "
            f"({tmp_path / 'palette.txt'})") in one_line(e)

# ---------------------------------------------------------------------------------- TinyShapes

def test_tiny_deterministic_and_in_range():
    a, b = TinyShapes("train"), TinyShapes("train")
    assert len(a) == 48 and len(TinyShapes("val")) == 16 and a.names[0] == "tiny_0000"
    for i in (0, 7, 47):
        (ia, la), (ib, lb) = a[i], b[i]
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
        assert ia.dtype == np.uint8 and ia.shape == (72, 96, 3) and la.shape == (72, 96)
        assert la.dtype == np.int64 and 0 <= la.min() and la.max() < a.num_classes
    assert not np.array_equal(a[0][0], TinyShapes("val")[0][0])
    labels = np.concatenate([a[i][1].ravel() for i in range(8)])
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(a.subset(["tiny_0005"])[0][1], a[5][1])
    assert len(build_dataset("tiny", "val")) == 16


# --------------------------------------------------------------------------------- real CamVid

REAL = data_root() / "camvid"
needs_camvid = pytest.mark.skipif(
    not (REAL / "train").is_dir(),
    reason=f"real CamVid not found at {REAL} (set SEMISEG_DATA or run data/download_camvid.sh)")


@needs_camvid
def test_real_camvid():
    train, val = CamVid(split="train"), CamVid(split="val")
    assert len(train) == 367 and len(val) == 101
    assert {CamVid.sequence_of(n) for n in train.names} <= {"0001TP", "0006R0", "0016E5",
                                                             "Seq05VD"}
    for ds, i in [(train, 0), (train, 366), (val, 50)]:
        img, lbl = ds[i]
        assert img.shape == (360, 480, 3) and lbl.shape == (360, 480)
        vals = set(np.unique(lbl).tolist())
        assert vals <= set(range(11)) | {255}
