"""§3.4 "Memory Bank": a FIFO queue of psi teacher projection vectors per class.

Each update receives the labeled-image vectors that passed the Feature Quality Filter
(``fqf_mask``), ranks them per (image, class) by the teacher's attention S_c,xi and keeps the
``quota = max(1, psi / |X_l|)`` highest-scoring ones (§4.2). The newcomers go to the front of
their class's queue, the oldest entries beyond psi fall off. The official code keeps the
*lowest*-ranked vectors (it sorts ascending); we keep the highest, as the paper says.

The update is vectorised: no Python loop over classes or images and no host synchronisation
(sorting, an on-device histogram and one gather), so the bank stays on the model's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import class_histogram, fp32_or_wider


def feature_quality_filter(teacher_logits, labels, phi, ignore_index=255):
    """FQF (§3.4): keep a vector when the teacher predicts its label with confidence > phi.

    ``teacher_logits`` [B, C, h, w] at feature resolution, ``labels`` [B, h, w]; returns a bool
    mask [B, h, w].
    """
    conf, pred = F.softmax(fp32_or_wider(teacher_logits), dim=1).max(dim=1)
    return (pred == labels) & (conf > phi) & (labels != ignore_index)


def bank_quota(psi, num_labeled):
    """§4.2: vectors added per image and class at each iteration, ``max(1, psi / |X_l|)``."""
    return max(1, psi // max(1, num_labeled))


def _segment_rank(keys):
    """For a sorted 1-D ``keys``, the position of each element inside its run of equal keys."""
    n = keys.numel()
    pos = torch.arange(n, device=keys.device)
    is_start = torch.ones(n, dtype=torch.bool, device=keys.device)
    if n > 1:
        is_start[1:] = keys[1:] != keys[:-1]
    run_start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(0).values
    return pos - run_start


class ClassMemoryBank:
    """Per-class FIFO of ``size`` (psi) vectors of dimension ``dim``; ``memory`` [C, psi, D], newest first."""

    def __init__(self, num_classes, size, dim, device=None, dtype=torch.float32):
        self.num_classes, self.size, self.dim = num_classes, size, dim
        self.memory = torch.zeros(num_classes, size, dim, device=device, dtype=dtype)
        self.count = torch.zeros(num_classes, dtype=torch.long, device=device)

    def to(self, device):
        self.memory, self.count = self.memory.to(device), self.count.to(device)
        return self

    def get(self, c):
        """The valid vectors of class ``c``, [n_c, D], newest first."""
        return self.memory[c, : int(self.count[c])]

    @torch.no_grad()
    def push(self, feats, labels, scores, image_ids, quota, valid=None):
        """Add, for every (image, class), the ``quota`` highest-``scores`` vectors of ``feats``.

        ``feats`` [N, D], ``labels`` [N] (values outside 0..C-1, e.g. 255, are skipped),
        ``scores`` [N] ranking scores, ``image_ids`` [N] ints, ``valid`` [N] optional bool mask
        (the FQF result). Newcomers are ordered by score, highest first, and pushed to the front.
        """
        C, psi = self.num_classes, self.size
        if labels.numel() == 0:
            return
        labels = labels.long()
        ok = (labels >= 0) & (labels < C)
        if valid is not None:
            ok = ok & valid
        cls = torch.where(ok, labels, torch.full_like(labels, C))  # bin C collects the rejected
        # 1) rank inside each (image, class) group by descending score
        order = torch.argsort(scores, descending=True, stable=True)
        group = image_ids.long()[order] * (C + 1) + cls[order]
        order = order[torch.argsort(group, stable=True)]
        group_sorted = image_ids.long()[order] * (C + 1) + cls[order]
        keep = torch.zeros_like(ok)
        keep[order] = (_segment_rank(group_sorted) < quota) & ok[order]
        # 2) sort all vectors by class, kept first, then by descending score
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort((~keep[order]).long(), stable=True)]
        order = order[torch.argsort(cls[order], stable=True)]
        n_new = torch.zeros(C + 1, dtype=torch.long, device=cls.device).index_add_(0, cls, keep.long())[:C]
        per_class = class_histogram(cls, C + 1)
        class_start = torch.cumsum(per_class, 0) - per_class
        # 3) slot k of class c takes newcomer k if k < n_new[c], else old entry k - n_new[c]
        slot = torch.arange(psi, device=cls.device)[None, :]  # [1, psi]
        from_new = slot < n_new[:, None]
        new_index = order[(class_start[:C, None] + slot).clamp(max=order.numel() - 1)]
        old_index = (slot - n_new[:, None]).clamp(min=0)
        candidates_new = feats.to(self.memory.dtype)[new_index]
        candidates_old = self.memory.gather(1, old_index[:, :, None].expand(-1, -1, self.dim))
        self.memory = torch.where(from_new[:, :, None], candidates_new, candidates_old)
        self.count = (self.count + n_new).clamp(max=psi)

    def state_dict(self):
        return {"memory": self.memory, "count": self.count}

    def load_state_dict(self, state):
        self.memory = state["memory"].to(self.memory.device)
        self.count = state["count"].to(self.count.device)
