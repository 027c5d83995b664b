# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # 1. The method in one page
#
# *Semi-Supervised Semantic Segmentation with Pixel-Level Contrastive Learning from a Class-wise
# Memory Bank* (Alonso et al., ICCV 2021), §3 and §4.2: one figure for the whole method, the loss
# of eq. (1), and one real training step on CamVid images.

# %% tags=["parameters"]
smoke = False
seed = 0
crop = 128        # side of the square training crops
# FQF threshold for this demo only (the paper's 0.95 keeps the bank empty for an
# untrained net)
phi_demo = 0.05

# %%
import math
import time
from types import SimpleNamespace

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from semiseg.config import Config, load_config
from semiseg.data.tiny import camvid_or_tiny
from semiseg.data.sampling import Batches
from semiseg.teacher import tau_schedule
from semiseg.train import Trainer, build_train_data, loss_weights
from semiseg.viz import label_image, show_source

torch.manual_seed(seed)
if smoke:
    crop = 64
t_start = time.time()

# Real CamVid if $SEMISEG_DATA holds it; otherwise the built-in TinyShapes data, said
# loudly.
_, data_overrides = camvid_or_tiny("train")

# The CPU profile of the README, shrunk to a single step on 2 + 2 images.
cfg = load_config(
    "camvid_quick",
    {
        **data_overrides,
        "seed": seed,
        "batch_labeled": 2,
        "batch_unlabeled": 2,
        "crop_size": [crop, crop],
        "warmup_frac": 0.0,
        "warmup_beta": 0.0,
        "phi": phi_demo,
    },
)
print(
    {
        k: getattr(cfg, k)
        for k in (
            "dataset",
            "ratio",
            "arch",
            "base_size",
            "crop_size",
            "psi",
            "phi",
            "num_views",
        )
    }
)

# %% [markdown]
# ## Idea
#
# A few images are labeled, most are not. A **student** network $f_\theta$ is trained by gradient
# descent; a **teacher** $f_\xi$ is an exponential moving average (EMA) of the student and is never
# trained directly. The student learns from four signals at once:
#
# * **$\mathcal{L}_{sup}$** — cross-entropy on weakly augmented labeled images.
# * **$\mathcal{L}_{pseudo}$** — cross-entropy against the teacher's pseudo-labels for unlabeled
#   images. The student sees $A = 2$ *strongly* augmented views (ClassMix, colour jitter, …). The
#   teacher saw the clean image. Each pixel is weighted by the teacher's sharpened confidence.
# * **$\mathcal{L}_{ent}$** — entropy minimisation on the student's predictions for those views.
# * **$\mathcal{L}_{contr}$** — the paper's contribution. A **class-wise memory bank** keeps
#   $\psi$ teacher feature vectors per class, taken from labeled images. Only vectors whose pixel
#   the teacher classifies correctly and confidently go in (the Feature Quality Filter, FQF), and
#   per image and class only the best ones, ranked by a learned attention module $S_{c,\xi}$.
#   Every student pixel feature (labeled or pseudo-labeled) is pulled towards the bank vectors of
#   its class. The loss uses only positive pairs, BYOL-style, with a projection head $g$, a
#   prediction head $q$ and learned per-vector weights $S_{c,\theta}$.

