"""The chat-completion client of one endpoint: request shape, API key, sending with retries."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import re
import time
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

from gad_megatron.cache import cache_key, normalize_sampling
from gad_megatron.config import SAMPLING_PARAMS, ConfigError, TeacherConfig
from gad_megatron.data import Messages
from gad_megatron.teacher.results import Completion, RequestStats, response_flags
from gad_megatron.teacher.retry import MalformedResponse, RetryPolicy, backoff_delay, classify_error

log = logging.getLogger(__name__)

NO_KEY = "not-needed"  # sent to local endpoints that take no key (the openai client insists on one)


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


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
            **self.cfg.extra_sampling,
        }
        for name, value in (overrides or {}).items():
            if name not in SAMPLING_PARAMS and name not in self.cfg.extra_sampling:
                known = ", ".join((*SAMPLING_PARAMS, *self.cfg.extra_sampling))
                raise ValueError(f"unknown sampling parameter '{name}' (known: {known})")
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
        params = {k: v for k, v in sampling.items() if k in SAMPLING_PARAMS}
        extra = {k: v for k, v in sampling.items() if k not in SAMPLING_PARAMS}  # server-specific: in the body
        if _uses_max_completion_tokens(self.cfg.model) and "max_tokens" in params:
            params["max_completion_tokens"] = params.pop("max_tokens")
        return await self._client.chat.completions.create(model=self.cfg.model, messages=messages,
                                                          extra_body=extra or None, **params)

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
                    failure = classify_error(exc)
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
