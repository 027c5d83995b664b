# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
#   kernelspec: {display_name: Python 3, language: python, name: python3}
# ---

# %% [markdown]
# # 3. The networks: segmentation model, heads $g$, $q$ and attention $S_c$
#
# §4.2 "Architecture" and §3.4: the segmentation network $f_\theta$, its features
# $V = f_\theta^-(x)$ at output stride 8, the projection and prediction heads, and the
# class-wise attention modules.

# %% tags=["parameters"]
smoke = False
seed = 0
image_size = [240, 180]   # [W, H] network input (the CPU profile's image size)
image_index = 0           # which CamVid training image to show
# build DeepLabv2-ResNet101 with random weights (big); skipped in smoke mode
build_deeplabv2 = True

# %%
import copy
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from semiseg.data.tiny import camvid_or_tiny
from semiseg.data.sampling import load_crop, seeded
from semiseg.models import (
    ASPPv2,
    ClassAttention,
    EffNetLite0DeepLabV3Plus,
    MLPHead,
    SegModel,
    build_model,
)
from semiseg.models.efficientnet_lite import efficientnet_lite0_weights_path
from semiseg.reference import ClassAttentionLoop
from semiseg.viz import label_image, show_source

torch.manual_seed(seed)
if smoke:
    image_size, build_deeplabv2 = [160, 120], False
t_start = time.time()

dataset, _ = camvid_or_tiny("train")
C = dataset.num_classes
image, label = load_crop(dataset, image_index, image_size, image_size, seeded(seed))
x = image[None]  # [1, 3, H, W] in [0, 1]
print(dataset, "| input", tuple(x.shape))

# %% [markdown]
# ## Idea
#
# The paper uses DeepLab networks: DeepLabv2 with ResNet-101 for most experiments and DeepLabv3+
# with ResNet-50 for two comparisons. Both produce logits at output stride 8, i.e. one per 8×8
# pixels, and the paper keeps that resolution for the contrastive part. Labels are downsampled to
# it instead of upsampling features. The contrastive loss needs three things on top of the
# network:
#
# * a **projection head** $g$ and a **prediction head** $q$, as in BYOL. The student's prediction
#   vectors $p = q_\theta(g_\theta(v))$ are pulled towards teacher projections
#   $z' = g_\xi(v')$ stored in the memory bank;
# * **class-wise attention modules** $S_c$, one per class for prediction vectors and one per class
#   for projection vectors: $2 \times N_{classes}$ small MLPs. Each gives one score in $[0, 1]$ per
#   vector. The score weights that vector in the loss (eq. 8) and ranks candidates for the bank.
#
# On CPU, this project trains a smaller network of the same shape: an EfficientNet-Lite0 encoder
# (ImageNet weights, shipped offline) with a DeepLabv3+-style decoder. It also gives features and
# logits at stride 8.
#
# ## Equations
#
# For an input of $H \times W$ pixels:
#
# $$V = f_\theta^-(x) \in \mathbb{R}^{D \times \lceil H/8 \rceil \times \lceil W/8 \rceil},\qquad
#   \text{logits} = \text{classifier}(V),\qquad Z = g_\theta(V),\qquad P = q_\theta(Z),$$
#
# with $g, q$: Linear(256) → BatchNorm → ReLU → Linear(256), applied to every pixel vector, and
#
# $$S_c(v) = \sigma\big(\text{Linear}_1(\text{LeakyReLU}(\text{BN}(\text{Linear}_{256}(v))))\big) \in [0, 1],
#   \qquad c = 1..C, \text{ applied only to vectors of class } c.$$
#
# DeepLabv2's classifier is an ASPP that **sums** four dilated 3×3 convolutions:
#
# $$\text{logits} = \sum_{d \in \{6, 12, 18, 24\}} \text{Conv}^{3\times3}_{\text{dilation } d}(V).$$

