"""The retry policy: which failures are retried, after how long, and which stop every request.

Pure functions but :func:`classify_error`, which reads the ``openai`` client's exception types.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from typing import Mapping

RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({401, 403, 404})  # wrong key, no access, wrong model/URL: the same for every request


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff parameters. Attempt limit and timeout live in :class:`~gad_megatron.config.TeacherConfig`."""

    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 120.0


def backoff_delay(
    attempt: int,
    rand: float,
    policy: RetryPolicy = RetryPolicy(),
    retry_after: float | None = None,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Full jitter: ``rand * min(cap, base * 2**(attempt-1))`` with ``rand`` uniform in [0, 1).
    A server's ``Retry-After`` is a floor (capped at ``max_retry_after_s``): never retry sooner.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    rand = min(max(rand, 0.0), 1.0)
    window = min(policy.cap_s, policy.base_s * 2.0 ** (attempt - 1))
    delay = rand * window
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, policy.max_retry_after_s))
    return delay


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, ``Retry-After`` seconds or HTTP date."""
    lower = {k.lower(): v for k, v in headers.items()}
    raw_ms = lower.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(float(raw_ms) / 1000.0, 0.0)
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def status_action(status: int) -> str:
    """``"retry"``, ``"fatal"`` (stop sending: config is wrong) or ``"fail"`` (this request only)."""
    if status in RETRYABLE_STATUS or status >= 500:
        return "retry"
    if status in FATAL_STATUS:
        return "fatal"
    return "fail"


class MalformedResponse(Exception):
    """A 200 answer that is not a usable chat completion (truncated JSON, no choices...)."""


@dataclass
class Failure:
    """A failed attempt, classified: what to do next, a message safe to keep, the server's wait."""

    action: str  # retry | fatal | fail
    message: str
    retry_after: float | None = None


def classify_error(exc: BaseException) -> Failure:
    """Retry, fail this request, or stop every request, for an exception raised while sending."""
    import openai

    name = type(exc).__name__
    if isinstance(exc, openai.APIStatusError):
        body = (exc.message or "").replace("\n", " ")[:300]
        retry_after = parse_retry_after(dict(exc.response.headers)) if exc.response is not None else None
        return Failure(status_action(exc.status_code), f"HTTP {exc.status_code}: {body}", retry_after)
    if isinstance(exc, (openai.APITimeoutError, TimeoutError, asyncio.TimeoutError)):
        return Failure("retry", "timeout")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return Failure("retry", f"connection error: {type(cause).__name__ if cause else name}")
    if isinstance(exc, (MalformedResponse, ValueError, openai.APIResponseValidationError)):
        # json.JSONDecodeError and pydantic's ValidationError are ValueErrors: a truncated or garbled body.
        return Failure("retry", f"malformed response: {name}: {str(exc)[:200]}")
    if isinstance(exc, OSError) or type(exc).__module__.startswith(("httpx", "httpcore", "h11", "anyio")):
        return Failure("retry", f"transport error: {name}")
    return Failure("fail", f"unexpected error: {name}: {str(exc)[:200]}")
