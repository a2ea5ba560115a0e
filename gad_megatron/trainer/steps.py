"""One optimizer step of each stage, on megatron-core.

GAD (arXiv 2511.10643): the generator G is trained by policy gradient on the discriminator's
score; D is trained every step to prefer the teacher's response to each of G's rollouts:

    D:  min  E_{x, i} -log sigmoid(D(x, y_teacher) - D(x, y_i))          (Bradley-Terry)
    G:  max  E_{x, y ~ G} [A(x, y)] - beta KL(G || G_warmup),  A = group-normalised D(x, y)

:func:`gad_step` reads top to bottom: generate -> score -> update D -> update G -> sync. The
rewards are D's scores *before* this step's D update; each teacher response is forwarded once
per prompt; D's scoring forward is its update's forward when a prompt's teacher answer and
rollouts fit one micro-batch (else the update re-runs one micro-batch at a time). Departures from the
paper's code, each deliberate: the policy loss reuses its own forward as the "old" log-probs
(one update per rollout batch makes them equal), and rollouts come from a colocated engine
synchronised after every G update (vLLM on GPUs, transformers on CPUs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gad_megatron.loss import DISC_LOSSES, group_advantages, pair_accuracy
from gad_megatron.models.ratio_discriminator import RatioScore
from gad_megatron.rollout.engine import InferenceEngine
from gad_megatron.rollout.replicas import Replicas, generate_for_step
from gad_megatron.rollout.reshard import sync_weights
from gad_megatron.rollout.step import Rollout, RolloutSettings, rollout_metrics, rollout_step
from gad_megatron.text_encoding import TextEncoder
from gad_megatron.trainer import ops
from gad_megatron.trainer.actor import Actor, sum_metrics
from gad_megatron.trainer.batching import (ScoreBatch, TokenBatch, build_batch, build_score_batch,
                                          group_micro_batches, micro_batches)
from gad_megatron.trainer.metrics import PhaseTimer
from gad_megatron.trainer.setup import data_parallel_share


@dataclass
class StepContext:
    """What every step needs, built once per stage by :mod:`gad_megatron.trainer.run`."""

    g: Actor
    d_lm: Any | None  # D (a MegatronLM) that scores; None in seqkd
    d: Actor | None  # D's optimizer side; None in seqkd and with a frozen D
    ref: Any | None  # the KL reference (frozen warmup G, a MegatronLM) in gad
    engine: InferenceEngine | None  # vLLM: on every rank; transformers: on each model-parallel group's first
    replicas: Replicas  # the engine ranks that generate together
    encoder: TextEncoder  # one text path for teacher text, rollouts, prompts
    rollout: RolloutSettings
    token_budget: int  # tokens per micro-batch (parallel.micro_batch_tokens)
    disc_loss: str
    clip: float
    kl_beta: float
    tis_cap: float | None
    seed: int
    width_multiple: int = 1  # micro-batch widths rounded up to this (FP8 GEMM shapes)
    dp_rank: int = 0
    dp_size: int = 1
    disc_only_steps: int = 0
    disc_updates: int = 1  # D updates on each step's rollout batch (train.disc_updates_per_step)
    d_ratio: RatioScore | None = None  # the likelihood-ratio D's reference and beta; None: the scalar-head D

    @property
    def pad_id(self) -> int:
        return self.encoder.tokenizer.pad_token_id

    def dp_share(self, n_prompts: int) -> range:
        """This data-parallel rank's contiguous share of a step's prompts (they split evenly)."""
        return data_parallel_share(n_prompts, self.dp_rank, self.dp_size)


Prompts = Sequence[dict[str, Any]]  # records: {"id", "prompt", "teacher_response"}


def _dp_group() -> Any:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def generate(ctx: StepContext, prompts: Prompts, step: int, reload_follows: bool) -> list[Rollout]:
    """``n`` rollouts of each prompt of this rank's data-parallel share; ``prompts`` are the whole
    step's, spread over the engine replicas. Every engine then sleeps until the trainer is done
    with the step, dropping its weights when ``reload_follows`` (a weight sync comes before the
    next generation)."""

    def run(share: range) -> list[Rollout]:
        assert ctx.engine is not None
        return rollout_step(ctx.engine, [prompts[i]["prompt"] for i in share], ctx.encoder, ctx.encoder, ctx.rollout,
                            ctx.seed, step, share.start)  # fmt: skip

    rollouts = generate_for_step(ctx.replicas, len(prompts), run, ctx.dp_share(len(prompts)))
    if ctx.engine is not None:
        ctx.engine.sleep(keep_weights=not reload_follows)
    return rollouts


def discriminate(ctx: StepContext, prompts: Prompts, rollouts: Sequence[Rollout],
                 timer: PhaseTimer) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """D's scores of each teacher response (forwarded once per prompt) and each rollout, before
    this step's D update, and that update unless D is frozen. -> (teacher [P], rollouts [P, N], metrics)

    One D pass when each prompt's teacher answer and rollouts fit one micro-batch together:
    its forward gives the scores, its backward the update (phase ``d_update``). Otherwise two:
    scores without autograd (``scoring``), then the update re-run one micro-batch at a time.
    With ``ctx.disc_updates`` = k > 1, D learns k times on this batch, each pass scoring with
    the weights the previous one left (GAN practice: k critic steps); the scores returned, and
    ``d_loss``, are the first pass's, ``d_acc_after`` the pair accuracy of the last pass's.
    """
    teacher = [ctx.encoder.encode(p["prompt"], p["teacher_response"]) for p in prompts]
    prompt_lengths = [len(ctx.encoder.prompt_ids(p["prompt"])) for p in prompts]
    return discriminate_ids(ctx, teacher, [list(r.d_input_ids) for r in rollouts], prompt_lengths, timer)


def discriminate_ids(ctx: StepContext, teacher: Sequence[Sequence[int]], rollouts: Sequence[Sequence[int]],
                     prompt_lengths: Sequence[int], timer: PhaseTimer,
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:  # fmt: skip
    """:func:`discriminate` on D's token ids: ``teacher`` [P] one sequence per prompt, ``rollouts``
    [P x N] prompt-major, N = ``ctx.rollout.n``; each sequence starts with its prompt's
    ``prompt_lengths`` [P] tokens (what a likelihood-ratio D does not score)."""
    assert ctx.d_lm is not None
    n_p, n = len(teacher), ctx.rollout.n
    batch, forward = _disc_inputs(ctx, [*teacher, *rollouts], [*prompt_lengths, *(x for x in prompt_lengths
                                                                                  for _ in range(n))], timer)  # fmt: skip
    groups_GK = torch.cat([torch.arange(n_p)[:, None], n_p + torch.arange(n_p * n).view(n_p, n)], dim=1)
    grouped = group_micro_batches(batch, groups_GK, ctx.token_budget, ctx.width_multiple) if ctx.d is not None else None
    micro = micro_batches(batch, ctx.token_budget, ctx.width_multiple) if grouped is None else None
    scores, grad_norm = _disc_pass(ctx, grouped, micro, forward, n_p, timer)
    teacher_P, student_PN = scores[:n_p], scores[n_p:].view(n_p, n)
    if ctx.d is None:
        return teacher_P, student_PN, {}
    loss = float(DISC_LOSSES[ctx.disc_loss](teacher_P, student_PN))
    metrics = {"d_loss": dp_mean(loss), "grad_norm_d": grad_norm}
    if ctx.disc_updates > 1:
        for _ in range(ctx.disc_updates - 1):
            last = _disc_pass(ctx, grouped, micro, forward, n_p, timer)[0]
        metrics["d_acc_after"] = dp_mean(float(pair_accuracy(last[:n_p], last[n_p:].view(n_p, n))))
    return teacher_P, student_PN, metrics


def _prompts_and_responses(rows: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                           ) -> tuple[list[Sequence[int]], list[Sequence[int]]]:  # fmt: skip
    """Each row split after its prompt's ``prompt_lengths`` tokens."""
    return [r[:k] for r, k in zip(rows, prompt_lengths)], [r[k:] for r, k in zip(rows, prompt_lengths)]


