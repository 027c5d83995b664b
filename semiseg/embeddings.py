"""``embeddings.npz``: the small artifact of a run that the book's pages read instead of a checkpoint.

``python -m semiseg.embeddings RUN_DIR`` (or ``RUN_DIR/checkpoint.pt``) writes, next to the
run's ``summary.json``, at most 4 MB of fp16 arrays (:data:`LIMIT`), so it can be committed:

* ``bank_vectors`` [M, D], ``bank_labels`` [M], ``bank_slots`` [M] -- every vector of the class-wise
  memory bank (§3.4) with its class and its slot (0 = newest: the bank is a FIFO per class);
* ``pred_vectors`` [K, D] -- a class-stratified sample of the student's prediction vectors
  p = q(g(f(x_u))) on unlabeled training images (what eq. 8-10 compare with the bank), with
  ``pred_pseudo`` (the teacher's pseudo-label of that pixel, eq. 5) and ``pred_true`` (its true
  label, for the plots only), and ``proj_vectors`` [K, D], the teacher's projections
  g_xi(f_xi(x_u)) of the same pixels (the space the bank lives in); a run without unlabeled
  images (ratio 1/1) samples its labeled ones (``meta["pred_images"]`` says which);
* ``val_images`` [n, H, W, 3] uint8, ``val_labels`` and ``val_preds`` [n, H, W] uint8 -- a few
  validation images with the student's prediction, for the qualitative figures;
* ``class_names``, ``palette`` and ``meta`` (JSON: run config, checkpoint iteration, sizes).

``semiseg.train`` writes it at the end of every run. Sampling is seeded, so the file is the same
for the same checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LIMIT = 4 * 2**20  # bytes


def _vectors(model, images, labels):
    """Feature-resolution vectors of a batch: (student-side features [N, F], labels [N])."""
    _, feats = model(images)
    small = F.interpolate(labels[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), small.reshape(-1), feats.shape[-2:]


@torch.no_grad()
def collect(state, num_unlabeled=24, per_class=120, num_val=3, seed=0):
    """The arrays of ``embeddings.npz`` from a checkpoint's ``state`` (see the module docstring)."""
    from .config import load_config
    from .data.sampling import load_resized
    from .evaluate import predict_logits
    from .models import build_model
    from .data.sets import build_eval_dataset, build_train_data

    cfg = load_config(overrides=state["config"])
    C = state["num_classes"]
    nets = {}
    for name in ("student", "teacher"):
        nets[name] = build_model(cfg.arch, C, pretrained=False)
        nets[name].load_state_dict(state[name])
        nets[name].eval()
    memory, count = state["bank"]["memory"], state["bank"]["count"]
    bank = [(memory[c, : int(count[c])], c) for c in range(C)]
    out = {"bank_vectors": torch.cat([v for v, _ in bank]).half().numpy(),
           "bank_labels": np.concatenate([np.full(len(v), c, np.uint8) for v, c in bank]),
           "bank_slots": np.concatenate([np.arange(len(v), dtype=np.int16) for v, _ in bank])}
    # unlabeled images: student prediction vectors p, teacher projections z', pseudo and true labels;
    # a run with none (ratio 1/1, the fully supervised ceiling) samples its labeled images instead
    labeled, unlabeled, _ = build_train_data(cfg)
    pred_images = "unlabeled" if len(unlabeled) else "labeled"
    unlabeled = unlabeled if len(unlabeled) else labeled
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(unlabeled), generator=g)[:num_unlabeled].tolist()
    pred, proj, pseudo, true = [], [], [], []
    for i in picks:
        image, label = load_resized(unlabeled, i, cfg.base_size)
        vectors, labels, _ = _vectors(nets["student"], image[None], label[None])
        pred.append(nets["student"].prediction(nets["student"].projection(vectors)))
        t_logits, t_feats = nets["teacher"](image[None])
        proj.append(nets["teacher"].projection(t_feats.permute(0, 2, 3, 1).reshape(-1, t_feats.shape[1])))
        t_logits = F.interpolate(t_logits, size=t_feats.shape[-2:], mode="bilinear", align_corners=False)
        pseudo.append(t_logits.argmax(1).reshape(-1))  # eq. (5), at feature resolution
        true.append(labels)
    pred, proj, pseudo, true = torch.cat(pred), torch.cat(proj), torch.cat(pseudo), torch.cat(true)
    keep = []
    for c in range(C):  # class-stratified by the true label (ignore pixels left out)
        idx = (true == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    keep = torch.cat(keep)
    out.update({"pred_vectors": pred[keep].half().numpy(), "proj_vectors": proj[keep].half().numpy(),
                "pred_pseudo": pseudo[keep].to(torch.uint8).numpy(), "pred_true": true[keep].to(torch.uint8).numpy()})
    # a few validation images with the student's prediction
    val = build_eval_dataset(cfg, "val")
    images, labels, preds = [], [], []
    for i in np.linspace(0, len(val) - 1, min(num_val, len(val))).astype(int):
        image, label = load_resized(val, int(i), cfg.eval_size)
        logits = predict_logits(nets["student"], image[None])
        images.append((image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
        labels.append(label.clamp(max=255).to(torch.uint8).numpy())
        preds.append(logits.argmax(1)[0].to(torch.uint8).numpy())
    out.update({"val_images": np.stack(images), "val_labels": np.stack(labels), "val_preds": np.stack(preds)})
    out["class_names"] = np.asarray(state["class_names"])
    out["palette"] = np.asarray(state["palette"], dtype=np.uint8)
    out["meta"] = np.asarray(json.dumps({"config": state["config"], "iteration": int(state["iteration"]),
                                         "num_unlabeled_images": len(picks), "pred_images": pred_images,
                                         "per_class": per_class, "seed": seed}))
    return out


def export(path, out=None, **kwargs):
    """Write ``embeddings.npz`` for the checkpoint ``path`` (a run folder or a ``checkpoint.pt``)."""
    from .checkpoint import read_checkpoint
    from .run_dir import atomic_write

    path = Path(path)
    ckpt = path / "checkpoint.pt" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist (embeddings are written from a run's final checkpoint)")
    arrays = collect(read_checkpoint(ckpt), **kwargs)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    if buffer.tell() > LIMIT:
        raise ValueError(f"embeddings of {ckpt} take {buffer.tell() / 2**20:.1f} MB, over the {LIMIT / 2**20:.0f} MB limit "
                         f"(lower per_class or num_unlabeled)")
    target = Path(out) if out else ckpt.parent / "embeddings.npz"
    atomic_write(target, lambda f: f.write(buffer.getvalue()))
    return target


def load(path):
    """The arrays of an ``embeddings.npz`` (``meta`` decoded from JSON)."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["meta"] = json.loads(str(arrays["meta"]))
    arrays["class_names"] = [str(n) for n in arrays["class_names"]]
    return arrays


def main(argv=None):
    from .config import one_line_errors

    parser = argparse.ArgumentParser(prog="python -m semiseg.embeddings", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (with checkpoint.pt) or a checkpoint file")
    parser.add_argument("--out", default=None, help="output file (default: embeddings.npz beside the checkpoint)")
    parser.add_argument("--per-class", type=int, default=120, help="unlabeled vectors kept per class")
    parser.add_argument("--unlabeled-images", type=int, default=24)
    args = parser.parse_args(argv)
    with one_line_errors():
        target = export(args.run, args.out, per_class=args.per_class, num_unlabeled=args.unlabeled_images)
    print(f"wrote {target} ({target.stat().st_size / 2**20:.2f} MB)")


if __name__ == "__main__":
    main()
