"""§3, eq. (1): one teacher-student training step, the training loop, and the run directory.

``python -m semiseg.train CONFIG [key=value ...]`` trains with a YAML profile from
``semiseg/configs`` (or a path) plus overrides, and writes into the run directory:
``config.yaml`` (resolved), ``metrics.jsonl``, ``summary.json`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed, losses, reference
from .checkpoint import (atomic_torch_save, check_compatible, newest_valid_checkpoint, read_checkpoint,
                         rng_state, save_checkpoint, set_rng_state, upgrade_optimizer_state)
from .checkpoint import load_checkpoint_model, resolve_device  # noqa: F401 (re-exported)
from .config import Config, load_config, one_line_errors, save_config, source_commit
from .data.augment import STRONG, WEAK, augment
from .data.sampling import Batches, seeded
from .data.sets import build_eval_dataset, build_train_data, eval_splits  # noqa: F401 (re-exported)
from .evaluate import evaluate
from .losses import fp32_or_wider
from .memory_bank import ClassMemoryBank, bank_quota, feature_quality_filter
from .models import build_model
from .models.heads import freeze_absent_classes
from .run_dir import (Interrupted, MetricsLog, NoLog, RunLock, StopSignals, check_resume_config, remove_run_files,
                      write_json, write_status)
from .teacher import ema_update, make_teacher, tau_schedule


# ----------------------------------------------------------------------------- the step
def pixel_labels(labels, size):
    """[B, H, W] labels -> [B, h, w] labels at feature resolution ``size`` (nearest, §4.2)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def pixels_to_vectors(feats, labels):
    """[B, D, h, w] features and [B, H, W] labels -> [B*h*w, D] vectors and labels at feature resolution (§4.2).

    The vectors are a copy of the map; the heads read a map in place (``MLPHead`` on [B, D, h, w])."""
    labels = pixel_labels(labels, feats.shape[-2:])
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), labels.reshape(-1), labels


class _Objective(torch.nn.Module):
    """``Trainer.student_terms`` as a module that owns the student, so DDP can wrap it."""

    def __init__(self, trainer):
        super().__init__()
        self.student = trainer.student
        self._trainer = [trainer]  # a list: not registered as a submodule

    def forward(self, *args):
        return self._trainer[0].student_terms(*args)


def loss_weights(cfg, iteration, warmup_end=None):
    """The λ's of eq. (1) at ``iteration``. §4.2: λ_pseudo = λ_contr = 0 during the warm-up, which
    ends at ``warmup_end``; by default at its fixed part, ``warmup_frac`` of the schedule (2K of
    150K iterations in the paper). :meth:`Trainer.end_warmup` can make it end later."""
    end = cfg.warmup_iterations if warmup_end is None else warmup_end
    warm = iteration < end
    return {"sup": cfg.lambda_sup, "pseudo": 0.0 if warm else cfg.lambda_pseudo,
            "ent": cfg.lambda_ent, "contr": 0.0 if warm else cfg.lambda_contr}


