"""One discriminator step: score teacher and rollouts, then (optionally) one BT / CE update.

The scores returned are the ones computed *before* the update: they are this step's rewards.
Each teacher response is forwarded once per prompt (not once per rollout). Two ways to get
D's gradient, exactly equal in value:

* ``single_pass``: the scoring forward keeps its autograd graph and feeds the loss, so D runs
  once per sequence. Memory grows with every sequence of the step (fine for small models).
* default (recompute): the scoring forward keeps no graph; the loss is differentiated with
  respect to the scores only, then each micro-batch is run again with a graph and
  back-propagated with its share of that gradient. One more forward, but the memory of one
  micro-batch, whatever the batch (the paper's 256 x 8 rollouts of 3.5k tokens on a 7B D).

D is replicated on every process (no DDP wrapper: DDP cannot take several forward passes
before one backward). Its gradients are averaged across processes by hand with one
all-reduce of a flat buffer, which is what DDP would do.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gad_megatron.data import Messages
from gad_megatron.evaluation.hf_discriminator import score_sequences
from gad_megatron.text_encoding import TextEncoder, right_pad
from trl_baseline.losses import bradley_terry_loss, cross_entropy_gan_loss, pair_accuracy


class NonFiniteError(RuntimeError):
    """A NaN or inf appeared in a score, loss or gradient; the step is stopped, not skipped."""


def check_finite(value: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"step {step}: non-finite {what} ({value.detach().flatten()[:4].tolist()}...)")


@dataclass
class DiscriminatorStep:
    """Result of one step. student_scores_B are the pre-update scores (the rewards)."""

    student_scores_B: torch.Tensor
    teacher_scores_B: torch.Tensor
    loss: float
    accuracy: float
    grad_norm: float
    time_scoring: float
    time_update: float


def average_gradients(params: list[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``params`` across processes in one flat buffer."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


class DiscriminatorUpdater:
    """Owns D, its tokenizer and its optimizer; turns (prompt, teacher, rollout) text into scores and updates."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        encoder: TextEncoder,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any | None,
        loss: str = "bt",
        micro_batch_size: int = 8,
        max_grad_norm: float = 0.2,
        autocast_dtype: torch.dtype | None = None,
        single_pass: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_name = loss
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.autocast_dtype = autocast_dtype
        self.single_pass = single_pass
        self._eot = encoder.end_of_turn_ids()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _score_batch(self, sequences: list[list[int]]) -> torch.Tensor:
        ids, mask = right_pad(sequences, self.tokenizer.pad_token_id, self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return score_sequences(self.model, ids, mask)

    def _scores(self, sequences: list[list[int]]) -> torch.Tensor:
        mb = self.micro_batch_size
        return torch.cat([self._score_batch(sequences[i : i + mb]) for i in range(0, len(sequences), mb)])

    def _backward_by_micro_batch(self, sequences: list[list[int]], grad: torch.Tensor) -> None:
        """Accumulate ``sum_i grad[i] * dscore_i/dtheta`` one micro-batch (and its graph) at a time."""
        mb = self.micro_batch_size
        for i in range(0, len(sequences), mb):
            self._score_batch(sequences[i : i + mb]).backward(grad[i : i + mb])

    def _loss(self, teacher_P: torch.Tensor, student_B: torch.Tensor, pair_index_B: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "bt":
            return bradley_terry_loss(teacher_P[pair_index_B], student_B)
        return cross_entropy_gan_loss(teacher_P, student_B)

    def step(
        self, prompts: list[Messages], teacher_responses: list[str], completions: list[str], update: bool, step: int
    ) -> DiscriminatorStep:
        """Score every rollout and its prompt's teacher response; update D when ``update``.

        prompts, teacher_responses, completions: one entry per rollout (B). Rollouts sharing
        a prompt share its teacher response, which is encoded and forwarded once.
        """
        t0 = time.perf_counter()
        keys = [repr(p) + "\x00" + t for p, t in zip(prompts, teacher_responses)]
        first_row: dict[str, int] = {}  # distinct (prompt, teacher) -> first rollout row carrying it
        for i, k in enumerate(keys):
            first_row.setdefault(k, i)
        slot = {k: j for j, k in enumerate(first_row)}
        teacher_seqs = [self.encoder.encode(prompts[i], teacher_responses[i], self._eot) for i in first_row.values()]
        student_seqs = [self.encoder.encode(p, c, self._eot) for p, c in zip(prompts, completions)]
        pair_index_B = torch.tensor([slot[k] for k in keys], device=self.device)

        self.model.train(update)
        with torch.set_grad_enabled(update and self.single_pass):
            teacher_P = self._scores(teacher_seqs)
            student_B = self._scores(student_seqs)
        check_finite(teacher_P, "discriminator teacher score", step)
        check_finite(student_B, "discriminator student score", step)
        recompute = update and not self.single_pass
        if recompute:  # differentiate the loss w.r.t. the scores; D's graph is rebuilt per micro-batch below
            teacher_P, student_B = teacher_P.detach().requires_grad_(), student_B.detach().requires_grad_()
        with torch.set_grad_enabled(update):
            loss = self._loss(teacher_P, student_B, pair_index_B)
        teacher_B = teacher_P.detach()[pair_index_B]
        t1 = time.perf_counter()
        grad_norm = math.nan
        if update:
            check_finite(loss.detach(), "discriminator loss", step)
            loss.backward()
            if recompute:
                self._backward_by_micro_batch(teacher_seqs, teacher_P.grad)
                self._backward_by_micro_batch(student_seqs, student_B.grad)
            grad_norm = self._update(step)
        return DiscriminatorStep(
            student_scores_B=student_B.detach(),
            teacher_scores_B=teacher_B,
            loss=loss.item(),
            accuracy=pair_accuracy(teacher_B, student_B.detach()).item(),
            grad_norm=grad_norm,
            time_scoring=t1 - t0,
            time_update=time.perf_counter() - t1,
        )

    def _update(self, step: int) -> float:
        """Average the accumulated gradients across processes, clip, step."""
        assert self.optimizer is not None, "a frozen discriminator has no optimizer"
        params = [p for p in self.model.parameters() if p.requires_grad]
        average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        check_finite(grad_norm, "discriminator gradient norm", step)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.item()
