"""Unit tests of the teacher client: backoff policy, cache keys, the SQLite cache, retries, key hygiene, and
``collect`` over it.

The endpoint is an in-process mock transport here; tests against a real server are in
test_collect_server.py and test_collect_faults.py.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import sqlite3
import time

import pytest
from pydantic import ValidationError

from gad_megatron import collect as collect_module
from gad_megatron.cache import ResponseCache, cache_key
from gad_megatron.config import ConfigError, Message, TeacherConfig
from gad_megatron.teacher.bulk import run_requests_with_stats
from gad_megatron.teacher.client import ChatClient, resolve_api_key
from gad_megatron.teacher.results import Completion, RequestStats, response_flags
from gad_megatron.teacher.retry import RetryPolicy, backoff_delay, parse_retry_after, status_action

try:  # the openai package moved to httpx2; older releases use httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

FAST = RetryPolicy(base_s=0.01, cap_s=0.05)
SECRET = "sk-unit-secret-9f8e7d"


# --------------------------------------------------------------------------------------------------
# backoff policy


def test_backoff_grows_exponentially_and_is_capped():
    policy = RetryPolicy(base_s=0.5, cap_s=4.0)
    top = [backoff_delay(a, rand=1.0, policy=policy) for a in range(1, 8)]
    assert top == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert backoff_delay(3, rand=0.0, policy=policy) == 0.0


def test_backoff_full_jitter_stays_in_window():
    rng = random.Random(0)
    policy = RetryPolicy(base_s=1.0, cap_s=60.0)
    delays = [backoff_delay(4, rand=rng.random(), policy=policy) for _ in range(2000)]
    assert min(delays) >= 0.0 and max(delays) <= 8.0
    assert 3.0 < sum(delays) / len(delays) < 5.0  # uniform on [0, 8]: mean 4
    assert len({round(d, 6) for d in delays}) > 1000  # jittered, not synchronized


def test_backoff_honours_retry_after_as_a_floor_with_a_cap():
    policy = RetryPolicy(base_s=0.5, cap_s=30.0, max_retry_after_s=20.0)
    assert backoff_delay(1, rand=0.5, policy=policy, retry_after=7.0) == 7.0
    assert backoff_delay(8, rand=1.0, policy=policy, retry_after=2.0) == 30.0  # own backoff larger
    assert backoff_delay(1, rand=0.0, policy=policy, retry_after=3600.0) == 20.0
    with pytest.raises(ValueError):
        backoff_delay(0, rand=0.5)


def test_parse_retry_after_forms():
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after": " 1.5 "}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28.0 <= parse_retry_after({"Retry-After": date}, now=now) <= 31.0
    assert parse_retry_after({"Retry-After": email.utils.formatdate(now - 30, usegmt=True)}, now=now) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize("status,action", [
    (408, "retry"), (409, "retry"), (429, "retry"), (500, "retry"), (502, "retry"), (503, "retry"), (504, "retry"),
    (401, "fatal"), (403, "fatal"), (404, "fatal"), (400, "fail"), (422, "fail"),
])
def test_status_actions(status, action):
    assert status_action(status) == action


def test_response_flags():
    assert response_flags(["fine"], ["stop"]) == []
    assert response_flags(["  "], ["stop"]) == ["empty"]
    assert response_flags(["cut off"], ["length"]) == ["truncated"]
    assert response_flags([""], ["content_filter"]) == ["empty", "content_filter"]
    assert response_flags(["no"], ["stop"], ["I can't help with that"]) == ["content_filter"]


# --------------------------------------------------------------------------------------------------
# cache key and cache


BASE_KEY = dict(
    base_url="http://127.0.0.1:8000/v1",
    model="teacher",
    system_prompt="be brief",
    context_messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    messages=[{"role": "user", "content": "hello"}],
    sampling={"temperature": 0.8, "top_p": 1.0, "max_tokens": 64, "n": 1},
)


@pytest.mark.parametrize("field,value", [
    ("base_url", "http://127.0.0.1:8001/v1"),
    ("model", "other-teacher"),
    ("system_prompt", "be verbose"),
    ("system_prompt", None),
    ("context_messages", []),
    ("context_messages", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}]),
    ("messages", [{"role": "user", "content": "hello!"}]),
    ("messages", [{"role": "system", "content": "hello"}]),
    ("sampling", {"temperature": 0.7, "top_p": 1.0, "max_tokens": 64, "n": 1}),
    ("sampling", {"temperature": 0.8, "top_p": 0.9, "max_tokens": 64, "n": 1}),
    ("sampling", {"temperature": 0.8, "top_p": 1.0, "max_tokens": 65, "n": 1}),
    ("sampling", {"temperature": 0.8, "top_p": 1.0, "max_tokens": 64, "n": 2}),
    ("sampling", {"temperature": 0.8, "top_p": 1.0, "max_tokens": 64, "n": 1, "seed": 3}),
])
def test_cache_key_includes_every_field(field, value):
    assert cache_key(**{**BASE_KEY, field: value}) != cache_key(**BASE_KEY)


def test_cache_key_is_canonical():
    same = dict(BASE_KEY, base_url="http://127.0.0.1:8000/v1/",
                sampling={"n": 1, "max_tokens": 64, "top_p": 1, "temperature": 0.8, "seed": None})
    assert cache_key(**same) == cache_key(**BASE_KEY)
    assert len(cache_key(**BASE_KEY)) == 64


def test_client_cache_key_covers_teacher_context(monkeypatch):
    cfg = TeacherConfig(base_url="http://127.0.0.1:1/v1", model="m", api_key_env=None)
    msgs = [{"role": "user", "content": "hi"}]
    keys = set()
    for variant in (
        cfg,
        cfg.model_copy(update={"system_prompt": "sys"}),
        cfg.model_copy(update={"context_messages": [Message(role="user", content="x")]}),
    ):
        client = ChatClient(variant)
        keys.add(client.cache_key(msgs, client.sampling()))
    assert len(keys) == 3


def test_cache_namespace_survives_a_new_port():
    msgs = [{"role": "user", "content": "hi"}]
    a = TeacherConfig(base_url="http://127.0.0.1:1111/v1", model="m", api_key_env=None, cache_namespace="local teacher")
    b = a.model_copy(update={"base_url": "http://127.0.0.1:2222/v1"})
    ka, kb = (ChatClient(c).cache_key(msgs, ChatClient(c).sampling()) for c in (a, b))
    assert ka == kb
    plain = [a.model_copy(update={"cache_namespace": None}), b.model_copy(update={"cache_namespace": None})]
    assert len({ChatClient(c).cache_key(msgs, ChatClient(c).sampling()) for c in plain}) == 2


def test_response_cache_roundtrip_and_wal(tmp_path):
    path = tmp_path / "c.sqlite"
    with ResponseCache(path) as cache:
        assert len(cache) == 0
        for i in range(520):
            cache.put(f"k{i}", {"text": f"t{i}"})
        cache.put("k0", {"text": "replaced"})
    with ResponseCache(path) as cache:
        assert len(cache) == 520
        assert cache.get("k0") == {"text": "replaced"}
        assert cache.get("missing") is None
        got = cache.get_many([f"k{i}" for i in range(700)])  # more keys than one SQL query takes
        assert set(got) == {f"k{i}" for i in range(520)} and got["k519"] == {"text": "t519"}
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_unusable_cache_file_is_a_clear_error(tmp_path):
    path = tmp_path / "c.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="not a usable answer cache"):
        ResponseCache(path)


def test_completion_cache_roundtrip():
    c = Completion(text="a", finish_reason="stop", prompt_tokens=3, completion_tokens=1, latency_s=0.1,
                   attempts=2, flags=["truncated"])
    back = Completion.from_cache(json.loads(json.dumps(c.to_cache())))
    assert back.cached and back.text == "a" and back.attempts == 2 and back.flags == ["truncated"]


# --------------------------------------------------------------------------------------------------
# the client against a mock transport


def answer_to(messages: list[dict]) -> str:
    """The mock's answer: derived from the last message, so a swapped or duplicated answer shows."""
    return f"answer to {messages[-1]['content']!r}"