class Trainer:
    """Holds student f_theta, teacher f_xi, the memory bank and the class-frequency state."""

    def __init__(self, cfg: Config, num_classes: int, num_labeled: int, device, dist_info=None):
        self.cfg, self.C, self.device = cfg, num_classes, torch.device(device)
        self.dist = dist_info or distributed.Dist()
        self.student = build_model(cfg.arch, num_classes, pretrained=cfg.pretrained).to(self.device).train()
        if cfg.attention_impl == "loop":  # the per-class reference modules, same weights (issue #13)
            reference.use_loop_attention(self.student)
        if cfg.sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise ValueError("config key 'sync_bn' = True needs CUDA processes (SyncBatchNorm has no CPU kernel)")
            distributed.convert_sync_bn(self.student)
        if cfg.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
        self.teacher = make_teacher(self.student)
        # torch.compile'd forward passes share the networks' parameters (the state dicts are unchanged)
        self.compiled = ({id(net): torch.compile(net) for net in (self.student, self.teacher)} if cfg.compile else {})
        if cfg.compile_contrastive:
            # eq. (8)-(11) forward + backward and the bank update, each one graph: inductor fuses their
            # elementwise work into a few kernels (issue #13); same numbers up to float rounding
            self.contrastive, self._push_to_bank = torch.compile(self.contrastive), torch.compile(self._push_to_bank)
        # the student-side computation of a step (eq. 1's terms), wrapped in DDP with several processes
        self.objective = _Objective(self)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # BatchNorm statistics are averaged after each step instead of broadcast from rank 0
            buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
            self.objective = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # g, q, S_c: unused while L_contr is off (warm-up), S_c if attention=false
                **buffers)
        self.optimizer = torch.optim.SGD(self.student.param_groups(cfg.lr, cfg.head_lr_mult), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        self.bank = ClassMemoryBank(num_classes, cfg.psi, self.student.head_dim, device=self.device,
                                     dtype=torch.get_default_dtype())
        self.quota = bank_quota(cfg.psi, num_labeled)
        self.class_counts = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        self.iteration = 0
        self.teacher_beta = None  # running mean of the teacher's pixel weight beta (the warm-up's gate)
        # the iteration at which L_pseudo and L_contr switch on (None: not known yet, see end_warmup)
        self.warmup_end = None if cfg.warmup_beta else cfg.warmup_iterations

    # λ weights of eq. (1), with the warm-up of §4.2 (not ended while warmup_end is None)
    def lambdas(self):
        return loss_weights(self.cfg, self.iteration, math.inf if self.warmup_end is None else self.warmup_end)

    def end_warmup(self, beta):
        """The warm-up rule (§4.2, and a choice where the paper is silent). The paper switches
        L_pseudo and L_contr off for the first 2K of 150K iterations "to make sure predictions have
        some quality before being taken into account"; a fixed fraction cannot promise that in a
        short run (150 iterations: a 2-iteration warm-up, then pseudo-labels of an untrained
        teacher, issue #10). So the warm-up lasts ``warmup_frac`` of the schedule *and* until the
        running mean (momentum 0.9 over steps) of the teacher's mean pixel weight
        beta = confidence^s on the unlabeled images reaches ``warmup_beta``. ``warmup_beta = 0`` is
        the paper's fixed warm-up. ``beta`` is this step's mean (None without unlabeled images),
        read in the step's one loss-value sync: the gate costs no extra host sync."""
        cfg = self.cfg
        if beta is not None:
            self.teacher_beta = beta if self.teacher_beta is None else 0.9 * self.teacher_beta + 0.1 * beta
        if self.warmup_end is not None or self.iteration + 1 < cfg.warmup_iterations:
            return
        if not cfg.warmup_beta or (self.teacher_beta or 0.0) >= cfg.warmup_beta:
            self.warmup_end = self.iteration + 1

    def set_lr(self):
        factor = (1 - self.iteration / self.cfg.iterations) ** self.cfg.poly_power  # poly schedule
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def alpha(self):
        return losses.class_balance_weights(self.class_counts) if self.cfg.class_balance else None

    def forward(self, net, x):
        """(logits, feats) of ``net`` in fp32, computed under bf16 autocast / channels_last when configured."""
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            logits, feats = self.compiled.get(id(net), net)(x)
        return fp32_or_wider(logits), fp32_or_wider(feats)

    @torch.no_grad()
    def pseudo_labels(self, x_u):
        """Eq. (5): teacher predictions on the un-augmented unlabeled images -> (labels, confidence)."""
        logits, _ = self.forward(self.teacher, x_u)
        probs = F.softmax(F.interpolate(fp32_or_wider(logits), size=x_u.shape[-2:], mode="bilinear", align_corners=False), 1)
        conf, pseudo = probs.max(1)
        return pseudo, conf

    def generators(self, stream, n):
        """One generator per sample of this process's share: keyed on (seed, iteration, stream, the
        sample's place in the global batch), so augmentation does not depend on the process count."""
        return [seeded(self.cfg.seed, self.iteration, 7, stream, self.dist.rank * n + i) for i in range(n)]

    def step(self, labeled, unlabeled=None, source=None):
        """One iteration of eq. (1); returns the loss terms as floats (means over processes)."""
        cfg = self.cfg
        lam = self.lambdas()
        # augmentation randomness depends only on (seed, iteration, sample): exact resume needs no RNG state
        self.generator = seeded(cfg.seed, self.iteration, 7, self.dist.rank)
        # the teacher runs during the warm-up too: its confidence is the warm-up's gate
        semi = unlabeled is not None and bool(cfg.lambda_pseudo or cfg.lambda_ent or cfg.lambda_contr)
        x_l, y_l, ids_l = self.to_device(labeled)
        # Eq. (4) input: a weak view x_l^a of each labeled image (Table 1)
        x_la, y_la, _ = augment(x_l, y_l, None, WEAK, self.generators(0, x_l.shape[0]))
        n_target = x_la.shape[0]
        if source is not None:  # §4.3.2: source images join the labeled batch for L_sup and L_contr
            x_s, y_s, _ = self.to_device(source)
            x_sa, y_sa, _ = augment(x_s, y_s, None, WEAK, self.generators(1, x_s.shape[0]))
            x_la, y_la = torch.cat([x_la, x_sa]), torch.cat([y_la, y_sa])
        # alpha's class frequencies (eq. 3): labeled pixels (255 -> bin C, dropped) and pseudo-labels;
        # in domain adaptation the source images' labels count too (a choice: the paper is silent)
        class_counts = losses.class_histogram(y_la.clamp(max=self.C), self.C + 1)[: self.C]
        inputs, targets, conf_u, B_u = x_la, y_la, None, 0
        stats = {}
        if semi:
            x_u, *y_u = self.to_device(unlabeled[:2])  # true labels, where given, for the log only
            pseudo, conf = self.pseudo_labels(x_u)
            beta = conf ** cfg.sharpen  # §4.2's pixel weights of the unlabeled images (before augmentation)
            stats = self.pseudo_stats(pseudo, beta, y_u[0]) if y_u else {}
            stats["teacher_beta"] = beta.mean()  # all unlabeled pixels: the warm-up's gate
            class_counts = class_counts + losses.class_histogram(pseudo, self.C)
            # Eq. (6)-(7): A strong views; their geometry is applied to pseudo-labels and confidences too
            views = [augment(x_u, pseudo, conf, STRONG, self.generators(2 + a, x_u.shape[0])) for a in range(cfg.num_views)]
            inputs = torch.cat([x_la] + [v[0] for v in views])
            targets = torch.cat([y_la] + [v[1] for v in views])
            conf_u = torch.cat([v[2] for v in views])
            B_u = x_u.shape[0]
        self.class_counts += distributed.all_reduce_(class_counts.double(), self.dist)
        terms, feats = self.objective(inputs, targets, conf_u, x_la.shape[0], B_u, semi, lam)
        # Eq. (1)
        loss = sum(lam[k] * v for k, v in terms.items())
        # the step's one host sync: all loss values at once, for the log and the NaN guard
        values = torch.stack([loss.detach(), *(v.detach() for v in terms.values()), *stats.values()])
        values = dict(zip(["loss", *terms, *stats], distributed.all_reduce_(values, self.dist, mean=True).tolist()))
        if not math.isfinite(values["loss"]):
            bad = [k for k in terms if not math.isfinite(values[k])]
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: term(s) {bad or ['total']}")
        self.set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # S_c of classes absent from this step stay as they are, as C separate modules did (issue #13)
        with freeze_absent_classes(self.student, self.optimizer, lambda t: distributed.all_reduce_(t, self.dist)):
            self.optimizer.step()
        distributed.average_buffers_(self.student, self.dist)
        # Eq. (2)
        ema_update(self.teacher, self.student, tau_schedule(self.iteration, cfg.iterations, cfg.tau_start, cfg.tau_end))
        if cfg.lambda_contr:
            self.update_bank(x_la[:n_target], y_la[:n_target], ids_l, feats[:n_target])
        self.end_warmup(values.get("teacher_beta"))
        self.iteration += 1
        return {**{k: values[k] for k in terms}, "loss": values["loss"], **{k: values[k] for k in stats}}

    @torch.no_grad()
    def pseudo_stats(self, pseudo, beta, labels):
        """Diagnostics of eq. (5)'s pseudo-labels against the true labels of the unlabeled images
        (read for the log only, never for training): ``pseudo_acc`` (pixel accuracy),
        ``pseudo_beta`` (mean pixel weight ``beta`` = confidence ** s of L_pseudo, given) and
        ``pseudo_acc_beta`` (accuracy weighted by beta)."""
        valid = (labels != 255).float()
        correct = (pseudo == labels).float() * valid
        n = valid.sum().clamp(min=1)
        return {"pseudo_acc": correct.sum() / n, "pseudo_beta": (beta * valid).sum() / n,
                "pseudo_acc_beta": (beta * correct).sum() / (beta * valid).sum().clamp(min=1e-12)}

    def student_terms(self, inputs, targets, conf_u, B_l, B_u, semi, lam):
        """The student's forward pass and the terms of eq. (1) -> (terms, feats)."""
        cfg = self.cfg
        logits, feats = self.forward(self.student, inputs)
        logits_up = F.interpolate(fp32_or_wider(logits), size=inputs.shape[-2:], mode="bilinear", align_corners=False)
        alpha = self.alpha()
        terms = {}
        # Eq. (4)
        terms["sup"] = losses.weighted_cross_entropy(logits_up[:B_l], targets[:B_l], class_weights=alpha)
        if semi:
            beta = conf_u ** cfg.sharpen  # §4.2: pixel weights = sharpened teacher confidence
            if lam["pseudo"]:
                # Eq. (6): mean over the A views of eq. (3)
                terms["pseudo"] = sum(
                    losses.weighted_cross_entropy(logits_up[B_l + a * B_u: B_l + (a + 1) * B_u], targets[B_l + a * B_u: B_l + (a + 1) * B_u],
                                                  class_weights=alpha, pixel_weights=beta[a * B_u:(a + 1) * B_u])
                    for a in range(cfg.num_views)) / cfg.num_views
            if lam["ent"]:
                # Eq. (7)
                terms["ent"] = losses.entropy_loss(logits_up[B_l:])
        if lam["contr"]:
            terms["contr"] = self.contrastive(feats, targets)
        return terms, feats

    def to_device(self, batch):
        """A batch's CPU tensors on the model's device; on CUDA through pinned memory, asynchronously
        (a copy from pageable memory would make the host wait for the device)."""
        if self.device.type != "cuda":
            return [t.to(self.device) for t in batch]
        return [t.pin_memory().to(self.device, non_blocking=True) for t in batch]

    def contrastive(self, feats, labels):
        """Eq. (8)-(11) on student vectors of labeled (labels) and unlabeled (pseudo-labels) pixels.

        No host sync (issue #13): every pixel vector goes through g, q and S_c,theta, the
        ignore-label ones marked invalid (left out of every BatchNorm statistic, weight 0 in the
        loss), and S_c,theta runs on all C x psi bank slots, the empty ones invalid. Fixed shapes,
        the same numbers as gathering the valid vectors first (``attention_impl: loop``,
        :func:`semiseg.reference.contrastive_gathered`, the code before issue #13).
        """
        model, cfg = self.student, self.cfg
        if cfg.attention_impl == "loop":
            vectors, vec_labels, _ = pixels_to_vectors(feats, labels)
            return reference.contrastive_gathered(model, vectors, vec_labels, self.bank, cfg.attention, cfg.attention_detach)
        vec_labels = pixel_labels(labels, feats.shape[-2:]).reshape(-1)
        valid = vec_labels != 255
        pred = model.prediction(model.projection(feats, valid), valid)  # P = q(g(V)), V: the map's pixel vectors
        slot_valid = torch.arange(cfg.psi, device=self.device)[None] < self.bank.count[:, None]  # [C, psi]
        if cfg.attention:
            # S_c,theta(p); with attention_detach (the official code's choice, the paper is silent)
            # L_contr cannot move p towards where the attention is low, only train S_c itself
            seen = pred.detach() if cfg.attention_detach else pred
            pred_scores = model.attention_pred(seen, vec_labels, valid)
            memory_scores = model.attention_proj.per_class(self.bank.memory, slot_valid)  # S_c,theta(z'), 0 if empty
        else:
            pred_scores, memory_scores = valid.to(pred.dtype), slot_valid.float()
        return losses.contrastive_loss(pred, vec_labels, self.bank.memory, pred_scores, memory_scores, self.C,
                                       memory_count=self.bank.count)

    @torch.no_grad()
    def update_bank(self, x_la, y_la, ids, student_feats):
        """§3.4 Memory Bank: FQF, rank by S_c,xi, per-image quota, FIFO — labeled target images only."""
        net = self.teacher if self.cfg.bank_from == "teacher" else self.student
        if self.cfg.bank_from == "teacher":
            _, feats = self.forward(net, x_la)
        else:
            feats = student_feats.detach()
        self._push_to_bank(net, feats, y_la, ids)

    @torch.no_grad()
    def _push_to_bank(self, net, feats, y_la, ids):
        """:meth:`update_bank` after the teacher forward: the work ``compile_contrastive`` compiles."""
        logits = net.classify(feats)
        labels_small = pixel_labels(y_la, feats.shape[-2:])
        vec_labels = labels_small.reshape(-1)
        if self.cfg.fqf:
            valid = feature_quality_filter(logits, labels_small, self.cfg.phi).reshape(-1)
        else:
            valid = vec_labels != 255
        was_training = net.training
        net.eval()  # Z' = g_xi(f_xi^-(x)) with inference-mode BatchNorm
        proj = net.projection(feats)  # the map's pixel vectors, read in place
        safe_labels = torch.where(vec_labels == 255, torch.zeros_like(vec_labels), vec_labels)
        if self.cfg.attention:
            scores = net.attention_proj(proj, safe_labels)  # ranking R_c = S_c,xi(Z'_c)
        else:
            scores = torch.rand(vec_labels.shape, generator=self.generator).to(self.device)
        net.train(was_training)
        image_ids = ids.to(self.device).repeat_interleave(labels_small[0].numel())
        # several processes: every one pushes all processes' candidates (gathered in rank order,
        # fixed shapes), so the banks stay identical
        gather = lambda t: distributed.all_gather_cat(t, self.dist)  # noqa: E731
        self.bank.push(gather(proj), gather(vec_labels), gather(scores), gather(image_ids), self.quota, valid=gather(valid))

    def state_dict(self):
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "bank": self.bank.state_dict(),
                "class_counts": self.class_counts, "iteration": self.iteration, "rng": rng_state(),
                "teacher_beta": self.teacher_beta, "warmup_end": self.warmup_end}

    def load_state_dict(self, state, path="the checkpoint"):
        self.student.load_state_dict(state["student"])  # old per-class attention keys are converted
        self.teacher.load_state_dict(state["teacher"])
        optimizer = upgrade_optimizer_state(state["optimizer"], state["student"], self.optimizer, self.student, path)
        try:
            self.optimizer.load_state_dict(optimizer)
        except ValueError as err:
            raise ValueError(f"checkpoint {path}: its optimizer state does not fit this model ({err}); evaluate or "
                             f"predict from it, or restart the run without --resume") from None
        self.bank.load_state_dict(state["bank"])
        self.class_counts = state["class_counts"].to(self.device)
        self.iteration = state["iteration"]
        fixed = self.cfg.warmup_iterations  # checkpoints from before the gate
        self.teacher_beta = state.get("teacher_beta")
        self.warmup_end = state.get("warmup_end", fixed if self.iteration >= fixed or not self.cfg.warmup_beta else None)
        if "rng" in state:
            set_rng_state(state["rng"])


