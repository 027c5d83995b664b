# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # 4. Segmentation losses: weighted cross-entropy, pseudo-labels, entropy
#
# §3.1–3.3 and §4.2: eq. (3)–(7). These are the losses on the network's class predictions. The
# contrastive loss on its features, eq. (8)–(11), comes later.

# %% tags=["parameters"]
smoke = False
seed = 0
# supervised steps before we look at confidences (0: untrained head)
finetune_steps = 30
crop = 128                # training crop side for those steps
image_size = [240, 180]   # [W, H] of the unlabeled image we look at
image_index = 0           # which unlabeled training image

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from semiseg import losses
from semiseg.config import load_config
from semiseg.data import build_dataset
from semiseg.data.tiny import camvid_or_tiny
from semiseg.data.sampling import Batches, load_crop, seeded
from semiseg.teacher import make_teacher
from semiseg.train import Trainer, build_train_data
from semiseg.viz import label_image, show_source

torch.manual_seed(seed)
if smoke:
    finetune_steps, crop, image_size = 3, 96, [160, 120]
t_start = time.time()

_, data_overrides = camvid_or_tiny("train")
if data_overrides:
    crop = 64

# The CPU profile, supervised-only, for a short fine-tune of the new head.
cfg = load_config(
    "camvid_quick",
    {
        **data_overrides,
        "seed": seed,
        "iterations": max(1, finetune_steps),
        "crop_size": [crop, crop],
        "lambda_pseudo": 0.0,
        "lambda_ent": 0.0,
        "lambda_contr": 0.0,
        "variant": "supervised",
    },
)
labeled, unlabeled, _ = build_train_data(cfg)
full = build_dataset(cfg.dataset, "train", cfg.data_root)
C, names = labeled.num_classes, labeled.class_names
print(
    f"{cfg.dataset} {cfg.ratio} split{cfg.split}: {len(labeled)} labeled, "
    f"{len(unlabeled)} unlabeled images"
)

# %% [markdown]
# ## Idea
#
# The labeled and the pseudo-labeled images use the **same** loss, a cross-entropy $\mathcal{H}$
# with two kinds of weights:
#
# * a per-**class** weight $\alpha^c$ against class imbalance. In road scenes, road and sky cover
#   most pixels and poles, signs and cyclists very few. Rare classes are weighted up with
#   $\alpha^c = \sqrt{f_m / f_c}$, so the median-frequency class keeps weight 1.
# * a per-**pixel** weight $\beta^n$. It is 1 for ground-truth labels. For pseudo-labels it is the
#   teacher's confidence raised to the 6th power. A pixel the teacher is 95% sure of keeps weight
#   0.74; one it is 60% sure of gets 0.05. Noisy pseudo-labels then hardly count.
#
# On unlabeled images the student is also pushed to make confident predictions (entropy
# minimisation). This also keeps the decision boundaries away from dense regions of data.
#
# ## Equations
#
# The weighted cross-entropy between the predicted distributions $y_1$ and targets $y_2$ over
# $N$ pixels and $C$ classes:
#
# $$\mathcal{H}(y_1, y_2) = -\frac{1}{N}\sum_{n=1}^{N}\sum_{c=1}^{C} y_2^{(n,c)} \log\big(y_1^{(n,c)}\big)\,
#   \alpha^c \beta^n \tag{3}$$
#
# Supervised loss on a weak view $x_l^a$, with $\beta^n = 1$:
#
# $$\mathcal{L}_{sup} = \mathcal{H}\big(f_\theta(x_l^a), y_l\big) \tag{4}$$
#
# Pseudo-labels from the teacher on the clean unlabeled image, and the loss over $A = 2$ strong
# views:
#
# $$\hat y_u = \arg\max f_\xi(x_u) \tag{5}$$
#
# $$\mathcal{L}_{pseudo} = \frac{1}{A}\sum_{a=1}^{A}\mathcal{H}\big(f_\theta(x_u^a), \hat y_u\big),
#   \qquad \beta^n = \big(\max_c f_\xi(x_u)^{(n,c)}\big)^{s},\ s = 6 \tag{6}$$
#
# Entropy of the student's predictions on the strong views:
#
# $$\mathcal{L}_{ent} = -\frac{1}{A}\frac{1}{N}\sum_{a=1}^{A}\sum_{n=1}^{N}\sum_{c=1}^{C}
#   f_\theta(x_u^{a})^{(n,c)} \log f_\theta(x_u^{a})^{(n,c)} \tag{7}$$
#
# Class balancing (§4.2, Cityscapes and GTA5; $\alpha^c = 1$ for VOC), with $f_c$ the frequency of
# class $c$ and $f_m$ the median of the class frequencies, computed "not only from $Y_l$ but also
# from $Y_u$":
#
# $$\alpha^c = \sqrt{f_m / f_c}.$$

