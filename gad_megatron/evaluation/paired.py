"""Paired comparisons of two models on the same prompts: a bootstrap confidence interval of the
mean per-prompt difference, and McNemar's exact test for a yes/no outcome (the style marker).

Prompts are the unit of resampling: with several seeds, a prompt's difference is first averaged
over the seeds that scored it (``per_prompt_differences``), so that the interval covers prompt
sampling and the seed noise enters through each prompt's mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["per_prompt_differences", "paired_bootstrap", "mcnemar"]


def per_prompt_differences(
    a_by_seed: Sequence[Mapping[str, float | None]], b_by_seed: Sequence[Mapping[str, float | None]]
) -> dict[str, float]:
    """Prompt id -> mean over seeds of ``b - a``, where seed s scored the prompt for both models
    (``a_by_seed[s]``, ``b_by_seed[s]``: id -> value, None for unscored)."""
    if len(a_by_seed) != len(b_by_seed):
        raise ValueError(f"{len(a_by_seed)} seeds for a, {len(b_by_seed)} for b")
    sums: dict[str, list[float]] = {}
    for a, b in zip(a_by_seed, b_by_seed):
        for pid, va in a.items():
            vb = b.get(pid)
            if va is not None and vb is not None:
                sums.setdefault(pid, []).append(vb - va)
    return {pid: sum(d) / len(d) for pid, d in sums.items()}


def paired_bootstrap(diffs: Sequence[float], resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Mean of ``diffs`` (one per prompt) with its percentile bootstrap interval at ``level``:
    ``resamples`` draws of len(diffs) prompts with replacement."""
    n = len(diffs)
    if n < 2:
        return {"mean": diffs[0] if n else None, "ci_low": None, "ci_high": None, "n": n, "excludes_zero": False}
    d_N = torch.tensor(diffs, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means_R = d_N[torch.randint(n, (resamples, n), generator=gen)].mean(-1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means_R, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"mean": d_N.mean().item(), "ci_low": low, "ci_high": high, "n": n, "excludes_zero": low > 0 or high < 0}


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test on paired outcomes: ``b_only`` prompts where only b has it, ``a_only``
    where only a has it; two-sided p from Binomial(a_only + b_only, 1/2) on the discordant pairs."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} outcomes for a, {len(b)} for b")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    n = a_only + b_only
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
    return {"a_only": a_only, "b_only": b_only, "n": len(a), "p_value": min(1.0, 2 * tail)}
