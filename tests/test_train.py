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
    from semiseg.checkpoint import load_checkpoint_model
    from semiseg.data.sets import build_eval_dataset

    cfg, summary = run
    out = cfg.run_dir()
    types = {"miou": float, "per_class_iou": dict, "val_miou": float, "teacher_miou": float, "teacher_val_miou": float,
             "scored_on": str, "scores": dict, "iterations": int, "seconds": float, "variant": str, "seed": int,
             "split": int, "profile": str, "dataset": str, "evaluated": str}
    for key, kind in types.items():
        assert isinstance(summary[key], kind), (key, summary[key])
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["iterations"] == 6 and summary["evaluated"] == "student" and summary["scored_on"] == "val"
    assert (summary["variant"], summary["seed"], summary["profile"], summary["dataset"]) == (cfg.variant, cfg.seed, "smoke", "tiny")
    assert summary["seconds"] > 0
    # the headline is the saved student's mIoU on the split it names, recomputed here from the checkpoint
    ckpt_cfg, student, device = load_checkpoint_model(out / "checkpoint.pt")
    dataset = build_eval_dataset(ckpt_cfg, summary["scored_on"])
    result = evaluate.evaluate(student, dataset, ckpt_cfg.eval_size, device)
    assert summary["miou"] == pytest.approx(result["miou"], abs=1e-3)
    assert summary["per_class_iou"].keys() == result["per_class_iou"].keys() == set(dataset.class_names)
    for name, iou in result["per_class_iou"].items():
        assert (summary["per_class_iou"][name] is None) == (iou is None)
        assert iou is None or summary["per_class_iou"][name] == pytest.approx(iou, abs=1e-3), name
    present = [v for v in summary["per_class_iou"].values() if v is not None]
    assert summary["miou"] == pytest.approx(sum(present) / len(present), abs=1e-3)  # mean over the classes seen
    _, teacher, _ = load_checkpoint_model(out / "checkpoint.pt", teacher=True)
    assert summary["teacher_miou"] == pytest.approx(evaluate.evaluate(teacher, dataset, ckpt_cfg.eval_size, device)["miou"], abs=1e-3)
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


