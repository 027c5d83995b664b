"""Table 1 augmentations and ClassMix: geometry shared by image, labels and confidences."""

import pytest
import torch
import torch.nn.functional as F

from semiseg.data.augment import STRONG, WEAK, AugParams, augment, classmix


def _batch(B=4, H=24, W=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 5, (B, H // 8, W // 8), generator=g)
    labels = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # piecewise constant regions
    # image encodes its own label so we can check alignment after any geometric change
    images = (labels.float() / 10)[:, None].expand(B, 3, H, W).clone()
    conf = labels.float() / 10 + 0.05
    return images, labels, conf


def test_classmix_pastes_half_of_the_partner_classes_consistently():
    images, labels, conf = _batch()
    labels[1, :, :16] = 255
    g = torch.Generator().manual_seed(1)
    image, label, c = classmix(images, labels, conf, 0, g)
    pasted = label != labels[0]
    partner_classes = set(labels[1].unique().tolist()) - {255}
    mixed_from_partner = set(label[(label == labels[1]) & pasted].unique().tolist())
    assert mixed_from_partner <= partner_classes
    assert torch.equal(torch.where(pasted, labels[1], labels[0]), label)
    assert torch.equal(image[0], label.float() / 10)  # image follows the mixed labels
    assert torch.allclose(c, label.float() / 10 + 0.05)  # so do confidences


def _interior(labels, r=2):
    """Pixels whose (2r+1) x (2r+1) neighbourhood lies inside the crop and holds a single label."""
    x = F.pad(labels.float()[:, None], (r, r, r, r), value=-1.0)
    return (F.max_pool2d(x, 2 * r + 1, 1) == -F.max_pool2d(-x, 2 * r + 1, 1))[:, 0]


def test_geometric_ops_move_labels_and_confidence_with_the_image():
    images, labels, conf = _batch(B=8, H=48, W=64)
    images = images.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :48, :64]  # 16 px blocks
    labels = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :48, :64]
    conf = conf.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :48, :64]
    params = AugParams(flip_p=1.0, resize_p=1.0, jitter_p=0.0, brightness=0, contrast=0, saturation=0,
                       hue=0, blur_p=0.0, classmix_p=1.0)
    g = torch.Generator().manual_seed(3)
    out_images, out_labels, out_conf = augment(images, labels, conf, params, g)
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    valid = out_labels != 255
    # the geometry did act on every sample (flip and resize with p = 1)
    for i in range(8):
        assert not torch.equal(out_labels[i], labels[i]) and not torch.equal(out_labels[i], labels[i].flip(-1))
    # bilinear resizing blends the image within 2 px of a label edge (the labels are resized with
    # nearest); everywhere else the image value is exactly the label's: no offset, no missed flip
    inside = _interior(out_labels) & valid
    assert inside.float().mean() > 0.4
    assert torch.allclose(out_images[:, 0][inside], out_labels[inside].float() / 10, atol=1e-6), \
        "image and labels misaligned away from label edges"
    assert torch.equal(out_images[:, 0], out_images[:, 1]) and torch.equal(out_images[:, 0], out_images[:, 2])
    # zoom-out padding: ignore label, black image, zero confidence; confidences follow labels exactly
    assert (out_images.permute(1, 0, 2, 3)[:, ~valid] == 0).all() and (out_conf[~valid] == 0).all()
    assert torch.allclose(out_conf[valid], out_labels[valid].float() / 10 + 0.05)


