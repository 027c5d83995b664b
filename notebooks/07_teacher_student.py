# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # 7. Teacher and student: the EMA teacher, the warm-up and one training step (§3, eq. 1, 2, 5, 6)
#
# Two copies of the same network. The **student** $f_\theta$ is trained by gradient descent on
# eq. (1). The **teacher** $f_\xi$ is never trained: after every step its weights move a little
# towards the student's (eq. 2). The teacher is the slower, smoother network, so it makes the
# pseudo-labels for unlabeled images and the targets in the memory bank.

# %% tags=["parameters"]
smoke = False
seed = 0

# %%
import time
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn

from semiseg.config import load_config
from semiseg.data.tiny import camvid_or_tiny
from semiseg.data.augment import STRONG, WEAK, augment
from semiseg.data.sampling import Batches, seeded
from semiseg.teacher import ema_update, make_teacher, tau_schedule
from semiseg.train import Trainer, build_train_data, loss_weights
from semiseg.viz import label_image, show_source

torch.manual_seed(seed)
t_start = time.time()

crop = 64 if smoke else 112   # square crops, pixels
extra_steps = 1 if smoke else 8

_, data_overrides = camvid_or_tiny("train")

# The CPU profile (1500 iterations), with small crops and batches. The warm-up is
# switched off so that the traced iteration has all four terms of eq. (1), and the FQF
# is off so that the memory bank has entries after one iteration (a fresh teacher is
# never 95 % confident, see notebook 05).
cfg = load_config(
    "camvid_quick",
    {
        "crop_size": [crop, crop],
        "batch_labeled": 2,
        "batch_unlabeled": 2,
        "psi": 16,
        "fqf": False,
        "warmup_frac": 0.0,
        "warmup_beta": 0.0,
        "seed": seed,
        **data_overrides,
    },
)
labeled, unlabeled, _ = build_train_data(cfg)
C, palette = labeled.num_classes, labeled.palette
print(
    f"{cfg.dataset}: {len(labeled)} labeled / {len(unlabeled)} unlabeled images; "
    f"{cfg.iterations} iterations in the profile"
)

# %% [markdown]
# ## Idea
#
# * The teacher's weights are an exponential moving average (EMA) of the student's. An EMA with
#   decay τ averages, roughly, the last $1/(1-\tau)$ student states: it smooths out the noise of
#   single SGD steps and gives better, more stable predictions.
# * τ grows from 0.995 to 1 over training, so the teacher follows the student less and less.
# * For the first 2K of 150K iterations the teacher is still bad, so the terms that trust it —
#   pseudo-labels and the contrastive loss — are switched off (λ = 0).
#
# ## Equations
#
# $$\mathcal{L} = \lambda_{sup}\mathcal{L}_{sup} + \lambda_{pseudo}\mathcal{L}_{pseudo} + \lambda_{ent}\mathcal{L}_{ent} + \lambda_{contr}\mathcal{L}_{contr} \tag{1}$$
#
# $$\xi = \tau\,\xi + (1 - \tau)\,\theta \tag{2}$$
#
# with (§4.2) τ from 0.995 to 1 — linearly in the iteration $t$ of $T$ (our choice):
# $\tau_t = 0.995 + 0.005\, t/(T-1)$; $\lambda_{sup}=1$, $\lambda_{pseudo}=1$, $\lambda_{ent}=0.01$,
# $\lambda_{contr}=0.1$, except $\lambda_{pseudo}=\lambda_{contr}=0$ for $t < 2000$ (of 150K).
#
# The teacher's pseudo-labels for an unlabeled image and the loss on its A = 2 strong views:
#
# $$\hat y_u = \arg\max f_\xi(x_u) \tag{5}$$
#
# $$\mathcal{L}_{pseudo} = \frac{1}{A}\sum_{a=1}^{A} \mathcal{H}\big(f_\theta(x_u^a), \hat y_u\big) \tag{6}$$
#
# where $\mathcal{H}$ (eq. 3) weights each pixel by $\beta^n = \big(\max_c f_\xi(x_u)^{(n,c)}\big)^6$.
# The geometric part of each strong augmentation is applied to $\hat y_u$ and β as well.
#
# ## Code

