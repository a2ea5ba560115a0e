"""What the endpoint's answers become: one :class:`Completion` per request and a batch's :class:`RequestStats`."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from gad_megatron.config import TeacherConfig


def response_flags(texts: Sequence[str], finish_reasons: Sequence[str | None], refusals: Sequence[str | None] = ()) -> list[str]:
    """Quality flags of an answer: ``empty``, ``truncated`` (finish_reason length), ``content_filter``."""
    flags: list[str] = []
    if any(not t.strip() for t in texts):
        flags.append("empty")
    if any(r == "length" for r in finish_reasons):
        flags.append("truncated")
    if any(r == "content_filter" for r in finish_reasons) or any(refusals):
        flags.append("content_filter")
    return flags


@dataclass
class Completion:
    """One answer (or one recorded failure). ``text`` is ``""`` when ``error`` is set."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int
    error: str | None = None
    flags: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # every choice when n > 1 (texts[0] == text)
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(cls, error: str, attempts: int, latency_s: float = 0.0) -> "Completion":
        return cls(text="", finish_reason=None, prompt_tokens=0, completion_tokens=0,
                   latency_s=latency_s, attempts=attempts, error=error)

    def to_cache(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cached")
        return data

    @classmethod
    def from_cache(cls, data: Mapping[str, Any]) -> "Completion":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names and k != "cached"}, cached=True)


@dataclass
class RequestStats:
    """Counters of one batch (or of a client's lifetime). Tokens count only requests made now."""

    rows: int = 0
    ok: int = 0
    failed: int = 0
    cached: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    flags: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    def cost(self, cfg: TeacherConfig) -> float | None:
        if cfg.price_per_1m_prompt_tokens is None and cfg.price_per_1m_completion_tokens is None:
            return None
        return (self.prompt_tokens * (cfg.price_per_1m_prompt_tokens or 0.0)
                + self.completion_tokens * (cfg.price_per_1m_completion_tokens or 0.0)) / 1e6

    @property
    def fresh(self) -> int:
        return self.ok + self.failed - self.cached

    def summary(self, cfg: TeacherConfig, desc: str = "teacher") -> str:
        rate = self.fresh / self.wall_s if self.wall_s > 0 else 0.0
        lines = [
            f"{desc}: {self.rows} rows in {self.wall_s:.1f}s: {self.ok} answered ({self.cached} from cache), "
            f"{self.failed} failed; {rate:.2f} new answers/s",
            f"{desc}: {self.requests} requests ({self.retries} retries), "
            f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens",
        ]
        cost = self.cost(cfg)
        if cost is not None:
            lines[-1] += f", cost ${cost:.4f}"
        if self.flags:
            lines.append(f"{desc}: flagged " + ", ".join(f"{k} {v}" for k, v in sorted(self.flags.items())))
        for err, count in self.errors.most_common(3):
            lines.append(f"{desc}: {count}x {err}")
        return "\n".join(lines)