def _disc_inputs(ctx: StepContext, rows: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                 timer: PhaseTimer) -> tuple[ScoreBatch | TokenBatch, ops.DForward]:  # fmt: skip
    """D's batch of ``rows`` (teacher answers first) and its forward. The likelihood-ratio D's
    needs the reference's log-likelihood of each response (phase ``d_reference``): computed
    here, the teacher answers' once per run (rows ``:P``, remembered)."""
    if ctx.d_ratio is None:
        return build_score_batch(rows, ctx.pad_id, ctx.width_multiple), ops.head_score_forward
    ratio, n_p = ctx.d_ratio, len(rows) // (ctx.rollout.n + 1)
    batch = build_batch(*_prompts_and_responses(rows, prompt_lengths), ctx.pad_id, width_multiple=ctx.width_multiple)
    reference = torch.tensor([ratio.known.get(ratio.key(r), float("nan")) for r in rows])
    missing = [i for i, unknown in enumerate(reference.isnan().tolist()) if unknown]
    if missing:
        with timer("d_reference"):
            sub = build_batch(*_prompts_and_responses([rows[i] for i in missing], [prompt_lengths[i] for i in missing]),
                              ctx.pad_id, width_multiple=ctx.width_multiple)  # fmt: skip
            reference[missing] = ops.response_logprob_sums(
                ratio.reference, micro_batches(sub, ctx.token_budget, ctx.width_multiple), len(missing))
        teacher_rows = [i for i in missing if i < n_p]
        ratio.remember([rows[i] for i in teacher_rows], reference[teacher_rows])
    return batch, ops.ratio_score_forward(ctx.d_lm, ratio.beta, reference, ratio.reduce)