# %%
show_source(make_teacher)
show_source(ema_update)
show_source(tau_schedule)

# %% [markdown]
# The λ's of eq. (1) with the warm-up, and the teacher's pseudo-labels:

# %%
show_source(loss_weights)
show_source(Trainer.lambdas)
show_source(Trainer.pseudo_labels)

# %% [markdown]
# One whole iteration — weak view of the labeled batch, pseudo-labels, A strong views, one
# student forward pass, the loss terms, SGD, eq. (2), the bank update:

# %%
show_source(Trainer.step)

# %% [markdown]
# ## Run: Eq. (2) on a toy module
#
# A linear layer with BatchNorm. We change the student, run `ema_update` with τ = 0.9 and compare
# with eq. (2) written out. BatchNorm's running statistics follow the same EMA (our choice), the
# integer batch counter is copied.

# %%
toy_student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
toy_teacher = make_teacher(toy_student)
with torch.no_grad():
    for p in toy_student.parameters():
        p.add_(torch.randn_like(p))
# a forward pass in train mode moves the BN running statistics
toy_student.train()(torch.randn(8, 3))
before = {k: v.clone() for k, v in toy_teacher.state_dict().items()}
ema_update(toy_teacher, toy_student, 0.9)
for k, v in toy_teacher.state_dict().items():
    s = toy_student.state_dict()[k]
    rule = 0.9 * before[k] + 0.1 * s if v.is_floating_point() else s
    print(
        f"{k:28s} max |teacher - eq.(2)| = "
        f"{float((v.float() - rule.float()).abs().max()):.1e}"
    )

# %% [markdown]
# ## Run: τ over training
#
# For the paper's 150K iterations and for the CPU profile's 1500. The right panel shows the
# EMA's "memory" $1/(1-\tau)$, the number of recent student states the teacher roughly
# averages, as a fraction of the run: the schedule is defined per iteration, so on the short CPU
# run the teacher lags much further behind, relative to the run's length.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for T, style in ((150_000, "-"), (1_500, "--")):
    t = np.unique(np.linspace(0, T - 1, 500).astype(int))
    tau = np.array([tau_schedule(int(i), T) for i in t])
    axes[0].plot(t / T, tau, style, label=f"T = {T:,}")
    horizon = 1 / (1 - tau[tau < 1])
    axes[1].plot(t[tau < 1] / T, horizon / T, style, label=f"T = {T:,}")
axes[0].axhline(
    0.996, color="grey", lw=0.8, ls=":", label="official code: 0.996, constant"
)
axes[0].set_xlabel("fraction of training t / T")
axes[0].set_ylabel("tau")
axes[0].legend()
axes[1].set_yscale("log")
axes[1].set_xlabel("fraction of training t / T")
axes[1].set_ylabel("1 / (1 - tau), as a fraction of T")
axes[1].legend()
plt.tight_layout()
plt.show()
print(
    "tau at t = 0, T/2, T-1 (T = 1500):",
    [round(tau_schedule(i, 1500), 5) for i in (0, 750, 1499)],
)

# %% [markdown]
# ## Run: the λ's of eq. (1) and the warm-up
#
# `Trainer.lambdas` calls `loss_weights` with the iteration at which the warm-up ended; we
# call `loss_weights` directly instead of building a network for every point. The paper's
# profile warms up for 2000 of 150K iterations; the CPU profile keeps the same fraction,
# 20 of 1500. The curves below assume the warm-up ends there; the next section shows when it
# can last longer.

# %%
def lambdas_at(config, iteration):
    return loss_weights(config, iteration)  # the warm-up ends at its fixed part