# ----------------------------------------------------------------------------- the loop
def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def setup(cfg: Config, info=None, run_dir=None, resume=False):
    """Data, batches and trainer of a run (shared by :func:`train` and the multi-process test).

    Returns ``(trainer, batches, val)``; ``batches(it)`` gives the (labeled, unlabeled, source)
    batches of iteration ``it`` for this process. With ``resume`` the trainer continues from the
    newest valid checkpoint of ``run_dir`` (the final ``checkpoint.pt`` when the run finished
    training but not its evaluation); its config must match (:func:`semiseg.run_dir.check_resume_config`).
    """
    info = info or distributed.Dist()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg)
    if device == "cuda" and info.enabled:
        device = f"cuda:{info.local_rank}"
    for key in ("batch_labeled", "batch_unlabeled"):
        distributed.check_divisible(getattr(cfg, key), info, key)
    labeled, unlabeled, source = build_train_data(cfg)
    # every split the run will be scored on is found now, not after hours of training
    eval_sets = {split: build_eval_dataset(cfg, split) for split in eval_splits(cfg)}
    for split, dataset in eval_sets.items():
        if len(dataset) == 0:
            raise ValueError(f"the {split} split of {cfg.dataset} has no images to score the run on")
        dataset.check_headers()
    val = eval_sets["val"]
    trainer = Trainer(cfg, labeled.num_classes, len(labeled), device, info)
    trainer.eval_sets = eval_sets
    state, path = (None, None)
    if resume and (Path(run_dir) / "checkpoint.pt").is_file():  # trained; the evaluation failed
        path = Path(run_dir) / "checkpoint.pt"
        state = read_checkpoint(path)
    elif resume:
        state, path = newest_valid_checkpoint(run_dir)
    trainer.seconds = 0.0
    if state is not None:
        check_compatible(state, cfg.arch, labeled.num_classes, path)
        check_resume_config(state["config"], cfg, path)
        trainer.load_state_dict(state, path)
        trainer.seconds = state.get("seconds", 0.0)
        if info.main:
            print(f"resuming {run_dir} from {path.name} (iteration {trainer.iteration})")
    elif resume and info.main:
        print(f"no valid checkpoint in {run_dir}; starting from iteration 0")

    def make(ds, size, stream):
        return Batches(ds, size, cfg.base_size, cfg.crop_size, seeded(cfg.seed, stream).initial_seed(), info.rank, info.world,
                       cache=cfg.cache_images)

    labeled_batch = make(labeled, cfg.batch_labeled, 1)
    semi = cfg.lambda_pseudo or cfg.lambda_ent or cfg.lambda_contr
    unlabeled_batch = make(unlabeled, cfg.batch_unlabeled, 2) if semi and len(unlabeled) else None
    source_batch = make(source, cfg.batch_labeled, 3) if source is not None else None

    def batches(it):
        return (labeled_batch(it), unlabeled_batch(it) if unlabeled_batch else None,
                source_batch(it) if source_batch else None)

    return trainer, batches, val


