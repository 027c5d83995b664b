"""Issue #9's protocol: variants, head learning rate, attention input, test split, teacher scores,
the fully supervised ceiling, pseudo-label diagnostics and the image cache."""

import json

import pytest
import torch

from semiseg import compare
from semiseg.config import VARIANTS, load_config
from semiseg.data import TinyShapes
from semiseg.data.sampling import Batches
from semiseg.train import Trainer, build_train_data, setup, train


def test_variant_applies_its_overrides_and_explicit_ones_win():
    cfg = load_config("smoke", {"variant": "supervised"})
    assert (cfg.lambda_pseudo, cfg.lambda_ent, cfg.lambda_contr) == (0.0, 0.0, 0.0)
    cfg = load_config("smoke", ["variant=no_contr", "lambda_ent=0.5"])
    assert (cfg.lambda_pseudo, cfg.lambda_ent, cfg.lambda_contr) == (1.0, 0.5, 0.0)
    assert load_config("smoke", ["variant=psi=8"]).psi == 8  # a key=value variant (Tables 6-7)
    assert load_config("smoke", {"variant": "base+fqf"}).bank_from == "student"
    with pytest.raises(KeyError, match="unknown variant 'supervisd'.*did you mean 'supervised'"):
        load_config("smoke", {"variant": "supervisd"})
    assert set(VARIANTS) >= {"full", "supervised", "no_contr"}


def test_head_lr_mult_sets_the_new_layers_rate():
    one = Trainer(load_config("smoke"), 4, 12, "cpu")
    assert [g["lr"] for g in one.optimizer.param_groups] == [0.01, 0.01]  # paper default: one rate
    ten = Trainer(load_config("smoke", {"head_lr_mult": 10}), 4, 12, "cpu")
    assert [g["lr"] for g in ten.optimizer.param_groups] == [0.01, pytest.approx(0.1)]
    ten.iteration = 3
    ten.set_lr()  # the poly schedule keeps the ratio
    lrs = [g["lr"] for g in ten.optimizer.param_groups]
    assert lrs[1] == pytest.approx(10 * lrs[0]) and lrs[0] < 0.01


def _contrastive_grad(detach, monkeypatch=None):
    torch.manual_seed(0)
    cfg = load_config("smoke", {"attention_detach": detach, "psi": 8})
    trainer = Trainer(cfg, 4, 12, "cpu")
    g = torch.Generator().manual_seed(0)
    for c in range(4):  # a full bank
        trainer.bank.push(torch.randn(8, trainer.bank.dim, generator=g), torch.full((8,), c), torch.rand(8, generator=g),
                          torch.arange(8), 8)
    feats = torch.randn(2, trainer.student.feat_dim, 8, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (2, 64, 64), generator=g)
    trainer.contrastive(feats, labels).backward()
    att = torch.cat([p.grad.flatten() for p in trainer.student.attention_pred.parameters() if p.grad is not None])
    return feats.grad.clone(), att


def test_attention_detach_cuts_only_the_path_through_the_attention_input():
    grad_detached, att_detached = _contrastive_grad(True)
    grad_through, att_through = _contrastive_grad(False)
    # the attention modules still learn in both cases, from the same loss
    assert att_detached.abs().sum() > 0 and torch.allclose(att_detached, att_through)
    # the features' gradient differs: without detach it also flows through S_c,theta(p)
    assert not torch.allclose(grad_detached, grad_through, atol=1e-7)


def test_pseudo_stats_measure_agreement_with_true_labels():
    trainer = Trainer(load_config("smoke"), 4, 12, "cpu")
    labels = torch.tensor([[[0, 1], [2, 255]]])
    conf = torch.tensor([[[1.0, 0.5], [1.0, 1.0]]])
    stats = trainer.pseudo_stats(torch.tensor([[[0, 1], [3, 3]]]), conf ** trainer.cfg.sharpen, labels)
    assert stats["pseudo_acc"] == pytest.approx(2 / 3)
    assert stats["pseudo_beta"] == pytest.approx((1 + 0.5 ** 6 + 1) / 3)
    assert stats["pseudo_acc_beta"] == pytest.approx((1 + 0.5 ** 6) / (2 + 0.5 ** 6))