# %% [markdown]
# ## Code

# %%
show_source(losses.weighted_cross_entropy)

# %%
show_source(losses.class_balance_weights)

# %%
show_source(losses.entropy_loss)

# %% [markdown]
# `Trainer.step` (notebook 01) calls them. $\mathcal{L}_{sup}$ gets `class_weights=alpha` only.
# $\mathcal{L}_{pseudo}$ also gets `pixel_weights = conf ** 6`. The confidences go through the
# same flips, crops and ClassMix as the pseudo-labels. $\mathcal{L}_{ent}$ stacks the $A$ views
# along the batch, which gives the $1/A$ average. The teacher side of eq. (5):

# %%
show_source(Trainer.pseudo_labels)

# %% [markdown]
# ## Run: class frequencies and $\alpha$ on CamVid
#
# Pixel counts per class, over the labeled split ($Y_l$) and over all training labels
# ($Y_l \cup Y_u$, what §4.2 describes). Smoke mode counts only a few images.

# %%
def class_counts(dataset):
    counts = torch.zeros(C, dtype=torch.float64)
    for i in range(len(dataset)):
        _, label = dataset.load(i)
        label = torch.from_numpy(label)
        counts += torch.bincount(label[label != 255], minlength=C)[:C].double()
    return counts


few = 4
lab_set = labeled.subset(labeled.names[:few]) if smoke else labeled
all_set = (
    full.subset(labeled.names[:few] + unlabeled.names[:few])
    if smoke
    else full.subset(labeled.names + unlabeled.names)
)
t0 = time.time()
counts_l, counts_all = class_counts(lab_set), class_counts(all_set)
alpha_l, alpha_all = (
    losses.class_balance_weights(counts_l),
    losses.class_balance_weights(counts_all),
)
print(f"counted {len(lab_set)} + {len(all_set)} label maps in {time.time() - t0:.1f} s")
print(
    f"{'class':<12}{'f_c (Y_l)':>10}{'f_c (all)':>10}"
    f"{'alpha (Y_l)':>12}{'alpha (all)':>12}"
)
freq_l, freq_all = counts_l / counts_l.sum(), counts_all / counts_all.sum()
for c in range(C):
    print(
        f"{names[c]:<12}{freq_l[c]:>10.4f}{freq_all[c]:>10.4f}"
        f"{alpha_l[c]:>12.3f}{alpha_all[c]:>12.3f}"
    )

# %%
x_pos = np.arange(C)
fig, axes = plt.subplots(1, 2, figsize=(15, 3.8))
axes[0].bar(x_pos - 0.2, freq_l.numpy(), 0.4, label=f"$Y_l$ ({len(lab_set)} images)")
axes[0].bar(
    x_pos + 0.2, freq_all.numpy(), 0.4, label=f"$Y_l \\cup Y_u$ ({len(all_set)} images)"
)
axes[0].set_yscale("log")
axes[0].set_title("class frequency $f_c$ (pixels)")
axes[1].bar(x_pos - 0.2, alpha_l.numpy(), 0.4, label="from $Y_l$")
axes[1].bar(x_pos + 0.2, alpha_all.numpy(), 0.4, label="from $Y_l \\cup Y_u$")
axes[1].axhline(1.0, color="black", lw=0.8, ls="--")
axes[1].set_title("$\\alpha^c = \\sqrt{f_m / f_c}$")
for a in axes:
    a.set_xticks(x_pos, names, rotation=40, ha="right", fontsize=9)
    a.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Run: confidence, $\beta$ and entropy on an unlabeled image
