"""§4.2 "Data augmentation", Table 1: weak views for labeled images, strong views for unlabeled
ones, and ClassMix. Every random parameter is drawn per sample (the official code draws some
per batch). All operations work on batched tensors so that the geometric part of a view is
applied identically to the image, its (pseudo-)labels and their confidences.

Choices the paper leaves open (marked in the book): the order ClassMix -> flip -> resize ->
colour jitter -> blur; resize keeps the crop size (zoom in: random crop; zoom out: pad with
ignore); blur sigma in [0.1, 2] with a kernel of about 1/10 of the shorter side; the ClassMix
partners are the pairs (0, 1), (2, 3), ... of the batch (an odd batch's last sample takes the one
before it), so that pairs never straddle two processes' shares of a batch (multi-GPU training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

IGNORE = 255


@dataclass(frozen=True)
class AugParams:
    """One column of Table 1."""

    flip_p: float
    resize_p: float
    jitter_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    blur_p: float
    classmix_p: float
    resize_range: tuple[float, float] = (0.75, 1.75)


# Table 1, "Weak" and "Strong" columns
WEAK = AugParams(flip_p=0.5, resize_p=0.5, jitter_p=0.2, brightness=0.15, contrast=0.15,
                 saturation=0.075, hue=0.05, blur_p=0.0, classmix_p=0.2)
STRONG = AugParams(flip_p=0.5, resize_p=0.8, jitter_p=0.8, brightness=0.3, contrast=0.3,
                   saturation=0.15, hue=0.1, blur_p=0.2, classmix_p=0.8)


def _rand(generator):
    return float(torch.rand((), generator=generator))


def _uniform(lo, hi, generator):
    return lo + (hi - lo) * _rand(generator)


def classmix_mask(labels, generator):
    """ClassMix: a mask [H, W] of half of the classes present in ``labels`` [H, W] (ignore excluded)."""
    classes = torch.unique(labels)
    classes = classes[classes != IGNORE]
    if classes.numel() == 0:
        return torch.zeros_like(labels, dtype=torch.bool)
    chosen = classes[torch.randperm(classes.numel(), generator=generator)[: (classes.numel() + 1) // 2]]
    return torch.isin(labels, chosen.to(labels.device))


def partner(index, batch_size):
    """ClassMix partner of sample ``index``: the other sample of its pair (0, 1), (2, 3), ..."""
    j = index ^ 1
    return j if j < batch_size else index - 1


def classmix(images, labels, conf, index, generator):
    """Paste half of the classes of sample ``index``'s partner onto it: image, labels and
    confidences are mixed with the same mask. Returns the mixed triple for that sample."""
    j = partner(index, images.shape[0])
    mask = classmix_mask(labels[j], generator)
    image = torch.where(mask[None], images[j], images[index])
    label = torch.where(mask, labels[j], labels[index])
    c = None if conf is None else torch.where(mask, conf[j], conf[index])
    return image, label, c


def _resize_keep_size(image, label, conf, scale, generator):
    """Resize by ``scale`` and random-crop (or pad with ignore) back to the input size."""
    _, H, W = image.shape
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    if conf is not None:
        conf = F.interpolate(conf[None, None], size=(h, w), mode="nearest")[0, 0]
    if h < H or w < W:  # zoom out: pad with ignore / zero confidence
        ph, pw = max(0, H - h), max(0, W - w)
        image = F.pad(image, (0, pw, 0, ph))
        label = F.pad(label, (0, pw, 0, ph), value=IGNORE)
        conf = None if conf is None else F.pad(conf, (0, pw, 0, ph))
        h, w = image.shape[1:]
    y = int(torch.randint(0, h - H + 1, (), generator=generator))
    x = int(torch.randint(0, w - W + 1, (), generator=generator))
    crop = (slice(y, y + H), slice(x, x + W))
    return image[(slice(None), *crop)], label[crop], None if conf is None else conf[crop]


def _colour_jitter(image, p, generator):
    image = TF.adjust_brightness(image, _uniform(1 - p.brightness, 1 + p.brightness, generator))
    image = TF.adjust_contrast(image, _uniform(1 - p.contrast, 1 + p.contrast, generator))
    image = TF.adjust_saturation(image, _uniform(1 - p.saturation, 1 + p.saturation, generator))
    return TF.adjust_hue(image, _uniform(-p.hue, p.hue, generator))


def _blur(image, generator):
    k = max(3, int(0.1 * min(image.shape[1:])) // 2 * 2 + 1)
    sigma = _uniform(0.1, 2.0, generator)
    return TF.gaussian_blur(image, kernel_size=[k, k], sigma=[sigma, sigma])


def augment(images, labels, conf=None, params=WEAK, generator=None):
    """One augmented view of a batch, Table 1 parameters drawn per sample.

    ``images`` [B, 3, H, W] in [0, 1]; ``labels`` [B, H, W] (labels or pseudo-labels, 255 =
    ignore); ``conf`` [B, H, W] pseudo-label confidences or None. ``generator``: one
    ``torch.Generator`` for the whole batch, or a list with one per sample (training uses one per
    sample, keyed by the sample's place in the global batch, so that a sample is augmented alike
    however the batch is split across processes). Returns new tensors of the same shapes.
    """
    out_images, out_labels, out_conf = [], [], []
    for i in range(images.shape[0]):
        image, label, c = images[i], labels[i], None if conf is None else conf[i]
        g = generator[i] if isinstance(generator, (list, tuple)) else generator
        if images.shape[0] > 1 and _rand(g) < params.classmix_p:
            image, label, c = classmix(images, labels, conf, i, g)
        if _rand(g) < params.flip_p:
            image, label = image.flip(-1), label.flip(-1)
            c = None if c is None else c.flip(-1)
        if _rand(g) < params.resize_p:
            image, label, c = _resize_keep_size(image, label, c, _uniform(*params.resize_range, g), g)
        if _rand(g) < params.jitter_p:
            image = _colour_jitter(image, params, g)
        if _rand(g) < params.blur_p:
            image = _blur(image, g)
        out_images.append(image.clamp(0, 1))
        out_labels.append(label)
        out_conf.append(c)
    conf_out = None if conf is None else torch.stack(out_conf)
    return torch.stack(out_images), torch.stack(out_labels), conf_out
