"""The model passes of a GAD step: policy log-probs, SFT and policy-gradient updates of G,
D's scores and D's update in bounded memory.

Every function takes micro-batches built by :mod:`gad_megatron.trainer.batching` (the same on
every rank of a model-parallel group) and returns results on every rank that needs them.
Log-probs come from the policy's TP-sharded logits through
:func:`gad_megatron.loss.vocab_parallel_logprobs` (the vocabulary is never gathered), and
only at each row's response positions: the output layer sees the hidden states of the
response window alone (:meth:`TokenBatch.response_window_BR`), so the prompt's logits,
most of a GAD batch's, are never computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from gad_megatron.config import RatioReduce
from gad_megatron.loss import DISC_LOSSES, disc_score_grads, policy_loss, vocab_parallel_logprobs
from gad_megatron.models.discriminator import stage_forward
from gad_megatron.models.policy import MegatronLM, broadcast_from_last_stage, model_device
from gad_megatron.trainer.actor import Actor, optimizer_step, run_micro_batches, zero_grad
from gad_megatron.trainer.batching import ScoreBatch, TokenBatch

CHUNK_TOKENS = 1024
# One pipeline stage of D on a micro-batch, with autograd: the rows' scores [B] on the last stage,
# the stage's activations elsewhere (head D: ScoreBatch; likelihood-ratio D: TokenBatch).
DForward = Callable[[torch.nn.Module, ScoreBatch | TokenBatch], torch.Tensor]


def _tp() -> tuple[torch.distributed.ProcessGroup, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron's DDP and Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextmanager
def _output_layer_at(model: torch.nn.Module, window_BR: torch.Tensor) -> Iterator[None]:
    """While inside, the model's output layer (last stage) projects only the hidden states at
    ``window_BR``: [T, B, H] -> [R, B, H], so the logits come out [B, R, V/TP]."""
    gpt = _unwrapped(model)
    if not gpt.post_process:
        yield
        return
    if gpt.output_layer.sequence_parallel:
        raise ValueError("the policy's response-window logits need whole sequences (sequence_parallel off)")
    index_RBH = window_BR.t().to(model_device())[:, :, None]

    def select(_layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden_TBH = args[0]
        return (hidden_TBH.gather(0, index_RBH.expand(-1, -1, hidden_TBH.shape[-1])), *args[1:]), kwargs

    handle = gpt.output_layer.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _policy_forward(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:
    """-> logits [B, R, V/TP] at the response window, this TP rank's vocabulary shard, on the last stage."""
    with _output_layer_at(model, batch.response_window_BR()):
        return model(input_ids=batch.input_ids_BT.to(model_device()), position_ids=None, attention_mask=None)