#
# A brand-new classifier predicts nearly uniform distributions: confidence about $1/C$, so
# $\beta \approx C^{-6}$ everywhere. We therefore first train the student for `finetune_steps`
# supervised steps of `Trainer.step` on labeled crops (only $\mathcal{L}_{sup}$ is on). Then we
# take a frozen copy as the teacher. In a real run the teacher is the EMA of a student trained
# for thousands of iterations.

# %%
trainer = Trainer(cfg, C, len(labeled), "cpu")
batches = Batches(labeled, cfg.batch_labeled, cfg.base_size, cfg.crop_size, seed)
t0 = time.time()
sup_curve = [trainer.step(batches(it))["sup"] for it in range(finetune_steps)]
if finetune_steps:
    print(
        f"{finetune_steps} steps in {time.time() - t0:.1f} s; "
        f"L_sup {sup_curve[0]:.3f} -> {sup_curve[-1]:.3f}"
    )
teacher = make_teacher(trainer.student)  # frozen, eval mode

image, true_label = load_crop(
    unlabeled, image_index, image_size, image_size, seeded(seed)
)
x_u = image[None]
with torch.no_grad():
    logits, _ = teacher(x_u)
    logits_up = F.interpolate(
        logits, size=x_u.shape[-2:], mode="bilinear", align_corners=False
    )
    probs = F.softmax(logits_up, dim=1)  # [1, C, H, W]
conf, pseudo = probs.max(1)  # eq. (5): confidence and pseudo-label per pixel
beta = conf ** cfg.sharpen  # §4.2: beta = confidence ** 6
# the summand of eq. (7), per pixel
entropy_map = -torch.special.xlogy(probs, probs).sum(1)
trainer.teacher = teacher
pseudo_pkg, conf_pkg = trainer.pseudo_labels(x_u)  # the package's eq. (5), for check 5
print(f"confidence: mean {conf.mean():.3f}, beta: mean {beta.mean():.3f}, "
      f"pixels with beta > 0.5: {100 * (beta > 0.5).float().mean():.1f}%")
print(f"entropy: mean {entropy_map.mean():.3f} nats (log C = {math.log(C):.3f})")

# %%
fig, axes = plt.subplots(2, 4, figsize=(17, 6.6))
axes[0, 0].imshow(image.permute(1, 2, 0).numpy())
axes[0, 0].set_title("unlabeled image $x_u$")
axes[0, 1].imshow(label_image(true_label.numpy(), labeled.palette))
axes[0, 1].set_title("its true labels (unused in training)")
axes[0, 2].imshow(label_image(pseudo[0].numpy(), labeled.palette))
axes[0, 2].set_title("pseudo-labels $\\hat y_u$, eq. (5)")
h = axes[1, 0].imshow(conf[0].numpy(), cmap="viridis", vmin=0, vmax=1)
axes[1, 0].set_title("confidence $\\max_c f_\\xi(x_u)$")
plt.colorbar(h, ax=axes[1, 0], fraction=0.035)
h = axes[1, 1].imshow(beta[0].numpy(), cmap="inferno", vmin=0, vmax=1)
axes[1, 1].set_title("$\\beta$ = confidence$^6$")
plt.colorbar(h, ax=axes[1, 1], fraction=0.035)
h = axes[1, 2].imshow(entropy_map[0].numpy(), cmap="magma", vmin=0, vmax=math.log(C))
axes[1, 2].set_title("entropy $-\\sum_c p \\log p$ (eq. 7 summand)")
plt.colorbar(h, ax=axes[1, 2], fraction=0.035)
for a in axes[:, :3].ravel():
    a.axis("off")
grid = torch.linspace(1 / C, 1, 100)
for s in (1, 2, 6):
    axes[0, 3].plot(
        grid, grid ** s, label=f"$s = {s}$", lw=2.5 if s == cfg.sharpen else 1
    )
axes[0, 3].set_xlabel("confidence")
axes[0, 3].set_ylabel("$\\beta$")
axes[0, 3].set_title("sharpening $\\beta = \\mathrm{conf}^s$")
axes[0, 3].legend()
axes[1, 3].hist(
    conf[0].flatten().numpy(), bins=40, range=(0, 1), alpha=0.6, label="confidence"
)
axes[1, 3].hist(
    beta[0].flatten().numpy(), bins=40, range=(0, 1), alpha=0.6, label="$\\beta$"
)
axes[1, 3].set_title("per-pixel weights")
axes[1, 3].legend()
plt.tight_layout()
plt.show()