def test_teacher_tracks_student_and_bank_fills(monkeypatch):
    """Eq. (2) with tau of the iteration, the bank filled with the teacher's projections (§3.4) and
    memory-side weights S_c,theta(z') that vary from vector to vector (eq. 8)."""
    import copy

    import torch.nn.functional as F

    from semiseg import losses
    from semiseg.teacher import tau_schedule

    # tau from 0.5 (not 0.995): a wrong tau moves the teacher by far more than rounding
    cfg = load_config("smoke", {"fqf": False, "warmup_frac": 0.0, "warmup_beta": 0.0, "tau_start": 0.5, "tau_end": 1.0})
    labeled, _, _ = build_train_data(cfg)
    C = labeled.num_classes
    trainer = Trainer(cfg, C, len(labeled), "cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g)
    labels = torch.randint(0, C, (2, 64, 64), generator=g)
    batch = (images, labels, torch.tensor([0, 1]))
    # a teacher away from the student, so that their vectors can be told apart
    with torch.no_grad():
        for p in trainer.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    bank_inputs, contrastive_args = [], []
    update_bank, contrastive_loss = trainer.update_bank, losses.contrastive_loss

    def projections(net, images, labels):
        """g(f^-(x)) of every pixel vector of ``net`` in eval mode, and the labels at feature resolution."""
        net = copy.deepcopy(net).eval()
        feats = net(images)[1]
        small = F.interpolate(labels[:, None].float(), size=feats.shape[-2:], mode="nearest").long().flatten()
        return net.projection(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])), small

    def spy_bank(x_la, y_la, *rest):
        bank_inputs.append((x_la.clone(), y_la.clone()))
        return update_bank(x_la, y_la, *rest)

    def spy_loss(pred, labels, memory, pred_scores, memory_scores, num_classes, **kw):
        contrastive_args.append((memory.clone(), memory_scores.detach().clone(), kw["memory_count"].clone()))
        return contrastive_loss(pred, labels, memory, pred_scores, memory_scores, num_classes, **kw)

    monkeypatch.setattr(trainer, "update_bank", spy_bank)
    monkeypatch.setattr(losses, "contrastive_loss", spy_loss)
    for it in range(2):
        teacher_before = {n: t.clone() for n, t in [*trainer.teacher.named_parameters(), *trainer.teacher.named_buffers()]}
        attention = copy.deepcopy(trainer.student.attention_proj)  # S_c,theta as the step sees it
        terms = trainer.step(batch, (images, labels, torch.tensor([2, 3])))
        assert set(terms) >= {"sup", "pseudo", "ent", "contr", "loss"}
        # Eq. (2) for every parameter and floating-point buffer, tau of this iteration
        tau = tau_schedule(it, cfg.iterations, cfg.tau_start, cfg.tau_end)
        assert tau == pytest.approx([0.5, 0.6][it])
        student = dict([*trainer.student.named_parameters(), *trainer.student.named_buffers()])
        for name, xi in [*trainer.teacher.named_parameters(), *trainer.teacher.named_buffers()]:
            if xi.is_floating_point():
                want = tau * teacher_before[name] + (1 - tau) * student[name].detach()
                assert torch.allclose(xi, want, rtol=1e-5, atol=1e-6), f"eq. (2) with tau={tau} fails at iteration {it} for {name}"
            else:
                assert torch.equal(xi, student[name]), name
        assert all(not p.requires_grad for p in trainer.teacher.parameters())
        if it == 0:
            # the bank holds the teacher's projections g_xi(f_xi^-(x)) of the labeled weak views
            count = trainer.bank.count.clone()
            assert int(count.sum()) > 0
            x_la, y_la = bank_inputs[0]
            with torch.no_grad():
                z_teacher, small = projections(trainer.teacher, x_la, y_la)
                z_student, _ = projections(trainer.student, x_la, y_la)
            for c in range(C):
                if count[c]:
                    to_teacher = torch.cdist(trainer.bank.get(c), z_teacher[small == c], compute_mode="donot_use_mm_for_euclid_dist").min(1).values
                    to_student = torch.cdist(trainer.bank.get(c), z_student[small == c], compute_mode="donot_use_mm_for_euclid_dist").min(1).values
                    scale = float(trainer.bank.get(c).norm(dim=1).mean())
                    assert (to_teacher < 1e-4 * scale).all(), f"class {c}: bank vectors not among the teacher's projections {to_teacher}"
                    assert (to_student > 1e-2 * scale).all(), (c, to_student)
        else:
            # the contrastive loss weighs each bank vector by S_c,theta(z'): they vary, 0 on empty slots
            memory, memory_scores, memory_count = contrastive_args[-1]
            assert torch.equal(memory_count, count)
            valid = torch.arange(cfg.psi)[None] < memory_count[:, None]
            assert (memory_scores[~valid] == 0).all()
            scores = memory_scores[valid]
            assert scores.numel() >= 2 and float(scores.max() - scores.min()) > 1e-3, f"constant memory weights {scores}"
            with torch.no_grad():
                for c in range(C):
                    if memory_count[c]:
                        n = int(memory_count[c])
                        want = attention(memory[c, :n], torch.full((n,), c))  # S_c alone on class c's slots
                        assert torch.allclose(memory_scores[c, : int(memory_count[c])], want, atol=1e-6), \
                            f"class {c}: memory weights are not the student's S_c(z')"


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
    cfg = load_config("smoke", {"fqf": False, "warmup_frac": 0.0, "warmup_beta": 0.0, "source_dataset": "tiny"})
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
    """Eq. (5) pseudo-labels are the teacher's arg max while the student predicts otherwise; eq. (1)
    checked on the update: the student's gradient is sum_k lambda_k grad L_k, each L_k identified by
    recomputing it with semiseg.losses."""
    import copy
    import itertools

    import torch.nn.functional as F

    from semiseg import losses

    lam = {"sup": 0.7, "pseudo": 1.3, "ent": 0.5, "contr": 2.0}  # all different: a swap shows
    cfg = load_config("smoke", {"fqf": False, "warmup_frac": 0.0, "warmup_beta": 0.0, **{f"lambda_{k}": v for k, v in lam.items()}})
    labeled, _, _ = build_train_data(cfg)
    trainer = Trainer(cfg, labeled.num_classes, len(labeled), "cpu")
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 64, 64, generator=g)
    labels = torch.randint(0, labeled.num_classes, (2, 64, 64), generator=g)
    batches = ((images, labels, torch.tensor([0, 1])), (images, labels, torch.tensor([2, 3])))
    trainer.step(*batches)  # the bank now holds vectors: L_contr > 0 below

    # Eq. (5): arg max of the TEACHER's class distribution on the un-augmented image. First make the
    # student predict other classes than the teacher, so that the two cannot be confused.
    with torch.no_grad():
        trainer.student.classifier.weight.add_(0.2 * torch.randn(trainer.student.classifier.weight.shape, generator=g))

    def distribution(net):
        with torch.no_grad():
            logits, _ = copy.deepcopy(net).eval()(images)
        return torch.softmax(F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False), 1)

    teacher_probs, student_probs = distribution(trainer.teacher), distribution(trainer.student)
    assert (teacher_probs.argmax(1) != student_probs.argmax(1)).float().mean() > 0.2
    pseudo, conf = trainer.pseudo_labels(images)
    assert torch.equal(pseudo, teacher_probs.argmax(1)), "pseudo-labels are not the teacher's arg max"
    assert torch.allclose(conf, teacher_probs.max(1).values, atol=1e-6)

    # Eq. (1), through the update it makes: capture the step's terms and, before its backward, the
    # gradient of each term on its own; the student's gradient must be sum_k lambda_k * grad L_k
    params = [p for p in trainer.student.parameters() if p.requires_grad]
    seen = {}
    objective = trainer.objective.forward

    def spy_objective(*args):
        terms, feats = objective(*args)
        seen["args"], seen["terms"] = args, {k: v.detach().clone() for k, v in terms.items()}
        seen["grads"] = {k: torch.autograd.grad(v, params, retain_graph=True, allow_unused=True) for k, v in terms.items()}
        return terms, feats

    contrastive_loss = losses.contrastive_loss

    def spy_contrastive(*args, **kw):
        seen["contr"] = contrastive_loss(*args, **kw)
        return seen["contr"]

    def keep_logits(module, inputs, output):  # the student's logits of the step (one forward)
        assert "logits" not in seen
        seen["logits"] = output.detach()

    hook = trainer.student.classifier.register_forward_hook(keep_logits)
    monkeypatch.setattr(trainer.objective, "forward", spy_objective)
    monkeypatch.setattr(losses, "contrastive_loss", spy_contrastive)
    terms = trainer.step(*batches)
    hook.remove()
    assert set(seen["terms"]) == set(lam) and terms["contr"] > 0

    # which term is which, recomputed with semiseg.losses from the student's logits of this step
    inputs, targets, conf_u, B_l, B_u = seen["args"][:5]
    logits = F.interpolate(seen["logits"], size=inputs.shape[-2:], mode="bilinear", align_corners=False)
    alpha, beta = trainer.alpha(), conf_u ** cfg.sharpen
    views = range(cfg.num_views)
    independent = {
        "sup": losses.weighted_cross_entropy(logits[:B_l], targets[:B_l], class_weights=alpha),
        "pseudo": sum(losses.weighted_cross_entropy(logits[B_l + a * B_u: B_l + (a + 1) * B_u], targets[B_l + a * B_u: B_l + (a + 1) * B_u],
                                                    class_weights=alpha, pixel_weights=beta[a * B_u: (a + 1) * B_u]) for a in views) / cfg.num_views,
        "ent": losses.entropy_loss(logits[B_l:]),
        "contr": seen["contr"].detach(),
    }
    for k, value in independent.items():
        assert float(seen["terms"][k]) == pytest.approx(float(value), rel=1e-5), f"term {k} is not L_{k}"
        assert terms[k] == pytest.approx(float(value), rel=1e-5), k
    assert terms["loss"] == pytest.approx(sum(lam[k] * float(independent[k]) for k in lam), rel=1e-5)

    def flat(grads):
        return torch.cat([(torch.zeros_like(p) if d is None else d).flatten() for d, p in zip(grads, params)])

    grad = flat([p.grad for p in params])
    per_term = {k: flat(v) for k, v in seen["grads"].items()}

    def error(weights):
        want = sum(weights[k] * per_term[k] for k in weights)
        return float((grad - want).norm() / want.norm())

    assert error(lam) < 1e-4, "the update is not sum_k lambda_k grad L_k"
    for a, b in itertools.combinations(lam, 2):  # a lambda on the wrong term would show
        assert error({**lam, a: lam[b], b: lam[a]}) > 1e-2, (a, b)