def ok_body(text: str, finish: str = "stop", n: int = 1) -> dict:
    return {
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": i, "message": {"role": "assistant", "content": f"{text}{i or ''}"}, "finish_reason": finish}
                    for i in range(n)],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


class Script:
    """Mock endpoint answering from a list of (status, body, headers) / exceptions, then ``default``.

    Without a ``default``, a 200 whose text is :func:`answer_to` the request's messages.
    """

    def __init__(self, steps=(), default=None):
        self.steps = list(steps)
        self.default = default
        self.calls: list[dict] = []

    async def __call__(self, request):
        sent = json.loads(request.content)
        self.calls.append({"auth": request.headers.get("authorization"), "body": sent})
        step = self.steps.pop(0) if self.steps else self.default or (200, ok_body(answer_to(sent["messages"])), {})
        if isinstance(step, Exception):
            raise step
        status, body, headers = step
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers={"content-type": "application/json", **headers})


def make_client(script: Script, **cfg_kw) -> ChatClient:
    cfg = TeacherConfig(**{"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": None,
                           "max_attempts": 4, "timeout_s": 5.0, **cfg_kw})
    return ChatClient(cfg, policy=FAST, http_client=httpx.AsyncClient(transport=httpx.MockTransport(script)))


async def _one(client: ChatClient, messages=None, **kw) -> Completion:
    async with client:
        return await client.complete(messages or [{"role": "user", "content": "hi"}], **kw)


