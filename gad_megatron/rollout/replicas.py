"""Rollout replicas: which ranks generate which of a step's prompts, and how the rollouts reach
the trainer's data-parallel ranks.

A replica is a group of ranks that generate together: one vLLM tensor-parallel group (its ranks
sample for themselves, feeding the same all-reduces, so all of them must get the same prompts and
the same sampling parameters, seed included), or one rank hosting a transformers engine (the
first rank of each model-parallel group). The step's prompts are split over the replicas,
independently of the trainer's data-parallel split, so no replica ever holds two ranks' different
prompts and no prompt is generated twice, whatever the two layouts (the paper's: trainer DP=8,
vLLM TP=2). After generation each replica's first rank shares its rollouts with every rank
(one object all-gather), and each rank keeps those of its own data-parallel share.

Sampling is seeded per prompt, by ``(run seed, step, prompt index)``: the rollouts of a step do not
depend on how many replicas share it, so one process, a data- or expert-parallel job, and a run
resumed at another layout sample the same (given the same weights).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from gad_megatron.config import ConfigError
from gad_megatron.rollout.step import Rollout


@dataclass(frozen=True)
class Replicas:
    """The engine replicas of a job: ``groups[i]`` are replica i's ranks, its first the one that shares."""

    groups: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, engine_ranks: Sequence[int], size: int) -> Replicas:
        """Consecutive groups of ``size`` engine ranks (vLLM's layout under the external launcher)."""
        ranks = sorted(engine_ranks)
        if size < 1 or not ranks or len(ranks) % size:
            raise ConfigError(f"rollout replicas of {size} rank(s) do not divide the {len(ranks)} engine rank(s)")
        return cls(tuple(tuple(ranks[i : i + size]) for i in range(0, len(ranks), size)))

    def index_of(self, rank: int) -> int | None:
        """The replica ``rank`` belongs to (None: it hosts no engine)."""
        return next((i for i, group in enumerate(self.groups) if rank in group), None)

    def share(self, n_prompts: int, index: int) -> range:
        """Replica ``index``'s contiguous share of a step's ``n_prompts`` prompts; shares differ
        by one prompt at most, and a replica may get none when prompts are fewer than replicas."""
        base, extra = divmod(n_prompts, len(self.groups))
        start = index * base + min(index, extra)
        return range(start, start + base + (index < extra))


def check_rollout_layout(world_size: int, rollout_tensor_parallel: int, use_vllm: bool) -> None:
    """Refuse, before any model loads, a vLLM replica size that does not tile the ranks."""
    if use_vllm and world_size % rollout_tensor_parallel:
        raise ConfigError(
            f"parallel.rollout_tensor_parallel={rollout_tensor_parallel} does not divide the {world_size} ranks: "
            "each vLLM replica must be a whole group of consecutive ranks"
        )


def generate_for_step(
    replicas: Replicas, n_prompts: int, generate: Callable[[range], list[Rollout]],
    keep: range,
) -> list[Rollout]:  # fmt: skip
    """Run this rank's replica on its share and return the rollouts of prompts ``keep``.

    ``generate(share)`` samples the prompts ``share`` (indices into the step's
    prompts) and returns their rollouts with ``prompt_index`` into ``share``; every rank of a
    replica calls it, and every rank of the job calls this function (a collective). Returned
    rollouts are grouped by prompt in prompt order, ``prompt_index`` into ``keep``.
    """
    rank = torch.distributed.get_rank()
    index = replicas.index_of(rank)
    mine: list[Rollout] | None = None
    digest = None
    if index is not None:
        share = replicas.share(n_prompts, index)
        rollouts = generate(share) if len(share) else []
        digest = _digest(rollouts)
        if rank == replicas.groups[index][0]:
            mine = [replace(r, prompt_index=share[r.prompt_index]) for r in rollouts]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (index, digest, mine))
    _check_replicas_agree(replicas, gathered)
    by_prompt: dict[int, list[Rollout]] = {}
    for _, _, part in gathered:
        for r in part or []:
            by_prompt.setdefault(r.prompt_index, []).append(r)
    missing = [i for i in keep if i not in by_prompt]
    if missing:
        raise RuntimeError(f"no replica generated prompt(s) {missing} of this step")
    return [replace(r, prompt_index=r.prompt_index - keep.start) for i in keep for r in by_prompt[i]]


def _digest(rollouts: Sequence[Rollout]) -> str:
    """A fingerprint of the sampled tokens, to compare the ranks of one replica."""
    return hashlib.blake2b(repr([(r.prompt_index, r.token_ids) for r in rollouts]).encode(), digest_size=8).hexdigest()


def _check_replicas_agree(replicas: Replicas, gathered: Sequence[tuple[int | None, str | None, Any]]) -> None:
    """Every rank of a replica must have sampled the same tokens: ranks that diverge feed
    different tokens into the replica's all-reduces (garbage, or a hang once their lengths differ)."""
    for index, group in enumerate(replicas.groups):
        digests = {gathered[rank][1] for rank in group}
        if len(digests) > 1:
            raise RuntimeError(f"rollout replica {index} (ranks {list(group)}): its ranks sampled different tokens; "
                               "they must get the same prompts and sampling parameters, seed included")  # fmt: skip