def _disc_pass(ctx: StepContext, grouped: Sequence[ScoreBatch | TokenBatch] | None,
               micro: Sequence[ScoreBatch | TokenBatch] | None, forward: ops.DForward, n_prompts: int,
               timer: PhaseTimer) -> tuple[torch.Tensor, float | None]:  # fmt: skip
    """D's current scores of every row (teacher answers first, then rollouts prompt-major) and
    one D update on them unless D is frozen: in one pass over ``grouped`` (whole groups per
    micro-batch), else scoring then updating over ``micro``. -> (scores [rows], grad norm or None)"""
    n, total = ctx.rollout.n, n_prompts * (ctx.rollout.n + 1)
    if grouped is not None:
        assert ctx.d is not None  # a frozen D is never grouped
        with timer("d_update"):
            return ops.disc_score_and_update(ctx.d, grouped, total, n + 1, ctx.disc_loss, forward)
    assert micro is not None
    with timer("scoring"):
        scores = ops.score(ctx.d_lm, micro, total, forward)
    if ctx.d is None:
        return scores, None
    with timer("d_update"):
        grad_norm = ops.disc_update(ctx.d, micro, scores[:n_prompts], scores[n_prompts:].view(n_prompts, n),
                                    ctx.disc_loss, forward)  # fmt: skip
    return scores, grad_norm


