"""A tiny end-to-end run on the built-in TinyShapes data: train, summary, evaluate, predict."""

import json

import pytest
import torch

from semiseg import compare, evaluate, predict
from semiseg.config import load_config
from semiseg.train import Trainer, build_train_data, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config("smoke", {"out_dir": str(out), "fqf": False, "iterations": 6})
    return cfg, train(cfg, progress=False)


def test_run_dir_contents(run):
    cfg, summary = run
    out = cfg.run_dir()
    for key in ("miou", "per_class_iou", "iterations", "seconds", "variant", "seed", "split", "profile"):
        assert key in summary
    assert json.loads((out / "summary.json").read_text()) == summary
    assert 0.0 <= summary["miou"] <= 100.0 and summary["iterations"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_miou"] == summary["miou"]
    # warm-up (2 of 6 iterations) over, the contrastive term is computed against a filled bank
    assert any(r.get("contr", 0) > 0 for r in records)
    assert (out / "config.yaml").exists() and (out / "checkpoint.pt").exists()


def test_refuses_to_overwrite_finished_run(run):
    cfg, _ = run
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        train(cfg, progress=False)


def test_evaluate_and_predict_cli(run, tmp_path, capsys):
    cfg, summary = run
    ckpt = str(cfg.run_dir() / "checkpoint.pt")
    evaluate.main([ckpt])
    printed = json.loads(capsys.readouterr().out)
    assert printed["miou"] == pytest.approx(summary["miou"], abs=1e-3)
    from semiseg.data import TinyShapes
    from PIL import Image

    image, _ = TinyShapes("val").load(0)
    Image.fromarray(image).save(tmp_path / "a.png")
    predict.main([ckpt, str(tmp_path / "a.png"), "--out", str(tmp_path / "pred")])
    mask = Image.open(tmp_path / "pred" / "a_mask.png")
    assert mask.size == (image.shape[1], image.shape[0])
    assert (tmp_path / "pred" / "a_overlay.png").exists()


def test_teacher_tracks_student_and_bank_fills():
    cfg = load_config("smoke", {"fqf": False, "warmup_frac": 0.0})
    labeled, unlabeled, _ = build_train_data(cfg)
    trainer = Trainer(cfg, labeled.num_classes, len(labeled), "cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g)
    labels = torch.randint(0, labeled.num_classes, (2, 64, 64), generator=g)
    batch = (images, labels, torch.tensor([0, 1]))
    before = [p.clone() for p in trainer.teacher.parameters()]
    terms = trainer.step(batch, (images, labels, torch.tensor([2, 3])))
    assert set(terms) >= {"sup", "pseudo", "ent", "contr", "loss"}
    assert int(trainer.bank.count.sum()) > 0
    changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.teacher.parameters()))
    assert changed and all(not p.requires_grad for p in trainer.teacher.parameters())


def test_supervised_variant_has_no_unlabeled_terms(tmp_path):
    cfg = load_config("smoke", {"variant": "supervised", "out_dir": str(tmp_path), "iterations": 2})
    assert (cfg.lambda_pseudo, cfg.lambda_ent, cfg.lambda_contr) == (0, 0, 0)
    train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("pseudo" not in r and "contr" not in r for r in records)


def test_compare_falls_back_to_tiny_without_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEMISEG_DATA", str(tmp_path / "nothing"))
    monkeypatch.chdir(tmp_path)
    compare.main(["camvid_quick", "iterations=2", "--variants", "supervised", "full"])
    out = capsys.readouterr().out
    assert "Falling back to the built-in TinyShapes dataset" in out
    assert "gain of the full method over supervised-only" in out
    assert (tmp_path / "runs" / "tiny").is_dir()


def test_domain_adaptation_source_joins_labeled_batch_but_not_the_bank():
    """§4.3.2: X_d is used for L_sup and L_contr; the memory bank holds target vectors only."""
    cfg = load_config("smoke", {"fqf": False, "warmup_frac": 0.0, "source_dataset": "tiny"})
    labeled, _, source = build_train_data(cfg)
    assert source is not None and len(source) == 48
    trainer = Trainer(cfg, labeled.num_classes, len(labeled), "cpu")
    images = torch.rand(2, 3, 64, 64)
    target = (images, torch.full((2, 64, 64), 1), torch.tensor([0, 1]))
    source_batch = (torch.rand(2, 3, 64, 64), torch.full((2, 64, 64), 2), torch.tensor([0, 1]))
    trainer.step(target, (images, torch.zeros(2, 64, 64, dtype=torch.long), torch.tensor([2, 3])), source_batch)
    assert trainer.bank.count[1] > 0 and trainer.bank.count[2] == 0
    assert trainer.class_counts[2] >= 2 * 64 * 64  # source labels entered the labeled batch