# %%
# eq. (3) on this image: the student (= teacher here) on its own pseudo-labels, with and
# without beta
with torch.no_grad():
    student_logits = F.interpolate(
        trainer.student.eval()(x_u)[0],
        size=x_u.shape[-2:],
        mode="bilinear",
        align_corners=False,
    )
trainer.student.train()
alpha = trainer.alpha()
h_plain = losses.weighted_cross_entropy(student_logits, pseudo, class_weights=alpha)
h_beta = losses.weighted_cross_entropy(
    student_logits, pseudo, class_weights=alpha, pixel_weights=beta
)
ent = losses.entropy_loss(student_logits)
print(
    f"H without beta {h_plain:.4f}   H with beta = conf^6 {h_beta:.4f}   "
    f"L_ent {ent:.4f}"
)

# %% [markdown]
# ## Checks

# %%
g = torch.Generator().manual_seed(seed)
toy_logits = torch.randn(2, C, 4, 5, generator=g) * 2
toy_target = torch.randint(0, C, (2, 4, 5), generator=g)
toy_target[0, 0, :3] = 255  # some ignored pixels
toy_target[1, 2:, 4] = 255
toy_alpha = torch.rand(C, generator=g) * 2 + 0.1
toy_beta = torch.rand(2, 4, 5, generator=g)


def eq3_loop(logits, target, alpha, beta):
    """Eq. (3) as written: -1/N sum_n sum_c y2[n,c] log y1[n,c] alpha[c] beta[n],
    N = non-ignored pixels."""
    y1 = F.softmax(logits, dim=1)
    total, N = 0.0, 0
    B, num_c, Hh, Ww = logits.shape
    for b in range(B):
        for i in range(Hh):
            for j in range(Ww):
                if target[b, i, j] == 255:
                    continue
                N += 1
                for c in range(num_c):
                    y2 = 1.0 if target[b, i, j] == c else 0.0
                    total += y2 * math.log(y1[b, c, i, j]) * alpha[c] * beta[b, i, j]
    return -total / N


# 1. eq. (3) matches its loop transcription, with alpha and beta
ours = losses.weighted_cross_entropy(
    toy_logits, toy_target, class_weights=toy_alpha, pixel_weights=toy_beta
)
assert math.isclose(
    ours.item(),
    float(eq3_loop(toy_logits, toy_target, toy_alpha, toy_beta)),
    rel_tol=1e-5,
)

# 2. eq. (3) divides by the number of non-ignored pixels N, not by sum of alpha as
# F.cross_entropy(weight=...) does
n_valid = (toy_target != 255).sum()
ours_alpha = losses.weighted_cross_entropy(
    toy_logits, toy_target, class_weights=toy_alpha
)
torch_mean = F.cross_entropy(toy_logits, toy_target, weight=toy_alpha, ignore_index=255)
torch_sum = F.cross_entropy(
    toy_logits, toy_target, weight=toy_alpha, ignore_index=255, reduction="sum"
)
print(
    f"eq. (3): {ours_alpha:.4f}   F.cross_entropy(weight=alpha): {torch_mean:.4f}   "
    f"(sum {torch_sum:.2f} / N = {n_valid.item()} vs / sum of alpha[y_n] = "
    f"{toy_alpha[toy_target[toy_target != 255]].sum():.2f})"
)
assert torch.allclose(ours_alpha, torch_sum / n_valid, atol=1e-6)
assert not torch.allclose(ours_alpha, torch_mean, atol=1e-3)
# ... without weights both are the plain mean over non-ignored pixels
assert torch.allclose(
    losses.weighted_cross_entropy(toy_logits, toy_target),
    F.cross_entropy(toy_logits, toy_target, ignore_index=255),
    atol=1e-6,
)

# 3. eq. (7): uniform predictions have entropy log C, one-hot predictions 0; the loss is
# the mean of the map above
assert math.isclose(
    losses.entropy_loss(torch.zeros(2, C, 3, 3)).item(), math.log(C), rel_tol=1e-5
)
assert (
    losses.entropy_loss(
        200.0 * F.one_hot(toy_target.clamp(max=C - 1), C).permute(0, 3, 1, 2).float()
    ).item()
    < 1e-30
)
assert math.isclose(
    losses.entropy_loss(logits_up).item(), entropy_map.mean().item(), rel_tol=1e-5
)
assert 0 <= entropy_map.min() and entropy_map.max() <= math.log(C) + 1e-4