def _same_image(B=8, H=24, W=32, seed=0):
    """One random image (values in [0.2, 0.7], no clamping by the jitter) repeated B times."""
    g = torch.Generator().manual_seed(seed)
    image = 0.2 + 0.5 * torch.rand(3, H, W, generator=g)
    labels = torch.randint(0, 4, (H // 8, W // 8), generator=g).repeat_interleave(8, 0).repeat_interleave(8, 1)
    return image.expand(B, 3, H, W).clone(), labels.expand(B, H, W).clone()


NONE = AugParams(flip_p=0, resize_p=0, jitter_p=0, brightness=0, contrast=0, saturation=0, hue=0, blur_p=0,
                 classmix_p=0)


def _with(**kw):
    """Table 1 parameters with everything off but ``kw``."""
    return AugParams(**{**NONE.__dict__, **kw})


def _views(params, seed=0):
    images, labels = _same_image()
    out, out_labels, _ = augment(images, labels, None, params, torch.Generator().manual_seed(seed))
    return images[0], out, out_labels


def _all_distinct(out):
    return all(not torch.allclose(out[i], out[j], atol=1e-6) for i in range(len(out)) for j in range(i))


def test_parameters_are_drawn_per_sample():
    """Every random choice of Table 1 is drawn per sample: eight copies of one image get eight views."""
    # flip: each view is the image or its mirror, and both occur
    image, out, _ = _views(_with(flip_p=0.5))
    flipped = [torch.equal(out[i], image.flip(-1)) for i in range(8)]
    assert all(f or torch.equal(out[i], image) for i, f in enumerate(flipped)) and 0 < sum(flipped) < 8


@pytest.mark.parametrize("op, p", [("resize_p", 0.5), ("jitter_p", 0.5), ("blur_p", 0.5)])
def test_whether_an_operation_applies_is_drawn_per_sample(op, p):
    extra = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.15, "hue": 0.1} if op == "jitter_p" else {}
    image, out, _ = _views(_with(**{op: p}, **extra))
    untouched = [torch.equal(out[i], image) for i in range(8)]
    assert 0 < sum(untouched) < 8, untouched
    assert _all_distinct(out[[i for i in range(8) if not untouched[i]]]), "two views share their parameters"


@pytest.mark.parametrize("kw", [{"brightness": 0.3}, {"contrast": 0.3}, {"saturation": 0.15}, {"hue": 0.1}])
def test_each_colour_jitter_factor_is_drawn_per_sample(kw):
    image, out, labels = _views(_with(jitter_p=1.0, **kw))
    assert _all_distinct(out), f"two views share their {next(iter(kw))} factor"
    assert (labels == labels[0]).all()
    name, = kw
    if name == "brightness":  # out = factor * image, factor in [0.7, 1.3], one per sample
        factor = out.flatten(1).sum(1) / image.sum()
        assert torch.allclose(out, factor[:, None, None, None] * image, atol=1e-5)
        assert ((factor > 0.7) & (factor < 1.3)).all() and len(set(factor.round(decimals=3).tolist())) == 8


def _ramps(B=8, H=24, W=64):
    """Channel 0 encodes the column (x / W), channel 1 the row (y / H): linear, so bilinear resizing
    keeps them exact and a view's geometry can be read off its values."""
    x = (torch.arange(W, dtype=torch.float32) / W).expand(H, W)
    y = (torch.arange(H, dtype=torch.float32) / H)[:, None].expand(H, W)
    return torch.stack([x, y, x]).expand(B, 3, H, W).clone(), torch.zeros(B, H, W, dtype=torch.long)


def test_resize_scale_is_drawn_per_sample():
    """Scale in [0.75, 1.75] per sample, read off the x ramp."""
    W = 64
    images, labels = _ramps(W=W)
    out, out_labels, _ = augment(images, labels, None, _with(resize_p=1.0), torch.Generator().manual_seed(0))
    scales = []
    for i in range(8):
        row = out[i, 0, 0][out_labels[i, 0] != 255]  # the columns that hold image (zoom-out pads the right)
        assert (row.diff() >= -1e-6).all()  # not flipped or shuffled
        scales.append(1.0 / (W * float(row.diff().median())))  # slope of the ramp = 1 / (W * scale)
    scales = torch.tensor(scales)
    assert ((scales > 0.74) & (scales < 1.76)).all(), scales
    # one scale per sample (a per-batch scale gives one value; two draws may round alike)
    assert len(set(scales.round(decimals=2).tolist())) >= 6, scales


def test_resize_crop_position_is_drawn_per_sample():
    """With one fixed zoom (x1.5) every view is a crop of the same resized image: its offset, read off
    the ramps exactly, is drawn per sample."""
    H, W, scale = 24, 64, 1.5
    images, labels = _ramps(H=H, W=W)
    out, _, _ = augment(images, labels, None, _with(resize_p=1.0, resize_range=(scale, scale)),
                        torch.Generator().manual_seed(0))
    # output pixel 1 of a crop at offset o samples source coordinate (o + 1.5) / scale - 0.5
    xs = (out[:, 0, 1, 1] * W + 0.5) * scale - 1.5
    ys = (out[:, 1, 1, 1] * H + 0.5) * scale - 1.5
    for offsets, limit in ((xs, W * scale - W), (ys, H * scale - H)):
        assert torch.allclose(offsets, offsets.round(), atol=1e-3), offsets  # whole-pixel crops
        assert ((offsets.round() >= 0) & (offsets.round() <= limit)).all(), offsets
    pairs = set(zip(xs.round().tolist(), ys.round().tolist()))
    assert len(pairs) >= 6, pairs  # one crop position per sample (per batch: a single one)


def test_blur_sigma_is_drawn_per_sample():
    _, out, _ = _views(_with(blur_p=1.0))
    assert _all_distinct(out), "two views share their blur sigma"


def test_classmix_decision_and_classes_are_drawn_per_sample():
    H, W = 24, 32
    _, labels = _same_image(H=H, W=W)
    images = (torch.arange(8.0) / 10)[:, None, None, None].expand(8, 3, H, W).clone()  # sample i: value i / 10
    out, _, _ = augment(images, labels, None, _with(classmix_p=0.5), torch.Generator().manual_seed(0))
    pasted = out[:, 0] != images[:, 0]
    classes = labels[0].unique()
    mixed = [bool(pasted[i].any()) for i in range(8)]
    assert 0 < sum(mixed) < 8, mixed  # the decision is per sample
    out, _, _ = augment(images, labels, None, _with(classmix_p=1.0), torch.Generator().manual_seed(0))
    masks = out[:, 0] != images[:, 0]
    chosen = []
    for i in range(8):
        partner = i ^ 1
        assert torch.allclose(out[i, 0][masks[i]], torch.tensor(partner / 10))  # pasted from its pair partner
        picked = labels[0][masks[i]].unique()
        # half of the classes (rounded up), whole classes only
        assert picked.numel() == (classes.numel() + 1) // 2 and torch.equal(masks[i], torch.isin(labels[0], picked))
        chosen.append(tuple(picked.tolist()))
    assert len(set(chosen)) > 1, chosen  # the classes are drawn per sample


def test_table1_values():
    assert (WEAK.flip_p, WEAK.resize_p, WEAK.jitter_p, WEAK.blur_p, WEAK.classmix_p) == (0.5, 0.5, 0.2, 0.0, 0.2)
    assert (STRONG.flip_p, STRONG.resize_p, STRONG.jitter_p, STRONG.blur_p, STRONG.classmix_p) == (0.5, 0.8, 0.8, 0.2, 0.8)
    assert (STRONG.brightness, STRONG.contrast, STRONG.saturation, STRONG.hue) == (0.3, 0.3, 0.15, 0.1)
    assert (WEAK.brightness, WEAK.contrast, WEAK.saturation, WEAK.hue) == (0.15, 0.15, 0.075, 0.05)


def test_strong_view_is_deterministic_given_generator():
    images, labels, conf = _batch(seed=5)
    a = augment(images, labels, conf, STRONG, torch.Generator().manual_seed(7))
    b = augment(images, labels, conf, STRONG, torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
