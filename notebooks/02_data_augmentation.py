# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # 2. Data and augmentation: Table 1 and ClassMix
#
# §4.2 "Data augmentation" and Table 1: weak views of the labeled images, strong views of the
# unlabeled ones, and ClassMix. Shown on CamVid images.

# %% tags=["parameters"]
smoke = False
seed = 0
num_images = 4          # CamVid training images used on this page
num_draws = 3           # augmented views drawn per image and set-up
base_size = [240, 180]  # [W, H] the images are resized to (the CPU profile's size)

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

from semiseg.data.tiny import camvid_or_tiny
from semiseg.data.augment import (
    STRONG,
    WEAK,
    AugParams,
    augment,
    classmix,
    classmix_mask,
)
from semiseg.data.sampling import load_crop, seeded
from semiseg.viz import label_image, show_source

torch.manual_seed(seed)
if smoke:
    num_images, num_draws, base_size = 3, 2, [120, 90]
t_start = time.time()

dataset, data_overrides = camvid_or_tiny("train")
if data_overrides:
    base_size = list(dataset.size)
print(dataset, "| resized to", base_size)

# %% [markdown]
# ## The data
#
# CamVid has 367 training and 101 validation road-scene images of 480×360 pixels, labeled with
# 11 classes. Pixels labeled "Unlabelled" are ignored (index 255, black below). The CPU profile
# uses them at half resolution.

# %%
picks = np.linspace(0, len(dataset) - 1, num_images).round().astype(int).tolist()
crops = [load_crop(dataset, i, base_size, base_size, seeded(seed, i)) for i in picks]
images = torch.stack([c[0] for c in crops])  # [B, 3, H, W] in [0, 1]
labels = torch.stack([c[1] for c in crops])  # [B, H, W], 255 = ignore
palette, C = dataset.palette, dataset.num_classes

fig, axes = plt.subplots(2, num_images, figsize=(3.2 * num_images, 5))
for k, i in enumerate(picks):
    axes[0, k].imshow(images[k].permute(1, 2, 0).numpy())
    axes[0, k].set_title(dataset.names[i], fontsize=9)
    axes[1, k].imshow(label_image(labels[k].numpy(), palette))
for a in axes.ravel():
    a.axis("off")
handles = [plt.Rectangle((0, 0), 1, 1, color=np.array(p) / 255) for p in palette]
fig.legend(
    handles,
    dataset.class_names,
    loc="lower center",
    ncol=min(C, 11),
    fontsize=8,
    frameon=False,
)
plt.tight_layout(rect=(0, 0.06, 1, 1))
plt.show()

# %% [markdown]
# ## Idea
#
# Labeled images get a **weak** view $x_l^a$: the labels are exact, so mild perturbation suffices.
# Unlabeled images get $A = 2$ **strong** views $x_u^a$, and the student must reproduce on them the
# pseudo-labels the teacher produced on the clean image. This is consistency regularisation with
# "augmentation anchoring". Strong views change colours, blur, and above all apply **ClassMix**:
# half of the classes of another image, with their pixels, are pasted on top. Every geometric change
# (flip, resize, crop, ClassMix) must move the labels, pseudo-labels and confidences with the
# image.
#
# ## Table 1 of the paper
#
# | Parameter | Weak | Strong |
# |---|---|---|
# | Flip probability | 0.50 | 0.50 |
# | Resize ×[0.75, 1.75] probability | 0.50 | 0.80 |
# | Color jittering probability | 0.20 | 0.80 |
# | Brightness adjustment max intensity | 0.15 | 0.30 |
# | Contrast adjustment max intensity | 0.15 | 0.30 |
# | Saturation adjustment max intensity | 0.075 | 0.15 |
# | Hue adjustment max intensity | 0.05 | 0.10 |
# | Gaussian blurring probability | 0 | 0.20 |
# | ClassMix probability | 0.20 | 0.80 |
#
# ClassMix (Olsson et al., 2021) for a sample $i$ and a partner $j$: $M$ is 1 on the pixels of
# $y_j$ whose class is among half of the classes present in $y_j$, chosen at random. Then
#
# $$x = M \odot x_j + (1 - M) \odot x_i,\qquad y = M \odot y_j + (1 - M) \odot y_i,\qquad
#   \text{conf} = M \odot \text{conf}_j + (1 - M) \odot \text{conf}_i .$$
#
# In training, $y$ are the teacher's pseudo-labels $\hat y_u$ and conf their confidences, which
# become the per-pixel weights $\beta$ of eq. (3).

