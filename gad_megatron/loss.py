"""GAD's losses on Megatron, as pure functions.

Policy side: per-token log-probs from tensor-parallel (vocabulary-sharded) logits without
gathering the vocabulary, and the clipped policy-gradient loss with k3 KL and truncated
importance sampling. Discriminator side: Bradley-Terry and CE-GAN losses, pair accuracy, the
group-normalised advantage, and the loss's gradient w.r.t. the scores.

Shape suffixes: T tokens (any layout, e.g. [B, S]; every ``_T`` argument of one call has the
same shape), Vp the columns of this TP rank's vocabulary shard (padded), P prompts, N rollouts
per prompt.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

KL_LOG_RATIO_BOUND = 20.0  # |ref - logprobs| per token in the k3 KL (verl's low_var_kl)
KL_TOKEN_BOUND = 10.0  # k3 per token


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _scaled(chunk_cVp: Tensor, n_real: int, temperature: float) -> Tensor:
    """A private fp32 copy of the real columns divided by the temperature: ``[c, n_real]``."""
    z = chunk_cVp[:, :n_real].to(torch.float32, copy=True)  # copy=True: in-place work below never touches the input
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _chunk_forward(
    chunk_cVp: Tensor, local_c: Tensor, owned_c: Tensor, n_real: int, temperature: float,
    group: dist.ProcessGroup | None, with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """(log-prob, log Z, entropy or None) of one chunk of rows. A function of its own so that its
    [c, Vp] temporaries are freed before the next chunk allocates (a loop variable would keep two)."""
    z = _scaled(chunk_cVp, n_real, temperature)
    max_c = z.amax(dim=1) if n_real else z.new_full((z.shape[0],), float("-inf"))  # a shard may be all padding
    _all_reduce(max_c, dist.ReduceOp.MAX, group)
    z.sub_(max_c[:, None])
    sums = z.new_zeros(3, z.shape[0])  # sum_j e^z_j, sum_j e^z_j z_j, z_target (z shifted by the max)
    if n_real:
        sums[2] = torch.where(owned_c, z.gather(1, local_c[:, None]).squeeze(1), 0.0)
    if with_entropy:
        e = z.exp()
        sums[0] = e.sum(dim=1)
        sums[1] = e.mul_(z).sum(dim=1)
    else:
        sums[0] = z.exp_().sum(dim=1)
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    log_sum = sums[0].log()
    entropy = log_sum - sums[1] / sums[0] if with_entropy else None  # H = log Z - E_p[z] (the max cancels)
    return sums[2] - log_sum, max_c + log_sum, entropy


def _chunk_backward(
    chunk_cVp: Tensor, local_c: Tensor, owned_c: Tensor, log_norm_c: Tensor, scale_c: Tensor, n_real: int,
    temperature: float,
) -> None:  # fmt: skip
    """Overwrite one chunk of logits with its gradient ``scale * (onehot - p)``."""
    if n_real:
        z = _scaled(chunk_cVp, n_real, temperature)
        z.sub_(log_norm_c[:, None]).exp_().mul_(-scale_c[:, None])  # -g p_j / temperature
        z.scatter_add_(1, local_c[:, None], (scale_c * owned_c)[:, None])  # +g onehot / temperature
        chunk_cVp[:, :n_real].copy_(z)
    chunk_cVp[:, n_real:].zero_()  # padded columns take no part in the softmax


class _VocabParallelLogProbs(torch.autograd.Function):
    """Forward: per chunk of rows, all-reduce the max, then (sum exp, sum exp * z, target z) over
    the TP group. Backward: recompute each chunk's softmax from the saved log-normaliser and
    write the gradient into the logits' own storage (no second [T, Vp] buffer)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits_TVp: Tensor, target_T: Tensor, group: dist.ProcessGroup | None, vocab_start: int,
        n_real: int, temperature: float, chunk_tokens: int, with_entropy: bool,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        local_T = target_T - vocab_start
        owned_T = (local_T >= 0) & (local_T < n_real)  # the target's column lives on this rank
        local_T = torch.where(owned_T, local_T, 0)
        tokens = logits_TVp.shape[0]
        out = dict(dtype=torch.float32, device=logits_TVp.device)
        logprobs_T, log_norm_T = torch.empty(tokens, **out), torch.empty(tokens, **out)
        entropy_T = torch.empty(tokens, **out) if with_entropy else None
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logprobs_T[rows], log_norm_T[rows], entropy = _chunk_forward(
                logits_TVp[rows], local_T[rows], owned_T[rows], n_real, temperature, group, with_entropy
            )
            if entropy_T is not None:
                entropy_T[rows] = entropy
        ctx.save_for_backward(logits_TVp, local_T, owned_T, log_norm_T)
        ctx.layout = (n_real, temperature, chunk_tokens)
        if entropy_T is not None:
            ctx.mark_non_differentiable(entropy_T)
        return logprobs_T, entropy_T

    @staticmethod
    def backward(ctx, grad_T: Tensor, _grad_entropy: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore
        logits_TVp, local_T, owned_T, log_norm_T = ctx.saved_tensors
        n_real, temperature, chunk_tokens = ctx.layout
        scale_T = grad_T.float() / temperature  # d(x / temperature) / dx
        for start in range(0, logits_TVp.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            _chunk_backward(logits_TVp[rows], local_T[rows], owned_T[rows], log_norm_T[rows], scale_T[rows], n_real,
                            temperature)  # fmt: skip
        return logits_TVp, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits_TVp: Tensor,
    target_T: Tensor,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    chunk_tokens: int = 1024,
    *,
    real_vocab_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``target_T`` under ``softmax(logits / temperature)``, and optionally the entropy.

    ``logits_TVp`` ([*T, Vp], any float dtype) is this rank's shard of the vocabulary, columns
    ``vocab_start .. vocab_start + Vp``; ``tp_group`` is the tensor-parallel group (None: no TP).
    Columns at or beyond ``real_vocab_size`` are Megatron's padding (logit 0, not -inf) and are
    excluded. With z = x / temperature over the real vocabulary V::

        log p(t) = z_t - log Z,   log Z = m + log sum_j exp(z_j - m),   m = max_j z_j
        H = log Z - sum_j p_j z_j                  (no gradient; for metrics)
        d log p(t) / d x_j = (1[j = t] - p_j) / temperature

    m, the two sums and z_t (from the rank that owns column t) are all-reduced over the TP
    group; nothing of size V is communicated. Work is done ``chunk_tokens`` rows at a time in
    fp32: the working set is one fp32 [chunk_tokens, Vp] buffer (two with ``with_entropy``),
    never [T, Vp]. Targets must lie in [0, real_vocab_size), masked positions included. The
    policy loss uses logits / temperature with the rollouts' sampling temperature (0.8), and
    old / reference log-probs must be computed at the same temperature.

    The logits are consumed: backward writes their gradient into their own storage (as
    Megatron's vocab-parallel cross-entropy does), so read nothing from them after backward;
    a leaf that requires grad is refused. If another op's backward needs these logits,
    autograd raises instead of using them. Without grad (old / reference log-probs) they are
    left untouched.

    Returns (logprobs [*T] fp32, entropy [*T] fp32 or None); every TP rank gets the same values.
    """
    if chunk_tokens < 1 or temperature <= 0:
        raise ValueError(f"need chunk_tokens >= 1 and temperature > 0, got {chunk_tokens}, {temperature}")
    if logits_TVp.shape[:-1] != target_T.shape:
        raise ValueError(f"logits {tuple(logits_TVp.shape)} do not match targets {tuple(target_T.shape)}")
    if logits_TVp.is_leaf and logits_TVp.requires_grad:
        raise ValueError("logits that require grad must not be a leaf: backward overwrites them (pass e.g. x.clone())")
    shard = logits_TVp.shape[-1]
    n_real = min(max(real_vocab_size - vocab_start, 0), shard)
    logprobs, entropy = _VocabParallelLogProbs.apply(
        logits_TVp.reshape(-1, shard), target_T.reshape(-1), tp_group, vocab_start, n_real, temperature,
        chunk_tokens, with_entropy,
    )  # fmt: skip
    return logprobs.view(target_T.shape), None if entropy is None else entropy.view(target_T.shape)


def policy_loss(
    logprobs_T: Tensor,
    old_logprobs_T: Tensor,
    advantages_T: Tensor,
    mask_T: Tensor,
    num_tokens_global: int | float | Tensor,
    ref_logprobs_T: Tensor | None = None,
    engine_logprobs_T: Tensor | None = None,
    clip: float = 0.2,
    kl_beta: float = 0.001,
    tis_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the token-mean policy loss, and metrics.

    Per valid token (``mask_T`` true), with r = exp(logprobs - old), A the advantage::

        pg  = max(-A r, -A clip(r, 1 - clip, 1 + clip))
        d   = clamp(ref - logprobs, -20, 20)
        kl  = min(exp(d) - d - 1, 10)                           (k3; 0 without ref_logprobs_T)
        w   = min(exp(old - engine), tis_cap), no gradient      (TIS; 1 when tis_cap is None)
        loss = sum_valid(w pg + kl_beta kl) / num_tokens_global

    ``num_tokens_global`` counts the valid tokens of the whole update (every micro-batch and
    data-parallel rank), so summing the returned losses over them gives the global token mean
    (scale back whatever the schedule or gradient reduction divides by). One update per rollout
    batch means old == logprobs in value (r = 1) while the gradient of r is exact. old, ref,
    engine and advantages are treated as constants. Masked slots may hold anything (-inf, NaN):
    they are zeroed before any arithmetic, contribute 0 and get a 0 gradient; a batch with no
    valid token gives 0.

    Metrics (detached): ``pg_loss``, ``kl``, ``clip_frac``, ``ratio_mean``, ``tis_weight`` are
    shares of global token means like the loss (sum them); ``ratio_max_dev`` = max |r - 1|
    over valid tokens (reduce with max; 0 when none).
    """
    if tis_cap is not None and engine_logprobs_T is None:
        raise ValueError("tis_cap needs engine_logprobs_T (the rollout engine's log-probs)")
    mask = mask_T.bool()

    def valid(x: Tensor) -> Tensor:
        return torch.where(mask, x, 0.0)

    logprobs, old, adv = valid(logprobs_T), valid(old_logprobs_T.detach()), valid(advantages_T.detach())
    ratio = torch.exp(logprobs - old)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)
    pg = torch.maximum(unclipped, clipped)
    weight = torch.ones_like(pg)
    if tis_cap is not None:
        weight = torch.exp(old - valid(engine_logprobs_T.detach())).clamp(max=tis_cap)
    kl = torch.zeros_like(pg)
    if ref_logprobs_T is not None:
        # k3 grows as exp(ref - logprobs): one token the policy has all but ruled out would
        # otherwise dominate (or overflow) the loss. Bounded as verl's low_var_kl bounds it.
        delta = (valid(ref_logprobs_T.detach()) - logprobs).clamp(-KL_LOG_RATIO_BOUND, KL_LOG_RATIO_BOUND)
        kl = (torch.exp(delta) - delta - 1).clamp(max=KL_TOKEN_BOUND)
    count = torch.as_tensor(num_tokens_global, dtype=pg.dtype, device=pg.device).clamp(min=1)
    fmask = mask.to(pg.dtype)
    loss = ((weight * pg + kl_beta * kl) * fmask).sum() / count
    with torch.no_grad():
        metrics = {
            "pg_loss": (weight * pg * fmask).sum() / count,
            "kl": (kl * fmask).sum() / count,
            "clip_frac": ((clipped > unclipped) & mask).sum() / count,
            "ratio_mean": (ratio * fmask).sum() / count,
            "ratio_max_dev": ((ratio - 1).abs() * fmask).max(),
            "tis_weight": (weight * fmask).sum() / count,
        }
    return loss, metrics


def bradley_terry_loss(teacher_scores_P: Tensor, student_scores_PN: Tensor) -> Tensor:
    """Mean over the P x N pairs of ``-log sigmoid(D(teacher_p) - D(rollout_pi))``.

    Each prompt's single teacher score (teacher text forwarded once per prompt) is paired with
    each of its N rollouts.
    """
    return F.softplus(student_scores_PN - teacher_scores_P[:, None]).mean()  # softplus(-d) = -logsigmoid(d)


def ce_gan_loss(teacher_scores_P: Tensor, student_scores_PN: Tensor) -> Tensor:
    """CE ablation: ``mean_p -log sigmoid(D(teacher_p)) + mean_pi -log(1 - sigmoid(D(rollout_pi)))``.

    The SUM of the real and fake terms, as in the GAN objective E_real[log D] + E_fake[log(1 - D)].
    The TRL-era ``losses.cross_entropy_gan_loss`` averaged them (x0.5): Adam mostly cancels a
    constant factor, but it halved the gradient norm that D's clipping (0.2) sees.
    """
    return F.softplus(-teacher_scores_P).mean() + F.softplus(student_scores_PN).mean()


def pair_accuracy(teacher_scores_P: Tensor, student_scores_PN: Tensor) -> Tensor:
    """Share of the P x N pairs where D scores the teacher strictly above the rollout (ties count wrong)."""
    return (teacher_scores_P[:, None] > student_scores_PN).float().mean()


def group_advantages(rewards_PN: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantage ``(r_pi - mean_i r_pi) / (std_i r_pi + eps)`` per prompt, [P, N] -> [P, N].

    std is the unbiased one (divides by N - 1), as verl's GRPO (torch.std); N >= 2. eps 1e-6 as
    verl; a group of equal rewards gets advantage 0.
    """
    if rewards_PN.dim() != 2 or rewards_PN.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, rollouts >= 2], got {tuple(rewards_PN.shape)}")
    mean, std = rewards_PN.mean(dim=1, keepdim=True), rewards_PN.std(dim=1, keepdim=True)
    return (rewards_PN - mean) / (std + eps)


DISC_LOSSES = {"bt": bradley_terry_loss, "ce": ce_gan_loss}


def disc_score_grads(
    teacher_scores_P: Tensor, student_scores_PN: Tensor, loss: Literal["bt", "ce"] = "bt"
) -> tuple[Tensor, Tensor, Tensor]:
    """D's loss and its gradient w.r.t. the scores: (loss, dL/dteacher [P], dL/dstudent [P, N]).

    D's update can then score without a graph and re-run one micro-batch at a time with
    ``scores_mb.backward(grad_mb)``: sum over micro-batches of grad . dscore/dtheta = dL/dtheta,
    in the memory of one micro-batch. Closed forms, with q = sigmoid(s_pi - t_p)::

        bt: dL/dt_p = -sum_i q_pi / (P N),   dL/ds_pi = q_pi / (P N)
        ce: dL/dt_p = -sigmoid(-t_p) / P,    dL/ds_pi = sigmoid(s_pi) / (P N)
    """
    teacher = teacher_scores_P.detach().requires_grad_()
    student = student_scores_PN.detach().requires_grad_()
    with torch.enable_grad():
        value = DISC_LOSSES[loss](teacher, student)
        grad_teacher, grad_student = torch.autograd.grad(value, (teacher, student))
    return value.detach(), grad_teacher, grad_student
