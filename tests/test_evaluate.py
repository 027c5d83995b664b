"""Confusion matrix by bincount and IoU against a per-pixel loop."""

import math

import torch

from semiseg.evaluate import confusion_matrix, iou_from_confusion


def test_confusion_matrix_matches_loop():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (30, 20), generator=g)
    target = torch.randint(0, 5, (30, 20), generator=g)
    target[target == 4] = 255
    want = torch.zeros(4, 4, dtype=torch.long)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            want[t, p] += 1
    assert torch.equal(confusion_matrix(pred, target, 4), want)


def test_iou():
    conf = torch.tensor([[3, 1, 0], [1, 2, 0], [0, 0, 0]])
    iou = iou_from_confusion(conf)
    assert iou[0].item() == 3 / 5 and iou[1].item() == 2 / 4
    assert math.isnan(iou[2].item())  # absent from prediction and truth: excluded from the mean
