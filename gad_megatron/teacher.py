"""One client for every OpenAI-compatible chat endpoint: the teacher and, later, the LLM judge.

- :class:`ChatClient` sends one chat completion (teacher-side system prompt and few-shot context
  prepended) and applies this module's retry policy: jittered exponential backoff on 408, 409, 429,
  5xx, timeouts, dropped connections and unreadable responses, honouring ``Retry-After``. The
  ``openai`` client's own retries are off (``max_retries=0``) so there is exactly one policy.
- :func:`run_requests` answers many requests with bounded concurrency, a progress bar and a
  durable cache (:mod:`gad_megatron.cache`): each answer is committed before it counts as done, so a killed
  run resumes without asking again, and a repeated run asks nothing.

Failures are results, not exceptions: after ``max_attempts`` (or at once for a non-retryable
error) a :class:`Completion` comes back with ``error`` set. Failures are not cached, so the next
run asks again for them and only them. 401/403/404 mean the endpoint, model or key is wrong for
every request: after the first one, the remaining requests are not sent.

The API key is read from the environment variable the config names and is never logged, stored,
or put into an error message (it is redacted from any server text we keep).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import ipaddress
import logging
import os
import random
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from gad_megatron.cache import ResponseCache, cache_key, normalize_sampling
from gad_megatron.config import ConfigError, TeacherConfig

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

RETRYABLE_STATUS = frozenset({408, 409, 429})
FATAL_STATUS = frozenset({401, 403, 404})  # wrong key, no access, wrong model/URL: the same for every request
SAMPLING_PARAMS = ("temperature", "top_p", "max_tokens", "n", "seed", "stop", "presence_penalty", "frequency_penalty")
NO_KEY = "not-needed"  # sent to local endpoints that take no key (the openai client insists on one)

# --------------------------------------------------------------------------------------------------
# Retry policy (pure functions)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff parameters. Attempt limit and timeout live in :class:`TeacherConfig`."""

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


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


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


# --------------------------------------------------------------------------------------------------
# Results


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


class MalformedResponse(Exception):
    """A 200 answer that is not a usable chat completion (truncated JSON, no choices...)."""


# --------------------------------------------------------------------------------------------------
# The client