def test_camvid_domain_adaptation_config_selects_sequences():
    from semiseg.data import data_root

    if not (data_root() / "camvid").is_dir():
        pytest.skip(f"CamVid not found under SEMISEG_DATA={data_root()}")
    cfg = load_config("camvid_da_quick")
    labeled, unlabeled, source = build_train_data(cfg)
    assert labeled.names and all(n.startswith("0001TP_") for n in labeled.names + unlabeled.names)
    assert source.names and not any(n.startswith("0001TP_") for n in source.names)
    from semiseg.train import build_eval_dataset

    # scored inductively on the 62 dusk frames of CamVid test; val (no dusk frames) stays whole
    test = build_eval_dataset(cfg, "test").names
    assert len(test) == 62 and all(n.startswith("0001TP_") for n in test) and not set(test) & set(unlabeled.names)
    assert len(build_eval_dataset(cfg, "val")) == 101


def test_eq1_total_is_weighted_sum_and_eq5_pseudo_labels_are_teacher_argmax(monkeypatch):
    cfg = load_config("smoke", {"fqf": False, "warmup_frac": 0.0, "lambda_ent": 0.5, "lambda_contr": 2.0})
    labeled, _, _ = build_train_data(cfg)
    trainer = Trainer(cfg, labeled.num_classes, len(labeled), "cpu")
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    labels = torch.randint(0, labeled.num_classes, (2, 64, 64), generator=g)
    # Eq. (5): arg max of the teacher's class distribution on the un-augmented image
    pseudo, conf = trainer.pseudo_labels(images)
    logits, _ = trainer.teacher(images)
    probs = torch.softmax(torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False), 1)
    assert torch.equal(pseudo, probs.argmax(1)) and torch.allclose(conf, probs.max(1).values)
    terms = trainer.step((images, labels, torch.tensor([0, 1])), (images, labels, torch.tensor([2, 3])))
    trainer.step((images, labels, torch.tensor([0, 1])), (images, labels, torch.tensor([2, 3])))  # bank now filled
    terms = trainer.step((images, labels, torch.tensor([0, 1])), (images, labels, torch.tensor([2, 3])))
    # Eq. (1)
    want = 1.0 * terms["sup"] + 1.0 * terms["pseudo"] + 0.5 * terms["ent"] + 2.0 * terms["contr"]
    assert terms["loss"] == pytest.approx(want, rel=1e-5) and terms["contr"] > 0


def test_warmup_zeroes_pseudo_and_contr_only():
    cfg = load_config("smoke", {"iterations": 150, "warmup_frac": 2 / 150})
    trainer = Trainer(cfg, 4, 12, "cpu")
    assert trainer.lambdas() == {"sup": 1.0, "pseudo": 0.0, "ent": 0.01, "contr": 0.0}
    trainer.iteration = 2
    assert trainer.lambdas() == {"sup": 1.0, "pseudo": 1.0, "ent": 0.01, "contr": 0.1}


def test_every_run_writes_a_small_embeddings_artifact(run):
    from semiseg import embeddings

    cfg, _ = run
    data = embeddings.load(cfg.run_dir() / "embeddings.npz")
    assert (cfg.run_dir() / "embeddings.npz").stat().st_size <= embeddings.LIMIT
    state = torch.load(cfg.run_dir() / "checkpoint.pt", weights_only=False)
    count = state["bank"]["count"]
    assert len(data["bank_vectors"]) == int(count.sum()) and data["bank_vectors"].dtype.name == "float16"
    for c in range(len(count)):  # the bank's vectors, class by class, newest first
        want = state["bank"]["memory"][c, : int(count[c])].half().numpy()
        got = data["bank_vectors"][data["bank_labels"] == c]
        assert (got == want).all() and (data["bank_slots"][data["bank_labels"] == c] == range(int(count[c]))).all()
    assert len(data["pred_vectors"]) == len(data["pred_true"]) == len(data["proj_vectors"]) > 0
    assert data["val_images"].shape[:3] == data["val_preds"].shape and data["meta"]["iteration"] == 6
