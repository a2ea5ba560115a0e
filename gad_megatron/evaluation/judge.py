"""LLM-as-judge, the paper's protocol, through the same client as the teacher (one client, two roles).

1. The judge answers every prompt itself: that answer is the *reference*.
2. In one request the judge rates the reference and the candidate from 1 to 10.
3. Per prompt, score = candidate / (candidate + reference); the suite score is the mean x 100,
   so 50 means parity with the judge's own answers.

Each pair is rated in both orders (candidate shown first, then second) and the two ratings of each
side are averaged before the ratio: LLM judges favour one position, and this cancels it.
A rating that cannot be parsed is asked again (sampled, temperature 0.7, new seed) up to
``retries`` times; if it still fails, that order is dropped and counted, never guessed. A prompt
with no parsed order is left out of the score and counted as unscored.

Every request goes through :func:`gad_megatron.teacher.bulk.run_requests_with_stats`, whose SQLite cache is
keyed on the full request: a rerun asks nothing that was answered before. The judge config's own
``system_prompt`` / ``context_messages`` go with every judge request, references included: leave
them empty for a strong judge; :func:`format_demo_messages` is a format demonstration for a small one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from gad_megatron.config import TeacherConfig

__all__ = [
    "RATING_TEMPLATE",
    "JudgeRun",
    "JudgeClient",
    "render_conversation",
    "rating_messages",
    "format_demo_messages",
    "parse_ratings",
    "judge_references",
    "judge_pairs",
]

Messages = list[dict[str, str]]

# Written for this project. The scale anchors keep small judges from rating everything 8.
RATING_TEMPLATE = """You are grading two answers to the same request. Judge them on helpfulness, correctness, \
relevance, depth and clarity, and rate each one with a whole number from 1 (useless) to 10 (excellent). \
The order of the answers says nothing about their quality, and a longer answer is not better for being longer.

[Request]
{conversation}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Write at most three sentences of justification. Then finish with one last line in exactly this form:
Ratings: A=<1-10>, B=<1-10>"""

_NUM = r"(\d{1,2}(?:\.\d+)?)"
_PAIR = re.compile(rf"ratings?\s*[:\-]?\s*\**\s*A\s*[=:]\s*{_NUM}\s*(?:/\s*10)?\s*[,;]?\s*(?:and\s+)?B\s*[=:]\s*{_NUM}", re.I)
_SINGLE = {  # one labelled line per side, e.g. "Answer A: 7/10"
    side: re.compile(rf"^[^\w\n]*(?:answer|response|assistant)?[ \t]*{side}[ \t]*(?:rating|score)?[ \t]*[=:][ \t]*{_NUM}", re.I | re.M)
    for side in "AB"
}


def render_conversation(prompt: Messages) -> str:
    """A chat prompt as plain text for the judge (a single user turn is shown as-is)."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt)


def rating_messages(prompt: Messages, answer_a: str, answer_b: str) -> Messages:
    """One user message holding the whole rating request (no system role: the endpoint's own stays free)."""
    text = RATING_TEMPLATE.format(conversation=render_conversation(prompt), answer_a=answer_a or "(empty answer)",
                                  answer_b=answer_b or "(empty answer)")
    return [{"role": "user", "content": text}]


def format_demo_messages() -> Messages:
    """Two worked rating turns to use as a small local judge's ``context_messages``.

    A 100M-class judge ignores the format instruction but copies a demonstrated format; a strong
    judge (the paper's GPT-4o) needs none. The demos are rated at the extremes on purpose, so they
    anchor the scale without suggesting a typical score.
    """
    demos = [
        ("What is the capital of France?", "The capital of France is Paris.", "I like turtles.",
         "A answers the question correctly; B is off-topic.\nRatings: A=9, B=1"),
        ("Give me a tip for better sleep.", "no", "Keep a regular bedtime and avoid screens late at night.",
         "A is unhelpful; B gives a useful, concrete tip.\nRatings: A=2, B=8"),
    ]
    out: Messages = []
    for question, a, b, verdict in demos:
        out += rating_messages([{"role": "user", "content": question}], a, b)
        out.append({"role": "assistant", "content": verdict})
    return out


def _in_range(a: float, b: float) -> bool:
    return 1.0 <= a <= 10.0 and 1.0 <= b <= 10.0


def parse_ratings(text: str | None) -> tuple[float, float] | None:
    """``(rating of A, rating of B)`` from a judge output, or None if the format is not there.

    Accepted: the requested ``Ratings: A=7, B=5`` line (last occurrence wins; ``:``, ``/10`` and
    ``and`` tolerated), or exactly one labelled line per side (``A: 7/10`` ... ``B: 5/10``).
    Anything else, or a value outside 1..10, is unparseable.
    """
    if not text:
        return None
    pairs = _PAIR.findall(text)
    if pairs:
        a, b = (float(x) for x in pairs[-1])
        return (a, b) if _in_range(a, b) else None
    found = {side: rx.findall(text) for side, rx in _SINGLE.items()}
    if len(found["A"]) == 1 and len(found["B"]) == 1:
        a, b = float(found["A"][0]), float(found["B"][0])
        return (a, b) if _in_range(a, b) else None
    return None


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:24]


@dataclass
class JudgeRun:
    """Outcome of judging one suite for one candidate model."""

    score: float | None  # mean of candidate / (candidate + reference), x 100
    n_scored: int
    n_unscored: int  # prompts with no parsed order at all
    n_unparseable: int  # rating requests still unparseable after retries
    n_failed: int  # requests the endpoint never answered
    n_retries: int
    requests: int  # rating requests actually sent (0 on a fully cached rerun)
    position_bias: float | None  # mean (first-position rating - second-position rating), in points
    cand_mean: float | None
    ref_mean: float | None
    details: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "details"}


