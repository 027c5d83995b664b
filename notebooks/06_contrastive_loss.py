# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # 6. The positive-only, class-wise contrastive loss (§3.4, eq. 8–11)
#
# The student's prediction vectors p are pulled towards the teacher's projection vectors z' of
# the **same class** stored in the memory bank (notebook 05). There are no negatives: only
# "be like the good examples of your own class". A learned attention module per class decides
# how much each vector — on both sides — counts.

# %% tags=["parameters"]
smoke = False
seed = 0

# %%
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from semiseg import losses, reference
from semiseg.data import TinyShapes, build_dataset, read_split
from semiseg.data.sampling import load_crop, seeded
from semiseg.memory_bank import ClassMemoryBank
from semiseg.models import build_model
from semiseg.teacher import make_teacher
from semiseg.train import Trainer, pixels_to_vectors
from semiseg.viz import label_image, show_source

torch.manual_seed(seed)
t_start = time.time()

try:
    dataset = build_dataset("camvid", "train")
    # the labeled images of split 0
    dataset = dataset.subset(read_split("camvid", "1/8", 0)[0])
    # [W, H]
    base_size, crop_size = ([120, 90], [112, 88]) if smoke else ([240, 180], [224, 176])
except FileNotFoundError as err:
    print(
        f"CamVid not found ({err}).\n-> falling back to the built-in TinyShapes data "
        "(semiseg.data.TinyShapes)"
    )
    dataset = TinyShapes("train")
    base_size, crop_size = None, [96, 72]
C_data = dataset.num_classes
print(dataset, "| network input", crop_size)

# %% [markdown]
# ## Idea
#
# * Group the student's vectors by (pseudo-)label. For every class c, compare each student
#   prediction vector $p_c$ with each memory entry $z'_c$ of that class by cosine similarity.
# * Weight each pair by the product of two learned per-vector weights; the weights come from a
#   sigmoid attention module $S_c$ and are L1-normalised per class so that their mean is 1
#   (otherwise the network could make the loss 0 by giving every vector weight 0).
# * Average over pairs and classes. The memory side is a target: it receives no gradient.
#
# ## Equations
#
# Per-vector weights (eq. 8; the same with $Z'_c$, $z'_c$ for the memory side):
#
# $$\mathbf{w}_{p_c} = \frac{N_{P_c}}{\sum_{p_i \in P_c} S_{c,\theta}(p_i)}\, S_{c,\theta}(p_c) \tag{8}$$
#
# $$\mathcal{C}(p_c, z'_c) = \frac{\langle p_c, z'_c\rangle}{\|p_c\|_2\,\|z'_c\|_2} \tag{9}$$
#
# $$\mathcal{D}(p_c, z'_c) = \mathbf{w}_{p_c}\,\mathbf{w}_{z'_c}\,\big(1 - \mathcal{C}(p_c, z'_c)\big) \tag{10}$$
#
# $$\mathcal{L}_{contr} = \frac{1}{C}\sum_{c=1}^{C} \frac{1}{N_{P_c}}\frac{1}{N_{Z'_c}} \sum_{p_c \in P_c}\sum_{z'_c \in Z'_c} \mathcal{D}(p_c, z'_c) \tag{11}$$
#
# (The paper writes $\frac{1}{N_{p_c}}\frac{1}{N_{z'_c}}$ in front of the sum over classes; they
# depend on c, so they belong inside it, as above.)
#
# **No N × ψ matrix needed.** Write $\hat p = p/\|p\|$, $\hat z = z'/\|z'\|$. Eq. (8) makes the
# weights of a class sum to the number of vectors, $\sum_p \mathbf{w}_p = N_{P_c}$ and
# $\sum_z \mathbf{w}_z = N_{Z'_c}$, and eq. (10) is linear in the cosine, so the double sum
# factorises:
#
# $$\frac{1}{N_{P_c} N_{Z'_c}}\sum_{p}\sum_{z} \mathbf{w}_p \mathbf{w}_z (1 - \langle\hat p, \hat z\rangle)
#   = \underbrace{\frac{\sum_p \mathbf{w}_p}{N_{P_c}}\,\frac{\sum_z \mathbf{w}_z}{N_{Z'_c}}}_{=1}
#   - \Big\langle \underbrace{\tfrac{1}{N_{P_c}}\textstyle\sum_p \mathbf{w}_p \hat p}_{\bar p_c},\
#                 \underbrace{\tfrac{1}{N_{Z'_c}}\textstyle\sum_z \mathbf{w}_z \hat z}_{\bar z_c} \Big\rangle
#   = 1 - \langle \bar p_c, \bar z_c\rangle .$$
#
# This is exact, not an approximation: one weighted mean per class and side, then one
# dot product. The N × ψ cosine matrix ($O(N\psi)$ memory, $O(N\psi D)$ time) is never
# built. As implemented, the bound is not $O((N + C\psi) D)$: `losses._WeightedUnitSum`
# forms the per-class sums of the prediction side as one product of a dense $[C + 1, N]$
# weight matrix with the $[N, D]$ vectors, $O(N C D)$ time and $O(N C)$ memory for that
# matrix (a scatter-add would be $O(N D)$), and the memory side is a batched product
# $[C, 1, \psi] \times [C, \psi, D]$, $O(C \psi D)$. In all $O((N + \psi) C D)$ time
# instead of $O(N \psi D)$, and $O(N C)$ instead of $O(N \psi)$ memory: a gain because
# $C + 1 < \psi$ (C + 1 = 12 on CamVid, 20 on Cityscapes, 22 on VOC; ψ = 256).
#
# ## Code
#
# The transcription of eq. (8)–(11) with a loop over classes, building each class's cosine matrix:

# %%
show_source(reference.contrastive_loss_loop)

# %% [markdown]
# The vectorised version used in training (eq. 8 in `_l1_normalised`, then the identity above):

# %%
show_source(losses._l1_normalised)
show_source(losses.contrastive_loss)

# %% [markdown]
# In training, `Trainer.contrastive` gathers the student's vectors of the labeled and the
# strongly augmented unlabeled images (labels or pseudo-labels downsampled to the feature grid),
# computes $P = q_\theta(g_\theta(V))$ and the attention scores on both sides:

# %%
show_source(Trainer.contrastive)

# %% [markdown]
# ## Run: a 2-D example with two classes

# %%
def unit(deg):
    rad = torch.tensor(deg, dtype=torch.float32) * math.pi / 180
    return torch.stack([torch.cos(rad), torch.sin(rad)], -1)


C2 = 2
# student prediction vectors p (lengths differ on purpose: the cosine ignores them)
pred_deg = [20, 65, 110, -25, 200, 250, 160]
pred_len = torch.tensor([1.0, 0.8, 1.1, 0.9, 1.0, 1.0, 0.7])
pred = unit(pred_deg) * pred_len[:, None]                    # [7, 2]
labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
# S_c,theta(p), in [0, 1]
pred_scores = torch.tensor([0.9, 0.5, 0.2, 0.6, 0.3, 0.8, 0.4])
# memory bank: psi = 3 teacher vectors z' per class
memory = torch.stack([unit([40, 50, 30]), unit([220, 230, 205])])  # [C, psi, 2]
memory_scores = torch.tensor([[0.9, 0.5, 0.7], [0.6, 0.6, 0.9]])  # S_c,theta(z')

# Eq. (8) on both sides
w_pred = losses._l1_normalised(pred_scores, labels, C2)
mem_labels = torch.arange(C2).repeat_interleave(3)
w_mem = losses._l1_normalised(memory_scores.flatten(), mem_labels, C2).view(C2, 3)
print(
    pd.DataFrame(
        {
            "class": labels.tolist(),
            "angle (deg)": pred_deg,
            "S_c(p)": pred_scores.tolist(),
            "w_p (eq. 8)": w_pred.numpy().round(3),
        }
    ).to_string(index=False)
)
print("\nmemory weights w_z' (eq. 8):\n", w_mem.numpy().round(3))