def test_client_prepends_teacher_context_and_sends_sampling():
    script = Script()
    client = make_client(script, system_prompt="SYS", temperature=0.3, max_tokens=17,
                         context_messages=[Message(role="user", content="demo q"), Message(role="assistant", content="demo a")])
    c = asyncio.run(_one(client, [{"role": "user", "content": "real q"}], top_p=0.5))
    assert c.ok and c.text == answer_to([{"content": "real q"}]) and c.finish_reason == "stop" and c.attempts == 1
    assert (c.prompt_tokens, c.completion_tokens) == (5, 2)
    body = script.calls[0]["body"]
    assert [m["content"] for m in body["messages"]] == ["SYS", "demo q", "demo a", "real q"]
    assert body["temperature"] == 0.3 and body["max_tokens"] == 17 and body["top_p"] == 0.5 and body["n"] == 1


def test_retry_after_is_honoured_then_success():
    script = Script([(429, {"error": {"message": "slow down"}}, {"Retry-After": "0.3"})])
    t0 = time.monotonic()
    c = asyncio.run(_one(make_client(script)))
    assert c.ok and c.attempts == 2 and len(script.calls) == 2
    assert time.monotonic() - t0 >= 0.3


@pytest.mark.parametrize("step", [
    (500, {"error": {"message": "boom"}}, {}),
    (503, {"error": {"message": "busy"}}, {}),
    (408, {"error": {"message": "timeout"}}, {}),
    (409, {"error": {"message": "conflict"}}, {}),
    (200, b'{"id": "x", "choices": [{"index": 0, "mess', {}),
    (200, {"id": "x", "object": "chat.completion", "choices": []}, {}),
    httpx.ConnectError("refused"),
    httpx.RemoteProtocolError("server disconnected"),
    httpx.ReadTimeout("slow"),
])
def test_transient_errors_are_retried(step):
    script = Script([step, step])
    c = asyncio.run(_one(make_client(script)))
    assert c.ok and c.attempts == 3 and len(script.calls) == 3 and c.text == answer_to([{"content": "hi"}])


def test_attempts_are_bounded_and_failure_is_recorded():
    script = Script(default=(500, {"error": {"message": "down"}}, {}))
    client = make_client(script, max_attempts=3)
    c = asyncio.run(_one(client))
    assert not c.ok and c.text == "" and c.attempts == 3 and len(script.calls) == 3
    assert "HTTP 500" in c.error
    assert client.stats.requests == 3 and client.stats.retries == 2


def test_non_retryable_error_fails_at_once():
    script = Script(default=(400, {"error": {"message": "prompt too long"}}, {}))
    c = asyncio.run(_one(make_client(script)))
    assert not c.ok and c.attempts == 1 and "HTTP 400" in c.error and "prompt too long" in c.error


