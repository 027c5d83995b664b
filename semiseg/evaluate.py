"""Evaluation: confusion matrix (one on-device histogram), per-class IoU and mIoU on a validation set.

``python -m semiseg.evaluate CKPT [--split val] [--teacher]`` evaluates a checkpoint written by
``semiseg.train``. The paper evaluates the student (§4.2); ``--teacher`` evaluates the EMA teacher.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from .data.datasets import to_tensor
from .losses import class_histogram

__all__ = ["confusion_matrix", "evaluate", "iou_from_confusion", "predict_logits", "to_tensor"]


def confusion_matrix(pred, target, num_classes, ignore_index=255):
    """[C, C] counts, rows = ground truth, columns = prediction, from one histogram.

    Ignored pixels go to an extra bin that is dropped (no boolean-mask indexing, no host sync)."""
    valid = target != ignore_index
    index = torch.where(valid, target.long() * num_classes + pred.long(), num_classes * num_classes)
    return class_histogram(index, num_classes * num_classes + 1)[:-1].reshape(num_classes, num_classes)


def iou_from_confusion(conf):
    """Per-class IoU = TP / (TP + FP + FN); classes absent from both prediction and truth are NaN."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


@torch.no_grad()
def predict_logits(model, images, size=None):
    """Model logits upsampled to the input size; ``size`` = [W, H] network input, None = native."""
    H, W = images.shape[-2:]
    x = images if size is None else F.interpolate(images, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    logits, _ = model(x)
    return F.interpolate(logits.float(), size=(H, W), mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate(model, dataset, size=None, device="cpu", progress=False):
    """mIoU (percent) and per-class IoU (percent, by class name) of ``model`` on ``dataset``."""
    was_training = model.training
    model.eval()
    C = dataset.num_classes
    conf = torch.zeros(C, C, dtype=torch.long, device=device)
    items = range(len(dataset))
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="eval", leave=False)
    for i in items:
        image, label = dataset.load(i)
        logits = predict_logits(model, to_tensor(image)[None].to(device), size)
        conf += confusion_matrix(logits.argmax(1)[0], torch.from_numpy(label).to(device), C)
    model.train(was_training)
    iou = iou_from_confusion(conf.cpu()) * 100
    return {
        "miou": float(np.nanmean(iou.numpy())),
        "per_class_iou": {name: (None if np.isnan(v) else round(float(v), 4)) for name, v in zip(dataset.class_names, iou.tolist())},
        "confusion": conf.cpu().tolist(),
    }


def main(argv=None):
    from .config import one_line_errors
    from .checkpoint import load_checkpoint_model
    from .data.sets import build_eval_dataset

    parser = argparse.ArgumentParser(prog="python -m semiseg.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="val")
    parser.add_argument("--teacher", action="store_true", help="evaluate the EMA teacher instead of the student")
    args = parser.parse_args(argv)
    with one_line_errors():
        cfg, model, device = load_checkpoint_model(args.checkpoint, teacher=args.teacher)
        dataset = build_eval_dataset(cfg, args.split)
        result = evaluate(model, dataset, cfg.eval_size, device, progress=True)
    result.pop("confusion")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
