"""Labeled/unlabeled split lists: counts, determinism, IO and the committed CamVid lists."""

import random

import pytest
from PIL import Image

from semiseg.data import CamVid, FolderDataset, data_root
from semiseg.data.splits import (main, make_split, num_labeled, read_split, split_dir,
                                 splits_root, write_split)

NAMES = [f"img_{i:03d}" for i in range(100)]


@pytest.mark.parametrize("dataset,n,ratio,expected", [
    ("cityscapes", 2975, "1/30", 100), ("cityscapes", 2975, "1/8", 372),
    ("cityscapes", 2975, "1/4", 744), ("voc", 10582, "1/50", 212), ("voc", 10582, "1/20", 530),
    ("voc", 10582, "1/8", 1323), ("camvid", 367, "1/4", 92), ("camvid", 367, "1/8", 46),
    ("camvid", 367, "1/16", 23)])
def test_paper_counts(dataset, n, ratio, expected):
    assert num_labeled(dataset, n, ratio) == expected


def test_bad_ratio():
    with pytest.raises(ValueError, match="1:8"):
        num_labeled("x", 10, "1:8")


def test_split_is_order_independent_and_partitions():
    shuffled = NAMES[:]
    random.Random(3).shuffle(shuffled)
    lab, unl = make_split(NAMES, 12, seed=0)
    assert (lab, unl) == make_split(shuffled, 12, seed=0)
    assert len(lab) == 12 and lab == sorted(lab) and unl == sorted(unl)
    assert set(lab) | set(unl) == set(NAMES) and not set(lab) & set(unl)
    assert make_split(NAMES, 12, seed=1)[0] != lab


def test_write_read_roundtrip_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMISEG_SPLITS", str(tmp_path))
    assert splits_root() == tmp_path
    d = write_split("toy", "1/8", 2, ["a", "b"], ["c"])
    assert d == split_dir("toy", "1/8", 2) == tmp_path / "toy/1-8/split2"
    assert sorted(p.name for p in d.iterdir()) == ["labeled.txt", "unlabeled.txt"]  # no temp left
    assert read_split("toy", "1/8", 2) == (["a", "b"], ["c"])

    with pytest.raises(FileNotFoundError) as e:
        read_split("toy", "1/4", 0)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "toy/1-4/split0/labeled.txt") in msg
    assert "python -m semiseg.data.splits toy --ratios 1/4 --splits 0" in msg

    write_split("toy", "1/2", 0, [], ["c"])
    with pytest.raises(ValueError, match="1-2/split0/labeled.txt"):
        read_split("toy", "1/2", 0)


def test_cli_on_tiny(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEMISEG_SPLITS", str(tmp_path))
    main(["tiny", "--ratios", "1/8", "1/4", "--splits", "0", "1"])
    lab, unl = read_split("tiny", "1/8", 1)
    assert len(lab) == 6 and len(lab) + len(unl) == 48
    assert (lab, unl) == make_split([f"tiny_{i:04d}" for i in range(48)], 6, seed=1)
    assert "6 labeled, 42 unlabeled" in capsys.readouterr().out


def test_cli_on_folder_with_palette_at_root(tmp_path, monkeypatch, capsys):
    """palette.txt only at the root serves the train/ and val/ folders (P-mode masks)."""
    monkeypatch.setenv("SEMISEG_SPLITS", str(tmp_path / "splits"))
    root = tmp_path / "mydata"
    for split, n in [("train", 4), ("val", 1)]:
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for i in range(n):
            Image.new("RGB", (8, 6)).save(root / split / "images" / f"{split}{i}.png")
            m = Image.new("P", (8, 6))
            m.putpalette([0, 0, 142, 0, 0, 0])  # index 0 = car, class 1 in palette.txt
            m.save(root / split / "masks" / f"{split}{i}.png")
    (root / "palette.txt").write_text("background 0 0 0\ncar 0 0 142\n")
    main(["folder", "--root", str(root), "--ratios", "1/2", "--splits", "0"])
    lab, unl = read_split("folder", "1/2", 0)
    assert (lab, unl) == make_split([f"train{i}" for i in range(4)], 2, seed=0)
    assert "2 labeled, 2 unlabeled" in capsys.readouterr().out
    assert FolderDataset(root, "val")[0][1].max() == 1


@pytest.mark.skipif(not (data_root() / "camvid" / "train").is_dir(),
                    reason=f"real CamVid not found at {data_root() / 'camvid'} (set SEMISEG_DATA)")
@pytest.mark.parametrize("ratio", ["1/4", "1/8", "1/16"])
def test_committed_camvid_lists_match_regeneration(ratio, monkeypatch):
    monkeypatch.delenv("SEMISEG_SPLITS", raising=False)
    names = CamVid(split="train").names
    for k in range(3):
        expected = make_split(names, num_labeled("camvid", len(names), ratio), seed=k)
        assert read_split("camvid", ratio, k) == expected
    if ratio == "1/8":
        assert len(read_split("camvid", "1/8", 0)[0]) == 46
