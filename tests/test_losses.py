"""BT and CE discriminator losses and the GRPO group advantage, against hand-computed values."""

from __future__ import annotations

import math

import torch

from gad_megatron.losses import bradley_terry_loss, cross_entropy_gan_loss, group_advantages, pair_accuracy


def test_bradley_terry_hand_values() -> None:
    teacher = torch.tensor([1.0, 0.0, 2.0])
    student = torch.tensor([0.0, 0.0, 3.0])
    # -log sigmoid(1), -log sigmoid(0), -log sigmoid(-1)
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(1))) / 3
    assert math.isclose(bradley_terry_loss(teacher, student).item(), expected, rel_tol=1e-6)


def test_bradley_terry_gradient_pushes_teacher_up() -> None:
    teacher = torch.tensor([0.0], requires_grad=True)
    student = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(teacher, student).backward()
    assert teacher.grad.item() == -0.5 and student.grad.item() == 0.5


def test_cross_entropy_hand_values() -> None:
    teacher = torch.tensor([0.0, 2.0])
    student = torch.tensor([0.0, -1.0, 1.0])
    real = (math.log(2) + math.log1p(math.exp(-2))) / 2
    fake = (math.log(2) + math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 3
    assert math.isclose(cross_entropy_gan_loss(teacher, student).item(), 0.5 * (real + fake), rel_tol=1e-6)


def test_pair_accuracy_ties_count_as_wrong() -> None:
    assert math.isclose(pair_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])).item(), 1 / 3, rel_tol=1e-6)


def test_group_advantage_hand_values() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, num_generations=3)
    # group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-4); group 2: zero std -> 0
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / torch.tensor([1 + 1e-4] * 3 + [1.0] * 3)
    assert torch.allclose(adv, expected, atol=1e-7)