# %%
def draw_method(ax):
    """Block diagram of §3 (Figures 2 and 3 of the paper in one)."""
    colours = {
        "data": "#e8e8e8",
        "student": "#cfe2ff",
        "teacher": "#ffe5b4",
        "loss": "#d4edda",
        "bank": "#f8d7da",
        "op": "#ffffff",
    }

    def box(x, y, text, kind="op", w=2.6, h=1.1):
        ax.add_patch(
            FancyBboxPatch(
                (x - w / 2, y - h / 2),
                w,
                h,
                boxstyle="round,pad=0.05",
                fc=colours[kind],
                ec="black",
                lw=1.2,
            )
        )
        ax.text(x, y, text, ha="center", va="center", fontsize=9.5)
        return SimpleNamespace(
            x=x, y=y, w=w, h=h, l=x - w / 2, r=x + w / 2, t=y + h / 2, b=y - h / 2
        )

    def arrow(p, q, text=None, rad=0.0, style="-", colour="black", text_xy=None):
        ax.add_patch(
            FancyArrowPatch(
                p,
                q,
                arrowstyle="-|>",
                mutation_scale=14,
                lw=1.3,
                color=colour,
                linestyle=style,
                connectionstyle=f"arc3,rad={rad}",
                shrinkA=1,
                shrinkB=1,
            )
        )
        if text:
            tx, ty = text_xy or ((p[0] + q[0]) / 2, (p[1] + q[1]) / 2 + 0.22)
            ax.text(tx, ty, text, ha="center", va="bottom", fontsize=9, color=colour)

    # labeled row: L_sup
    xl = box(1.3, 9.0, "labeled\n$x_l$, $y_l$", "data", w=2.2)
    weak = box(4.6, 9.0, "weak aug\n(Table 1)", w=2.4)
    student = box(
        14.8,
        7.3,
        "student $f_\\theta$\n\none batch:\n$x_l^a$ and the\nA strong views",
        "student",
        w=2.4,
        h=4.4,
    )
    lsup = box(
        19.6,
        9.0,
        "$\\mathcal{L}_{sup}$, eq. (4)\n$\\alpha$ class weights",
        "loss",
        w=3.2,
    )
    arrow((xl.r, 9.0), (weak.l, 9.0))
    arrow((weak.r, 9.0), (student.l, 9.0), "$x_l^a$")
    arrow((student.r, 9.0), (lsup.l, 9.0))
    # unlabeled row: pseudo-labels, L_pseudo, L_ent
    xu = box(1.3, 5.8, "unlabeled\n$x_u$", "data", w=2.2)
    teacher = box(4.6, 5.8, "teacher $f_\\xi$", "teacher", w=2.4)
    pseudo = box(8.0, 5.8, "$\\hat y_u$ = argmax, conf\neq. (5)", w=2.6)
    strong = box(11.4, 5.8, "strong aug $\\times A$\n(ClassMix, jitter, …)", w=2.6)
    lpseudo = box(
        19.6,
        7.3,
        "$\\mathcal{L}_{pseudo}$, eq. (6)\n$\\beta$ = conf$^6$",
        "loss",
        w=3.2,
    )
    lent = box(19.6, 5.6, "$\\mathcal{L}_{ent}$, eq. (7)", "loss", w=3.2)
    arrow((xu.r, 5.8), (teacher.l, 5.8))
    arrow((teacher.r, 5.8), (pseudo.l, 5.8))
    arrow((pseudo.r, 5.8), (strong.l, 5.8))
    arrow((strong.r, 5.8), (student.l, 5.8), "$x_u^a$, $\\hat y_u^a$")
    arrow((xu.x, xu.b), (strong.x, strong.b), "$x_u$", rad=0.3, text_xy=(6.4, 3.55))
    arrow((student.r, 7.3), (lpseudo.l, 7.3))
    arrow((student.r, 5.6), (lent.l, 5.6))
    # contrastive row: memory bank, L_contr
    xla = box(1.3, 1.6, "$x_l^a$, $y_l^a$\n(the weak views)", "data", w=2.2)
    teacher2 = box(
        4.6, 1.6, "teacher $f_\\xi$\n$z' = g_\\xi(f_\\xi^-(x))$", "teacher", w=2.4
    )
    fqf = box(8.0, 1.6, "FQF: argmax = $y$\nand conf > $\\phi$", w=2.6)
    rank = box(11.4, 1.6, "rank by $S_{c,\\xi}(z')$\ntop-K per image, class", w=2.9)
    bank = box(14.8, 1.6, "memory bank\n$\\psi$ per class, FIFO", "bank", w=2.4)
    heads = box(
        14.8,
        3.55,
        "$p = q_\\theta(g_\\theta(V))$\n$S_{c,\\theta}(p)$",
        "student",
        w=2.4,
    )
    lcontr = box(19.6, 1.6, "$\\mathcal{L}_{contr}$, eq. (8)-(11)", "loss", w=3.2)
    for a, b in (
        (xla, teacher2),
        (teacher2, fqf),
        (fqf, rank),
        (rank, bank),
        (bank, lcontr),
    ):
        arrow((a.r, a.y), (b.l, b.y))
    arrow((student.x, student.b), (heads.x, heads.t), "$V$", text_xy=(15.2, 4.35))
    arrow((heads.r, heads.y), (lcontr.l, lcontr.t - 0.15))
    # eq. (2): the teacher is an EMA of the student (both teacher boxes hold the same
    # weights)
    arrow(
        (student.l, 8.0),
        (teacher.x, teacher.t),
        "EMA, eq. (2): $\\xi \\leftarrow \\tau\\xi + (1-\\tau)\\theta$",
        rad=0.12,
        style="--",
        colour="tab:red",
        text_xy=(9.2, 8.0),
    )
    ax.text(
        teacher2.x,
        teacher2.t + 0.12,
        "(same EMA weights)",
        ha="center",
        va="bottom",
        fontsize=8.5,
        color="tab:red",
    )
    ax.text(
        11.0,
        -0.2,
        "$\\mathcal{L} = \\lambda_{sup}\\mathcal{L}_{sup}"
        " + \\lambda_{pseudo}\\mathcal{L}_{pseudo}"
        " + \\lambda_{ent}\\mathcal{L}_{ent}"
        " + \\lambda_{contr}\\mathcal{L}_{contr}$   (1)",
        ha="center",
        va="center",
        fontsize=12,
    )
    ax.set_xlim(-0.1, 21.4)
    ax.set_ylim(-0.7, 10.0)
    ax.axis("off")


