"""§3 "Teacher-student scheme": the teacher's weights are an EMA of the student's (eq. 2)."""

from __future__ import annotations

import copy

import torch


def make_teacher(student):
    """A frozen copy of the student: no gradients, always in eval mode for inference."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher, student, tau):
    """Eq. (2): ``xi = tau * xi + (1 - tau) * theta`` for every parameter.

    *Choice*: floating-point buffers (BatchNorm running statistics) follow the same EMA;
    integer buffers (``num_batches_tracked``) are copied.
    """
    buffers = list(zip(teacher.buffers(), student.buffers()))
    xi = list(teacher.parameters()) + [b_t for b_t, _ in buffers if b_t.is_floating_point()]
    theta = [p.detach() for p in student.parameters()] + [b_s for b_t, b_s in buffers if b_t.is_floating_point()]
    # Eq. (2), as two multi-tensor kernels instead of two per tensor
    torch._foreach_mul_(xi, tau)
    torch._foreach_add_(xi, theta, alpha=1.0 - tau)
    for b_t, b_s in buffers:
        if not b_t.is_floating_point():
            b_t.copy_(b_s)


def tau_schedule(iteration, total, tau_start=0.995, tau_end=1.0):
    """§4.2: tau goes "from 0.995 to 1 during training". *Choice*: linearly in the iteration."""
    frac = min(max(iteration / max(total - 1, 1), 0.0), 1.0)
    return tau_start + (tau_end - tau_start) * frac