# %%
TABLE_1 = {  # transcribed from the paper once: (weak, strong)
    "flip_p": (0.50, 0.50),
    "resize_p": (0.50, 0.80),
    "jitter_p": (0.20, 0.80),
    "brightness": (0.15, 0.30),
    "contrast": (0.15, 0.30),
    "saturation": (0.075, 0.15),
    "hue": (0.05, 0.10),
    "blur_p": (0.0, 0.20),
    "classmix_p": (0.20, 0.80),
    "resize_range": ((0.75, 1.75), (0.75, 1.75)),
}


def mark(a, b):
    return "" if a == b else " ✗ differs"


rows = [
    "| field | paper weak | `WEAK` | paper strong | `STRONG` |",
    "|---|---|---|---|---|",
]
for name, (w, s) in TABLE_1.items():
    rows.append(
        f"| `{name}` | {w} | {getattr(WEAK, name)}{mark(w, getattr(WEAK, name))} | "
        f"{s} | {getattr(STRONG, name)}{mark(s, getattr(STRONG, name))} |"
    )
display(Markdown("\n".join(rows)))

# %% [markdown]
# ## Code
#
# The two columns of Table 1:

# %%
show_source(AugParams)

# %% [markdown]
# One view of a batch. Every random number is drawn per sample from one generator. The geometric
# steps act on image, labels and confidences together. Colour jitter and blur act on the image
# only.

# %%
show_source(augment)

# %% [markdown]
# ClassMix: the mask of half of the partner's classes, and the mix itself.

# %%
show_source(classmix_mask)
show_source(classmix)

# %% [markdown]
# ## Run: weak and strong views of the same images
#
# Each row is one image. The first column is the image, then `num_draws` weak views, then
# `num_draws` strong views; the label or pseudo-label map that travels with each view is below
# it. A view can contain pixels of the next image of the batch (ClassMix), and a zoom-out pads
# with ignore (black).

# %%
g = torch.Generator().manual_seed(seed)
weak_views = [augment(images, labels, None, WEAK, g) for _ in range(num_draws)]
strong_views = [augment(images, labels, None, STRONG, g) for _ in range(num_draws)]
show = min(2, num_images)
cols = 1 + 2 * num_draws
fig, axes = plt.subplots(2 * show, cols, figsize=(2.3 * cols, 3.6 * show))
for r in range(show):
    panels = [("original", images[r], labels[r])]
    panels += [(f"weak #{d + 1}", v[0][r], v[1][r]) for d, v in enumerate(weak_views)]
    panels += [
        (f"strong #{d + 1}", v[0][r], v[1][r]) for d, v in enumerate(strong_views)
    ]
    for c, (title, im, lb) in enumerate(panels):
        axes[2 * r, c].imshow(im.permute(1, 2, 0).numpy())
        axes[2 * r, c].set_title(title, fontsize=9)
        axes[2 * r + 1, c].imshow(label_image(lb.numpy(), palette))
for a in axes.ravel():
    a.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Run: ClassMix step by step
#
# Sample 0 receives half of the classes of its partner, sample 1. In training, the confidences
# would be the teacher's. Here a stand-in with the same character is used: the share of the
# majority class in a 9×9 window, which is low near class boundaries.

