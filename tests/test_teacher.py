"""Eq. (2) EMA teacher and the tau schedule."""

import pytest
import torch
from torch import nn

from semiseg.teacher import ema_update, make_teacher, tau_schedule


def test_ema_update_is_eq2():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    xi_before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, tau=0.9)
    for xi_old, xi, theta in zip(xi_before, teacher.parameters(), student.parameters()):
        assert torch.allclose(xi, 0.9 * xi_old + 0.1 * theta)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_tau_one_freezes_and_zero_copies():
    student, other = nn.Linear(2, 2), nn.Linear(2, 2)
    teacher = make_teacher(other)
    before = teacher.weight.clone()
    ema_update(teacher, student, 1.0)
    assert torch.equal(teacher.weight, before)
    ema_update(teacher, student, 0.0)
    assert torch.equal(teacher.weight, student.weight)


def test_tau_schedule_goes_from_0995_to_1():
    assert tau_schedule(0, 100) == pytest.approx(0.995)
    assert tau_schedule(99, 100) == pytest.approx(1.0)
    assert 0.995 < tau_schedule(50, 100) < 1.0