# 4. alpha: the median-frequency class gets exactly 1, rarer classes more, commoner
# classes less; unseen classes 1
for counts, alpha_c in ((counts_l, alpha_l), (counts_all, alpha_all)):
    seen = counts > 0
    freqs = counts.float() / counts.float().sum()
    f_m = freqs[seen].median()
    median_class = int(torch.nonzero(seen & (freqs == f_m))[0])
    print(
        f"median-frequency class: {names[median_class]}, "
        f"alpha = {alpha_c[median_class].item():.6f}"
    )
    assert math.isclose(alpha_c[median_class].item(), 1.0, rel_tol=1e-6)
    assert (
        torch.equal(alpha_c[seen] > 1, freqs[seen] < f_m)
        and torch.equal(alpha_c[seen] < 1, freqs[seen] > f_m)
    )
    order = torch.argsort(freqs[seen])
    # alpha decreases with frequency
    assert torch.all(alpha_c[seen][order][:-1] >= alpha_c[seen][order][1:])
    assert torch.all(alpha_c[~seen] == 1)
assert torch.allclose(
    losses.class_balance_weights(torch.tensor([10.0, 0.0, 40.0, 90.0])),
    torch.tensor([2.0, 1.0, 1.0, 2.0 / 3]),
)

# 5. eq. (5) as computed above is the package's Trainer.pseudo_labels; beta = conf^6
# lies in [C^-6, 1] and never exceeds the confidence; it can only lower the loss
assert (beta >= (1 / C) ** 6 - 1e-7).all() and (beta <= conf + 1e-7).all()
assert torch.equal(pseudo_pkg, pseudo) and torch.allclose(conf_pkg, conf)
assert h_beta <= h_plain
print(f"all checks passed ({time.time() - t_start:.1f} s)")

# %% [markdown]
# ## What differs from the paper and the official code
#
# From the docstrings of `semiseg/losses.py` and `semiseg/train.py`, and the README:
#
# * **$N$ in eq. (3)** is the number of non-ignored pixels, as written. PyTorch's
#   `F.cross_entropy(weight=α)` divides by $\sum_n \alpha^{y_n}$ instead (check 2). The two differ
#   by the factor $N / \sum_n \alpha^{y_n}$, which changes from batch to batch with the class mix.
# * **Entropy, eq. (7).** Natural log, not divided by $\log C$. The official code divides by
#   $\log C$; the paper does not. With $\lambda_{ent} = 0.01$ this changes the term's weight by a
#   factor $\log 11 \approx 2.4$ on CamVid.
# * **Where the frequencies come from.** The paper computes $f_c$ from $Y_l$ and $Y_u$. The labels
#   of unlabeled images are unknown in semi-supervised training, so `Trainer` keeps running pixel
#   counts: the labels of every weak labeled view, plus the teacher's pseudo-labels of every
#   unlabeled batch. The plot above shows what the true $Y_l \cup Y_u$ would give on CamVid.
# * **α where the paper is silent.** A class not seen yet gets $\alpha = 1$, and the median is
#   taken over the classes seen so far (last check of 4). `class_balance: false` gives
#   $\alpha = 1$ everywhere, the paper's setting for Pascal VOC.
# * **α in both terms.** α weighs both $\mathcal{L}_{sup}$ and $\mathcal{L}_{pseudo}$, since both are
#   $\mathcal{H}$ of eq. (3).
# * **Resolution.** Logits are upsampled bilinearly to the input size before eq. (3)–(7). Only the
#   contrastive part works at stride 8 on downsampled labels, as §4.2 says.
# * **Pseudo-label confidence.** β comes from the teacher's softmax on the un-augmented image
#   (eq. 5). The teacher runs in eval mode. Then β travels with the pseudo-labels through each
#   strong view.
# * **This page only.** The "teacher" is a frozen copy of a student trained for `finetune_steps`
#   supervised steps, not an EMA after a long run.