# %% [markdown]
# ## Code
#
# Every network is a `SegModel`. `forward` returns `(logits, feats)`, and `classify` is the
# classification layer alone. The bank update needs `classify` to run the FQF on teacher features.

# %%
show_source(SegModel)

# %%
show_source(EffNetLite0DeepLabV3Plus)

# %% [markdown]
# The heads $g$, $q$ and the class-wise attention $S_c$. The $C$ modules $S_c$ are stored
# stacked (`weight1` is $[C, 256, 256]$, ...) and run as one batched computation whose number of
# operators does not depend on $C$ (issue #13); each vector still goes through its own class's
# weights only. The per-class loop it replaced, `semiseg.reference.ClassAttentionLoop` (one
# module per class, `torch.split` by class), is the reference it is tested against.

# %%
show_source(MLPHead)
show_source(ClassAttention.forward)
show_source(ClassAttentionLoop.forward)

# %% [markdown]
# DeepLabv2's ASPP classifier (all four branches summed):

# %%
show_source(ASPPv2)

# %% [markdown]
# ## Run: the CPU network on a CamVid image

# %%
# pretrained=True: offline ImageNet weights for the encoder
model = build_model("effnet_lite0_dlv3p", C)
model.eval()
with torch.no_grad():
    logits, feats = model(x)
    # Z = g(V), [h*w, 256]
    proj = model.projection(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]))
    pred = model.prediction(proj)  # P = q(Z), [h*w, 256]
    enc = model.backbone.forward_features(model.normalize(x))
H, W = x.shape[-2:]
print(f"input        {tuple(x.shape)}")
print(f"encoder s8   {tuple(enc['s8'].shape)}   (low-level features, stride 8)")
print(
    f"encoder out  {tuple(enc['out'].shape)}   "
    f"(stride {model.backbone.output_stride}, dilated last stages)"
)
print(f"feats V      {tuple(feats.shape)}   (decoder output, stride 8)")
print(f"logits       {tuple(logits.shape)}")
print(f"Z = g(V)     {tuple(proj.shape)},  P = q(Z) {tuple(pred.shape)}")


# %%
def count(module):
    return sum(p.numel() for p in module.parameters())


def parameter_table(model, parts):
    rows = [(name, count(getattr(model, attr))) for name, attr in parts]
    total = count(model)
    print(f"{'part':<38}{'parameters':>12}{'share':>8}")
    for name, n in rows:
        print(f"{name:<38}{n:>12,}{100 * n / total:>7.1f}%")
    print(f"{'total':<38}{total:>12,}")
    return rows, total


parts = [
    ("backbone (EfficientNet-Lite0, ImageNet)", "backbone"),
    ("decoder (ASPP + low-level fusion)", "decoder"),
    ("classifier (1x1 conv)", "classifier"),
    ("projection head g", "projection"),
    ("prediction head q", "prediction"),
    (f"attention S_c for p ({C} modules)", "attention_pred"),
    (f"attention S_c for z' ({C} modules)", "attention_proj"),
]
rows, total = parameter_table(model, parts)

# %%
# A figure: the image, its labels, the feature norm |V| per stride-8 cell, the first
# three principal components of V as colours, and the argmax of the (untrained)
# classifier.
v = feats[0].permute(1, 2, 0).reshape(-1, feats.shape[1])  # [h*w, 256]
v_centered = v - v.mean(0)
_, _, basis = torch.pca_lowrank(v_centered, q=3, center=False)
pcs = (v_centered @ basis).reshape(feats.shape[2], feats.shape[3], 3)
pcs = (pcs - pcs.amin((0, 1))) / (pcs.amax((0, 1)) - pcs.amin((0, 1)) + 1e-8)
panels = [
    ("image", image.permute(1, 2, 0).numpy(), None),
    ("labels", label_image(label.numpy(), dataset.palette), None),
    ("$\\|V\\|$ per stride-8 cell", feats[0].norm(dim=0).numpy(), "magma"),
    ("3 principal components of V", pcs.numpy(), None),
    (
        "argmax of untrained classifier",
        label_image(logits[0].argmax(0).numpy(), dataset.palette),
        None,
    ),
]
fig, axes = plt.subplots(1, 5, figsize=(19, 3.4))
for a, (title, arr, cmap) in zip(axes, panels):
    h = a.imshow(arr, cmap=cmap, interpolation="nearest")
    a.set_title(title, fontsize=10)
    a.axis("off")
    if cmap:
        plt.colorbar(h, ax=a, fraction=0.035)
