"""Automatic text metrics: ROUGE-L F1, n-gram overlap F1, response-length statistics.

Tokenization is Unicode-aware: the common ROUGE tokenizer keeps only ``[a-z0-9]`` and so scores
Chinese, Russian or accented text as empty. Here words are runs of Unicode letters/digits, and
scripts written without spaces (Han, kana, Thai, ...) are split into single characters so that
overlap is still measured there.
"""

from __future__ import annotations

import math
import re
import statistics
import unicodedata
from collections import Counter
from typing import Any, Iterable, Sequence

__all__ = [
    "tokenize",
    "lcs_length",
    "rouge_l_f1",
    "ngram_f1",
    "ngram_f1_all",
    "repetition",
    "length_stats",
    "mean",
]

# Scripts without word separators: one token per character.
_NO_SPACE_SCRIPTS = (
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs (+ ext. A, compatibility)
    "\U00020000-\U0002ffff"  # CJK ext. B-F
    "\u0e00-\u0e7f\u0e80-\u0eff"  # Thai, Lao
    "\u1000-\u109f\u1780-\u17ff"  # Myanmar, Khmer
)
# A token is one character of such a script, or a run of letters / digits / combining marks (accents
# left uncomposed, Indic vowel signs). Punctuation, symbols and underscores separate tokens.
_TOKEN = re.compile(rf"[{_NO_SPACE_SCRIPTS}]|(?:(?![{_NO_SPACE_SCRIPTS}])[^\W_]|[\u0300-\u036f\u0900-\u0dff])+")


def tokenize(text: str) -> list[str]:
    """Case-folded, NFKC-normalized word tokens; Han/kana/Thai-like scripts one character each."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return _TOKEN.findall(text)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(min) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def _f1(overlap: float, n_cand: int, n_ref: int) -> float:
    if n_cand == 0 or n_ref == 0 or overlap == 0:
        return 0.0
    precision, recall = overlap / n_cand, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) of ``candidate`` against ``reference``; 0.0 if either has no tokens."""
    c, r = tokenize(candidate), tokenize(reference)
    return _f1(lcs_length(c, r), len(c), len(r))


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def ngram_f1(candidate: str, reference: str, n: int) -> float:
    """F1 of clipped n-gram overlap (multiset intersection); 0.0 if either side has no n-gram."""
    c, r = _ngrams(tokenize(candidate), n), _ngrams(tokenize(reference), n)
    return _f1(sum((c & r).values()), sum(c.values()), sum(r.values()))


def ngram_f1_all(candidate: str, reference: str, max_n: int = 6) -> dict[int, float]:
    """``{n: ngram_f1}`` for n = 1..max_n, tokenizing once."""
    ct, rt = tokenize(candidate), tokenize(reference)
    out = {}
    for n in range(1, max_n + 1):
        c, r = _ngrams(ct, n), _ngrams(rt, n)
        out[n] = _f1(sum((c & r).values()), sum(c.values()), sum(r.values()))
    return out


def repetition(text: str, n: int = 4) -> float:
    """Share of the text's word n-grams that repeat an earlier one: ``1 - distinct / total`` (seq-rep-n).

    0.0 for a text without repeats or shorter than ``n`` words; a one-sentence answer whose
    sign-off is written five times scores about 0.3, a sign-off looped to the token cap about 0.8. Degenerate repetition is how a hacked generator often
    pads an answer that the discriminator scores well.
    """
    grams = _ngrams(tokenize(text), n)
    total = sum(grams.values())
    return 1.0 - len(grams) / total if total else 0.0


def mean(values: Iterable[float]) -> float | None:
    """Mean of the finite values, None when there are none (a missing metric is not a zero)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def length_stats(lengths: Sequence[int], finish_reasons: Sequence[str] | None = None, bins: int = 10) -> dict[str, Any]:
    """Mean / median / p90 / max / std of response lengths, a histogram, and the share truncated."""
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    hi = max(ordered)
    width = max(1, math.ceil((hi + 1) / bins))
    counts = [0] * bins
    for x in lengths:
        counts[min(bins - 1, x // width)] += 1
    out: dict[str, Any] = {
        "count": len(lengths),
        "mean": statistics.fmean(lengths),
        "median": statistics.median(lengths),
        "p90": p90,
        "max": hi,
        "std": statistics.pstdev(lengths),
        "histogram": {"edges": [i * width for i in range(bins + 1)], "counts": counts},
    }
    if finish_reasons is not None:
        out["truncated_frac"] = sum(1 for f in finish_reasons if f == "length") / len(lengths)
    return out
