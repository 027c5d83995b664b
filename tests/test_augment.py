"""Table 1 augmentations and ClassMix: geometry shared by image, labels and confidences."""

import torch

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


def test_geometric_ops_move_labels_and_confidence_with_the_image():
    images, labels, conf = _batch()
    params = AugParams(flip_p=1.0, resize_p=1.0, jitter_p=0.0, brightness=0, contrast=0, saturation=0,
                       hue=0, blur_p=0.0, classmix_p=1.0)
    g = torch.Generator().manual_seed(3)
    out_images, out_labels, out_conf = augment(images, labels, conf, params, g)
    assert out_images.shape == images.shape and out_labels.shape == labels.shape
    valid = out_labels != 255
    # bilinear resizing blurs edges; away from them the image value still encodes the label
    close = (out_images[:, 0] - out_labels.float() / 10).abs() < 1e-4
    assert close[valid].float().mean() > 0.7
    assert torch.allclose(out_conf[valid], out_labels[valid].float() / 10 + 0.05)


def test_parameters_are_drawn_per_sample():
    images = torch.rand(8, 3, 16, 16)
    labels = torch.zeros(8, 16, 16, dtype=torch.long)
    params = AugParams(flip_p=0.5, resize_p=0, jitter_p=0, brightness=0, contrast=0, saturation=0, hue=0,
                       blur_p=0, classmix_p=0)
    out, _, _ = augment(images, labels, None, params, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], images[i].flip(-1)) for i in range(8)]
    assert 0 < sum(flipped) < 8


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