def test_hanging_request_times_out_and_retries():
    class Hang(Script):
        cancelled = False

        async def __call__(self, request):
            if not self.calls:
                self.calls.append({})
                try:
                    await asyncio.sleep(30)  # were it not cancelled, this attempt would succeed late: attempts == 1
                except asyncio.CancelledError:
                    self.cancelled = True
                    raise
            return await super().__call__(request)

    script = Hang()
    c = asyncio.run(_one(make_client(script, timeout_s=0.3)))
    assert script.cancelled and c.ok and c.attempts == 2 and len(script.calls) == 2


def test_fatal_status_stops_further_requests():
    script = Script(default=(401, {"error": {"message": "bad key"}}, {}))

    async def many():
        async with make_client(script) as client:
            return [await client.complete([{"role": "user", "content": str(i)}]) for i in range(5)]

    results = asyncio.run(many())
    assert len(script.calls) == 1
    assert all(not c.ok and "401" in c.error for c in results)
    assert results[1].error.startswith("not sent") and results[1].attempts == 0


def test_n_choices_and_flags():
    script = Script(default=(200, ok_body("x", finish="length", n=3), {}))
    c = asyncio.run(_one(make_client(script, n=3)))
    assert c.texts == ["x", "x1", "x2"] and c.text == "x" and c.flags == ["truncated"]


def test_unknown_sampling_parameter_is_rejected():
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        asyncio.run(_one(make_client(Script()), tempreature=0.1))


# --------------------------------------------------------------------------------------------------
# the key: only from the environment, never in logs or errors


def test_api_key_resolution(monkeypatch):
    remote = TeacherConfig(base_url="https://api.example.com/v1", model="m", api_key_env="GAD_UNIT_KEY")
    monkeypatch.delenv("GAD_UNIT_KEY", raising=False)
    with pytest.raises(ConfigError, match="GAD_UNIT_KEY"):
        resolve_api_key(remote)
    local = remote.model_copy(update={"base_url": "http://127.0.0.1:8000/v1"})
    assert resolve_api_key(local) == "not-needed"
    monkeypatch.setenv("GAD_UNIT_KEY", SECRET)
    assert resolve_api_key(remote) == SECRET


def test_key_is_sent_but_never_logged_or_kept(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("GAD_UNIT_KEY", SECRET)
    echo = {"error": {"message": f"invalid key Bearer {SECRET}"}}
    script = Script([(500, echo, {}), (400, echo, {})])
    caplog.set_level(logging.DEBUG)
    client = make_client(script, api_key_env="GAD_UNIT_KEY")
    c = asyncio.run(_one(client))
    assert script.calls[0]["auth"] == f"Bearer {SECRET}"  # the key does reach the endpoint
    assert not c.ok and SECRET not in c.error and "***" in c.error
    assert caplog.records and SECRET not in caplog.text
    assert SECRET not in repr(client.cfg) and SECRET not in client.cfg.model_dump_json()


# --------------------------------------------------------------------------------------------------
# bulk helper


def test_run_requests_caches_dedupes_and_retries_only_failures(tmp_path):
    cfg = TeacherConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None, max_attempts=2, concurrency=3)
    reqs = [(f"r{i}", [{"role": "user", "content": f"q{i % 5}"}]) for i in range(8)]  # 5 distinct prompts
    script = Script()
    bad = {"error": {"message": "no"}}

    async def handler(request):
        if json.loads(request.content)["messages"][-1]["content"] == "q4":
            script.calls.append({})
            return httpx.Response(400, json=bad)
        return await script(request)

    def run(h):
        transport = httpx.AsyncClient(transport=httpx.MockTransport(h))
        return run_requests_with_stats(cfg, reqs, tmp_path / "c.sqlite", policy=FAST, http_client=transport, progress=False)

    results, stats = run(handler)
    assert set(results) == {f"r{i}" for i in range(8)}
    assert len(script.calls) == 5  # duplicates sent once
    assert not results["r4"].ok
    assert all(results[rid].text == answer_to(msgs) for rid, msgs in reqs if rid != "r4")  # r5 shares r0's answer
    assert (stats.ok, stats.failed, stats.cached, stats.requests) == (7, 1, 0, 5)

    script.calls.clear()
    results, stats = run(handler)
    assert len(script.calls) == 1  # only the failed prompt is asked again
    assert (stats.ok, stats.failed, stats.cached, stats.requests) == (7, 1, 7, 1)
    assert all(results[rid].cached and results[rid].text == answer_to(msgs) for rid, msgs in reqs if rid != "r4")