fig, ax = plt.subplots(figsize=(15, 7.2))
draw_method(ax)
ax.set_title("Teacher-student training with a class-wise memory bank (§3, Figures 2-3)")
plt.show()

# %% [markdown]
# ## Equations
#
# The student's loss, eq. (1), with the weights of §4.2:
#
# $$\mathcal{L} = \lambda_{sup}\mathcal{L}_{sup} + \lambda_{pseudo}\mathcal{L}_{pseudo}
#   + \lambda_{ent}\mathcal{L}_{ent} + \lambda_{contr}\mathcal{L}_{contr}, \qquad
#   \lambda_{sup} = 1,\ \lambda_{pseudo} = 1,\ \lambda_{ent} = 0.01,\ \lambda_{contr} = 0.1
#   \tag{1}$$
#
# except in the first 2K of the 150K iterations, where $\lambda_{pseudo} = \lambda_{contr} = 0$
# "to make sure predictions have some quality before being taken into account". The teacher
# follows the student with a decay $\tau$ that goes from 0.995 to 1 during training:
#
# $$\xi = \tau\,\xi + (1 - \tau)\,\theta. \tag{2}$$
#
# The four terms have their own notebooks: eq. (3)-(7) in `04_segmentation_losses`, the memory
# bank and eq. (8)-(11) in the later notebooks, and the augmentations of Table 1 in
# `02_data_augmentation`.

# %% [markdown]
# ## Code
#
# The λ weights with their warm-up (a fraction of the run, so that short CPU profiles scale it):

# %%
show_source(Trainer.lambdas)

# %% [markdown]
# One training step. It follows the figure top to bottom: weak views of the labeled batch,
# teacher pseudo-labels (eq. 5), $A$ strong views, one student forward pass over everything, the
# terms of eq. (1), one SGD step, the EMA of eq. (2), then the memory-bank update from the
# labeled images.

# %%
show_source(Trainer.step)