def test_warmup_zeroes_pseudo_and_contr_only():
    cfg = load_config("smoke", {"iterations": 150, "warmup_frac": 2 / 150, "warmup_beta": 0.0})
    trainer = Trainer(cfg, 4, 12, "cpu")
    assert trainer.lambdas() == {"sup": 1.0, "pseudo": 0.0, "ent": 0.01, "contr": 0.0}
    trainer.iteration = 2
    assert trainer.lambdas() == {"sup": 1.0, "pseudo": 1.0, "ent": 0.01, "contr": 0.1}


def test_warmup_waits_for_a_confident_teacher():
    """The gate (issue #10): after warmup_frac, the warm-up lasts until the running mean
    (momentum 0.9) of the teacher's mean beta reaches warmup_beta."""
    cfg = load_config("smoke", {"iterations": 150, "warmup_frac": 2 / 150, "warmup_beta": 0.05})
    trainer = Trainer(cfg, 4, 12, "cpu")
    on = {"sup": 1.0, "pseudo": 1.0, "ent": 0.01, "contr": 0.1}
    for it in range(40):  # an unconfident teacher: the fixed part ends at 2, the warm-up does not
        trainer.iteration = it
        trainer.end_warmup(0.001)
    trainer.iteration = 40
    assert trainer.warmup_end is None and trainer.lambdas()["pseudo"] == 0.0 and trainer.lambdas()["contr"] == 0.0
    assert abs(trainer.teacher_beta - 0.001) < 1e-12
    mean, it = trainer.teacher_beta, 40
    while mean < 0.05:  # the teacher jumps to beta = 0.2: the running mean crosses 0.05 a few steps later
        mean = 0.9 * mean + 0.1 * 0.2
        trainer.iteration = it
        trainer.end_warmup(0.2)
        assert (trainer.warmup_end is None) == (mean < 0.05), it
        it += 1
    assert trainer.warmup_end == it == 43 and abs(trainer.teacher_beta - mean) < 1e-12
    trainer.iteration = it
    assert trainer.lambdas() == on
    trainer.end_warmup(0.0)  # once ended, the warm-up stays ended
    assert trainer.warmup_end == 43 and trainer.lambdas() == on
    # not before the fixed part, however confident the teacher
    early = Trainer(load_config("smoke", {"iterations": 150, "warmup_frac": 0.1, "warmup_beta": 0.05}), 4, 12, "cpu")
    for it in range(15):
        early.iteration = it
        early.end_warmup(0.9)
    assert early.warmup_end == 15