# %%
loss_loop = reference.contrastive_loss_loop(
    pred, labels, memory, pred_scores, memory_scores, C2
)
loss_vec = losses.contrastive_loss(pred, labels, memory, pred_scores, memory_scores, C2)
# the identity, by hand: 1 - <pbar_c, zbar_c> per class
p_unit, z_unit = (
    pred / pred.norm(dim=1, keepdim=True),
    memory / memory.norm(dim=2, keepdim=True),
)
pbar = torch.stack(
    [(w_pred[labels == c, None] * p_unit[labels == c]).mean(0) for c in range(C2)]
)
zbar = (w_mem[:, :, None] * z_unit).mean(1)
per_class = 1 - (pbar * zbar).sum(1)
print(f"loop (eq. 8-11, N x psi cosines): {loss_loop:.6f}")
print(f"vectorised (semiseg.losses):      {loss_vec:.6f}")
print(
    f"1 - <pbar_c, zbar_c> per class:   {per_class.numpy().round(6)}  "
    f"-> mean over C: {per_class.mean():.6f}"
)


# %%
def draw(ax, pred, title, pbar=None, zbar=None, weights=w_pred):
    colours = ["tab:blue", "tab:orange"]
    t = np.linspace(0, 2 * np.pi, 200)
    ax.plot(np.cos(t), np.sin(t), color="lightgrey", lw=1)
    for c in range(C2):
        for z, wz in zip(memory[c], w_mem[c]):
            ax.annotate(
                "",
                xy=z.numpy(),
                xytext=(0, 0),
                arrowprops=dict(
                    arrowstyle="->", ls="--", color=colours[c], lw=0.8 + 1.5 * float(wz)
                ),
            )
    for p, c, wp in zip(pred, labels, weights):
        ax.annotate(
            "",
            xy=p.detach().numpy(),
            xytext=(0, 0),
            arrowprops=dict(
                arrowstyle="-|>", color=colours[int(c)], lw=0.8 + 1.5 * float(wp)
            ),
        )
        ax.text(
            *(1.12 * p.detach().numpy() / float(p.detach().norm())),
            f"w={float(wp):.2f}",
            fontsize=7,
            ha="center",
            va="center",
            color=colours[int(c)],
        )
    if pbar is not None:
        for c in range(C2):
            ax.plot(*pbar[c].numpy(), "o", color=colours[c], ms=7, mec="k")
            ax.plot(*zbar[c].numpy(), "s", color=colours[c], ms=7, mec="k")
    ax.set_aspect("equal")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_title(title, fontsize=9)


fig, ax = plt.subplots(figsize=(5, 5))
draw(ax, pred, "solid: student p (width = weight), dashed: memory z'\n"
     "o = pbar_c, square = zbar_c (weighted means of unit vectors)", pbar, zbar)
plt.show()

# %% [markdown]
# ## Run: gradients turn the vectors towards the memory
#
# We treat the seven 2-D vectors as parameters and take plain gradient steps on
# $\mathcal{L}_{contr}$. The scores stay fixed here; in training they are outputs of $S_c$
# and learn too (see "What the attention scores learn" below).

