"""Shared test helpers."""

import torch

from semiseg.models.heads import ClassAttention
from semiseg.reference import ClassAttentionLoop


def randomised_attention(num_classes, dim, hidden=None, seed=None):
    """(ClassAttention, the per-class reference loop with the same weights): non-trivial weights and
    running statistics, so every part of S_c shows in the scores. The batched module gets them
    through an old-format (per-class) state dict. ``seed``: seeds torch first."""
    if seed is not None:
        torch.manual_seed(seed)
    loop = ClassAttentionLoop(num_classes, dim, hidden or dim)
    with torch.no_grad():
        for mod in loop.modules_per_class:
            mod.bn.running_mean.uniform_(-0.5, 0.5)
            mod.bn.running_var.uniform_(0.5, 2)
            mod.bn.weight.uniform_(0.5, 2)
            mod.bn.bias.uniform_(-1, 1)
            mod.fc2.weight.mul_(3)
    att = ClassAttention(num_classes, dim, hidden or dim)
    att.load_state_dict(loop.state_dict())
    return att, loop