def test_warmup_gate_survives_a_resume_and_reads_old_checkpoints():
    cfg = load_config("smoke", {"iterations": 150, "warmup_frac": 2 / 150, "warmup_beta": 0.05})
    trainer = Trainer(cfg, 4, 12, "cpu")
    trainer.teacher_beta, trainer.warmup_end, trainer.iteration = 0.07, 31, 60
    state = trainer.state_dict()
    again = Trainer(cfg, 4, 12, "cpu")
    again.load_state_dict(state)
    assert (again.teacher_beta, again.warmup_end) == (0.07, 31)
    old = {k: v for k, v in state.items() if k not in ("teacher_beta", "warmup_end")}  # before the gate
    again = Trainer(cfg, 4, 12, "cpu")
    again.load_state_dict(old)
    assert again.warmup_end == 2 and again.lambdas()["pseudo"] == 1.0  # past the fixed warm-up: as trained
    again = Trainer(cfg, 4, 12, "cpu")
    again.load_state_dict({**old, "iteration": 1})
    assert again.warmup_end is None  # still in the fixed part: the gate decides from here


def test_a_run_whose_teacher_never_gets_confident_says_so():
    """A full-method run that stays in the warm-up is supervised + L_ent; it warns at half the
    schedule and at the end (log, status.json, summary.json), naming warmup_beta."""
    import dataclasses

    from semiseg.data.sampling import Batches
    from semiseg.train import halfway_warnings

    cfg = load_config("smoke", {"warmup_beta": 0.99})
    labeled, unlabeled, _ = build_train_data(cfg)
    trainer = Trainer(cfg, labeled.num_classes, len(labeled), "cpu")
    batches = [Batches(ds, size, cfg.base_size, cfg.crop_size, cfg.seed + k)
               for k, (ds, size) in enumerate([(labeled, cfg.batch_labeled), (unlabeled, cfg.batch_unlabeled)])]
    for it in range(cfg.iterations):
        terms = trainer.step(batches[0](it), batches[1](it))
        assert "pseudo" not in terms and "contr" not in terms and 0.0 <= terms["teacher_beta"] < 0.99
    assert trainer.warmup_end is None
    notes = halfway_warnings(cfg, trainer, None)
    assert len(notes) == 1 and "warmup_beta = 0.99" in notes[0] and "still off" in notes[0], notes
    # the paper's fixed warm-up: the same run switches both terms on after warmup_frac
    fixed = Trainer(dataclasses.replace(cfg, warmup_beta=0.0), labeled.num_classes, len(labeled), "cpu")
    for it in range(cfg.iterations):
        terms = fixed.step(batches[0](it), batches[1](it))
    assert fixed.warmup_end == round(cfg.warmup_frac * cfg.iterations) and "pseudo" in terms


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


def test_a_fully_supervised_run_writes_embeddings_from_its_labeled_images(tmp_path):
    """Ratio 1/1 has no unlabeled images: embeddings.npz samples the labeled ones and says so."""
    from semiseg import embeddings

    cfg = load_config("smoke", {"ratio": "1/1", "variant": "supervised", "iterations": 2, "out_dir": str(tmp_path)})
    train(cfg, progress=False)
    data = embeddings.load(tmp_path / "embeddings.npz")
    assert data["meta"]["pred_images"] == "labeled" and len(data["pred_vectors"]) > 0