def train(cfg: Config, progress=True, overwrite=False, resume=False):
    """Train one run; returns its summary dict (also written to ``<run_dir>/summary.json``).

    With ``resume`` the run continues from the newest valid checkpoint in its run directory
    (config ``checkpoint_every``) and ends with the same weights as an uninterrupted run; a run
    whose final evaluation failed is only evaluated. The run folder is locked for the whole run,
    ``overwrite`` removes the old run's files first, and SIGTERM / SIGINT stop it after the
    current iteration with a checkpoint (:mod:`semiseg.run_dir`).
    Under ``torchrun`` every process trains its share of each batch (:mod:`semiseg.distributed`);
    rank 0 alone evaluates and writes.
    """
    run_dir = cfg.run_dir()
    if (run_dir / "summary.json").exists() and not overwrite:
        raise FileExistsError(f"{run_dir} already holds a finished run (summary.json); pass --overwrite to replace it")
    commit = source_commit()  # the code that trains, read before it can change on disk
    info = distributed.init(resolve_device(cfg))
    lock = RunLock(run_dir)
    if info.main:
        if run_dir.exists() and not run_dir.is_dir():
            raise NotADirectoryError(f"out_dir {run_dir} is a file, not a folder")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(f"cannot create out_dir {run_dir}: a parent of it is a file") from None
        except PermissionError:
            raise PermissionError(f"cannot create out_dir {run_dir}: permission denied") from None
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(f"out_dir {run_dir} is not writable")
        lock.acquire()
    try:
        if info.main and overwrite:
            remove_run_files(run_dir)  # before anything new is written: --resume can never find the old run
        distributed.barrier(info)
        try:
            trainer, batches, val = setup(cfg, info, run_dir, resume)
        except BaseException as err:
            if info.main:
                write_status(run_dir, "crashed", iteration=0, error=f"{type(err).__name__}: {err}", stage="setup")
            raise
        return _train(cfg, info, run_dir, trainer, batches, val, commit, progress and info.main)
    finally:
        lock.release()