class JudgeClient:
    """The judge endpoint through ``gad_megatron.teacher.bulk.run_requests_with_stats``, counting HTTP requests really sent."""

    def __init__(self, cfg: TeacherConfig, cache_path: str | Path, progress: bool | None = None) -> None:
        self.cfg = cfg
        self.cache_path = Path(cache_path)
        self.progress = progress
        self.requests = 0  # HTTP requests sent, retries included; cache hits are not requests

    def __call__(self, requests: list[tuple[str, Messages]], desc: str, sampling: dict[str, Any]) -> dict[str, Any]:
        from gad_megatron.teacher.bulk import run_requests_with_stats

        if not requests:
            return {}
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        results, stats = run_requests_with_stats(self.cfg, requests, self.cache_path, desc, sampling=sampling,
                                                 progress=self.progress)
        self.requests += stats.requests
        return results


def judge_references(client: JudgeClient, records: Sequence[dict[str, Any]], temperature: float = 0.0,
                     max_tokens: int | None = None, desc: str = "judge references") -> dict[str, str | None]:
    """The judge's own answer to every prompt (``id -> text``; None where the endpoint failed)."""
    sampling = {"temperature": temperature, "max_tokens": max_tokens or client.cfg.max_tokens}
    results = client([(r["id"], [dict(m) for m in r["prompt"]]) for r in records], desc, sampling)
    out: dict[str, str | None] = {}
    for r in records:
        c = results.get(r["id"])
        out[r["id"]] = c.text.strip() if c is not None and c.error is None and c.text.strip() else None
    return out


def judge_pairs(
    client: JudgeClient,
    records: Sequence[dict[str, Any]],
    candidates: dict[str, str],
    references: dict[str, str | None],
    *,
    both_orders: bool = True,
    temperature: float = 0.0,
    max_tokens: int = 512,
    retries: int = 2,
    desc: str = "judge",
) -> JudgeRun:
    """Rate each candidate against the reference for its prompt; see the module docstring."""
    requests_before = client.requests
    jobs: dict[str, dict[str, Any]] = {}  # job key -> {id, order, messages}
    for r in records:
        rid = r["id"]
        cand, ref = candidates.get(rid), references.get(rid)
        if cand is None or ref is None:
            continue
        orders = [("cand_first", cand, ref), ("cand_second", ref, cand)] if both_orders else [("cand_first", cand, ref)]
        for order, a, b in orders:
            jobs[f"{rid}\x1f{order}"] = {"id": rid, "order": order, "messages": rating_messages(r["prompt"], a, b)}

    parsed: dict[str, tuple[float, float]] = {}
    raw: dict[str, str | None] = {}
    failed: set[str] = set()
    n_retries = 0
    pending = list(jobs)
    for attempt in range(retries + 1):
        if not pending:
            break
        # The first pass is greedy; a retry must sample, or it would repeat the same unparseable text.
        sampling = {"temperature": temperature, "max_tokens": max_tokens} if attempt == 0 else \
            {"temperature": 0.7, "max_tokens": max_tokens, "seed": attempt}
        n_retries += len(pending) if attempt else 0
        results = client([(k, jobs[k]["messages"]) for k in pending], f"{desc} (retry {attempt})" if attempt else desc, sampling)
        still = []
        for k in pending:
            c = results.get(k)
            if c is None or c.error is not None:
                failed.add(k)  # the client already retried transport errors; asking again will not help
                continue
            raw[k] = c.text
            ratings = parse_ratings(c.text)
            if ratings is None:
                still.append(k)
            else:
                parsed[k] = ratings
        pending = still
    unparseable = set(pending)

    details, scores, cand_all, ref_all, bias = [], [], [], [], []
    for r in records:
        rid = r["id"]
        row: dict[str, Any] = {"id": rid}
        cand_scores, ref_scores = [], []
        for order in ("cand_first", "cand_second"):
            k = f"{rid}\x1f{order}"
            if k not in jobs:
                continue
            if k in parsed:
                a, b = parsed[k]
                c_s, r_s = (a, b) if order == "cand_first" else (b, a)
                cand_scores.append(c_s)
                ref_scores.append(r_s)
                row[order] = {"candidate": c_s, "reference": r_s}
            else:
                row[order] = {"status": "failed" if k in failed else "unparseable", "raw": (raw.get(k) or "")[-300:]}
        if len(cand_scores) == 2:
            # Rating in first position minus rating in second position, over both sides.
            bias.append(((cand_scores[0] - cand_scores[1]) + (ref_scores[1] - ref_scores[0])) / 2)
        if cand_scores:
            c_m, r_m = sum(cand_scores) / len(cand_scores), sum(ref_scores) / len(ref_scores)
            row["score"] = c_m / (c_m + r_m)
            scores.append(row["score"])
            cand_all.append(c_m)
            ref_all.append(r_m)
        elif any(f"{rid}\x1f{o}" in jobs for o in ("cand_first", "cand_second")):
            row["score"] = None
        else:
            row["score"] = None
            row["status"] = "no candidate or no reference"
        details.append(row)

    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return JudgeRun(
        score=100 * mean(scores) if scores else None,
        n_scored=len(scores),
        n_unscored=len(records) - len(scores),
        n_unparseable=len(unparseable),
        n_failed=len(failed),
        n_retries=n_retries,
        requests=client.requests - requests_before,
        position_bias=mean(bias),
        cand_mean=mean(cand_all),
        ref_mean=mean(ref_all),
        details=details,
    )
