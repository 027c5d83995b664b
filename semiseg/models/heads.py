"""Projection / prediction heads and class-wise attention modules (paper §3.4, §4.2).

* :class:`MLPHead` -- g (projection) and q (prediction), following BYOL [14]:
  ``Linear(256) -> BatchNorm -> ReLU -> Linear(256)``.
* :class:`ClassAttention` -- the C class-specific attention modules S_c:
  ``Linear(256) -> BatchNorm -> LeakyReLU -> Linear(1) -> Sigmoid``; a SegModel
  owns two of them (one for prediction vectors p, one for projection vectors z'),
  i.e. the paper's 2 x N_classes modules.

Both operate on flat vectors ``[N, dim]`` (pixels already gathered by the caller).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPHead(nn.Module):
    """``Linear(in_dim, dim) -> BatchNorm1d -> ReLU -> Linear(dim, dim)``.

    Input ``[N, in_dim]``, output ``[N, dim]``. Used as projection head g
    (``in_dim = feat_dim``) and prediction head q (``in_dim = 256``).
    """

    def __init__(self, in_dim: int, dim: int = 256, hidden: int | None = None):
        super().__init__()
        hidden = dim if hidden is None else hidden
        self.in_dim, self.dim = in_dim, dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and self.training:
            # BatchNorm1d cannot compute batch statistics from one sample: use running stats
            lin, bn, _, lin2 = self.net
            h = lin(x)
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                             training=False, eps=bn.eps)
            return lin2(F.relu(h))
        return self.net(x)


class _AttentionModule(nn.Module):
    """One S_c: ``Linear(dim, hidden) -> BN1d -> LeakyReLU -> Linear(hidden, 1) -> Sigmoid``."""

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


class ClassAttention(nn.Module):
    """C class-specific attention modules; each vector goes only through its class's module.

    ``forward(vectors [N, dim], labels [N] long in 0..C-1) -> scores [N]`` in [0, 1].

    Implementation: stable argsort by label, ``torch.split`` into class segments by the
    per-class ``counts`` (a host list), apply each present class's module on its segment,
    concatenate and un-permute. Every vector is computed once, by its own module: no C x
    arithmetic and no padding. ``torch.split`` needs the segment sizes on the host, so a
    caller that knows them passes ``counts`` (the trainer reads the counts of all three calls
    of a step in one synchronisation); without it they are counted here (one sync per call).
    BatchNorm statistics are therefore computed per class segment (as if each S_c were
    called on its own batch).
    A segment containing a single vector in training mode uses the BN running
    statistics (``F.batch_norm(training=False)``) since batch statistics of one sample
    are undefined. Empty input returns an empty tensor.
    """

    def __init__(self, num_classes: int, dim: int = 256, hidden: int = 256):
        super().__init__()
        self.num_classes, self.dim = num_classes, dim
        self.modules_per_class = nn.ModuleList(
            _AttentionModule(dim, hidden) for _ in range(num_classes))

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
                raise ValueError(f"labels must be in [0, {self.num_classes}), got max "
                                 f"{len(counts) - 1}")
        elif len(counts) != self.num_classes or sum(counts) != n:
            raise ValueError(f"counts must hold {self.num_classes} class sizes summing to {n}, got {counts}")
        segments = torch.split(vectors[order], counts)
        outs = [self.modules_per_class[c](seg) for c, seg in enumerate(segments)
                if counts[c] > 0]
        sorted_scores = torch.cat(outs)
        scores = torch.empty_like(sorted_scores)
        scores[order] = sorted_scores
        return scores
