"""Length-controlled judge score (gad_megatron.evaluation.length_control) on synthetic preferences."""

from __future__ import annotations

import math
import random

import pytest

from gad_megatron.evaluation.length_control import fit_logistic, length_controlled_score, length_features


def _lengths(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Reference lengths 20-40 and candidates mostly longer (difference -10..+30 tokens)."""
    rng = random.Random(seed)
    ref = [rng.randint(20, 40) for _ in range(n)]
    return [r + rng.randint(-10, 30) for r in ref], ref


def _mean100(xs: list[float]) -> float:
    return 100 * sum(xs) / len(xs)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_fit_recovers_known_coefficients() -> None:
    x = [i / 10 - 1 for i in range(21)]
    y = [1 / (1 + math.exp(-(0.3 + 1.2 * xi))) for xi in x]
    a, b = fit_logistic(y, x)
    assert a == pytest.approx(0.3, abs=1e-6) and b == pytest.approx(1.2, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_length_only_preferences_give_parity(seed: int) -> None:
    """The longer answer always wins, more clearly the longer it is: raw far above 50, LC near 50."""
    cand, ref = _lengths(80, seed)
    scores = [0.5 + 0.45 * math.tanh((c - r) / 10) for c, r in zip(cand, ref)]
    raw = _mean100(scores)
    lc = length_controlled_score(scores, cand, ref)
    assert raw > 60
    assert lc == pytest.approx(50, abs=3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quality_only_preferences_keep_the_raw_score(seed: int) -> None:
    """Preferences independent of length: LC = raw; the same quality plus a length bias: LC unchanged."""
    cand, ref = _lengths(200, seed)
    rng = random.Random(100 + seed)
    quality = [min(0.9, max(0.1, rng.gauss(0.6, 0.12))) for _ in cand]
    raw = _mean100(quality)
    lc = length_controlled_score(quality, cand, ref)
    assert lc == pytest.approx(raw, abs=2)

    x = length_features(cand, ref)
    biased = [1 / (1 + math.exp(-(_logit(q) + 1.5 * xi))) for q, xi in zip(quality, x)]
    assert _mean100(biased) > raw + 5  # the judge's length bias inflates the raw score
    assert length_controlled_score(biased, cand, ref) == pytest.approx(lc, abs=2)


def test_degenerate_inputs() -> None:
    """Documented rules: < 3 prompts -> None; length differences that do not vary -> the raw mean."""
    assert length_controlled_score([], [], []) is None
    assert length_controlled_score([0.9, 0.1], [10, 30], [20, 20]) is None
    scores = [0.7, 0.6, 0.4, 0.65]
    raw = _mean100(scores)
    assert length_controlled_score(scores, [20] * 4, [20] * 4) == pytest.approx(raw)  # all the same length
    assert length_controlled_score(scores, [25, 30, 35, 40], [15, 20, 25, 30]) == pytest.approx(raw)  # always +10
    assert length_controlled_score([0.6, 0.4, 0.5], [10, 20, 30], [20, 20, 20]) == pytest.approx(50, abs=1e-6)
    with pytest.raises(ValueError):
        length_controlled_score(scores, [20] * 3, [20] * 4)


def test_eval_uses_scored_prompts_and_both_lengths() -> None:
    """evaluate.py's hook: unscored prompts are skipped; candidate and reference lengths both enter."""
    from gad_megatron.evaluation.evaluate import _judge_score_lc

    cand, ref = _lengths(40, 3)
    scores = [0.5 + 0.45 * math.tanh((c - r) / 10) for c, r in zip(cand, ref)]
    judged = [{"id": f"q{i}", "score": s} for i, s in enumerate(scores)] + [{"id": "bad", "score": None}]
    rows = {f"q{i}": {"response": "x" * c} for i, c in enumerate(cand)} | {"bad": {"response": "x" * 500}}
    refs = {f"q{i}": "y" * r for i, r in enumerate(ref)} | {"bad": None}
    lc = _judge_score_lc(judged, rows, refs, count=None)  # no tokenizer: characters
    assert lc == pytest.approx(length_controlled_score(scores, cand, ref))
    assert lc == pytest.approx(50, abs=3) and _mean100(scores) > 60