def _train(cfg, info, run_dir, trainer, batches, val, commit, progress):
    """The loop of :func:`train`, its checkpoints, the final evaluation and the summary."""
    main = info.main
    device = trainer.device
    if main:
        save_config(cfg, run_dir / "config.yaml")
        write_status(run_dir, "running", iteration=trainer.iteration, processes=info.world)
    metrics = MetricsLog(run_dir / "metrics.jsonl", trainer.iteration) if main else NoLog()
    meta = {"config": cfg.to_dict(), "num_classes": trainer.C, "processes": info.world,
            "class_names": list(val.class_names), "palette": [tuple(c) for c in val.palette]}
    start = time.time() - trainer.seconds
    bar = range(trainer.iteration, cfg.iterations)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc=f"{cfg.variant} seed{cfg.seed}", dynamic_ncols=True, file=sys.stdout,
                   initial=trainer.iteration, total=cfg.iterations)

    def state():
        return {**meta, **trainer.state_dict(), "seconds": time.time() - start}

    try:
        # one process: SIGTERM / SIGINT finish the current iteration, then stop with a checkpoint
        with (StopSignals() if not info.enabled else contextlib.nullcontext()) as signals:
            for it in bar:
                terms = trainer.step(*batches(it))
                if progress:
                    bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()})
                record = None
                if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations:
                    fill = (trainer.bank.count.float() / cfg.psi).tolist()
                    record = {"iteration": it + 1, **terms, "lr": trainer.optimizer.param_groups[0]["lr"],
                              "bank_fill": sum(fill) / len(fill), "bank_fill_per_class": [round(f, 4) for f in fill],
                              "seconds": round(time.time() - start, 2)}
                if cfg.eval_every and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.iterations:
                    if main:  # the learning curves: student and EMA teacher on val (and test)
                        record = (record or {"iteration": it + 1}) | curve_scores(trainer, cfg, device)
                    distributed.barrier(info)
                if record:
                    metrics.add(record)
                if main and it + 1 == cfg.iterations // 2:
                    notes = halfway_warnings(cfg, trainer, metrics)
                    for note in notes:
                        print(f"warning: {note}", file=sys.stderr)
                    write_status(run_dir, "running", iteration=it + 1, processes=info.world, warnings=notes)
                if signals is not None and signals.pending and it + 1 < cfg.iterations:
                    save_checkpoint(run_dir, state(), cfg.keep_checkpoints)
                    name = signal.Signals(signals.pending).name
                    write_status(run_dir, "interrupted", iteration=it + 1, signal=name)
                    raise Interrupted(signals.pending, f"{name}: stopped at iteration {it + 1} of {cfg.iterations} with a "
                                      f"checkpoint; resume with the same command and --resume (out_dir={run_dir})")
                if main and cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
                    save_checkpoint(run_dir, state(), cfg.keep_checkpoints)
        seconds = time.time() - start
        if main:  # the trained weights are safe before anything can go wrong in the evaluation
            atomic_torch_save({**state(), "seconds": seconds}, run_dir / "checkpoint.pt")
            scores = score_run(trainer, cfg, progress)
    except Interrupted:
        raise
    except BaseException as err:
        if main:
            write_status(run_dir, "crashed", iteration=trainer.iteration, error=f"{type(err).__name__}: {err}")
        raise
    if not main:
        distributed.barrier(info)
        distributed.destroy(info)
        return None
    headline = eval_splits(cfg)[0]
    result = scores[cfg.eval_with][headline]
    summary = {"miou": result["miou"], "scored_on": headline, "per_class_iou": result["per_class_iou"],
               "val_miou": scores[cfg.eval_with]["val"]["miou"],
               "teacher_miou": scores["teacher"][headline]["miou"], "teacher_val_miou": scores["teacher"]["val"]["miou"],
               "scores": scores, "iterations": cfg.iterations, "warmup_end": trainer.warmup_end,
               "seconds": round(seconds, 1), "variant": cfg.variant, "seed": cfg.seed, "split": cfg.split,
               "profile": cfg.profile, "dataset": cfg.dataset, "ratio": cfg.ratio, "arch": cfg.arch,
               "evaluated": cfg.eval_with, "device": str(device), "processes": info.world, "precision": cfg.precision,
               "torch": torch.__version__, "commit": commit, "machine": machine_name(device)}
    final = {"iteration": cfg.iterations, "val_miou": summary["val_miou"], "teacher_val_miou": summary["teacher_val_miou"]}
    if cfg.curve_test:  # the curves' last point: the final scores on test_split
        final |= {"test_miou": scores["student"][cfg.test_split]["miou"],
                  "teacher_test_miou": scores["teacher"][cfg.test_split]["miou"]}
    metrics.add(final)
    write_json(run_dir / "summary.json", summary, indent=2)
    notes = halfway_warnings(cfg, trainer, metrics) if main and cfg.iterations >= 2 else []
    if notes:
        summary["warnings"] = notes
        write_json(run_dir / "summary.json", summary, indent=2)
    write_status(run_dir, "finished", iteration=cfg.iterations, **({"warnings": notes} if notes else {}))
    write_embeddings(run_dir)
    distributed.barrier(info)
    distributed.destroy(info)
    return summary