plt.tight_layout()
plt.show()
print(
    "The pretrained encoder already separates sky, road, buildings and cars in V "
    "(the PCA panel).\n"
    "The classifier is new (N(0, 0.01) weights), "
    "so its argmax means nothing until training."
)

# %% [markdown]
# ## Run: class-wise attention
#
# We give pixel vectors of the image their true classes. Each class's vectors go through that
# class's module $S_c$, and only that one.

# %%
labels_small = F.interpolate(
    label[None, None].float(), size=feats.shape[-2:], mode="nearest"
)[0, 0].long().reshape(-1)
keep = labels_small != 255
z, z_labels = proj[keep], labels_small[keep]
with torch.no_grad():
    scores = model.attention_proj(z, z_labels)  # S_c(z') for every vector's own class
present = z_labels.unique().tolist()
print(f"{keep.sum().item()} labeled vectors of {len(present)} classes -> scores in "
      f"[{scores.min():.3f}, {scores.max():.3f}]; mean per class:")
print(
    {
        dataset.class_names[c]: round(scores[z_labels == c].mean().item(), 3)
        for c in present
    }
)

# %% [markdown]
# ### What the attention sees: `p` or `p.detach()`
#
# In eq. (8) the weight of a prediction vector is $S_{c,\theta}(p)$, a function of $p$ itself.
# If $S_c$ sees $p$ with its gradient, $\mathcal{L}_{contr}$ can also fall by moving $p$
# (and so the backbone) towards where the attention is *low*, which shrinks its own weight
# instead of bringing $p$ closer to the memory. The official loss calls the selector on
# `features.detach()`; the paper is silent. Config key `attention_detach` (default `True`,
# the official behaviour) decides. The cell computes $\mathcal{L}_{contr}$ once each way on
# the same vectors and bank: the loss value and the gradient reaching the attention modules
# are the same, the gradient reaching the features is not.

# %%
from semiseg.config import load_config
from semiseg.train import Trainer


def contrastive_grads(detach):
    torch.manual_seed(0)
    trainer = Trainer(
        load_config("smoke", {"attention_detach": detach, "psi": 8}), 4, 12, "cpu"
    )
    g = torch.Generator().manual_seed(1)
    for c in range(4):  # a filled bank
        trainer.bank.push(torch.randn(8, 256, generator=g), torch.full((8,), c),
                          torch.rand(8, generator=g), torch.arange(8), 8)
    feats_c = torch.randn(
        2, trainer.student.feat_dim, 8, 8, generator=g, requires_grad=True
    )
    labels_c = torch.randint(0, 4, (2, 64, 64), generator=g)
    loss = trainer.contrastive(feats_c, labels_c)
    loss.backward()
    attention = torch.cat(
        [p.grad.flatten() for p in trainer.student.attention_pred.parameters()]
    )
    return loss.item(), feats_c.grad.flatten(), attention


loss_d, grad_d, att_d = contrastive_grads(True)
loss_n, grad_n, att_n = contrastive_grads(False)
cosine = float(F.cosine_similarity(grad_d, grad_n, dim=0))
print(f"L_contr: detached {loss_d:.6f} | not detached {loss_n:.6f}")
print(f"gradient on the features: |detached| {grad_d.norm():.3e}, |not detached| "
      f"{grad_n.norm():.3e}, cosine {cosine:.4f}")
print(f"gradient on S_c's parameters equal: {torch.allclose(att_d, att_n)}")
assert loss_d == loss_n and torch.allclose(att_d, att_n)
assert not torch.allclose(grad_d, grad_n)