profiles = {
    "paper (Cityscapes DLv2)": load_config("paper_cityscapes_dlv2"),
    "CPU profile (camvid_quick)": load_config("camvid_quick"),
}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.3))
lambda_curves = {}
for ax, (name, prof) in zip(axes, profiles.items()):
    warm = prof.warmup_iterations
    its = np.arange(0, 3 * warm)
    curves = {
        k: np.array([lambdas_at(prof, int(i))[k] for i in its])
        for k in ("sup", "pseudo", "ent", "contr")
    }
    lambda_curves[name] = (its, curves, warm)
    for k, style in zip(curves, ("-", "--", "-.", ":")):
        ax.step(its, curves[k], style, where="post", label=f"lambda_{k}", lw=2)
    ax.axvline(warm, color="grey", lw=0.8)
    ax.set_title(f"{name}: warm-up = first {warm} iterations")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### When the teacher is not ready: the warm-up's gate (our choice)
#
# The paper gives the warm-up a purpose: "to make sure predictions have some quality before
# being taken into account". 2K of 150K iterations does that at the paper's scale, but a fixed
# fraction does not at any length: 150 iterations give a 2-iteration warm-up, after which the
# pseudo-labels of an untrained teacher take over (a user's aerial run ended at 7.8 mIoU
# against 27.9 for supervised-only, issue #10). So the warm-up also waits for the teacher: it
# ends at the first iteration after `warmup_frac` at which a running mean of the teacher's
# pixel weight $\beta = f_\xi(x_u)^s$ (the weights of $\mathcal{L}_{pseudo}$, §4.2) reaches
# `warmup_beta` = 0.05, e.g. a mean confidence of about 0.6 at $s = 6$.
# `warmup_beta = 0` is the paper's fixed warm-up. The value is read in the step's one
# loss-value synchronisation, so the gate costs no extra host sync. If the warm-up is still
# on at half the schedule, the run warns (log, `status.json`, `summary.json`).
#
# Note: the reproduction grid (notebook 13) was trained by commit e2b449d, before the gate:
# its warm-up was the fixed 20 iterations.

# %%
show_source(Trainer.end_warmup)

# %%
# the gate on a made-up sequence of teacher betas: a teacher that grows confident slowly
gate_cfg = load_config("camvid_quick")
gate = SimpleNamespace(
    cfg=gate_cfg, iteration=0, teacher_beta=None, warmup_end=None
)
betas_seen = np.clip(np.linspace(0.0, 0.2, 300), 0, None)
for i, b in enumerate(betas_seen):
    gate.iteration = i
    Trainer.end_warmup(gate, float(b))
print(
    f"fixed part: {gate_cfg.warmup_iterations} iterations; "
    f"the gate opened at iteration {gate.warmup_end} "
    f"(running mean of beta {gate.teacher_beta:.3f} at the end)"
)

# %% [markdown]
# ## Run: one iteration, traced
#
# We build a `Trainer`, run iteration 0 (it fills the memory bank), then trace iteration 1. The
# randomness of a step depends only on (seed, iteration): `Trainer.step` augments each sample with
# its own generator, keyed on (seed, iteration, stream, the sample's place in the batch), from
# `Trainer.generators`. So we can make the same weak view, pseudo-labels and strong views
# ourselves, and then let `Trainer.step` run the real iteration.

# %%
trainer = Trainer(cfg, C, len(labeled), "cpu")
labeled_batches = Batches(
    labeled,
    cfg.batch_labeled,
    cfg.base_size,
    cfg.crop_size,
    seeded(cfg.seed, 1).initial_seed(),
)
unlabeled_batches = Batches(
    unlabeled,
    cfg.batch_unlabeled,
    cfg.base_size,
    cfg.crop_size,
    seeded(cfg.seed, 2).initial_seed(),
)
trainer.step(labeled_batches(0), unlabeled_batches(0))