def curve_scores(trainer, cfg, device):
    """One point of the learning curves: ``val_miou`` and ``teacher_val_miou``, plus
    ``test_miou`` and ``teacher_test_miou`` with ``curve_test`` (scored on ``test_split``)."""
    splits = ["val"] + ([cfg.test_split] if cfg.curve_test else [])
    out = {}
    for split in splits:
        key = "val" if split == "val" else "test"
        out[f"{key}_miou"] = evaluate(trainer.student, trainer.eval_sets[split], cfg.eval_size, device)["miou"]
        out[f"teacher_{key}_miou"] = evaluate(trainer.teacher, trainer.eval_sets[split], cfg.eval_size, device)["miou"]
    return out


def halfway_warnings(cfg, trainer, metrics):
    """One-line warnings for a semi-supervised run whose unlabeled terms are not working by half
    of the schedule (issue #10): a warm-up that has not ended, an empty memory bank, or pseudo-label
    weights of about 0. Each names the likely cause and what to change. Checked at half the schedule
    and again at the end."""
    notes = []
    half = cfg.iterations // 2
    if trainer.warmup_end is None and (cfg.lambda_pseudo or cfg.lambda_contr):
        beta = "not measured" if trainer.teacher_beta is None else f"{trainer.teacher_beta:.3f}"
        notes.append(f"the warm-up has not ended at iteration {trainer.iteration} of {cfg.iterations}: the teacher's "
                     f"mean pixel weight beta = confidence^{cfg.sharpen:g} is {beta} < warmup_beta = "
                     f"{cfg.warmup_beta:g}, so L_pseudo and L_contr are still off (supervised + L_ent so far); "
                     f"train longer, or lower warmup_beta (0: the paper's fixed warm-up of warmup_frac)")
        return notes
    warm = trainer.warmup_end
    if cfg.lambda_contr and int(trainer.bank.count.sum()) == 0:
        notes.append(f"the memory bank is still empty at iteration {trainer.iteration} of {cfg.iterations}, so "
                     f"L_contr is 0: the Feature Quality Filter admits only correct teacher predictions with "
                     f"confidence > phi = {cfg.phi}; lower phi, or train longer (the warm-up ends at {warm})")
    betas = [r["pseudo_beta"] for r in getattr(metrics, "records", []) if "pseudo_beta" in r
             and r["iteration"] > max(warm, half // 2)]
    if cfg.lambda_pseudo and betas and sum(betas) / len(betas) < 1e-3:
        notes.append(f"the pseudo-label weights beta = confidence^{cfg.sharpen:g} average "
                     f"{sum(betas) / len(betas):.1e} after the warm-up (iteration {warm}), so L_pseudo "
                     f"barely trains: the teacher is not yet confident; train longer, raise warmup_frac, "
                     f"or lower sharpen")
    return notes


def write_embeddings(run_dir):
    """``embeddings.npz`` beside the summary (:mod:`semiseg.embeddings`): what the book's pages read.
    A failure here costs the run nothing, so it is a warning, not an error."""
    from .embeddings import export

    try:
        export(run_dir)
    except Exception as err:  # noqa: BLE001 -- the run itself is finished and saved
        warnings.warn(f"{run_dir}: embeddings.npz not written ({type(err).__name__}: {err}); "
                      f"write it with python -m semiseg.embeddings {run_dir}", stacklevel=2)


def eval_model(trainer):
    return trainer.teacher if trainer.cfg.eval_with == "teacher" else trainer.student


def machine_name(device):
    """What the run ran on, for its summary: the GPU's name, or the CPU threads torch used."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()})"


def score_run(trainer, cfg, progress=False):
    """mIoU and per-class IoU of the student (the paper's model, §4.2) and of the EMA teacher on
    every split of :func:`eval_splits`: ``{model: {split: {"miou", "per_class_iou", "images"}}}``."""
    scores = {}
    for name, net in (("student", trainer.student), ("teacher", trainer.teacher)):
        scores[name] = {}
        for split, dataset in trainer.eval_sets.items():
            result = evaluate(net, dataset, cfg.eval_size, trainer.device, progress=progress)
            scores[name][split] = {"miou": round(result["miou"], 4), "per_class_iou": result["per_class_iou"],
                                   "images": len(dataset)}
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m semiseg.train", description="Train the method (or an ablation) on one split.")
    parser.add_argument("config", nargs="?", help="YAML file or name of a shipped profile (semiseg/configs)")
    parser.add_argument("--keys", action="store_true", help="list every config key with its default and meaning")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. iterations=100 seed=1")
    parser.add_argument("--overwrite", action="store_true", help="remove the run in the output directory, then train")
    parser.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint of the run directory")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_intermixed_args(argv)
    if args.keys:
        from .config import keys_table

        print(keys_table())
        return
    if args.config is None:
        parser.error("the config (a profile name or a YAML file) is required")
    try:
        with one_line_errors():
            cfg = load_config(args.config, args.overrides)
            summary = train(cfg, progress=not args.no_progress, overwrite=args.overwrite, resume=args.resume)
    except Interrupted as stop:
        print(stop.message, file=sys.stderr)
        raise
    except KeyboardInterrupt:  # outside the training loop (setup, evaluation)
        sys.exit("interrupted (SIGINT) outside the training loop; resume with --resume")
    if summary is not None:  # rank 0 (or the only process)
        print(json.dumps({k: summary[k] for k in ("variant", "seed", "miou", "iterations", "seconds")}))


if __name__ == "__main__":
    main()