def update_generator_pg(ctx: StepContext, prompts: Prompts, rollouts: Sequence[Rollout],
                        advantages_PN: torch.Tensor) -> dict[str, float]:  # fmt: skip
    """Clipped policy gradient on the sampled tokens, KL to the reference, TIS when configured."""
    per_prompt = [ctx.encoder.prompt_ids(p["prompt"]) for p in prompts]  # once per prompt, not per rollout
    prompt_ids = [per_prompt[r.prompt_index] for r in rollouts]
    batch = build_batch(prompt_ids, [list(r.token_ids) for r in rollouts], ctx.pad_id,
                        advantages=advantages_PN.reshape(-1).tolist(), engine_logprobs=[list(r.logprobs) for r in rollouts],
                        width_multiple=ctx.width_multiple)  # fmt: skip
    micro = micro_batches(batch, ctx.token_budget, ctx.width_multiple)
    refs = ops.policy_logprobs(ctx.ref, micro, ctx.rollout.temperature) if ctx.ref is not None and ctx.kl_beta else None
    per_micro, grad_norm = ops.policy_gradient_update(ctx.g, micro, refs, ctx.rollout.temperature, ctx.clip,
                                                      ctx.kl_beta, ctx.tis_cap)  # fmt: skip
    totals = _last_stage_sums(per_micro)
    tokens = max(totals.pop("policy_tokens", 0.0), 1.0)
    out = {k: v / tokens for k, v in totals.items() if not k.endswith("_max")}
    out |= {k: v for k, v in totals.items() if k.endswith("_max")}  # ratio_dev_max, engine_logprob_diff_max
    out["policy_loss"] = out.pop("pg_loss", 0.0) + ctx.kl_beta * out.get("kl", 0.0)
    out["grad_norm_g"] = grad_norm
    out["tokens/g_update"] = _dp_sum(sum(len(p) + len(r.token_ids) for p, r in zip(prompt_ids, rollouts)))
    out["seqs/g_update"] = _dp_sum(len(rollouts))
    return out


def update_generator_sft(ctx: StepContext, prompts: Prompts) -> dict[str, float]:
    """Next-token NLL on the teacher's response (end-of-turn included), token mean."""
    prompt_ids = [ctx.encoder.prompt_ids(p["prompt"]) for p in prompts]
    eot = ctx.encoder.end_of_turn_ids()
    responses = [ctx.encoder.response_ids(p["teacher_response"], eot) for p in prompts]
    batch = build_batch(prompt_ids, responses, ctx.pad_id, width_multiple=ctx.width_multiple)
    micro = micro_batches(batch, ctx.token_budget, ctx.width_multiple)
    per_micro, grad_norm = ops.sft_update(ctx.g, micro)
    totals = _last_stage_sums(per_micro)
    return {"sft_loss": totals.get("sft_loss", 0.0) / max(totals.get("sft_tokens", 0.0), 1.0), "grad_norm_g": grad_norm,
            "tokens/g_update": _dp_sum(sum(len(p) + len(r) for p, r in zip(prompt_ids, responses))),
            "seqs/g_update": _dp_sum(len(prompts))}


def sync(ctx: StepContext) -> dict[str, float]:
    stats = sync_weights(ctx.g.lm, None, ctx.engine)
    return {"sync_gb_per_s": stats.gb_per_s}


def gad_step(ctx: StepContext, step_prompts: Prompts, step: int) -> dict[str, float]:
    """generate -> score -> update D -> update G -> sync weights."""
    timer = PhaseTimer()
    with timer("rollout"):
        rollouts = generate(ctx, step_prompts, step, reload_follows=True)
    prompts = [step_prompts[i] for i in ctx.dp_share(len(step_prompts))]
    teacher_P, rewards_PN, metrics = discriminate(ctx, prompts, rollouts, timer)  # D's pre-update scores
    advantages_PN = group_advantages(rewards_PN)
    with timer("g_update"):
        metrics |= update_generator_pg(ctx, prompts, rollouts, advantages_PN)
    with timer("sync"):
        metrics |= sync(ctx)
    return (metrics | timer.pop() | _pair_metrics(teacher_P, rewards_PN, advantages_PN)
            | _rollout_metrics(ctx, prompts, rollouts))


