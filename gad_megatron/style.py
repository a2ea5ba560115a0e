"""Teacher answer style for the offline quickstart (context distillation).

The quickstart teacher is a small chat model that receives a hidden few-shot
context (``context_messages``) demonstrating a distinctive answer style. The
student sees only the user prompt. The style is detected with regex markers,
so the distillation result can be measured as the share of student answers
that carry the style.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

__all__ = [
    "Marker",
    "TeacherStyle",
    "load_quickstart_prompts",
    "load_teacher_style",
    "style_match",
    "style_rate",
    "style_rate_complete",
]

Where = Literal["start", "end", "anywhere"]
_WHERE: frozenset[str] = frozenset({"start", "end", "anywhere"})
_ASSETS = "gad_megatron.assets"
_STYLE_FILE = "teacher_style.json"
_PROMPTS_FILE = "quickstart_prompts.jsonl"
_GLOBAL_FLAGS = re.compile(r"^\(\?[aiLmsux]+\)")


@dataclass(frozen=True)
class Marker:
    """One regex check on an answer.

    ``where`` selects how ``pattern`` is applied to the whitespace-stripped
    answer: ``"start"`` must match at its beginning, ``"end"`` must match a
    suffix reaching its end, ``"anywhere"`` may match at any position.
    """

    name: str
    pattern: str
    where: Where = "anywhere"

    def __post_init__(self) -> None:
        if self.where not in _WHERE:
            raise ValueError(f"marker {self.name!r}: bad where={self.where!r}")
        _compile(self.pattern, self.where)  # fail early on invalid regexes

    def matches(self, text: str) -> bool:
        """Return True if this marker is found in ``text``."""
        rx = _compile(self.pattern, self.where)
        s = text.strip()
        return (rx.match(s) if self.where == "start" else rx.search(s)) is not None


@dataclass(frozen=True)
class TeacherStyle:
    """A hidden few-shot context plus the markers that detect its style."""

    description: str
    context_messages: tuple[dict[str, str], ...]
    markers: tuple[Marker, ...]

    def with_context(self, prompt: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """Return the teacher-side messages: the context followed by ``prompt``."""
        return [dict(m) for m in self.context_messages] + [dict(m) for m in prompt]


@lru_cache(maxsize=256)
def _compile(pattern: str, where: str) -> re.Pattern[str]:
    if where != "end":
        return re.compile(pattern)
    # Anchor to the end without breaking top-level alternation or global flags.
    m = _GLOBAL_FLAGS.match(pattern)
    flags = m.group(0) if m else ""
    return re.compile(f"{flags}(?:{pattern[len(flags):]})\\Z")


def style_match(text: str, style: TeacherStyle) -> bool:
    """Return True if ``text`` matches every marker of ``style``."""
    return all(marker.matches(text) for marker in style.markers)


def style_rate(texts: Iterable[str], style: TeacherStyle) -> float:
    """Return the fraction of ``texts`` matching ``style`` (0.0 for no texts)."""
    hits = total = 0
    for text in texts:
        total += 1
        hits += style_match(text, style)
    return hits / total if total else 0.0


def style_rate_complete(rows: Iterable[Mapping[str, Any]], style: TeacherStyle) -> tuple[float | None, int]:
    """``(rate, n_complete)``: :func:`style_rate` over the rows that were not cut at the token cap.

    ``rows`` are generation rows (``{"response": str, "finish_reason": str, ...}``); a row whose
    ``finish_reason`` is ``"length"`` is left out, since a truncated answer cannot carry a marker
    at its end. The rate is None, not 0.0, when no row is complete: there is nothing to measure.
    """
    complete = [r["response"] for r in rows if r.get("finish_reason") != "length"]
    return (style_rate(complete, style) if complete else None), len(complete)


def _parse_style(data: dict) -> TeacherStyle:
    messages = tuple(
        {"role": str(m["role"]), "content": str(m["content"])}
        for m in data["context_messages"]
    )
    markers = tuple(
        Marker(name=str(m["name"]), pattern=str(m["pattern"]), where=m.get("where", "anywhere"))
        for m in data["markers"]
    )
    if not markers:
        raise ValueError("teacher style needs at least one marker")
    return TeacherStyle(description=str(data["description"]), context_messages=messages, markers=markers)


def load_teacher_style() -> TeacherStyle:
    """Load the packaged quickstart teacher style (``gad/assets/teacher_style.json``)."""
    text = resources.files(_ASSETS).joinpath(_STYLE_FILE).read_text(encoding="utf-8")
    return _parse_style(json.loads(text))


def load_quickstart_prompts() -> list[dict]:
    """Load the packaged quickstart prompts: ``{"id": str, "prompt": [messages]}`` dicts."""
    text = resources.files(_ASSETS).joinpath(_PROMPTS_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