it = trainer.iteration
labeled_batch, unlabeled_batch = labeled_batches(it), unlabeled_batches(it)
x_l, y_l, ids_l = labeled_batch
# eq. (4) input x_l^a
x_la, y_la, _ = augment(x_l, y_l, None, WEAK, trainer.generators(0, len(x_l)))
x_u = unlabeled_batch[0]
pseudo, conf = trainer.pseudo_labels(x_u)  # eq. (5), teacher
# x_u^a, A = 2
views = [
    augment(x_u, pseudo, conf, STRONG, trainer.generators(2 + a, len(x_u)))
    for a in range(cfg.num_views)
]
print(
    "labeled",
    tuple(x_l.shape),
    "| unlabeled",
    tuple(x_u.shape),
    "| pseudo-labels",
    tuple(pseudo.shape),
    f"| teacher confidence: mean {float(conf.mean()):.3f}, "
    f"max {float(conf.max()):.3f} (1/C = {1 / C:.3f})",
)

# %%
def show_row(axes, image, labels, confidence=None, title=""):
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title(title, fontsize=9)
    axes[1].imshow(label_image(labels.numpy(), palette))
    axes[1].set_title("labels" if confidence is None else "pseudo-labels", fontsize=9)
    if confidence is not None:
        im = axes[2].imshow(confidence.numpy(), vmin=0, vmax=1, cmap="magma")
        axes[2].set_title("teacher confidence", fontsize=9)
        plt.colorbar(im, ax=axes[2], fraction=0.046)
        im = axes[3].imshow(confidence.numpy() ** cfg.sharpen, cmap="magma")
        axes[3].set_title(f"beta = confidence^{cfg.sharpen:g}", fontsize=9)
        plt.colorbar(im, ax=axes[3], fraction=0.046)


b = 0
fig, axes = plt.subplots(5, 4, figsize=(12, 14))
show_row(axes[0, :2], x_l[b], y_l[b], title="labeled crop x_l")
show_row(axes[0, 2:], x_la[b], y_la[b], title="weak view x_l^a (Table 1)")
show_row(
    axes[1],
    x_u[b],
    pseudo[b],
    conf[b],
    title="unlabeled x_u (teacher input, no augmentation)",
)
for a, (img, lab, cf) in enumerate(views):
    show_row(axes[2 + a], img[b], lab[b], cf[b], title=f"strong view a = {a + 1}")
axes[4, 0].hist(conf.flatten().numpy(), bins=40, color="grey")
axes[4, 0].set_title("teacher confidences (all pixels)", fontsize=9)
for ax in axes.flat[:16]:
    ax.axis("off")
for ax in axes[4, 1:]:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# At iteration 1 the teacher is the ImageNet-initialised network with an untrained classifier:
# its pseudo-labels are nearly arbitrary and its confidences sit near 1/C. With β = conf⁶
# those pixels weigh almost nothing, and in a real run the warm-up keeps λ_pseudo at 0 anyway.
#
# ## Run: the loss terms of this iteration
#
# Now `Trainer.step` runs iteration 1 for real, on the same batches. We keep the teacher's
# weights from before the step to check eq. (2) afterwards.

# %%
lam = trainer.lambdas()
tau = tau_schedule(it, cfg.iterations, cfg.tau_start, cfg.tau_end)
teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
terms = trainer.step(labeled_batch, unlabeled_batch)
teacher_after = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
student_after = {k: v.clone() for k, v in trainer.student.state_dict().items()}
print({k: round(v, 5) for k, v in terms.items()}, f"| tau = {tau:.6f}")

