"""Sequences -> padded token batches -> micro-batches sized by a token budget.

A sequence is ``prompt + response`` token ids. Position t of a row predicts token t + 1, so
every per-token tensor is aligned to targets: ``loss_mask_BT[b, t]`` is 1 when token t + 1 is
a response token (the end-of-turn included, the prompt never). Rows are right-padded with the
pad id and a 0 mask; megatron-core's causal attention then needs no padding mask.

Micro-batches are dynamically sized: rows sorted longest first, each micro-batch as wide as
its longest row and holding as many rows as fit the token budget. Padding is then only the
length spread inside a micro-batch (a GAD batch mixes prompts of 20 to 250 tokens and teacher
answers longer than any rollout: one width for all rows padded 40-75% of the tokens).
Shapes differ between micro-batches, so pipeline stages exchange them first
(``variable_seq_lengths``, set by :func:`gad_megatron.models.families.transformer_config_from_hf`).
``width_multiple`` rounds every width up (right padding, masked like any other): Transformer
Engine's FP8 GEMMs need the token count and the hidden sizes to be multiples of 16 (MXFP8: 32),
and a micro-batch as wide as its longest row would crash them at its first odd length.
D's micro-batches can instead hold whole groups (a teacher answer and its N rollouts): D's
pair loss then needs no row outside the micro-batch (:func:`group_micro_batches`).

The policy's output layer runs only on each row's response window (``response_window_BR``):
prompts are most of a GAD batch's tokens, and their logits would be computed to be masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch


@dataclass
class TokenBatch:
    """Right-padded rows and target-aligned per-token tensors (all [B, T])."""

    input_ids_BT: torch.Tensor  # long
    target_ids_BT: torch.Tensor  # long: input shifted left by one, pad at the end
    loss_mask_BT: torch.Tensor  # float: 1 where the target is a response token
    lengths_B: torch.Tensor  # long: real tokens of each row (prompt + response)
    response_start_B: torch.Tensor  # long: the position that predicts the row's first response token
    advantages_BT: torch.Tensor | None = None  # float: the row's advantage on its response tokens
    engine_logprobs_BT: torch.Tensor | None = None  # float: the rollout engine's log-prob of each target
    row_ids_B: torch.Tensor | None = None  # long: each row's index in the caller's list

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask_BT.sum().item())

    def response_window_BR(self) -> torch.Tensor:
        """Positions ``start_b .. start_b + R - 1`` of each row, R the longest response here.
        -> long [B, R]

        Positions past the last column are clamped to it; every target position outside a
        row's response, the last column included, has loss mask 0.
        """
        responses_B = self.lengths_B - self.response_start_B - 1
        span_R = torch.arange(max(int(responses_B.max()), 1))
        return (self.response_start_B[:, None] + span_R).clamp(max=self.input_ids_BT.shape[1] - 1)

    def in_window(self, window_BR: torch.Tensor) -> TokenBatch:
        """The per-token tensors at ``window_BR`` (from :meth:`response_window_BR`), [B, R] each."""
        return replace(self, **{f.name: value.gather(1, window_BR) for f in fields(self)
                                if f.name.endswith("_BT") and (value := getattr(self, f.name)) is not None})


@dataclass
class ScoreBatch:
    """Right-padded sequences for D and each row's last real position."""

    input_ids_BT: torch.Tensor  # long
    last_B: torch.Tensor  # long: index of the last real token
    row_ids_B: torch.Tensor  # long: each row's index in the caller's list

    @property
    def lengths_B(self) -> torch.Tensor:
        return self.last_B + 1