# %%
n_steps, lr = 25, 2.0
pred_var = pred.clone().requires_grad_(True)
optimizer = torch.optim.SGD([pred_var], lr=lr)
trajectory, loss_curve = [pred_var.detach().clone()], []
for _ in range(n_steps):
    loss = losses.contrastive_loss(
        pred_var, labels, memory, pred_scores, memory_scores, C2
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    trajectory.append(pred_var.detach().clone())
    loss_curve.append(loss.item())
trajectory = torch.stack(trajectory)  # [steps + 1, N, 2]

fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
draw(
    axes[0],
    trajectory[-1],
    f"after {n_steps} gradient steps (dots: path of each unit direction)",
)
for i in range(len(pred)):
    path = trajectory[:, i] / trajectory[:, i].norm(dim=1, keepdim=True)
    axes[0].plot(
        path[:, 0],
        path[:, 1],
        ".",
        ms=3,
        color=["tab:blue", "tab:orange"][int(labels[i])],
    )
axes[1].plot(loss_curve, "k.-")
axes[1].set_xlabel("gradient step")
axes[1].set_ylabel("L_contr")
axes[1].set_title("the loss falls as the vectors align")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Run: the effect of the attention weights
#
# One class, one memory vector at 90°, two student vectors at 90° ± 40° — the same distance from
# the target — but with scores 0.8 and 0.2, i.e. weights 1.6 and 0.4. The gradient of eq. (11)
# with respect to $p$ is proportional to $\mathbf{w}_p$, so the high-weight vector turns four
# times as fast.

# %%
pair = unit([50, 130]).requires_grad_(True)        # both 40 degrees from the target
pair_labels = torch.tensor([0, 0])
pair_scores = torch.tensor([0.8, 0.2])
target = unit([90])[None]                           # [C=1, psi=1, 2]
loss_pair = losses.contrastive_loss(
    pair, pair_labels, target, pair_scores, torch.ones(1, 1), 1
)
grad_pair = torch.autograd.grad(loss_pair, pair)[0]
pair_weights = losses._l1_normalised(pair_scores, pair_labels, 1)
print(
    "weights:",
    pair_weights.tolist(),
    " |gradient|:",
    grad_pair.norm(dim=1).numpy().round(5),
    " ratio:",
    float(grad_pair.norm(dim=1)[0] / grad_pair.norm(dim=1)[1]),
)

angles = [[50.0, 130.0]]
pv = pair.detach().clone().requires_grad_(True)
opt = torch.optim.SGD([pv], lr=1.0)
for _ in range(15):
    loss_p = losses.contrastive_loss(
        pv, pair_labels, target, pair_scores, torch.ones(1, 1), 1
    )
    opt.zero_grad()
    loss_p.backward()
    opt.step()
    a = torch.rad2deg(torch.atan2(pv[:, 1], pv[:, 0])).detach()
    angles.append(a.tolist())
angles = np.array(angles)
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(np.abs(angles[:, 0] - 90), "o-", label="score 0.8 (w = 1.6)")
ax.plot(np.abs(angles[:, 1] - 90), "s-", label="score 0.2 (w = 0.4)")
ax.set_xlabel("gradient step")
ax.set_ylabel("angle to the memory vector (deg)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Run: what the attention scores learn
#
# Since $\mathcal{L}_c = \sum_j s_j d_j / \sum_j s_j$ with $d_j = 1 - \langle \hat p_j, \bar z_c\rangle$
# (from the identity), the gradient with respect to a score is
# $\partial\mathcal{L}/\partial s_j = (d_j - \mathcal{L}_c) / (C \sum_i s_i)$: vectors farther
# from the class's memory than the weighted average get a positive gradient (their score goes
# **down**), closer ones go up. Scaling all scores of a class by the same factor changes nothing
# — that is what the L1 normalisation buys — so $\sum_j s_j\, \partial\mathcal{L}/\partial s_j = 0$.

# %%
s_var = pred_scores.clone().requires_grad_(True)
m_var = memory_scores.clone().requires_grad_(True)
loss_s = losses.contrastive_loss(pred, labels, memory, s_var, m_var, C2)
loss_s.backward()
d = 1 - (p_unit * zbar[labels]).sum(1)
expected = (d - per_class[labels]) / (
    C2 * torch.stack([pred_scores[labels == c].sum() for c in range(C2)])[labels]
)
print(
    pd.DataFrame(
        {
            "class": labels.tolist(),
            "d_j = 1 - <p_j, zbar>": d.numpy().round(4),
            "dL/ds_j (autograd)": s_var.grad.numpy().round(5),
            "(d_j - L_c) / (C sum s)": expected.numpy().round(5),
        }
    ).to_string(index=False)
)

# %% [markdown]
# ## Run: real features of EfficientNet-Lite0 DeepLabv3+ on two CamVid images
#
# The network of the CPU profile (ImageNet backbone, untrained head). The teacher (a copy) fills a
# bank from image 2; the student's vectors of image 1 are compared with it. Labels are
# downsampled to the stride-8 feature grid with nearest neighbour (§4.2 "we keep the output
# resolution and downsample the labels"). Both networks are in eval mode here, so BatchNorm uses
# its running statistics.

# %%
crops = [load_crop(dataset, i, base_size, crop_size, seeded(seed, i)) for i in range(2)]
images = torch.stack([c[0] for c in crops])       # [2, 3, H, W]
image_labels = torch.stack([c[1] for c in crops])  # [2, H, W]
model = build_model("effnet_lite0_dlv3p", C_data).eval()
teacher = make_teacher(model)

# the teacher's side: Z' = g_xi(f_xi^-(x)) of image 2 into the bank
with torch.no_grad():
    _, feats_t = teacher(images[1:])
    v_t, l_t, _ = pixels_to_vectors(feats_t, image_labels[1:])
    keep_t = l_t != 255
    z_t = teacher.projection(v_t[keep_t])
    bank = ClassMemoryBank(C_data, 64, model.head_dim)
    bank.push(
        z_t,
        l_t[keep_t],
        teacher.attention_proj(z_t, l_t[keep_t]),
        torch.zeros_like(l_t[keep_t]),
        quota=64,
    )

_, feats_s = model(images[:1])                                   # [1, 256, H/8, W/8]
v_s, l_s, labels_small = pixels_to_vectors(feats_s, image_labels[:1])
keep_s = l_s != 255
p_s = model.prediction(model.projection(v_s[keep_s]))           # P = q(g(V))
labels_s = l_s[keep_s]
s_p = model.attention_pred(p_s, labels_s)                        # S_c,theta(p)
slot_valid = torch.arange(bank.size)[None] < bank.count[:, None]
mem_labels_real = torch.arange(C_data)[:, None].expand_as(slot_valid)
s_z = torch.zeros(slot_valid.shape)
# S_c,theta(z')
s_z[slot_valid] = model.attention_proj(
    bank.memory[slot_valid], mem_labels_real[slot_valid]
)

real_vec = losses.contrastive_loss(
    p_s, labels_s, bank.memory, s_p, s_z, C_data, memory_count=bank.count
)
real_loop = reference.contrastive_loss_loop(
    p_s, labels_s, bank.memory, s_p, s_z, C_data, memory_count=bank.count
)
grad_vec = torch.autograd.grad(real_vec, p_s, retain_graph=True)[0]
grad_loop = torch.autograd.grad(real_loop, p_s, retain_graph=True)[0]
real_vec, real_loop = real_vec.detach(), real_loop.detach()  # values from here on
print(f"{len(p_s)} student vectors, bank entries per class {bank.count.tolist()}")
print(f"L_contr vectorised = {float(real_vec):.6f}, loop = {float(real_loop):.6f}, "
      f"max |grad difference| = {float((grad_vec - grad_loop).abs().max()):.2e}")

# per-class terms 1 - <pbar_c, zbar_c>: the loss restricted to one class, times C
per_class_real = torch.stack(
    [
        losses.contrastive_loss(
            p_s,
            labels_s.masked_fill(labels_s != c, 255),
            bank.memory,
            s_p,
            s_z,
            C_data,
            memory_count=bank.count,
        )
        * C_data
        for c in range(C_data)
    ]
).detach()

# %%
fig, axes = plt.subplots(
    1, 4, figsize=(15, 3.2), gridspec_kw={"width_ratios": [1, 1, 1, 1.3]}
)
axes[0].imshow(images[0].permute(1, 2, 0).numpy())
axes[0].set_title("image 1 (student)")
axes[1].imshow(label_image(image_labels[0].numpy(), dataset.palette))
axes[1].set_title("labels")
axes[2].imshow(label_image(labels_small[0].numpy(), dataset.palette))
axes[2].set_title(f"labels on the feature grid {tuple(labels_small.shape[1:])}")
for ax in axes[:3]:
    ax.axis("off")
present = [c for c in range(C_data) if (labels_s == c).any() and bank.count[c] > 0]
axes[3].bar([dataset.class_names[c] for c in present], per_class_real[present].numpy(),
            color=[np.array(dataset.palette[c]) / 255 for c in present], edgecolor="k")
axes[3].set_ylabel("1 - <pbar_c, zbar_c>")
axes[3].set_title(f"per-class terms; L_contr = their sum / C = {float(real_vec):.3f}")
axes[3].tick_params(axis="x", rotation=60)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Run: how big would the N × ψ matrix be?
#
# With our reading of the paper's Cityscapes setting — 512² crops and the batch size 5
# read as 5 labeled + 2 views × 5 unlabeled images (the paper gives one batch size; the
# official code takes 5 // 2 = 2 unlabeled images × 2 views, notebook 11, item (k)) —
# and all vectors in one loss as in our `Trainer`, the loop version would need:

# %%
n_vectors = (5 + 2 * 5) * (512 // 8) ** 2
print(
    f"N = {n_vectors} vectors x psi = 256 memory entries = "
    f"{n_vectors * 256 / 1e6:.1f} M cosines "
    f"({n_vectors * 256 * 4 / 2**20:.0f} MiB in fp32, again for the backward pass); "
    f"the identity needs C x D = 19 x 256 class means per side."
)
if not smoke:  # a timing on a medium problem
    g = torch.Generator().manual_seed(seed)
    Nt, Ct, psit, Dt = 20_000, 11, 256, 256
    args_t = (
        torch.randn(Nt, Dt, generator=g),
        torch.randint(0, Ct, (Nt,), generator=g),
        torch.randn(Ct, psit, Dt, generator=g),
        torch.rand(Nt, generator=g),
        torch.rand(Ct, psit, generator=g),
        Ct,
    )
    for name, fn in (
        ("loop", reference.contrastive_loss_loop),
        ("vectorised", losses.contrastive_loss),
    ):
        t0 = time.time()
        value = fn(*args_t)
        print(f"{name:>10}: {float(value):.6f} in {1000 * (time.time() - t0):.0f} ms")

# %% [markdown]
# ## Checks

# %%
def value_and_grads(fn, pred, labels, memory, ps, ms, C, count=None):
    pred, ps, ms = (t.clone().requires_grad_(True) for t in (pred, ps, ms))
    memory = memory.clone().requires_grad_(True)
    loss = fn(pred, labels, memory, ps, ms, C, memory_count=count)
    loss.backward()
    return loss.detach(), pred.grad, ps.grad, ms.grad, memory.grad


# loop vs vectorised on random problems with ignored pixels, absent classes and partly
# filled banks
for trial in range(3):
    g = torch.Generator().manual_seed(100 + trial)
    N, Cr, psir, Dr = 300, 5, 12, 16
    lab = torch.randint(0, Cr, (N,), generator=g)
    lab[lab == 3] = 255  # class 3 absent from the batch (ignored pixels)
    count = torch.tensor([12, 5, 0, 12, 7])  # class 2 has an empty bank
    args = (
        torch.randn(N, Dr, generator=g),
        lab,
        torch.randn(Cr, psir, Dr, generator=g),
        torch.rand(N, generator=g) + 0.01,
        torch.rand(Cr, psir, generator=g) + 0.01,
        Cr,
        count,
    )
    out_loop = value_and_grads(reference.contrastive_loss_loop, *args)
    out_vec = value_and_grads(losses.contrastive_loss, *args)
    for name, a, b in zip(
        ["value", "dL/dp", "dL/dS(p)", "dL/dS(z')"], out_loop[:4], out_vec[:4]
    ):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (
            trial,
            name,
            float((a - b).abs().max()),
        )
    assert out_loop[4] is None and out_vec[4] is None, (
        "the memory must receive no gradient"
    )

# the 2-D example: loop == vectorised == the identity by hand
assert abs(float(loss_loop) - float(loss_vec)) < 1e-6
assert abs(float(per_class.mean()) - float(loss_vec)) < 1e-6
# eq. (8): weights have mean 1 per class on both sides
for c in range(C2):
    assert (
        abs(float(w_pred[labels == c].mean()) - 1) < 1e-6
        and abs(float(w_mem[c].mean()) - 1) < 1e-6
    )

# the loss is 0 when every vector points like its class's memory (whatever the lengths
# and scores)
aligned_pred = unit([30, 30, 30, 200, 200]) * torch.tensor(
    [[0.5], [1.0], [3.0], [2.0], [0.1]]
)
aligned = losses.contrastive_loss(
    aligned_pred,
    torch.tensor([0, 0, 0, 1, 1]),
    torch.stack([unit([30] * 3) * 2, unit([200] * 3)]),
    torch.rand(5) + 0.1,
    torch.rand(2, 3) + 0.1,
    2,
)
assert abs(float(aligned)) < 1e-6, float(aligned)

# gradient steps reduce the loss; the high-weight vector moves 4x faster
assert loss_curve[-1] < loss_curve[0]
assert abs(float(grad_pair.norm(dim=1)[0] / grad_pair.norm(dim=1)[1]) - 4.0) < 1e-4
assert abs(angles[-1, 0] - 90) < abs(angles[-1, 1] - 90)

# score gradients: the closed form, and invariance to scaling the scores of a class (L1
# normalisation)
assert torch.allclose(s_var.grad, expected, atol=1e-6)
for c in range(C2):
    assert abs(float((pred_scores[labels == c] * s_var.grad[labels == c]).sum())) < 1e-6
    assert abs(float((memory_scores[c] * m_var.grad[c]).sum())) < 1e-6
assert (m_var.grad.abs() > 0).any(), (
    "the memory-side attention S_c(z') is trained by the loss"
)

# real features: loop == vectorised, and the per-class terms add up to the loss
assert abs(float(real_vec) - float(real_loop)) < 1e-5
assert torch.allclose(grad_vec, grad_loop, atol=1e-5)
assert abs(float(per_class_real.sum() / C_data) - float(real_vec)) < 1e-5
print(f"all checks passed ({time.time() - t_start:.1f} s for the notebook)")

# %% [markdown]
# ## What differs from the paper and the official code (Shathe/SemiSeg-Contrastive)
#
# **Where the official code does otherwise** (notebook 11 runs both behaviours):
#
# * Memory-side weights: the official loss uses $\mathbf{w}_{z'} = 1$ for every memory entry;
#   we use the L1-normalised $S_{c,\theta}(z')$ of eq. (8), as the paper says ("Equation 8 is
#   used to compute $\mathbf{w}_{z'_c}$ too"). With weights 1, the attention modules for $z'$
#   get no gradient from the loss and only serve to rank entries for the bank.
# * The official `trainSSL.py` computes the loss twice — once on the labeled vectors, once on
#   the unlabeled ones — and adds both with weight 0.1 each. We compute eq. (11) once over all
#   the student's vectors of the iteration (labeled with their labels, unlabeled with their
#   pseudo-labels), with λ_contr = 0.1, reading §3.4's "a training sample either from
#   $\{\mathcal{X}_l, Y_l\}$ or $\{\mathcal{X}_u, \hat Y_u\}$" as one set of vectors.
#
# **Our choices where the paper is silent** (see the `contrastive_loss` docstring):
#
# * The loss is computed through the exact identity $1 - \langle\bar p_c, \bar z_c\rangle$
#   instead of the N × ψ matrix; `reference.contrastive_loss_loop` is the literal transcription,
#   and the checks above show both agree in value and gradients.
# * $\frac{1}{C}$ in eq. (11) is the number of classes of the dataset; a class with no vectors
#   (on either side) adds 0 but still counts in the denominator, exactly as eq. (11) is written.
# * Pixels with the ignore label (255, e.g. padding from the resize augmentation) are dropped.
# * Labels and pseudo-labels are brought to the feature grid by nearest-neighbour downsampling.
# * The memory vectors are detached (they are teacher outputs); their attention scores are not.

# %%
print(f"notebook finished in {time.time() - t_start:.1f} s")
