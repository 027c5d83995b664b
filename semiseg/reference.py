"""Readable per-class loop versions of eq. (8)-(11), of the memory-bank update and of the
class-wise attention modules S_c (§3.4, §4.2).

These are the paper's formulas transcribed as directly as possible — loops over classes,
vectors and memory entries, plain Python lists for the FIFO, one module per class — and are what
the book shows first. ``semiseg.losses.contrastive_loss``, ``semiseg.memory_bank.ClassMemoryBank.push``
and ``semiseg.models.heads.ClassAttention`` are the vectorised versions used in training; the tests
assert that both agree. :class:`ClassAttentionLoop` and :func:`contrastive_gathered` are also the
trainer's ``attention_impl: loop`` path (the code before issue #13, with its host reads).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import losses


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


class AttentionModule(nn.Module):
    """One S_c (§4.2): ``Linear(dim, hidden) -> BN1d -> LeakyReLU -> Linear(hidden, 1) -> Sigmoid``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.training and h.shape[0] == 1:
            # a single vector in training mode: BatchNorm1d would raise, so normalise
            # with the running statistics instead (and do not update them)
            h = F.batch_norm(h, self.bn.running_mean, self.bn.running_var, self.bn.weight,
                             self.bn.bias, training=False, eps=self.bn.eps)
        else:
            h = self.bn(h)
        return torch.sigmoid(self.fc2(F.leaky_relu(h))).squeeze(1)


class ClassAttentionLoop(nn.Module):
    """C separate attention modules S_c, run one class at a time: ``ClassAttention`` before issue #13.

    ``forward(vectors [N, dim], labels [N] long in 0..C-1, counts=None) -> scores [N]``. Stable
    argsort by label, ``torch.split`` into class segments by the per-class ``counts`` (a host list;
    counted here with one ``.tolist()`` when not given), each present class's module on its
    segment (BatchNorm statistics per class segment; a one-vector segment in training uses the
    running statistics and leaves them), concatenate and un-permute. Empty input -> empty output.
    Its parameters and buffers are ``modules_per_class.{c}.fc1.weight`` ... (the old checkpoint
    format). Launches a number of kernels proportional to C.
    """

    def __init__(self, num_classes: int, dim: int = 256, hidden: int = 256):
        super().__init__()
        self.num_classes, self.dim = num_classes, dim
        self.modules_per_class = nn.ModuleList(AttentionModule(dim, hidden) for _ in range(num_classes))

    @classmethod
    def from_stacked(cls, att):
        """The loop version of a ``semiseg.models.heads.ClassAttention``, with the same weights and statistics."""
        from .models.heads import PER_CLASS_KEYS

        with torch.random.fork_rng(devices=[]):  # building it draws no numbers from the global generator
            loop = cls(att.num_classes, att.dim, att.hidden).to(att.weight1.device)
        stacked = att.state_dict()
        with torch.no_grad():
            for c, module in enumerate(loop.modules_per_class):
                for name, tensor in module.state_dict().items():
                    row = stacked[PER_CLASS_KEYS[name][0]][c]
                    tensor.copy_(row.T if name == "fc1.weight" else row.reshape(tensor.shape))
        return loop.train(att.training)

    def __getitem__(self, c: int) -> nn.Module:
        return self.modules_per_class[c]

    def __len__(self) -> int:
        return self.num_classes

    def forward(self, vectors: torch.Tensor, labels: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        if vectors.dim() != 2 or labels.dim() != 1 or vectors.shape[0] != labels.shape[0]:
            raise ValueError(f"expected vectors [N, dim] and labels [N], got "
                             f"{tuple(vectors.shape)} and {tuple(labels.shape)}")
        n = vectors.shape[0]
        if n == 0:
            return vectors.new_zeros(0)
        labels = labels.long()
        order = torch.argsort(labels, stable=True)
        if counts is None:
            counts = torch.bincount(labels, minlength=self.num_classes).tolist()
            if len(counts) > self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}), got max {len(counts) - 1}")
        elif len(counts) != self.num_classes or sum(counts) != n:
            raise ValueError(f"counts must hold {self.num_classes} class sizes summing to {n}, got {counts}")
        segments = torch.split(vectors[order], counts)
        outs = [self.modules_per_class[c](seg) for c, seg in enumerate(segments) if counts[c] > 0]
        sorted_scores = torch.cat(outs)
        scores = torch.empty_like(sorted_scores)
        scores[order] = sorted_scores
        return scores


def use_loop_attention(model):
    """Replace a SegModel's two ``ClassAttention`` by :class:`ClassAttentionLoop` with the same weights."""
    model.attention_pred = ClassAttentionLoop.from_stacked(model.attention_pred)
    model.attention_proj = ClassAttentionLoop.from_stacked(model.attention_proj)
    return model


def contrastive_gathered(model, vectors, vec_labels, bank, attention=True, attention_detach=True, ignore_index=255):
    """``Trainer.contrastive`` before issue #13: eq. (8)-(11) on the gathered non-ignored vectors.

    The non-ignored pixel vectors and the valid bank slots are gathered first (boolean masks: host
    reads), so g, q and S_c see only them; the attention is whatever ``model`` holds (with
    :class:`ClassAttentionLoop`, one ``.tolist()`` per call for the segment sizes).
    """
    keep = vec_labels != ignore_index
    vectors, vec_labels = vectors[keep], vec_labels[keep]
    pred = model.prediction(model.projection(vectors))  # P = q(g(V))
    psi = bank.size
    slot_valid = torch.arange(psi, device=bank.count.device)[None] < bank.count[:, None]  # [C, psi]
    if attention:
        seen = pred.detach() if attention_detach else pred
        pred_scores = model.attention_pred(seen, vec_labels)  # S_c,theta(p)
        slots = slot_valid.reshape(-1).nonzero()[:, 0]  # class-major: sorted by class
        scores = model.attention_proj(bank.memory.reshape(-1, bank.dim)[slots], torch.div(slots, psi, rounding_mode="floor"))
        memory_scores = torch.zeros(slot_valid.numel(), device=scores.device).index_put((slots,), scores)
        memory_scores = memory_scores.view_as(slot_valid)  # S_c,theta(z'), 0 on empty slots
    else:
        pred_scores, memory_scores = torch.ones_like(vec_labels, dtype=pred.dtype), slot_valid.float()
    return losses.contrastive_loss(pred, vec_labels, bank.memory, pred_scores, memory_scores, bank.num_classes,
                                   memory_count=bank.count)