def _is_loopback(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(cfg: TeacherConfig) -> str:
    """The key from the environment variable ``cfg.api_key_env`` (local endpoints may go without)."""
    if cfg.api_key_env is None:
        return NO_KEY
    value = os.environ.get(cfg.api_key_env, "").strip()
    if value:
        return value
    if _is_loopback(cfg.base_url):
        log.debug("%s is not set; sending no key to the local endpoint %s", cfg.api_key_env, cfg.base_url)
        return NO_KEY
    raise ConfigError(
        f"api_key_env: environment variable {cfg.api_key_env} is not set (endpoint {cfg.base_url}); "
        "export the key there, or set api_key_env: null for an endpoint without authentication"
    )


def _quiet_http_loggers() -> None:
    # httpx logs every request at INFO: that would bury the progress bar (and log URLs).
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


@dataclass
class _Failure:
    action: str  # retry | fatal | fail
    message: str
    retry_after: float | None = None


def _classify(exc: BaseException) -> _Failure:
    import openai

    name = type(exc).__name__
    if isinstance(exc, openai.APIStatusError):
        body = (exc.message or "").replace("\n", " ")[:300]
        retry_after = parse_retry_after(dict(exc.response.headers)) if exc.response is not None else None
        return _Failure(status_action(exc.status_code), f"HTTP {exc.status_code}: {body}", retry_after)
    if isinstance(exc, (openai.APITimeoutError, TimeoutError, asyncio.TimeoutError)):
        return _Failure("retry", "timeout")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return _Failure("retry", f"connection error: {type(cause).__name__ if cause else name}")
    if isinstance(exc, (MalformedResponse, ValueError, openai.APIResponseValidationError)):
        # json.JSONDecodeError and pydantic's ValidationError are ValueErrors: a truncated or garbled body.
        return _Failure("retry", f"malformed response: {name}: {str(exc)[:200]}")
    if isinstance(exc, OSError) or type(exc).__module__.startswith(("httpx", "httpcore", "h11", "anyio")):
        return _Failure("retry", f"transport error: {name}")
    return _Failure("fail", f"unexpected error: {name}: {str(exc)[:200]}")


def _uses_max_completion_tokens(model: str) -> bool:
    # OpenAI's reasoning models reject `max_tokens`.
    return re.match(r"^(o\d|gpt-5)", model) is not None


class ChatClient:
    """Async chat-completion client for one endpoint, with the teacher-side context and retry policy.

    Use one instance per event loop (``async with ChatClient(cfg) as client: ...``).
    """

    def __init__(
        self,
        cfg: TeacherConfig,
        policy: RetryPolicy | None = None,
        http_client: Any = None,
        rng: random.Random | None = None,
    ):
        from openai import AsyncOpenAI

        self.cfg = cfg
        self.policy = policy or RetryPolicy()
        self._key = resolve_api_key(cfg)
        self._secrets = [self._key] if self._key != NO_KEY else []
        self._client = AsyncOpenAI(
            api_key=self._key, base_url=cfg.base_url, max_retries=0, timeout=cfg.timeout_s, http_client=http_client
        )
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._rng = rng or random.Random()
        self._pause_until = 0.0
        self._fatal: str | None = None
        self.stats = RequestStats()
        _quiet_http_loggers()

    # -- request shape --------------------------------------------------------------------------

    def sampling(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The sampling params sent (config values, then ``overrides``); also part of the cache key."""
        params: dict[str, Any] = {
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "max_tokens": self.cfg.max_tokens,
            "n": self.cfg.n,
        }
        for name, value in (overrides or {}).items():
            if name not in SAMPLING_PARAMS:
                raise ValueError(f"unknown sampling parameter '{name}' (known: {', '.join(SAMPLING_PARAMS)})")
            params[name] = value
        return normalize_sampling(params)

    def teacher_messages(self, messages: Sequence[Mapping[str, str]]) -> Messages:
        """What the endpoint sees: system prompt, hidden few-shot turns, then the row's messages."""
        out: Messages = []
        if self.cfg.system_prompt:
            out.append({"role": "system", "content": self.cfg.system_prompt})
        out.extend({"role": m.role, "content": m.content} for m in self.cfg.context_messages)
        out.extend({"role": m["role"], "content": m["content"]} for m in messages)
        return out

    def cache_key(self, messages: Sequence[Mapping[str, str]], sampling: Mapping[str, Any]) -> str:
        return cache_key(
            base_url=self.cfg.cache_namespace or self.cfg.base_url,
            model=self.cfg.model,
            system_prompt=self.cfg.system_prompt,
            context_messages=[{"role": m.role, "content": m.content} for m in self.cfg.context_messages],
            messages=messages,
            sampling=sampling,
        )

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    # -- sending --------------------------------------------------------------------------------

    async def _send(self, messages: Messages, sampling: dict[str, Any]) -> Any:
        params = dict(sampling)
        if _uses_max_completion_tokens(self.cfg.model) and "max_tokens" in params:
            params["max_completion_tokens"] = params.pop("max_tokens")
        return await self._client.chat.completions.create(model=self.cfg.model, messages=messages, **params)

    def _to_completion(self, resp: Any, attempts: int, latency_s: float) -> Completion:
        choices = getattr(resp, "choices", None)
        if not choices:
            raise MalformedResponse("response has no choices" if isinstance(choices, list) else "not a chat completion")
        texts, reasons, refusals = [], [], []
        for choice in choices:
            message = getattr(choice, "message", None)
            if message is None:
                raise MalformedResponse("choice without a message")
            texts.append(message.content or "")
            reasons.append(choice.finish_reason)
            refusals.append(getattr(message, "refusal", None))
        usage = getattr(resp, "usage", None)
        return Completion(
            text=texts[0],
            finish_reason=reasons[0],
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            latency_s=round(latency_s, 4),
            attempts=attempts,
            flags=response_flags(texts, reasons, refusals),
            texts=texts if len(texts) > 1 else [],
        )

    async def _wait_for_pause(self) -> None:
        while (wait := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    async def complete(self, messages: Sequence[Mapping[str, str]], **sampling_overrides: Any) -> Completion:
        """Ask once (retrying per the policy); never raises for endpoint trouble: see ``error``."""
        sampling = self.sampling(sampling_overrides)
        sent = self.teacher_messages(messages)
        started = time.monotonic()
        attempt = 0
        while True:
            await self._wait_for_pause()
            if self._fatal is not None:
                return Completion.failure(f"not sent: {self._fatal}", attempts=attempt)
            attempt += 1
            async with self._sem:
                t0 = time.monotonic()
                self.stats.requests += 1
                try:
                    resp = await asyncio.wait_for(self._send(sent, sampling), timeout=self.cfg.timeout_s)
                    result = self._to_completion(resp, attempt, time.monotonic() - t0)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - classified below; unknown errors fail this request only
                    failure = _classify(exc)
                    if failure.action == "fail" and failure.message.startswith("unexpected"):
                        log.debug("unexpected error from the endpoint", exc_info=True)
                else:
                    self.stats.prompt_tokens += result.prompt_tokens
                    self.stats.completion_tokens += result.completion_tokens
                    return result
            message = self.redact(failure.message)
            if failure.action == "fatal" and self._fatal is None:
                self._fatal = message
                log.error("%s (%s): %s; not sending the remaining requests", self.cfg.base_url, self.cfg.model, message)
            if failure.action != "retry" or attempt >= self.cfg.max_attempts:
                return Completion.failure(message, attempts=attempt, latency_s=round(time.monotonic() - started, 4))
            delay = backoff_delay(attempt, self._rng.random(), self.policy, failure.retry_after)
            if failure.retry_after is not None:
                # The server said when to come back: hold every request, not just this one.
                self._pause_until = max(self._pause_until, time.monotonic() + delay)
            self.stats.retries += 1
            log.debug("attempt %d/%d failed (%s); retrying in %.2fs", attempt, self.cfg.max_attempts, message, delay)
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "ChatClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --------------------------------------------------------------------------------------------------
# Bulk requests: cache + concurrency + progress


def _progress(desc: str, total: int, enabled: bool | None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            elapsed = task.elapsed or 0.0
            fresh = task.fields.get("fresh", 0)
            return Text(f"{fresh / elapsed:.2f}/s" if elapsed > 0 and fresh else "-/s", style="cyan")

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed[/] "
                   "[dim]{task.fields[cached]} cached[/]"),
        RateColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=(not console.is_terminal) if enabled is None else not enabled,
    )
    task = progress.add_task(desc, total=total, done=0, failed=0, cached=0, fresh=0)
    return progress, task


async def arun_requests(
    cfg: TeacherConfig,
    requests: Sequence[tuple[str, Sequence[Mapping[str, str]]]],
    cache_path: str | Path,
    desc: str = "teacher",
    sampling: Mapping[str, Any] | None = None,
    *,
    policy: RetryPolicy | None = None,
    progress: bool | None = None,
    http_client: Any = None,
) -> tuple[dict[str, Completion], RequestStats]:
    """Answer every ``(key, messages)``: cached answers first, the rest with bounded concurrency.

    Identical requests (same cache key) are sent once. Returns key -> :class:`Completion` for every
    key, and the batch's counters.
    """
    started = time.monotonic()
    ids = [rid for rid, _ in requests]
    if len(set(ids)) != len(ids):
        dup = next(k for k, n in Counter(ids).items() if n > 1)
        raise ValueError(f"duplicate request key '{dup}'")
    client = ChatClient(cfg, policy=policy, http_client=http_client)
    stats = client.stats
    stats.rows = len(requests)
    params = client.sampling(sampling)
    groups: dict[str, list[str]] = {}
    messages_of: dict[str, Sequence[Mapping[str, str]]] = {}
    for rid, messages in requests:
        key = client.cache_key(messages, params)
        groups.setdefault(key, []).append(rid)
        messages_of.setdefault(key, messages)

    results: dict[str, Completion] = {}
    cache = ResponseCache(cache_path)
    bar, task = _progress(desc, len(requests), progress)
    counts = {"done": 0, "failed": 0, "cached": 0, "fresh": 0}
    failures_logged = 0

    def record(key: str, completion: Completion) -> None:
        nonlocal failures_logged
        n = len(groups[key])
        for rid in groups[key]:
            results[rid] = completion
        if completion.ok:
            stats.ok += n
            counts["done"] += n
            stats.flags.update({flag: n for flag in completion.flags})
        else:
            stats.failed += n
            counts["failed"] += n
            stats.errors[completion.error] += n
            if failures_logged < 5:
                failures_logged += 1
                log.warning("%s: request %s failed after %d attempt(s): %s", desc, groups[key][0], completion.attempts, completion.error)
        if completion.cached:
            stats.cached += n
            counts["cached"] += n
        else:
            counts["fresh"] += n
        bar.update(task, advance=n, **counts)

    try:
        with bar:
            for key, value in cache.get_many(groups).items():
                record(key, Completion.from_cache(value))
            todo = iter([key for key in groups if groups[key][0] not in results])

            async def worker() -> None:
                for key in todo:
                    completion = await client.complete(messages_of[key], **(sampling or {}))
                    if completion.ok:
                        cache.put(key, completion.to_cache())  # durable before it counts as done
                    record(key, completion)

            async with asyncio.TaskGroup() as tg:
                for _ in range(cfg.concurrency):
                    tg.create_task(worker())
    finally:
        cache.close()
        await client.aclose()
        stats.wall_s = time.monotonic() - started
    return results, stats


def _run_sync(coro: Any) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside an event loop (a notebook, an async reward function): use a fresh loop elsewhere.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def run_requests_with_stats(
    cfg: TeacherConfig,
    requests: Sequence[tuple[str, Sequence[Mapping[str, str]]]],
    cache_path: str | Path,
    desc: str = "teacher",
    sampling: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Completion], RequestStats]:
    """Synchronous :func:`arun_requests`."""
    return _run_sync(arun_requests(cfg, requests, cache_path, desc, sampling, **kwargs))


def run_requests(
    cfg: TeacherConfig,
    requests: Sequence[tuple[str, Sequence[Mapping[str, str]]]],
    cache_path: str | Path,
    desc: str = "teacher",
    sampling: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Completion]:
    """Key -> :class:`Completion` for every request (cached, bounded concurrency, resumable)."""
    return run_requests_with_stats(cfg, requests, cache_path, desc, sampling, **kwargs)[0]