# %% [markdown]
# ## Run: one step on CamVid
#
# We take the CPU profile `camvid_quick` (EfficientNet-Lite0 with ImageNet weights, CamVid 1/8
# split 0) and shrink it to 2 labeled and 2 unlabeled crops. The warm-up is switched off so that
# all four terms are on. The memory bank starts empty, so the first step can only fill it:
# $\mathcal{L}_{contr}$ is 0 there. We show the second step. The classifier is still untrained and
# its confidence is about $1/C$, so with $\phi = 0.95$ no vector would pass the FQF. For this demo
# only, we lower $\phi$ to `phi_demo`: a vector then enters the bank when its pixel is classified
# correctly.

# %%
labeled, unlabeled, _ = build_train_data(cfg)
print(
    f"{cfg.dataset} {cfg.ratio} split{cfg.split}: {len(labeled)} labeled, "
    f"{len(unlabeled)} unlabeled images"
)
trainer = Trainer(cfg, labeled.num_classes, len(labeled), "cpu")
labeled_batches = Batches(
    labeled, cfg.batch_labeled, cfg.base_size, cfg.crop_size, seed
)
unlabeled_batches = Batches(
    unlabeled, cfg.batch_unlabeled, cfg.base_size, cfg.crop_size, seed + 1
)

steps = []
for it in range(2):
    batch_l, batch_u = labeled_batches(it), unlabeled_batches(it)
    lam = trainer.lambdas()
    iteration = trainer.iteration
    teacher_w = trainer.teacher.classifier.weight.detach().clone()
    t0 = time.time()
    terms = trainer.step(batch_l, batch_u)
    steps.append(
        SimpleNamespace(
            lam=lam,
            terms=terms,
            iteration=iteration,
            teacher_before=teacher_w,
            bank_count=trainer.bank.count.clone(),
            seconds=time.time() - t0,
        )
    )
    print(
        f"step {it}: "
        + ", ".join(f"{k} = {v:.4f}" for k, v in terms.items())
        + f"   (bank vectors per class: {trainer.bank.count.tolist()}, "
        f"{steps[-1].seconds:.1f} s)"
    )

# %%
last = steps[-1]
print(f"{'term':<8}{'lambda':>8}{'value':>10}{'lambda*value':>14}")
for k in ("sup", "pseudo", "ent", "contr"):
    print(
        f"{k:<8}{last.lam[k]:>8.2f}{last.terms[k]:>10.4f}"
        f"{last.lam[k] * last.terms[k]:>14.4f}"
    )
print(f"{'total':<8}{'':>8}{'':>10}{last.terms['loss']:>14.4f}")

# %%
# What the student saw in that step: labeled crops with labels, unlabeled crops with the
# teacher's pseudo-labels.
images_l, labels_l, _ = batch_l
images_u = batch_u[0]
pseudo, conf = trainer.pseudo_labels(images_u)
palette = labeled.palette
fig, axes = plt.subplots(
    1, 9, figsize=(18, 2.6), gridspec_kw={"width_ratios": [1] * 8 + [1.6]}
)
for i in range(2):
    axes[2 * i].imshow(images_l[i].permute(1, 2, 0).numpy())
    axes[2 * i].set_title(f"labeled $x_l$ #{i}")
    axes[2 * i + 1].imshow(label_image(labels_l[i].numpy(), palette))
    axes[2 * i + 1].set_title("$y_l$")
    axes[4 + 2 * i].imshow(images_u[i].permute(1, 2, 0).numpy())
    axes[4 + 2 * i].set_title(f"unlabeled $x_u$ #{i}")
    axes[5 + 2 * i].imshow(label_image(pseudo[i].numpy(), palette))
    axes[5 + 2 * i].set_title("teacher $\\hat y_u$")
for a in axes[:8]:
    a.axis("off")
names = ["sup", "pseudo", "ent", "contr"]
axes[8].bar(
    names,
    [last.lam[k] * last.terms[k] for k in names],
    color=["tab:blue", "tab:orange", "tab:green", "tab:red"],
)
axes[8].set_yscale("log")
axes[8].set_title("$\\lambda \\cdot$ term, step 2")
plt.tight_layout()
plt.show()
print(
    "The pseudo-labels of an untrained head are noise; "
    "after the warm-up of a real run they follow the scene."
)

