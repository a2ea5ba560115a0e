"""Pure loss and reward-transform functions of GAD (shapes in the docstrings).

Notation: P prompts, N rollouts per prompt, B = P * N pairs (one per rollout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(teacher_B: torch.Tensor, student_B: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``-log sigmoid(D(x, y_teacher) - D(x, y_student))``.

    teacher_B: (B,) score of the teacher response paired with each rollout.
    student_B: (B,) score of each rollout. Returns a scalar.
    """
    return -F.logsigmoid(teacher_B - student_B).mean()


def cross_entropy_gan_loss(teacher_P: torch.Tensor, student_B: torch.Tensor) -> torch.Tensor:
    """Classic GAN discriminator loss (ablation): teacher labelled real, rollouts fake.

    teacher_P: (P,) one score per distinct teacher response (each counted once).
    student_B: (B,) one score per rollout.
    Returns the mean of the two class-balanced binary cross-entropies, a scalar.
    """
    real = F.softplus(-teacher_P).mean()  # -log sigmoid(s)
    fake = F.softplus(student_B).mean()  # -log(1 - sigmoid(s))
    return 0.5 * (real + fake)


def pair_accuracy(teacher_B: torch.Tensor, student_B: torch.Tensor) -> torch.Tensor:
    """Share of pairs where D ranks the teacher strictly above the rollout. (B,), (B,) -> scalar."""
    return (teacher_B > student_B).float().mean()


def group_advantages(rewards_B: torch.Tensor, num_generations: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO group-normalised advantage ``(r_i - mean_g) / (std_g + eps)``, unbiased std.

    rewards_B: (P * N,) rewards, the N rollouts of a prompt contiguous. Returns (P * N,).
    This is the formula TRL's GRPOTrainer applies with ``scale_rewards="group"``; tests check
    that the trainer's advantages equal it.
    """
    grouped = rewards_B.view(-1, num_generations)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased, as TRL's nanstd
    return ((grouped - mean) / (std + eps)).view(-1)