names = [k for k in ("sup", "pseudo", "ent", "contr") if k in terms]
fig, ax = plt.subplots(figsize=(7, 3))
xs = np.arange(len(names))
ax.bar(xs - 0.2, [terms[k] for k in names], 0.4, label="term L_k")
ax.bar(
    xs + 0.2,
    [lam[k] * terms[k] for k in names],
    0.4,
    label="lambda_k * L_k (enters eq. 1)",
)
ax.set_xticks(xs, [f"L_{k}\n(lambda={lam[k]:g})" for k in names])
ax.set_yscale("log")
ax.legend()
ax.set_title(f"iteration {it}: L = {terms['loss']:.4f}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Run: the teacher lags behind the student
#
# A few more iterations; the distance between the two sets of weights grows while the student
# moves and the teacher follows at rate 1 − τ ≈ 0.005 per step.

# %%
def weight_distance(a, b):
    return torch.sqrt(
        sum(((p - q) ** 2).sum() for p, q in zip(a.parameters(), b.parameters()))
    ).item()


drift = [weight_distance(trainer.teacher, trainer.student)]
for _ in range(extra_steps):
    trainer.step(
        labeled_batches(trainer.iteration), unlabeled_batches(trainer.iteration)
    )
    drift.append(weight_distance(trainer.teacher, trainer.student))
fig, ax = plt.subplots(figsize=(5, 2.8))
ax.plot(np.arange(it + 1, it + 2 + extra_steps), drift, "o-")
ax.set_xlabel("iteration")
ax.set_ylabel("||xi - theta||")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Checks

# %%
# eq. (2) on the toy module
for k, v in toy_teacher.state_dict().items():
    s = toy_student.state_dict()[k]
    if v.is_floating_point():
        assert torch.allclose(v, 0.9 * before[k] + 0.1 * s, rtol=1e-6, atol=1e-7), k
        assert not torch.equal(v, before[k]) and not torch.equal(v, s), k
    else:
        assert torch.equal(v, s), k

# the traced iteration: the teacher changed by exactly eq. (2) (parameters and BN
# statistics)
max_rel = 0.0
for k, xi_new in teacher_after.items():
    theta, xi_old = student_after[k], teacher_before[k]
    if xi_new.is_floating_point():
        rule = tau * xi_old + (1 - tau) * theta  # eq. (2)
        assert torch.allclose(xi_new, rule, rtol=1e-6, atol=1e-8), k
        max_rel = max(
            max_rel, float(((xi_new - rule).abs() / rule.abs().clamp(min=1e-8)).max())
        )
    else:
        assert torch.equal(xi_new, theta), k
assert any(
    not torch.equal(teacher_after[k], teacher_before[k]) for k in teacher_before
), "the teacher moved"
print(
    f"eq. (2) holds for all {len(teacher_after)} tensors of the teacher "
    f"(max relative error {max_rel:.1e})"
)

# augment is a function of the per-sample generators, keyed on (seed, iteration, stream,
# sample): the same keys give the same views, whatever else ran in between
def keyed(stream, n):
    return [seeded(cfg.seed, it, 7, stream, i) for i in range(n)]


x_la2, _, _ = augment(x_l, y_l, None, WEAK, keyed(0, len(x_l)))
views2 = [
    augment(x_u, pseudo, conf, STRONG, keyed(2 + a, len(x_u)))
    for a in range(cfg.num_views)
]
assert torch.equal(x_la2, x_la) and all(
    torch.equal(v2[0], v[0]) and torch.equal(v2[1], v[1])
    for v2, v in zip(views2, views)
)
# pseudo-labels are the argmax of the teacher (eq. 5), confidences its max probability
assert (
    pseudo.shape == x_u.shape[:1] + x_u.shape[2:]
    and (conf >= 1 / C - 1e-6).all()
    and (conf <= 1).all()
)

# the teacher has no gradients and stays in eval mode
assert not trainer.teacher.training
assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
# ... while the student has them
assert any(p.grad is not None for p in trainer.student.parameters())

# eq. (1): the loss is the lambda-weighted sum of the terms
assert abs(terms["loss"] - sum(lam[k] * terms[k] for k in names)) < 1e-5
assert set(names) == {"sup", "pseudo", "ent", "contr"}

# warm-up: lambda_pseudo = lambda_contr = 0 for the first 2K of 150K, then 1 and 0.1
paper = profiles["paper (Cityscapes DLv2)"]
assert paper.warmup_iterations == 2000
for i in (0, 1, 1999):
    assert lambdas_at(paper, i) == {
        "sup": 1.0,
        "pseudo": 0.0,
        "ent": 0.01,
        "contr": 0.0,
    }, i
for i in (2000, 2001, 149_999):
    assert lambdas_at(paper, i) == {
        "sup": 1.0,
        "pseudo": 1.0,
        "ent": 0.01,
        "contr": 0.1,
    }, i
assert round(profiles["CPU profile (camvid_quick)"].warmup_frac * 1500) == 20
# the gate: not before the fixed part, and not before the running mean reaches 0.05
assert 20 < gate.warmup_end < 300
assert betas_seen[gate.warmup_end - 1] >= gate_cfg.warmup_beta
# ... and a step taken during the warm-up has no pseudo-label or contrastive term
trainer.warmup_end = None  # the gate has not opened
warm_lam = trainer.lambdas()
warm_terms = trainer.step(
    labeled_batches(trainer.iteration), unlabeled_batches(trainer.iteration)
)
trainer.warmup_end = 0
assert warm_lam["pseudo"] == 0 and warm_lam["contr"] == 0
assert "pseudo" not in warm_terms and "contr" not in warm_terms and "ent" in warm_terms
assert abs(warm_terms["loss"] - (warm_terms["sup"] + 0.01 * warm_terms["ent"])) < 1e-5

# tau goes from 0.995 to 1, linearly
assert (
    abs(tau_schedule(0, 150_000) - 0.995) < 1e-12
    and abs(tau_schedule(149_999, 150_000) - 1.0) < 1e-12
)
assert abs(tau_schedule(75_000, 150_001) - 0.9975) < 1e-12
assert drift[0] > 0
print(f"all checks passed ({time.time() - t_start:.1f} s for the notebook)")

# %% [markdown]
# ## What differs from the paper and the official code (Shathe/SemiSeg-Contrastive)
#
# **Where the official code does otherwise** (from reading its `trainSSL.py`):
#
# * τ: the official code uses a constant 0.996 (after a short start where it uses
#   min(1 − 1/(10t+1), 0.996)); the paper says τ goes from 0.995 to 1, which we follow.
# * Only the parameters are averaged there, and its EMA model is left in training mode, so its
#   BatchNorm layers normalise with the statistics of the batch they predict on. Our teacher is
#   always in eval mode, and its BatchNorm running statistics follow the same EMA as the weights.
# * λ_pseudo: the official code ramps the pseudo-label weight up during the first 2K iterations
#   instead of holding it at 0 (notebook 11, item e). λ_contr = 0 for the first 2K iterations in
#   both.
#
# **Our choices where the paper is silent** (named in the docstrings):
#
# * τ rises **linearly** from 0.995 to 1 (`tau_schedule`).
# * BatchNorm running statistics of the teacher follow the EMA; integer buffers are copied
#   (`ema_update`).
# * The CPU profile keeps the paper's warm-up *fraction*, 2000/150000 of the run: 20 of 1500
#   iterations. The τ schedule is per iteration, so on the short run the teacher lags further
#   behind relative to the run's length (the τ plot above).
# * The labeled weak views and both strong views go through the student in **one** forward
#   pass (their BatchNorm statistics are shared); the official code runs two passes.
# * Pseudo-labels: the teacher's logits are upsampled bilinearly to the image size before the
#   softmax and argmax (`Trainer.pseudo_labels`).
# * The student is evaluated, as in the paper (§4.2); `eval_with=teacher` is available.

# %%
print(f"notebook finished in {time.time() - t_start:.1f} s")
