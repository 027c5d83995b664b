"""Bad input gets one line naming the file, key or value (issue 5, item 3); each case runs the CLI."""

import numpy as np
import pytest
from PIL import Image

from semiseg import evaluate, train
from semiseg.checkpoint import check_compatible


def cli_error(main, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _camvid_tree(root, n=3, size=(16, 12), label_value=1):
    for split in ("train", "val", "test"):
        (root / "camvid" / split).mkdir(parents=True)
        (root / "camvid" / f"{split}annot").mkdir(parents=True)
        for i in range(n):
            name = f"0001TP_{i:06d}.png"
            Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(root / "camvid" / split / name)
            Image.fromarray(np.full((size[1], size[0]), label_value, np.uint8)).save(root / "camvid" / f"{split}annot" / name)
    return root


@pytest.fixture
def camvid_env(tmp_path, monkeypatch):
    data = _camvid_tree(tmp_path / "data")
    splits = tmp_path / "splits" / "camvid" / "1-8" / "split0"
    splits.mkdir(parents=True)
    (splits / "labeled.txt").write_text("0001TP_000000\n")
    (splits / "unlabeled.txt").write_text("0001TP_000001\n0001TP_000002\n")
    monkeypatch.setenv("SEMISEG_DATA", str(data))
    monkeypatch.setenv("SEMISEG_SPLITS", str(tmp_path / "splits"))
    return tmp_path


def _train_args(tmp_path, *extra):
    return ["camvid_quick", "pretrained=false", "iterations=1", "crop_size=[16,16]", "base_size=null", "eval_size=null",
            "batch_labeled=1", "batch_unlabeled=1", f"out_dir={tmp_path / 'run'}", "--no-progress", *extra]


def test_missing_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMISEG_DATA", str(tmp_path / "nowhere"))
    msg = cli_error(train.main, _train_args(tmp_path))
    assert f"dataset directory not found: {tmp_path / 'nowhere' / 'camvid'}" in msg


def test_missing_split_file(camvid_env):
    msg = cli_error(train.main, _train_args(camvid_env, "ratio=1/4"))
    assert "1-4/split0/labeled.txt" in msg and "python -m semiseg.data.splits" in msg


def test_empty_labeled_split(camvid_env):
    (camvid_env / "splits" / "camvid" / "1-8" / "split0" / "labeled.txt").write_text("")
    msg = cli_error(train.main, _train_args(camvid_env))
    assert "labeled.txt" in msg and "empty" in msg


def test_image_without_label(camvid_env):
    (camvid_env / "data" / "camvid" / "trainannot" / "0001TP_000000.png").unlink()
    msg = cli_error(train.main, _train_args(camvid_env))
    assert "0001TP_000000.png" in msg and "no label" in msg


def test_sizes_differ(camvid_env):
    Image.fromarray(np.ones((5, 7), np.uint8)).save(camvid_env / "data" / "camvid" / "trainannot" / "0001TP_000000.png")
    msg = cli_error(train.main, _train_args(camvid_env))
    assert "size mismatch" in msg and "0001TP_000000.png" in msg


def test_label_out_of_range(camvid_env):
    Image.fromarray(np.full((12, 16), 42, np.uint8)).save(camvid_env / "data" / "camvid" / "trainannot" / "0001TP_000000.png")
    msg = cli_error(train.main, _train_args(camvid_env))
    assert "label values [42] outside 0..10" in msg


def test_corrupt_image(camvid_env):
    (camvid_env / "data" / "camvid" / "train" / "0001TP_000000.png").write_bytes(b"not a png")
    msg = cli_error(train.main, _train_args(camvid_env))
    assert "0001TP_000000.png: cannot read image" in msg


def test_corrupt_test_image_is_found_before_training(camvid_env, monkeypatch):
    (camvid_env / "data" / "camvid" / "test" / "0001TP_000002.png").write_bytes(b"not a png")
    steps = []
    monkeypatch.setattr(train.Trainer, "step", lambda *a: steps.append(1))
    msg = cli_error(train.main, _train_args(camvid_env))
    assert "test/0001TP_000002.png: cannot read image header" in msg and not steps


def test_unknown_key_and_bad_values(tmp_path):
    assert "did you mean 'lambda_contr'" in cli_error(train.main, _train_args(tmp_path, "lambda_cont=1"))
    assert "'lambda_contr' = -1.0: must be >= 0" in cli_error(train.main, _train_args(tmp_path, "lambda_contr=-1"))
    assert "'psi' = 0: must be >= 1" in cli_error(train.main, _train_args(tmp_path, "psi=0"))
    assert "'phi' = 1.0: must be in (0, 1)" in cli_error(train.main, _train_args(tmp_path, "phi=1"))
    assert "'psi' expects int" in cli_error(train.main, _train_args(tmp_path, "psi=many"))


def test_cuda_and_bf16_unavailable(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device is available" in cli_error(train.main, ["smoke", "device=cuda", f"out_dir={tmp_path}"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    msg = cli_error(train.main, ["smoke", "device=cuda", "precision=bf16", f"out_dir={tmp_path}"])
    assert "'precision' = 'bf16' but Old GPU has no bfloat16 support" in msg


def test_finished_run_is_not_overwritten(tmp_path):
    train.main(["smoke", "iterations=1", f"out_dir={tmp_path}", "--no-progress"])
    msg = cli_error(train.main, ["smoke", "iterations=1", f"out_dir={tmp_path}", "--no-progress"])
    assert f"{tmp_path} already holds a finished run" in msg


def test_checkpoint_from_other_architecture_or_class_count(tmp_path):
    state = {"config": {"arch": "effnet_lite0_dlv3p"}, "num_classes": 4}
    with pytest.raises(ValueError, match="is for arch 'effnet_lite0_dlv3p', but the config asks for 'deeplabv2_r101'"):
        check_compatible(state, "deeplabv2_r101", 4, "x.pt")
    with pytest.raises(ValueError, match="has 4 classes, but the dataset has 11"):
        check_compatible(state, "effnet_lite0_dlv3p", 11, "x.pt")
    train.main(["smoke", "iterations=2", "checkpoint_every=1", f"out_dir={tmp_path}", "--no-progress"])
    # pretend the run was interrupted after its first checkpoint
    (tmp_path / "summary.json").unlink()
    (tmp_path / "checkpoint.pt").unlink()
    msg = cli_error(train.main, ["smoke", "iterations=2", "arch=deeplabv3p_r50", f"out_dir={tmp_path}", "--resume", "--no-progress"])
    assert "iter0000001.pt is for arch 'effnet_lite0_dlv3p', but the config asks for 'deeplabv3p_r50'" in msg


def test_corrupt_checkpoint_for_evaluate(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"\x00garbage")
    assert f"checkpoint {bad} is unreadable" in cli_error(evaluate.main, [str(bad)])
    assert "does not exist" in cli_error(evaluate.main, [str(tmp_path / "none.pt")])


def test_splits_command_bad_palette(tmp_path, monkeypatch):
    from semiseg.data import splits

    monkeypatch.setenv("SEMISEG_SPLITS", str(tmp_path / "splits"))
    root = tmp_path / "mydata"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        Image.new("RGB", (8, 6)).save(root / split / "images" / "x.png")
        Image.new("RGB", (8, 6)).save(root / split / "masks" / "x.png")
    (root / "palette.txt").write_text("background 0 0 0\ncar 0 0 142\ntruck 0 0 142\n")
    argv = ["folder", "--root", str(root), "--ratios", "1/1"]
    msg = cli_error(splits.main, argv)
    assert f"{root / 'palette.txt'}:3: duplicate colour (0, 0, 142) for 'truck'" in msg
    (root / "palette.txt").write_text("background 0 0 0\ncar 0 0 142\n")
    (root / "val" / "palette.txt").write_text("background 0 0 0\ntruck 0 0 142\n")
    msg = cli_error(splits.main, argv)
    assert "class lists differ: class 1 is 'car' (0, 0, 142)" in msg and str(root / "val" / "palette.txt") in msg
    (root / "val" / "palette.txt").unlink()
    splits.main(argv)
    assert splits.read_split("folder", "1/1", 0) == (["x"], [])
