"""Distinguishability: can a fresh classifier tell teacher responses from candidate responses?

A logistic regression on hashed word uni/bi-grams, character 3-grams and length features is
trained on the responses to one half of the prompts and tested on the other half, then the halves
swap (2-fold cross-fitting, so every prompt is tested once, by a classifier that never saw it).
Both responses to one prompt always fall in the same half, so the classifier cannot match a
response to its prompt's partner. 50% accuracy = indistinguishable; the 95% Wilson interval says
how far from 50% the estimate really is.

Character n-grams keep case, punctuation and newlines on purpose: formatting and style are exactly
what distillation should transfer. :func:`discriminator_distinguishability` runs the same protocol
with the project's discriminator (fresh from a checkpoint, new head) in place of the n-gram model.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from typing import Any, Callable, Sequence

import torch

__all__ = ["featurize", "wilson_interval", "distinguishability", "discriminator_distinguishability"]

_WORD = re.compile(r"\w+|[^\w\s]")


def _bucket(feature: str, dim: int) -> int:
    # crc32, not hash(): Python's string hash changes between processes.
    return zlib.crc32(feature.encode("utf-8")) % dim


def featurize(texts: Sequence[str], dim: int = 1 << 16) -> torch.Tensor:
    """Sparse (len(texts), dim) matrix: sublinear-tf hashed n-grams, L2-normalised, plus length features."""
    rows, cols, vals = [], [], []
    for i, text in enumerate(texts):
        counts: dict[int, float] = {}
        words = [w.lower() for w in _WORD.findall(text)]
        grams = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
        grams += [f"c:{text[j:j + 3]}" for j in range(max(0, len(text) - 2))]
        for g in grams:
            k = _bucket(g, dim)
            counts[k] = counts.get(k, 0.0) + 1.0
        feats = {k: 1.0 + math.log(c) for k, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in feats.values())) or 1.0
        feats = {k: v / norm for k, v in feats.items()}
        # Length is the classic tell (a reward-hacked student rambles): give it its own buckets.
        for name, value in (("len:chars", math.log1p(len(text)) / 10), ("len:words", math.log1p(len(words)) / 10),
                            ("len:lines", math.log1p(text.count("\n")) / 5)):
            k = _bucket(name, dim)
            feats[k] = feats.get(k, 0.0) + value
        for k, v in feats.items():
            rows.append(i)
            cols.append(k)
            vals.append(v)
    idx = torch.tensor([rows, cols], dtype=torch.long)
    return torch.sparse_coo_tensor(idx, torch.tensor(vals, dtype=torch.float32), (len(texts), dim), check_invariants=True).coalesce()


def _fit(x: torch.Tensor, y: torch.Tensor, l2: float, iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.sparse.mm(x, w).squeeze(-1) + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sound at small n and near 0 or 1)."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _cross_fit(n: int, seed: int, fit_predict: Callable[[list[int], list[int]], list[float]]) -> dict[str, Any]:
    """Split prompts in two halves; train on one, score the other, then swap. Rows: teacher i, candidate n+i.
    ``per_prompt[i]``: the share of prompt i's two rows classified right (0, 0.5 or 1)."""
    if n < 4:
        return {"accuracy": None, "reason": f"needs at least 4 prompts, got {n}", "n_prompts": n}
    order = list(range(n))
    random.Random(seed).shuffle(order)
    halves = [order[: n // 2], order[n // 2 :]]
    per_prompt = [0.0] * n
    folds = []
    for train, test in ((halves[0], halves[1]), (halves[1], halves[0])):
        logits = fit_predict(train + [n + i for i in train], test + [n + i for i in test])
        right = [(z > 0) == (row < len(test)) for row, z in enumerate(logits)]
        for row, ok in enumerate(right):
            per_prompt[test[row % len(test)]] += ok / 2
        folds.append(sum(right) / len(right))
    correct, total = round(sum(per_prompt) * 2), 2 * n
    lo, hi = wilson_interval(correct, total)
    return {"accuracy": correct / total, "ci_low": lo, "ci_high": hi, "n_test": total, "n_prompts": n, "fold_accuracy": folds,
            "per_prompt": per_prompt}  # fmt: skip


def _labels(rows: list[int], n: int) -> torch.Tensor:
    return torch.tensor([1.0 if r < n else 0.0 for r in rows])


def distinguishability(teacher: Sequence[str], candidate: Sequence[str], seed: int = 0, l2: float = 1e-3,
                       dim: int = 1 << 16) -> dict[str, Any]:
    """Held-out accuracy of a fresh teacher-vs-candidate classifier; ``teacher[i]``, ``candidate[i]`` share prompt i."""
    if len(teacher) != len(candidate):
        raise ValueError("teacher and candidate must be aligned by prompt")
    n = len(teacher)
    x = featurize(list(teacher) + list(candidate), dim) if n >= 4 else None
    torch.manual_seed(seed)

    def fit_predict(train: list[int], test: list[int]) -> list[float]:
        w, b = _fit(x.index_select(0, torch.tensor(train)), _labels(train, n), l2)
        return (torch.sparse.mm(x.index_select(0, torch.tensor(test)), w).squeeze(-1) + b).tolist()

    return {**_cross_fit(n, seed, fit_predict), "classifier": "hashed n-gram logistic regression"}


def discriminator_distinguishability(
    model_spec: str,
    prompts: Sequence[list[dict[str, str]]],
    teacher: Sequence[str],
    candidate: Sequence[str],
    seed: int = 0,
    epochs: int = 2,
    lr: float = 1e-5,
    batch_size: int = 8,
    max_prompt_length: int = 512,
    max_response_length: int = 512,
) -> dict[str, Any]:
    """Same protocol with the project's discriminator, freshly initialised from ``model_spec`` (new head).

    Trained with binary cross-entropy (teacher = 1) on the text path the GAD discriminator uses, so
    it sees exactly what D sees in training. Much slower than the n-gram classifier (a full LM per fold).
    """
    from gad_megatron.evaluation.hf_discriminator import load_hf_discriminator, score_sequences
    from gad_megatron.models.sources import load_tokenizer
    from gad_megatron.text_encoding import TextEncoder, right_pad

    if not len(prompts) == len(teacher) == len(candidate):
        raise ValueError("prompts, teacher and candidate must be aligned")
    n = len(teacher)
    tok = load_tokenizer(model_spec)
    enc = TextEncoder(tok, max_prompt_length, max_response_length)
    eot = enc.end_of_turn_ids()
    seqs = [enc.encode(p, r, eot) for p, r in zip(list(prompts) * 2, list(teacher) + list(candidate))]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def fit_predict(train: list[int], test: list[int]) -> list[float]:
        torch.manual_seed(seed)
        model = load_hf_discriminator(model_spec).to(device)  # fresh for every fold: no leak between halves
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        labels = _labels(train, n)
        rng = random.Random(seed)
        model.train()
        for _ in range(epochs):
            order = list(range(len(train)))
            rng.shuffle(order)
            for k in range(0, len(order), batch_size):
                idx = order[k : k + batch_size]
                ids, mask = right_pad([seqs[train[i]] for i in idx], pad, device)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(score_sequences(model, ids, mask),
                                                                            labels[idx].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        out: list[float] = []
        with torch.no_grad():
            for k in range(0, len(test), batch_size):
                ids, mask = right_pad([seqs[i] for i in test[k : k + batch_size]], pad, device)
                out += score_sequences(model, ids, mask).tolist()
        del model, opt
        return out

    return {**_cross_fit(n, seed, fit_predict), "classifier": f"discriminator (fresh from {model_spec})"}