def test_image_cache_gives_identical_batches():
    data = TinyShapes("train")
    plain = Batches(data, 4, [80, 60], [32, 32], seed=3)
    cached = Batches(data, 4, [80, 60], [32, 32], seed=3, cache=True)
    for it in (0, 1, 12, 13):  # later epochs reuse cached images
        a, b = plain(it), cached(it)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(cached.cache) > 4


def test_ratio_1_1_labels_every_image_and_refuses_semi_variants():
    cfg = load_config("smoke", {"ratio": "1/1", "variant": "supervised"})
    labeled, unlabeled, _ = build_train_data(cfg)
    assert len(labeled) == len(TinyShapes("train")) and len(unlabeled) == 0
    with pytest.raises(ValueError, match="variant 'full' needs unlabeled images"):
        build_train_data(load_config("smoke", {"ratio": "1/1"}))


def test_summary_headline_is_the_test_split_with_val_and_teacher_beside(tmp_path):
    cfg = load_config("smoke", {"out_dir": str(tmp_path), "test_split": "test", "eval_every": 3, "iterations": 4})
    summary = train(cfg, progress=False)
    assert summary["scored_on"] == "test"
    scores = summary["scores"]
    assert summary["miou"] == scores["student"]["test"]["miou"] and summary["val_miou"] == scores["student"]["val"]["miou"]
    assert summary["teacher_miou"] == scores["teacher"]["test"]["miou"]
    assert scores["student"]["test"]["images"] == len(TinyShapes("test"))
    assert summary["miou"] != summary["teacher_miou"]  # two different networks were scored
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in records if r["iteration"] == 3]
    assert "teacher_val_miou" in curve[-1] and "val_miou" in curve[-1]
    logged = [r for r in records if "pseudo_acc" in r]
    assert logged and len(logged[-1]["bank_fill_per_class"]) == 4


def test_curve_test_scores_the_test_split_at_every_evaluation_and_at_the_end(tmp_path):
    cfg = load_config("smoke", {"out_dir": str(tmp_path), "test_split": "test", "eval_every": 2, "iterations": 4,
                                "curve_test": True})
    summary = train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in records if "test_miou" in r]
    assert [r["iteration"] for r in curve] == [2, 4]
    assert all("teacher_test_miou" in r and "val_miou" in r for r in curve)
    assert curve[-1]["test_miou"] == summary["miou"] and curve[-1]["teacher_test_miou"] == summary["teacher_miou"]
    with pytest.raises(ValueError, match="curve_test"):
        load_config("smoke", {"curve_test": True})  # no test_split, no eval_every


def test_final_checkpoint_is_written_before_the_evaluation(tmp_path, monkeypatch):
    import semiseg.train as train_module

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(train_module, "evaluate", broken)
    cfg = load_config("smoke", {"out_dir": str(tmp_path), "iterations": 2})
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(cfg, progress=False)
    assert (tmp_path / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "crashed"


def test_missing_test_split_is_found_before_training(tmp_path):
    cfg = load_config("smoke", {"out_dir": str(tmp_path), "test_split": "nope"})
    with pytest.raises(ValueError, match="TinyShapes split must be one of"):
        setup(cfg)


def test_compare_honours_out_dir_and_never_compares_a_run_with_itself(tmp_path, capsys):
    compare.main(["smoke", "iterations=2", f"out_dir={tmp_path}", "--variants", "supervised", "full"])
    out = capsys.readouterr().out
    assert (tmp_path / "supervised" / "seed0" / "summary.json").exists()
    assert (tmp_path / "full" / "seed0" / "summary.json").exists()
    assert "gain of the full method over supervised-only" in out
    with pytest.raises(SystemExit, match="names a variant twice"):
        compare.main(["smoke", "iterations=2", f"out_dir={tmp_path}", "--variants", "full", "full"])


def test_a_run_whose_bank_never_fills_says_so(tmp_path, capsys):
    cfg = load_config("smoke", {"out_dir": str(tmp_path), "iterations": 4, "phi": 0.999999})
    summary = train(cfg, progress=False)
    (note,) = [n for n in summary["warnings"] if "memory bank is still empty" in n]
    assert "phi = 0.999999" in note and "lower phi" in note
    assert "warning: the memory bank is still empty at iteration 2 of 4" in capsys.readouterr().err
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "finished" and status["warnings"] == summary["warnings"]
    assert "warnings" not in train(load_config("smoke", {"out_dir": str(tmp_path / "sup"), "iterations": 4,
                                                         "variant": "supervised"}), progress=False)