# %% [markdown]
# ## Run: DeepLabv2-ResNet101 (the paper's main network)
#
# It is built with random weights to look at its shapes and size: `feats` are ResNet layer4's
# 2048 channels. The ASPP classifier is a sum of four convolutions, so `classify(feats)` is that
# sum. Building it takes a few seconds and a few hundred MB of memory, so smoke mode skips it. The ASPP
# check below also runs on a small standalone `ASPPv2`.

# %%
if build_deeplabv2:
    dlv2 = build_model("deeplabv2_r101", C, pretrained=False).eval()
    with torch.no_grad():
        x_small = F.interpolate(
            x, scale_factor=0.5, mode="bilinear", align_corners=False
        )
        logits2, feats2 = dlv2(x_small)
    print(
        f"input {tuple(x_small.shape)} -> feats {tuple(feats2.shape)}, "
        f"logits {tuple(logits2.shape)}"
    )
    parameter_table(
        dlv2,
        [
            ("backbone (ResNet-101, dilated layer3/4)", "backbone"),
            ("ASPP classifier (4 branches)", "classifier"),
            ("projection head g (2048 -> 256)", "projection"),
            ("prediction head q", "prediction"),
            (f"attention S_c for p ({C} modules)", "attention_pred"),
            (f"attention S_c for z' ({C} modules)", "attention_proj"),
        ],
    )
    aspp, aspp_in = dlv2.classifier, feats2
else:
    print(
        "smoke mode: DeepLabv2-ResNet101 not built; "
        "the ASPP check uses a standalone ASPPv2(64 -> C)"
    )
    aspp, aspp_in = ASPPv2(64, C).eval(), torch.randn(1, 64, 12, 16)
with torch.no_grad():
    branches = [conv(aspp_in) for conv in aspp.convs]
    aspp_out = aspp(aspp_in)
print("branch dilations:", [conv.dilation[0] for conv in aspp.convs])

# %% [markdown]
# ## Checks

# %%
# 1. output stride 8: feats and logits have ceil(H/8) x ceil(W/8) cells, also for sizes
# not divisible by 8
h8, w8 = math.ceil(H / 8), math.ceil(W / 8)
assert feats.shape == (1, model.feat_dim, h8, w8) and logits.shape == (1, C, h8, w8)
assert enc["s8"].shape[-2:] == (h8, w8)
with torch.no_grad():
    odd_logits, odd_feats = model(torch.rand(1, 3, 61, 90))
assert (
    odd_logits.shape[-2:]
    == (math.ceil(61 / 8), math.ceil(90 / 8))
    == odd_feats.shape[-2:]
)
# 2. logits are the classification layer applied to feats (what the FQF relies on)
with torch.no_grad():
    assert torch.allclose(model.classify(feats), logits, atol=1e-5)
# 3. heads: g maps feat_dim -> 256, q maps 256 -> 256; 2 x C attention modules
assert proj.shape == (h8 * w8, 256) and pred.shape == (h8 * w8, 256)
assert model.projection.net[0].in_features == model.feat_dim
assert len(model.attention_pred) == len(model.attention_proj) == C
# 4. each vector goes only through its own class's module: in eval mode a score equals
# S_c applied alone (the per-class reference modules, same weights) ...
loop = ClassAttentionLoop.from_stacked(model.attention_proj)
with torch.no_grad():
    for c in present:
        alone = loop[c](z[z_labels == c])
        assert torch.allclose(scores[z_labels == c], alone, atol=1e-6), c
# ... changing the module of one class changes the scores of that class only ...
changed = copy.deepcopy(model.attention_proj)
c0 = present[0]
with torch.no_grad():
    changed.bias2[c0] += 1.0
    scores2 = changed(z, z_labels)
