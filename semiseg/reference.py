"""Readable per-class loop versions of eq. (8)-(11) and of the memory-bank update (§3.4).

These are the paper's formulas transcribed as directly as possible — loops over classes,
vectors and memory entries, plain Python lists for the FIFO — and are what the book shows
first. ``semiseg.losses.contrastive_loss`` and ``semiseg.memory_bank.ClassMemoryBank.push``
are the vectorised versions used in training; the tests assert that both agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss_loop(pred, labels, memory, pred_scores, memory_scores, num_classes, memory_count=None):
    """Eq. (8)-(11) with a Python loop over classes; builds each class's N_Pc x N_Z'c cosine matrix."""
    C, psi, _ = memory.shape
    counts = memory_count.tolist() if memory_count is not None else [psi] * C
    total = pred.new_zeros(())
    for c in range(num_classes):
        in_class = labels == c
        p, s_p = pred[in_class], pred_scores[in_class]  # P_c and S_c(p)
        z, s_z = memory[c, : counts[c]].detach(), memory_scores[c, : counts[c]]  # Z'_c and S_c(z')
        if len(p) == 0 or len(z) == 0:
            continue
        # Eq. (8), for p and for z'
        w_p = len(p) / s_p.sum() * s_p
        w_z = len(z) / s_z.sum() * s_z
        # Eq. (9)
        cos = F.normalize(p, dim=1) @ F.normalize(z, dim=1).T  # [N_Pc, N_Z'c]
        # Eq. (10)
        dist = w_p[:, None] * w_z[None, :] * (1 - cos)
        # Eq. (11), inner sums and their normalisation
        total = total + dist.sum() / (len(p) * len(z))
    # Eq. (11), 1/C
    return total / num_classes


def memory_push_loop(memory, feats, labels, scores, image_ids, quota, size):
    """The bank update of §3.4 on a list of per-class lists (newest first).

    For every class and labeled image, the ``quota`` highest-scoring vectors (already through the
    FQF: entries with label outside 0..C-1 are skipped) are put in front of the class's queue,
    highest score first; the queue is cut to ``size`` (FIFO).
    """
    for c in range(len(memory)):
        new = []
        for image in sorted(set(image_ids.tolist())):
            idx = [i for i in range(len(labels)) if labels[i] == c and image_ids[i] == image]
            idx.sort(key=lambda i: -float(scores[i]))  # rank by S_c,xi
            new += idx[:quota]  # top-K per image and class
        new.sort(key=lambda i: -float(scores[i]))
        memory[c] = ([feats[i] for i in new] + memory[c])[:size]  # FIFO
    return memory


def as_tensor(memory, dim):
    """A list-of-lists bank as the [C, psi, D] tensor + counts layout of ``ClassMemoryBank``."""
    size = max([len(m) for m in memory] + [1])
    out = torch.zeros(len(memory), size, dim)
    for c, vectors in enumerate(memory):
        if vectors:
            out[c, : len(vectors)] = torch.stack(vectors)
    return out, torch.tensor([len(m) for m in memory])