def round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def build_score_batch(sequences: Sequence[Sequence[int]], pad_id: int, width_multiple: int = 1) -> ScoreBatch:
    """Right-padded rows, numbered in the order given, as wide as the longest rounded up to ``width_multiple``."""
    lengths = torch.tensor([len(s) for s in sequences])
    if not len(sequences) or bool((lengths == 0).any()):
        raise ValueError("need at least one sequence and no empty one")
    ids = torch.full((len(sequences), round_up(int(lengths.max()), width_multiple)), pad_id, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ScoreBatch(ids, lengths - 1, torch.arange(len(sequences)))


Batch = TypeVar("Batch", TokenBatch, ScoreBatch)


def build_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    advantages: Sequence[float] | None = None,
    engine_logprobs: Sequence[Sequence[float]] | None = None,
    width_multiple: int = 1,
) -> TokenBatch:
    """Rows ``prompt_i + response_i``, right-padded to the longest (rounded up to ``width_multiple``).
    ``engine_logprobs[i][j]`` is the engine's log-prob of ``responses[i][j]``; ``advantages[i]``
    applies to all of row i's response tokens."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many prompts as responses (> 0), got {len(prompts)} and {len(responses)}")
    lengths = torch.tensor([len(p) + len(r) for p, r in zip(prompts, responses)])
    width, rows = round_up(int(lengths.max()), width_multiple), len(prompts)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    target_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, width)
    adv = torch.zeros(rows, width) if advantages is not None else None
    engine = torch.zeros(rows, width) if engine_logprobs is not None else None
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([*prompt, *response], dtype=torch.long)
        n, start = len(seq), len(prompt) - 1  # position start predicts the first response token
        input_ids[i, :n] = seq
        target_ids[i, : n - 1] = seq[1:]
        span = slice(start, start + len(response))
        mask[i, span] = 1.0
        if adv is not None:
            adv[i, span] = float(advantages[i])  # type: ignore[index]
        if engine is not None:
            engine[i, span] = torch.tensor(engine_logprobs[i], dtype=torch.float32)  # type: ignore[index]
    starts = torch.tensor([len(p) - 1 for p in prompts])
    return TokenBatch(input_ids, target_ids, mask, lengths, starts, adv, engine, torch.arange(rows))


def micro_batches(batch: Batch, token_budget: int, width_multiple: int = 1) -> list[Batch]:
    """Split ``batch`` into micro-batches of at most ``token_budget`` tokens (one row at least).

    Rows go longest first; a micro-batch is cut to the width of its first (longest) row, rounded
    up to ``width_multiple`` (``batch`` must be built with the same), and takes
    ``max(1, token_budget // width)`` rows. ``row_ids_B`` keeps each row's place in ``batch``.
    """
    return _pack(batch, torch.arange(len(batch.lengths_B))[:, None], token_budget, width_multiple)


def group_micro_batches(batch: ScoreBatch, groups_GK: torch.Tensor, token_budget: int,
                        width_multiple: int = 1) -> list[ScoreBatch] | None:  # fmt: skip
    """Micro-batches of whole groups: group g is rows ``groups_GK[g]``, kept together and in that
    order, so a micro-batch's rows reshape to [groups, K]. Groups go widest first, as rows do
    in :func:`micro_batches`. None when one group alone exceeds ``token_budget``.
    """
    widest = round_up(int(batch.lengths_B[groups_GK].max()), width_multiple)
    if widest * groups_GK.shape[1] > token_budget:
        return None
    return _pack(batch, groups_GK, token_budget, width_multiple)


def _pack(batch: Batch, groups_GK: torch.Tensor, token_budget: int, width_multiple: int) -> list[Batch]:
    """Groups of K rows, widest first, as many per micro-batch as fit ``token_budget`` (one at least)."""
    widths_G = batch.lengths_B[groups_GK].amax(dim=1)
    order = torch.argsort(widths_G, descending=True, stable=True)
    if round_up(int(widths_G.max()), width_multiple) > batch.input_ids_BT.shape[1]:
        raise ValueError(f"build the batch with width_multiple={width_multiple} too")
    out: list[Batch] = []
    start = 0
    while start < len(order):
        width = round_up(int(widths_G[order[start]]), width_multiple)
        take = order[start : start + max(1, token_budget // (width * groups_GK.shape[1]))]
        out.append(_take_rows(batch, groups_GK[take].reshape(-1), width))
        start += len(take)
    return out


def _take_rows(batch: Batch, index: torch.Tensor, width: int) -> Batch:
    """Rows ``index`` of ``batch``, per-token tensors cut to ``width`` columns."""
    return replace(batch, **{
        f.name: value[index][:, :width] if f.name.endswith("_BT") else value[index]
        for f in fields(batch) if (value := getattr(batch, f.name)) is not None
    })  # fmt: skip