assert not torch.allclose(scores2[z_labels == c0], scores[z_labels == c0])
assert torch.equal(scores2[z_labels != c0], scores[z_labels != c0])
# ... and in training mode BatchNorm statistics are those of the class's own vectors
att = copy.deepcopy(model.attention_proj).train()
with torch.no_grad():
    train_scores = att(z, z_labels)
    for c in present:
        if (z_labels == c).sum() > 1:
            assert torch.allclose(
                train_scores[z_labels == c],
                copy.deepcopy(loop[c]).train()(z[z_labels == c]),
                atol=1e-5,
            )
assert ((scores >= 0) & (scores <= 1)).all()
# 5. the encoder holds the offline ImageNet weights
shipped = torch.load(efficientnet_lite0_weights_path(), map_location="cpu")
assert torch.equal(model.backbone._conv_stem.weight, shipped["_conv_stem.weight"])
# 6. parameter counts add up, and the optimiser groups split backbone (lr) from new
# layers (head_lr_mult x lr; the paper and the official optimizer use one rate,
# head_lr_mult = 1)
assert sum(n for _, n in rows) == total
groups = model.param_groups(0.01, head_lr_mult=10)
assert [g["lr"] for g in groups] == [0.01, 0.1]
assert sum(p.numel() for g in groups for p in g["params"]) == total
assert sum(p.numel() for p in groups[0]["params"]) == count(model.backbone)
# 7. DeepLabv2's ASPP sums all four branches (the official code's early return sums the
# first two)
assert len(branches) == 4
assert torch.allclose(aspp_out, sum(branches), atol=1e-4)
assert not torch.allclose(aspp_out, branches[0] + branches[1], atol=1e-4)
if build_deeplabv2:
    assert feats2.shape[1] == 2048 and dlv2.projection.net[0].in_features == 2048
    assert feats2.shape[-2:] == (
        math.ceil(x_small.shape[2] / 8),
        math.ceil(x_small.shape[3] / 8),
    )
    assert torch.allclose(dlv2.classify(feats2), logits2, atol=1e-4)
print(f"all checks passed ({time.time() - t_start:.1f} s)")

# %% [markdown]
# ## What differs from the paper and the official code
#
# From the docstrings of `semiseg/models/deeplab.py` and `semiseg/models/heads.py`:
#
# * **DeepLabv2's ASPP** sums all four dilated branches, as DeepLabv2 describes (check 7). The
#   official `Classifier_Module` returns from inside its loop, so it sums only the first two.
# * **Head input width.** The paper's heads are "Linear(256)" with no input width given. For
#   DeepLabv2, $g$ takes the 2048-channel layer4 output directly (our choice). For DeepLabv3+,
#   the features are the 256-channel decoder output.
# * **CPU network** (not in the paper): EfficientNet-Lite0 at encoder output stride 16, with the
#   stride of its last stages replaced by dilation. A DeepLabv3+-style decoder (ASPP with 128
#   channels, rates 6/12/18, fused with the stride-8 features) brings the features back to stride
#   8. A fully dilated stride-8 encoder would be slower on CPU. The encoder's input normalisation
#   (mean = std = 0.5) and TF "same" padding were chosen to match the shipped weights (see the
#   module docstring of `efficientnet_lite.py`).
# * **Learning rates.** New layers (decoder, classifier, heads, attention) train at
#   `head_lr_mult` × the backbone learning rate (check 6). The paper gives one rate and the
#   official optimizer has one group (`model/deeplabv2.py`, `optim_parameters`), so the paper
#   profiles use 1; the CPU profile's value was chosen by a measurement (README).
# * **Attention input.** $S_{c,\theta}$ sees `p.detach()` (`attention_detach`, as the official
#   code); the paper is silent (cell above).
# * **ASPP pooling branch.** The image-pooling branch of the DeepLabv3 ASPP has no BatchNorm, so
#   that a batch of one still trains.
# * **BatchNorm in the attention modules.** BatchNorm statistics are those of each class's own
#   vectors, as if each $S_c$ were called on its own batch (check 4). A class with a single
#   vector in a batch uses the running statistics.