# %%
def boundary_confidence(labels, num_classes, k=9):
    """A stand-in for teacher confidence: the majority-class share in a k x k window."""
    safe = torch.where(labels == 255, torch.full_like(labels, num_classes), labels)
    onehot = F.one_hot(safe, num_classes + 1).permute(0, 3, 1, 2).float()
    pooled = F.avg_pool2d(onehot, k, stride=1, padding=k // 2, count_include_pad=False)
    return pooled.amax(1)  # [B, H, W]


conf = boundary_confidence(labels, C)
i, j = 0, 1
# the same generator state as the call below
mask = classmix_mask(labels[j], seeded(seed, 99))
mixed_image, mixed_label, mixed_conf = classmix(
    images, labels, conf, i, seeded(seed, 99)
)
partner_classes = sorted(set(labels[j].unique().tolist()) - {255})
chosen = sorted(set(labels[j][mask].unique().tolist()))
print("classes in the partner:", [dataset.class_names[c] for c in partner_classes])
print("pasted (half of them): ", [dataset.class_names[c] for c in chosen])

fig, axes = plt.subplots(3, 4, figsize=(13, 7.5))
rows = [
    ("sample i", images[i], labels[i], conf[i]),
    ("partner j", images[j], labels[j], conf[j]),
    ("mixed", mixed_image, mixed_label, mixed_conf),
]
for r, (name, im, lb, cf) in enumerate(rows):
    axes[r, 0].imshow(im.permute(1, 2, 0).numpy())
    axes[r, 0].set_title(f"{name}: image")
    axes[r, 1].imshow(label_image(lb.numpy(), palette))
    axes[r, 1].set_title(f"{name}: labels")
    h = axes[r, 2].imshow(cf.numpy(), cmap="viridis", vmin=0, vmax=1)
    axes[r, 2].set_title(f"{name}: confidence")
    plt.colorbar(h, ax=axes[r, 2], fraction=0.035)
axes[1, 3].imshow(mask.numpy(), cmap="gray")
axes[1, 3].set_title("mask M (chosen classes of j)")
axes[2, 3].imshow((mixed_image * (0.4 + 0.6 * mask[None])).permute(1, 2, 0).numpy())
axes[2, 3].set_title("mixed, pasted part bright")
axes[0, 3].axis("off")
axes[0, 3].text(
    0,
    0.5,
    "pasted from j:\n" + "\n".join(dataset.class_names[c] for c in chosen),
    fontsize=10,
    va="center",
)
for a in axes.ravel():
    a.set_xticks([])
    a.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Checks

# %%
# 1. the code's WEAK / STRONG are Table 1
for name, (w, s) in TABLE_1.items():
    assert getattr(WEAK, name) == w and getattr(STRONG, name) == s, name

# 2. ClassMix: labels, image and confidences are the partner's exactly where the mask is
# on, the sample's elsewhere
assert (
    torch.equal(mixed_label[mask], labels[j][mask])
    and torch.equal(mixed_label[~mask], labels[i][~mask])
)
assert (
    torch.equal(mixed_image[:, mask], images[j][:, mask])
    and torch.equal(mixed_image[:, ~mask], images[i][:, ~mask])
)
assert (
    torch.equal(mixed_conf[mask], conf[j][mask])
    and torch.equal(mixed_conf[~mask], conf[i][~mask])
)
# ... the mask is half of the partner's classes (rounded up), whole classes, never
# ignore pixels
assert len(chosen) == (len(partner_classes) + 1) // 2
assert torch.equal(mask, torch.isin(labels[j], torch.tensor(chosen)))
assert not (labels[j][mask] == 255).any()

# 3. geometry follows the image: flip-only parameters flip image, labels and confidences
# together
nothing = dict(
    flip_p=0.0,
    resize_p=0.0,
    jitter_p=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    blur_p=0.0,
    classmix_p=0.0,
)
flip_only = AugParams(**{**nothing, "flip_p": 1.0})
out_i, out_l, out_c = augment(images, labels, conf, flip_only, seeded(seed, 1))
assert (
    torch.equal(out_i, images.flip(-1))
    and torch.equal(out_l, labels.flip(-1))
    and torch.equal(out_c, conf.flip(-1))
)
# ... and with random flips, zooms, crops and ClassMix: an image that *is* its
# colour-coded label map must still show, after augmentation, the colours of the
# augmented labels (except on blurred edges)
colour_images = (
    torch.from_numpy(np.stack([label_image(lb.numpy(), palette) for lb in labels]))
    .permute(0, 3, 1, 2)
    .float()
    / 255
)
geometric = AugParams(**{**nothing, "flip_p": 0.5, "resize_p": 1.0, "classmix_p": 0.8})
# confidences that encode the label exactly
enc = torch.where(labels == 255, 0.0, labels.float() / 1000)
out_i, out_l, out_c = augment(colour_images, labels, enc, geometric, seeded(seed, 2))
valid = out_l != 255
lut = torch.tensor(palette, dtype=torch.float32) / 255
expected = lut[out_l.clamp(max=C - 1)].permute(0, 3, 1, 2)
agree = ((out_i - expected).abs().amax(1) < 2 / 255)[valid].float().mean().item()
print(
    f"colour of the augmented image matches its augmented label on {100 * agree:.1f}% "
    "of labeled pixels"
)
# bilinear zooming blurs colours at class borders, so agreement is not 100 %; a label
# map that did not follow its image (here: the same labels mirrored) agrees on far fewer
# pixels
mirrored = (
    ((out_i - expected.flip(-1)).abs().amax(1) < 2 / 255)[valid].float().mean().item()
)
print(f"... and with its label map mirrored on {100 * mirrored:.1f}%")
assert agree > 0.75 and agree > mirrored + 0.2
# conf follows labels through zoom / crop / mix
assert torch.equal(out_c[valid], out_l[valid].float() / 1000)
assert (out_c[~valid] == 0).all()  # zoom-out padding: ignore label, zero confidence

# 4. parameters are drawn per sample: copies of one image in a batch get different
# strong views
same = images[:1].expand(8, -1, -1, -1).contiguous()
views, _, _ = augment(
    same, labels[:1].expand(8, -1, -1).contiguous(), None, STRONG, seeded(seed, 3)
)
distinct = len({tuple(v.flatten()[::97].tolist()) for v in views})
print(f"8 copies of one image -> {distinct} distinct strong views")
assert distinct > 1
# 5. the views depend only on the generator: same seed, same views (what makes an exact
# resume possible)
again = augment(
    same, labels[:1].expand(8, -1, -1).contiguous(), None, STRONG, seeded(seed, 3)
)[0]
assert torch.equal(views, again)
print(f"all checks passed ({time.time() - t_start:.1f} s)")

# %% [markdown]
# ## What differs from the paper and the official code
#
# From the docstring of `semiseg/data/augment.py` and the README:
#
# * **Per-sample parameters.** Every random parameter is drawn per sample (check 4). The official
#   code draws some of them per batch.
# * **Order of operations** (the paper does not give one): ClassMix → flip → resize → colour
#   jitter → blur.
# * **Resize keeps the crop size.** A zoom in is followed by a random crop back to the input size.
#   A zoom out is padded with the ignore label and zero confidence, so padding never counts as a
#   class.
# * **Blur.** The paper gives no kernel. We draw σ in [0.1, 2] and use a kernel of about 1/10 of the
#   shorter side.
# * **ClassMix partner.** The partner of sample $i$ is sample $i+1$ of the same batch (cyclically).
#   ClassMix needs a batch of at least 2. It applies to weak views too (probability 0.2, Table 1),
#   where the labels are ground truth.
# * **Colour jitter.** Jitter draws a brightness / contrast / saturation factor in $[1-m, 1+m]$
#   and a hue shift in $[-m, m]$, with $m$ the "max intensity" of Table 1.
# * **This page only.** The confidence map in the ClassMix figure is a stand-in. In training it is
#   the teacher's softmax maximum (eq. 5); see notebook 04.