def _logprobs(logits_BRV: torch.Tensor, batch: TokenBatch, lm: MegatronLM, temperature: float,
              with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``batch`` already in the response window (:meth:`TokenBatch.in_window`). -> [B, R] each."""
    group, rank = _tp()
    return vocab_parallel_logprobs(
        logits_BRV, batch.target_ids_BT.to(logits_BRV.device), group, rank * logits_BRV.shape[-1], CHUNK_TOKENS,
        real_vocab_size=lm.layout.vocab_size, temperature=temperature, with_entropy=with_entropy,
    )  # fmt: skip


def policy_logprobs(lm: MegatronLM, micro: Sequence[TokenBatch], temperature: float) -> list[torch.Tensor]:
    """Per-token log-probs of each micro-batch's targets in its response window, without
    autograd ([B, R] each, last pipeline stage only; [] on the others). For the KL reference."""
    out: list[torch.Tensor] = []

    def keep(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        out.append(_logprobs(logits, batch.in_window(batch.response_window_BR()), lm, temperature)[0].cpu())
        return logits.new_zeros(()), torch.zeros((), dtype=torch.int), {}

    run_micro_batches(lm.model, micro, _policy_forward, keep, train=False)
    return out


def sft_update(actor: Actor, micro: Sequence[TokenBatch]) -> tuple[list[dict[str, torch.Tensor]], float]:
    """One optimizer step of next-token NLL on the masked (response) tokens, token mean over the
    global batch. -> (per-micro-batch metric sums, grad norm)."""

    def loss(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        batch = batch.in_window(batch.response_window_BR())
        mask = batch.loss_mask_BT.to(logits.device)
        logprobs, _ = _logprobs(logits, batch, actor.lm, 1.0)
        nll = -(logprobs * mask).sum()
        count = mask.sum().to(torch.int)
        return nll, count, {"sft_loss": nll.detach(), "sft_tokens": count.float()}

    zero_grad(actor)
    metrics = run_micro_batches(actor.ddp, micro, _policy_forward, loss, train=True)
    return metrics, optimizer_step(actor)


def policy_gradient_update(
    actor: Actor, micro: Sequence[TokenBatch], ref_logprobs: Sequence[torch.Tensor] | None, temperature: float,
    clip: float, kl_beta: float, tis_cap: float | None,
) -> tuple[list[dict[str, torch.Tensor]], float]:  # fmt: skip
    """One optimizer step of the clipped policy gradient with k3 KL to the reference and TIS.

    One update per rollout batch: the parameters do not change between micro-batches, so the
    "old" log-probs are this forward's own, detached (ratio 1, exact gradient), and no second
    forward is needed. -> (per-micro-batch metric sums, grad norm)."""
    refs = iter(ref_logprobs) if ref_logprobs is not None else None

    def loss(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        batch, device = batch.in_window(batch.response_window_BR()), logits.device
        mask = batch.loss_mask_BT.to(device)
        logprobs, entropy = _logprobs(logits, batch, actor.lm, temperature, with_entropy=True)
        value, metrics = policy_loss(
            logprobs, logprobs.detach(), batch.advantages_BT.to(device), mask, 1,
            ref_logprobs_T=None if refs is None else next(refs).to(device),
            engine_logprobs_T=batch.engine_logprobs_BT.to(device) if tis_cap is not None else None,
            clip=clip, kl_beta=kl_beta, tis_cap=tis_cap,
        )  # fmt: skip
        metrics["ratio_dev_max"] = metrics.pop("ratio_max_dev")
        metrics["entropy"] = (entropy * mask).sum()
        engine_diff = (logprobs.detach() - batch.engine_logprobs_BT.to(device)) * mask
        metrics["engine_logprob_diff"] = engine_diff.sum()
        metrics["engine_logprob_diff_max"] = engine_diff.abs().max()
        metrics["policy_tokens"] = mask.sum()
        return value, mask.sum().to(torch.int), metrics

    zero_grad(actor)
    metrics = run_micro_batches(actor.ddp, micro, _policy_forward, loss, train=True)
    return metrics, optimizer_step(actor)


def head_score_forward(model: torch.nn.Module, batch: ScoreBatch) -> torch.Tensor:
    """The scalar-head D's :data:`DForward`: its head at each row's last real token."""
    device = model_device()
    return stage_forward(model, batch.input_ids_BT.to(device), batch.last_B.to(device))


def _response_logprob_sums(logits: torch.Tensor, batch: TokenBatch, lm: MegatronLM) -> torch.Tensor:
    """Sum of the response tokens' log-probs (temperature 1) of each row. -> [B] fp32"""
    batch = batch.in_window(batch.response_window_BR())
    return (_logprobs(logits, batch, lm, 1.0)[0] * batch.loss_mask_BT.to(logits.device)).sum(dim=1)


def response_logprob_sums(lm: MegatronLM, micro: Sequence[TokenBatch], total_rows: int) -> torch.Tensor:
    """log pi(response | prompt) of every row, without autograd, on every rank of the pipeline.
    -> [total_rows] fp32 (rows numbered by ``row_ids_B``)"""
    sums = torch.zeros(total_rows, dtype=torch.float32, device=model_device())

    def keep(logits: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        sums[batch.row_ids_B.to(logits.device)] = _response_logprob_sums(logits, batch, lm)
        return logits.new_zeros(()), torch.zeros((), dtype=torch.int), {}

    run_micro_batches(lm.model, micro, _policy_forward, keep, train=False)
    return broadcast_from_last_stage(sums, sums.shape, sums.dtype).cpu()


def ratio_score_forward(lm: MegatronLM, beta: float, reference_sums: torch.Tensor, reduce: RatioReduce) -> DForward:
    """The likelihood-ratio D's :data:`DForward`: ``beta * (log pi_D(response) - reference_sums[row])``
    for rows of a :class:`TokenBatch`, divided by the row's response tokens when ``reduce`` is
    ``mean``; ``reference_sums`` [rows] the frozen reference's :func:`response_logprob_sums` of the
    same rows."""

    def forward(model: torch.nn.Module, batch: TokenBatch) -> torch.Tensor:  # type: ignore[override]
        out = _policy_forward(model, batch)
        if not _unwrapped(model).post_process:
            return out
        ratio_B = _response_logprob_sums(out, batch, lm) - reference_sums[batch.row_ids_B].to(out.device)
        if reduce == "mean":
            ratio_B = ratio_B / batch.loss_mask_BT.sum(dim=1).clamp(min=1).to(out.device)
        return beta * ratio_B

    return forward  # type: ignore[return-value]


def score(lm: MegatronLM, micro: Sequence[ScoreBatch | TokenBatch], total_rows: int,
          forward: DForward = head_score_forward) -> torch.Tensor:  # fmt: skip
    """D's score of every row, without autograd, on every rank of the pipeline. -> [total_rows] fp32"""
    scores = torch.zeros(total_rows, dtype=torch.float32, device=model_device())

    def keep(out: torch.Tensor, batch: ScoreBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        scores[batch.row_ids_B.to(out.device)] = out.detach().float()
        return out.new_zeros(()), torch.zeros((), dtype=torch.int), {}

    run_micro_batches(lm.model, micro, forward, keep, train=False)
    return broadcast_from_last_stage(scores, scores.shape, scores.dtype).cpu()


def disc_score_and_update(actor: Actor, micro: Sequence[ScoreBatch | TokenBatch], total_rows: int, group_size: int,
                          loss_name: str, forward: DForward = head_score_forward) -> tuple[torch.Tensor, float]:
    """One optimizer step of D whose forward also gives the scores: one D pass where
    :func:`score` + :func:`disc_update` take two.

    Each micro-batch holds whole groups of ``group_size`` rows, a teacher answer then its
    rollouts (:func:`gad_megatron.trainer.batching.group_micro_batches`), so each group's
    pair losses need only its own rows: a micro-batch of G groups returns the sum of its
    G x (K - 1) pair losses (``G (K - 1) x`` the loss's pair mean) and that pair count, and
    megatron-core divides by the global count, as :func:`disc_update`. The scores are those
    of the weights before the step. -> (every row's score on every pipeline rank [total_rows], grad norm)
    """
    scores = torch.zeros(total_rows, dtype=torch.float32, device=model_device())

    def loss(out: torch.Tensor, batch: ScoreBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        scores[batch.row_ids_B.to(out.device)] = out.detach().float()
        groups_GK = out.float().view(-1, group_size)
        pairs = groups_GK.shape[0] * (group_size - 1)
        return DISC_LOSSES[loss_name](groups_GK[:, 0], groups_GK[:, 1:]) * pairs, torch.tensor(pairs, dtype=torch.int), {}

    zero_grad(actor)
    run_micro_batches(actor.ddp, micro, forward, loss, train=True)
    grad_norm = optimizer_step(actor)
    return broadcast_from_last_stage(scores, scores.shape, scores.dtype).cpu(), grad_norm


def disc_update(actor: Actor, micro: Sequence[ScoreBatch | TokenBatch], teacher_P: torch.Tensor,
                student_PN: torch.Tensor, loss_name: str, forward: DForward = head_score_forward) -> float:
    """One optimizer step of D on the pairs scored by :func:`score`, in the memory of one micro-batch.

    The loss's gradient with respect to each score (``disc_score_grads``) becomes the row's
    weight; each micro-batch is re-run with autograd and back-propagates ``sum(weight * score)``:
    summed over micro-batches that is exactly the gradient of the loss. Rows are numbered
    teacher first (P), then rollouts (P x N, prompt-major). Weights are scaled by this rank's
    pair count, and megatron-core divides by the pair count summed over data-parallel ranks,
    so the update is the gradient of the mean over all pairs of the global batch.
    -> grad norm."""
    _, grad_teacher, grad_student = disc_score_grads(teacher_P, student_PN, loss_name)  # type: ignore[arg-type]
    pairs = student_PN.numel()
    weights = torch.cat([grad_teacher, grad_student.reshape(-1)]) * pairs
    first = True

    def loss(out: torch.Tensor, batch: ScoreBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        nonlocal first
        w = weights[batch.row_ids_B]
        count = torch.tensor(pairs if first else 0, dtype=torch.int)  # the pairs, counted once per rank
        first = False
        return (out.float() * w.to(out.device)).sum(), count, {}

    zero_grad(actor)
    run_micro_batches(actor.ddp, micro, forward, loss, train=True)
    return optimizer_step(actor)
