"""Paired statistics for the study: per-prompt differences over seeds, the bootstrap interval,
McNemar's exact test, checked against values worked out by hand and by simulation."""

from __future__ import annotations

import math
import random

import pytest

from gad_megatron.evaluation.paired import mcnemar, paired_bootstrap, per_prompt_differences


def test_differences_average_over_the_seeds_that_scored_both() -> None:
    a = [{"p1": 1.0, "p2": 0.0, "p3": None}, {"p1": 3.0, "p2": 1.0}]
    b = [{"p1": 2.0, "p2": 1.0, "p3": 5.0}, {"p1": 3.0}]
    assert per_prompt_differences(a, b) == {"p1": 0.5, "p2": 1.0}
    with pytest.raises(ValueError, match="2 seeds for a, 1 for b"):
        per_prompt_differences(a, b[:1])


def test_bootstrap_interval_matches_the_normal_approximation() -> None:
    """400 differences of mean 0.3, sd 1: the 95% interval is mean -+ 1.96 sd/sqrt(n) to ~5%."""
    rng = random.Random(0)
    diffs = [rng.gauss(0.3, 1.0) for _ in range(400)]
    res = paired_bootstrap(diffs, resamples=20_000)
    mean = sum(diffs) / 400
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 399)
    half = 1.96 * sd / 20
    assert res["mean"] == pytest.approx(mean) and res["n"] == 400
    assert res["ci_low"] == pytest.approx(mean - half, abs=0.05 * half)
    assert res["ci_high"] == pytest.approx(mean + half, abs=0.05 * half)
    assert res["excludes_zero"]


def test_bootstrap_covers_zero_when_there_is_no_effect_and_is_seeded() -> None:
    """Over 200 null data sets the 95% interval misses 0 about 5% of the time."""
    misses = 0
    for trial in range(200):
        rng = random.Random(trial)
        misses += paired_bootstrap([rng.gauss(0, 1) for _ in range(60)], resamples=2000)["excludes_zero"]
    assert 2 <= misses <= 20
    diffs = [0.1, -0.4, 0.3, 0.2]
    assert paired_bootstrap(diffs, seed=3) == paired_bootstrap(diffs, seed=3)
    assert paired_bootstrap([0.2])["ci_low"] is None


def test_mcnemar_exact_p_values() -> None:
    # 10 prompts where only b carries the marker, 2 where only a does: p = 2 (1 + 12 + 66) / 2^12
    a = [True] * 2 + [False] * 10 + [True] * 5 + [False] * 3
    b = [False] * 2 + [True] * 10 + [True] * 5 + [False] * 3
    res = mcnemar(a, b)
    assert (res["a_only"], res["b_only"], res["n"]) == (2, 10, 20)
    assert res["p_value"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar(b, a)["p_value"] == res["p_value"], "two-sided"
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0, "no discordant pair"
    assert mcnemar([True] * 3, [False] * 3)["p_value"] == 1.0 * 2 / 8