# %% [markdown]
# ## Checks

# %%
# 1. all four terms of eq. (1) are computed, and they are finite
for s in steps:
    assert {"sup", "pseudo", "ent", "contr", "loss"} <= set(s.terms), s.terms
    assert all(math.isfinite(v) for v in s.terms.values()), s.terms
# 2. the first step filled the bank (FQF + ranking + quota), so the second step's
# contrastive term is > 0
assert steps[0].terms["contr"] == 0.0 and int(steps[0].bank_count.sum()) > 0
assert last.terms["contr"] > 0
assert int(trainer.bank.count.max()) <= cfg.psi
# 3. the total is eq. (1): sum of lambda * term with the paper's lambdas (warm-up
# switched off here)
total = sum(last.lam[k] * last.terms[k] for k in names)
assert abs(total - last.terms["loss"]) < 1e-5 * max(1.0, abs(total)), (
    total,
    last.terms["loss"],
)
assert last.lam == {"sup": 1.0, "pseudo": 1.0, "ent": 0.01, "contr": 0.1}
# 4. the warm-up of §4.2: with the paper's defaults, lambda_pseudo = lambda_contr = 0
# before iteration 2000 only
paper = Config()
assert loss_weights(paper, 1999) == {
    "sup": 1.0,
    "pseudo": 0.0,
    "ent": 0.01,
    "contr": 0.0,
}
assert loss_weights(paper, 2000) == {
    "sup": 1.0,
    "pseudo": 1.0,
    "ent": 0.01,
    "contr": 0.1,
}
# 5. eq. (2): after the step, teacher = tau * teacher_before + (1 - tau) * student
tau = tau_schedule(last.iteration, cfg.iterations, cfg.tau_start, cfg.tau_end)
expected = (
    tau * last.teacher_before + (1 - tau) * trainer.student.classifier.weight.detach()
)
assert torch.allclose(trainer.teacher.classifier.weight, expected, atol=1e-7)
assert not torch.equal(
    trainer.teacher.classifier.weight, trainer.student.classifier.weight
)
assert all(not p.requires_grad for p in trainer.teacher.parameters())
print(f"all checks passed ({time.time() - t_start:.1f} s)")

# %% [markdown]
# ## What differs from the paper and the official code
#
# From the README and the docstrings of `semiseg/train.py` and `semiseg/teacher.py`:
#
# * **Warm-up.** During the warm-up, $\lambda_{pseudo}$ and $\lambda_{contr}$ are exactly 0, as §4.2
#   says. The official code ramps $\lambda_{pseudo}$ up instead. The warm-up is stored as a
#   fraction (`warmup_frac` = 2K/150K) so that short profiles scale it.
# * **One student batch.** The labeled weak views and both strong views go through the student
#   in one batch, so BatchNorm sees them together. The paper does not say.
# * **τ schedule.** τ rises linearly from 0.995 to 1. The paper only says "from 0.995 to 1".
# * **Teacher BatchNorm.** The teacher's BatchNorm statistics follow the same EMA as its weights.
# * **Optimiser.** SGD with weight decay 5e-4 and a poly schedule with exponent 0.9. New layers
#   (decoder, classifier, heads, attention) train at 10× the backbone learning rate. The paper
#   states none of these three.
# * **Network and scale.** The CPU network is EfficientNet-Lite0 (ImageNet weights) with a
#   DeepLabv3+-style decoder at output stride 8. The paper uses DeepLabv2-R101 / DeepLabv3+-R50 on
#   a V100; the `paper_*` profiles build those. The CPU profile also uses 240×180 images, 128² crops,
#   1500 iterations and learning rate 0.01.
# * **Bank, ASPP and entropy.** The memory bank keeps the highest-ranked vectors (the official code
#   keeps the lowest). The DeepLabv2 ASPP sums all four branches (the official code sums two). The
#   entropy is not divided by $\log C$. See notebooks 03 and 04.
# * **This page only.** φ is lowered to `phi_demo` and the warm-up is off, so that one step on an
#   untrained network shows all four terms.
