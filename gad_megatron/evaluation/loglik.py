"""White-box diagnostics: mean per-token log-likelihood of responses under a local model.

Two directions, when a local copy of the teacher exists:

- candidate responses under the teacher (with the teacher's hidden context): does the student
  say what the teacher would say? (mode-seeking view; higher is better)
- teacher responses under the candidate (student prompt only): does the student cover what
  the teacher says? (mode-covering view; higher is better)

A response is scored as the model would have produced it: prompt rendered with the chat template
and generation prompt, then the response text encoded on its own, then the end-of-turn token if the
response finished (a truncated response has none). Values are per token of each model's own
tokenizer, so compare them across checkpoints of one model, not across tokenizers.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from gad_megatron.rollout.hf_engine import cache_keyword

__all__ = ["encode_pair", "shared_prefix_length", "response_logprobs", "token_logprobs", "mean_loglik", "teacher_loglik", "candidate_loglik"]

Messages = list[dict[str, str]]


def encode_pair(tokenizer: Any, prompt: Messages, response: str, finished: bool = True,
                context: Sequence[dict[str, str]] | None = None) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` with ``context`` messages placed before the prompt."""
    messages = [dict(m) for m in (context or [])] + [dict(m) for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n".join(m["content"] for m in messages) + "\n"
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response.strip(), add_special_tokens=False)["input_ids"]  # same strip as teacher text
    if finished and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids


def shared_prefix_length(seqs: Sequence[Sequence[int]], limit: int) -> int:
    """Length of the token prefix every sequence starts with, at most ``limit``."""
    first, n = seqs[0], max(0, min(limit, *(len(s) for s in seqs)))
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def response_logprobs(model: Any, tokenizer: Any, prompts: Sequence[Messages], responses: Sequence[str],
                      finished: Sequence[bool] | None = None, context: Sequence[dict[str, str]] | None = None,
                      batch_size: int = 8, min_shared_prefix: int = 16) -> list[tuple[float, int]]:
    """Per example ``(sum of response-token log-probs, number of response tokens)``."""
    finished = finished if finished is not None else [True] * len(prompts)
    pairs = [encode_pair(tokenizer, p, r, f, context) for p, r, f in zip(prompts, responses, finished)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return token_logprobs(model, pairs, pad, batch_size, min_shared_prefix)


@torch.no_grad()
def token_logprobs(model: Any, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8,
                   min_shared_prefix: int = 16, temperature: float = 1.0) -> list[tuple[float, int]]:
    """Per ``(prompt_ids, response_ids)`` pair: ``(sum of response-token log-probs, number of response tokens)``
    under ``softmax(logits / temperature)``, the distribution a sampler at that temperature draws from.

    When every prompt starts with the same ``>= min_shared_prefix`` tokens (a teacher's hidden
    context, a chat template's default system prompt), that prefix is forwarded once and its KV
    cache reused by every batch: the same values to float rounding, a fraction of the compute.
    """
    if not pairs:
        return []
    device = next(model.parameters()).device
    # The last prompt token stays outside the prefix: its logits predict the first response token.
    shared = shared_prefix_length([p for p, _ in pairs], min(len(p) for p, _ in pairs) - 1)
    shared = shared if shared >= min_shared_prefix else 0
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = []
    try:
        prefix_cache = _prefix_cache(model, pairs[0][0][:shared], device) if shared else None
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            seqs = [(p + r)[shared:] for p, r in chunk]
            width = max(len(s) for s in seqs)
            # Right padding: positions (and so rotary embeddings) match an unpadded forward pass.
            ids_BW = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask_BW = torch.zeros((len(seqs), shared + width), dtype=torch.long)
            mask_BW[:, :shared] = 1
            for i, s in enumerate(seqs):
                ids_BW[i, : len(s)] = torch.tensor(s)
                mask_BW[i, shared : shared + len(s)] = 1
            kwargs: dict[str, Any] = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(seqs))
                positions_BW = torch.arange(shared, shared + width).expand(len(seqs), width)
                kwargs = {cache_keyword(model): cache, "use_cache": True, "position_ids": positions_BW.to(device)}
            # Logits only from the first position that predicts a response token: [B, K, V].
            first = min(len(p) for p, _ in chunk) - 1 - shared
            logits_BKV = model(input_ids=ids_BW.to(device), attention_mask=mask_BW.to(device),
                               logits_to_keep=width - first, **kwargs).logits[:, :-1].float() / temperature  # fmt: skip
            targets_BK = ids_BW[:, first + 1 :].to(device)
            logp_BK = logits_BKV.gather(-1, targets_BK.unsqueeze(-1)).squeeze(-1) - logits_BKV.logsumexp(-1)
            for i, (p, r) in enumerate(chunk):
                # Token t is predicted at position t-1 (positions counted after the shared prefix).
                start = len(p) - 1 - shared - first
                out.append((float(logp_BK[i, start : start + len(r)].sum()), len(r)))
    finally:
        model.train(was_training)
    return out


def _prefix_cache(model: Any, prefix_ids: list[int], device: torch.device) -> Any:
    """The KV cache of one forward over ``prefix_ids`` (batch 1)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True, **{cache_keyword(model): cache})
    return cache


def mean_loglik(model: Any, tokenizer: Any, prompts: Sequence[Messages], responses: Sequence[str],
                finished: Sequence[bool] | None = None, context: Sequence[dict[str, str]] | None = None,
                batch_size: int = 8) -> dict[str, float | int | None]:
    """``mean_token_loglik`` (all tokens pooled), ``mean_response_loglik`` (per-response means averaged), counts,
    and ``per_response``: each response's mean token log-prob, aligned with ``responses`` (None: no tokens)."""
    every = response_logprobs(model, tokenizer, prompts, responses, finished, context, batch_size)
    scores = [s for s in every if s[1] > 0]
    tokens = sum(n for _, n in scores)
    return {
        "per_response": [s / n if n > 0 else None for s, n in every],
        "mean_token_loglik": sum(s for s, _ in scores) / tokens if tokens else None,
        "mean_response_loglik": sum(s / n for s, n in scores) / len(scores) if scores else None,
        "tokens": tokens,
        "count": len(scores),
    }


def teacher_loglik(teacher: Any, teacher_tokenizer: Any, prompts: Sequence[Messages], candidate_responses: Sequence[str],
                   teacher_context: Sequence[dict[str, str]] | None = None, finished: Sequence[bool] | None = None,
                   batch_size: int = 8) -> dict[str, float | int | None]:
    """Candidate responses scored by the local teacher, with the teacher-side context before each prompt."""
    return mean_loglik(teacher, teacher_tokenizer, prompts, candidate_responses, finished, teacher_context, batch_size)


def candidate_loglik(candidate: Any, tokenizer: Any, prompts: Sequence[Messages], teacher_responses: Sequence[str],
                     finished: Sequence[bool] | None = None, batch_size: int = 8) -> dict[str, float | int | None]:
    """Teacher responses scored by the candidate, which sees the student prompt only."""
    return mean_loglik(candidate, tokenizer, prompts, teacher_responses, finished, None, batch_size)
