"""Length-controlled judge score, after AlpacaEval 2's length-controlled win rate.

Judges prefer longer answers. To report what a judge would say if the candidate were as long as
the reference, the per-prompt preference ``y_i`` (the judge score in (0, 1): candidate rating over
the sum of both ratings) is fitted by a logistic regression on the standardised length difference

    x_i = tanh((len_cand_i - len_ref_i) / std(len_cand - len_ref))
    y_i ~ sigmoid(a + b * x_i)

and the length-controlled score is the prediction at zero length difference, ``100 * sigmoid(a)``.
The fit is a fractional logit (soft labels, binary cross-entropy): a rating ratio of exactly 0.5,
common with 1-10 ratings, stays a tie instead of being thresholded, and with no length effect
(``b = 0``) the prediction equals the raw mean score exactly, so the two are directly comparable.
One model is fitted at a time (no per-model terms).

Degenerate inputs, by rule: fewer than :data:`MIN_PROMPTS` scored prompts gives None (too few to
fit a slope); length differences that do not vary (all answers the same length, or every candidate
longer by the same amount) give the raw mean x 100, since length cannot explain any difference
between prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["MIN_PROMPTS", "fit_logistic", "length_controlled_score", "length_features"]

MIN_PROMPTS = 3
_EPS = 1e-9  # preferences are clipped into (0, 1) so that log-losses stay finite


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def length_features(cand_lengths: Sequence[float], ref_lengths: Sequence[float]) -> list[float] | None:
    """``tanh(d / std(d))`` per prompt with ``d = len_cand - len_ref`` (n,); None if ``d`` does not vary."""
    diffs = [float(c) - float(r) for c, r in zip(cand_lengths, ref_lengths, strict=True)]
    if not diffs:
        return None
    mu = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mu) ** 2 for d in diffs) / len(diffs))
    if std == 0.0:
        return None
    return [math.tanh(d / std) for d in diffs]


def _loss(a: float, b: float, y: Sequence[float], x: Sequence[float]) -> float:
    total = 0.0
    for yi, xi in zip(y, x):
        p = min(max(_sigmoid(a + b * xi), _EPS), 1.0 - _EPS)
        total -= yi * math.log(p) + (1.0 - yi) * math.log(1.0 - p)
    return total


def fit_logistic(y: Sequence[float], x: Sequence[float], max_iter: int = 100,
                 tol: float = 1e-10) -> tuple[float, float]:
    """``(a, b)`` minimising the cross-entropy of ``sigmoid(a + b x)`` against targets ``y`` in [0, 1].

    ``y`` and ``x``: (n,) each. Newton's method on the two parameters, halving a step that does not
    lower the loss; starts from the intercept-only solution ``(logit(mean y), 0)``.
    """
    y = [min(max(float(v), _EPS), 1.0 - _EPS) for v in y]
    ybar = sum(y) / len(y)
    a, b = math.log(ybar / (1.0 - ybar)), 0.0
    loss = _loss(a, b, y, x)
    for _ in range(max_iter):
        g_a = g_b = h_aa = h_ab = h_bb = 0.0
        for yi, xi in zip(y, x):
            p = _sigmoid(a + b * xi)
            w = p * (1.0 - p)
            g_a += p - yi
            g_b += (p - yi) * xi
            h_aa += w
            h_ab += w * xi
            h_bb += w * xi * xi
        det = h_aa * h_bb - h_ab * h_ab
        if det <= 0.0:
            break
        step_a = (h_bb * g_a - h_ab * g_b) / det
        step_b = (h_aa * g_b - h_ab * g_a) / det
        scale = 1.0
        while scale > 1e-6:
            new_a, new_b = a - scale * step_a, b - scale * step_b
            new_loss = _loss(new_a, new_b, y, x)
            if new_loss <= loss:
                break
            scale /= 2
        else:
            break
        a, b, loss = new_a, new_b, new_loss
        if max(abs(scale * step_a), abs(scale * step_b)) < tol:
            break
    return a, b


def length_controlled_score(scores: Sequence[float], cand_lengths: Sequence[float],
                            ref_lengths: Sequence[float]) -> float | None:
    """The judge score at zero length difference, x 100 (50 = parity), or None; see the module docstring.

    ``scores``: per-prompt preferences in [0, 1] (n,); ``cand_lengths`` / ``ref_lengths``: the two
    answers' lengths (n,), in any one unit (tokens or characters).
    """
    if len(scores) != len(cand_lengths) or len(scores) != len(ref_lengths):
        raise ValueError(f"lengths differ: {len(scores)} scores, {len(cand_lengths)} / {len(ref_lengths)} lengths")
    if len(scores) < MIN_PROMPTS:
        return None
    x = length_features(cand_lengths, ref_lengths)
    if x is None:
        return 100.0 * sum(scores) / len(scores)
    a, _ = fit_logistic(scores, x)
    return 100.0 * _sigmoid(a)