def warmup_step(ctx: StepContext, step_prompts: Prompts, step: int) -> dict[str, float]:
    """D learns on fresh rollouts; G learns the teacher text by SFT (D alone for the first
    ``disc_only_steps`` steps)."""
    timer = PhaseTimer()
    trains_g = step > ctx.disc_only_steps
    with timer("rollout"):
        rollouts = generate(ctx, step_prompts, step, reload_follows=trains_g)
    prompts = [step_prompts[i] for i in ctx.dp_share(len(step_prompts))]
    teacher_P, student_PN, metrics = discriminate(ctx, prompts, rollouts, timer)
    if trains_g:
        with timer("g_update"):
            metrics |= update_generator_sft(ctx, prompts)
        with timer("sync"):
            metrics |= sync(ctx)
    advantages_PN = group_advantages(student_PN)
    return (metrics | timer.pop() | _pair_metrics(teacher_P, student_PN, advantages_PN)
            | _rollout_metrics(ctx, prompts, rollouts))


def seqkd_step(ctx: StepContext, step_prompts: Prompts, step: int) -> dict[str, float]:
    """The SeqKD baseline: SFT on the teacher's text."""
    timer = PhaseTimer()
    with timer("g_update"):
        metrics = update_generator_sft(ctx, [step_prompts[i] for i in ctx.dp_share(len(step_prompts))])
    return metrics | timer.pop()


STEPS = {"gad": gad_step, "warmup": warmup_step, "seqkd": seqkd_step}


def _dp_sum(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor, group=_dp_group())
    return float(tensor.item())


def _dp_max(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=_dp_group())
    return float(tensor.item())


def dp_mean(value: float) -> float:
    return _dp_sum(value) / torch.distributed.get_world_size(_dp_group())


def _last_stage_sums(per_micro: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Metric sums over micro-batches and data-parallel ranks, from the last pipeline stage to
    every rank of the pipeline (the logger is on rank 0, the first stage)."""
    from megatron.core import parallel_state

    box: list[Any] = [sum_metrics(per_micro, _dp_group()) if parallel_state.is_pipeline_last_stage() else None]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                                group=parallel_state.get_pipeline_model_parallel_group())  # fmt: skip
    return box[0]


def _pair_metrics(teacher_P: torch.Tensor, student_PN: torch.Tensor, advantages_PN: torch.Tensor) -> dict[str, float]:
    return {
        "d_acc": dp_mean(float(pair_accuracy(teacher_P, student_PN))),
        "teacher_score": dp_mean(float(teacher_P.mean())),
        "student_score": dp_mean(float(student_PN.mean())),
        "reward_mean": dp_mean(float(student_PN.mean())),
        "reward_std": dp_mean(float(student_PN.std(dim=1).mean())),
        "adv_std": dp_mean(float(advantages_PN.std())),
    }


def _teacher_length(encoder: TextEncoder, response: str) -> int:
    """The teacher response's length as a rollout's is counted: its tokens and one stop token,
    at most the response budget."""
    text_tokens = len(encoder.tokenizer(response.strip(), add_special_tokens=False)["input_ids"])
    return min(text_tokens + 1, encoder.max_response_length)


def _rollout_metrics(ctx: StepContext, prompts: Prompts, rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Rollout lengths, truncated share and repetition; ``len_vs_teacher``: their mean length over the
    teacher's on the same prompts."""
    m = rollout_metrics(rollouts)
    teacher = [_teacher_length(ctx.encoder, p["teacher_response"]) for p in prompts]
    len_mean, teacher_len_mean = dp_mean(m["rollout/length_mean"]), dp_mean(sum(teacher) / max(len(teacher), 1))
    return {"len_mean": len_mean, "len_max": _dp_max(m["rollout/length_max"]),
            "truncated_frac": dp_mean(m["rollout/truncated"]), "repetition": dp_mean(m["rollout/repetition"]),
            "teacher_len_mean": teacher_len_mean,
            "len_vs_teacher": len_mean / max(teacher_len_mean, 1.0)}  # fmt: skip