def test_collect_gives_every_row_its_own_answer_fresh_and_cached(tmp_path, monkeypatch):
    n = 12
    records = [{"id": f"r{i}", "prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(n)]
    cfg = TeacherConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None, concurrency=4)
    script = Script()

    async def earliest_answers_last(request):  # answers come back in another order than asked
        await asyncio.sleep(0.01 * (n - int(json.loads(request.content)["messages"][-1]["content"][1:])))
        return await script(request)

    def with_mock(*args, **kw):
        mock = httpx.AsyncClient(transport=httpx.MockTransport(earliest_answers_last))
        return run_requests_with_stats(*args, http_client=mock, **kw)

    monkeypatch.setattr(collect_module, "run_requests_with_stats", with_mock)
    for order in (records, records[::-1]):  # fresh, then from the cache in reverse order
        rows, stats = collect_module.collect(order, cfg, tmp_path / "c.sqlite", policy=FAST, progress=False)
        assert [r["id"] for r in rows] == [r["id"] for r in order]
        assert [r["teacher_response"] for r in rows] == [answer_to(r["prompt"]) for r in order]
    assert len(script.calls) == n and stats.cached == n


def test_run_requests_works_inside_a_running_loop(tmp_path):
    cfg = TeacherConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=None)
    script = Script()

    async def inside():
        return run_requests_with_stats(cfg, [("a", [{"role": "user", "content": "x"}])], tmp_path / "c.sqlite",
                                       http_client=httpx.AsyncClient(transport=httpx.MockTransport(script)),
                                       progress=False)

    assert asyncio.run(inside())[0]["a"].text == answer_to([{"content": "x"}])


def test_summary_reports_cost():
    cfg = TeacherConfig(base_url="http://x/v1", model="m", price_per_1m_prompt_tokens=2.0,
                        price_per_1m_completion_tokens=8.0)
    stats = RequestStats(rows=3, ok=3, requests=4, retries=1, prompt_tokens=1_000_000, completion_tokens=500_000,
                         wall_s=2.0)
    assert stats.cost(cfg) == pytest.approx(6.0)
    text = stats.summary(cfg)
    assert "4 requests (1 retries)" in text and "cost $6.0000" in text
    assert stats.cost(cfg.model_copy(update={"price_per_1m_prompt_tokens": None,
                                             "price_per_1m_completion_tokens": None})) is None


def test_extra_sampling_goes_in_the_body_and_the_cache_key():
    """Server-specific fields (llama.cpp's top_k, min_p...) reach the endpoint and tell cached answers apart."""
    script = Script()
    extra = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
    client = make_client(script, extra_sampling=extra)
    c = asyncio.run(_one(client, [{"role": "user", "content": "q"}], min_p=0.1))
    assert c.ok
    body = script.calls[0]["body"]
    assert (body["top_k"], body["min_p"], body["repeat_penalty"]) == (0, 0.1, 1.0) and body["temperature"] == 0.8
    plain_script = Script()
    plain = make_client(plain_script)
    messages = [{"role": "user", "content": "q"}]
    assert client.cache_key(messages, client.sampling()) != plain.cache_key(messages, plain.sampling())
    assert plain.cache_key(messages, plain.sampling()) == plain.cache_key(messages, plain.sampling({"n": 1}))
    asyncio.run(_one(plain, messages))
    assert not {"top_k", "min_p", "repeat_penalty"} & set(plain_script.calls[0]["body"])  # no extras, none sent
    with pytest.raises(ValueError, match="unknown sampling parameter 'top_k'"):
        plain.sampling({"top_k": 5})


def test_extra_sampling_cannot_shadow_a_standard_field():
    with pytest.raises(ValidationError, match="temperature has its own field"):
        TeacherConfig(base_url="http://127.0.0.1:9/v1", model="m", extra_sampling={"temperature": 1.0, "top_k": 5})
