"""Failure paths against the real llama.cpp server behind a fault-injecting proxy, and kill-and-resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from gad_megatron.collect import collect, run_collect
from gad_megatron.config import TeacherConfig, parse_config
from gad_megatron.data import read_jsonl
from gad_megatron.llama_server import LlamaServer
from gad_megatron.teacher.retry import RetryPolicy
from tests.fault_proxy import FAULTS, FaultProxy, RotatingPlan

pytestmark = pytest.mark.server

FAST = RetryPolicy(base_s=0.05, cap_s=0.5)
KEY = "sk-secret-123"


@pytest.fixture(scope="module")
def server():
    with LlamaServer(n_ctx=2048) as srv:
        yield srv


N_PROMPTS = 24


def upstream(server: LlamaServer) -> str:
    return server.base_url.removesuffix("/v1")


# Each prompt's first token differs from every other's (distinct first letters), so whatever the
# server answered before, the prefix llama.cpp reuses from its KV cache ends at the same place (the
# chat template's header) and a greedy answer comes out the same in any request order. Prompts
# sharing a longer prefix ("... the number 7.", "... the number 12.") are evaluated from cached
# prefixes of different lengths, and a greedy near-tie can then flip.
TOPICS = ["Apples", "Bridges", "Clouds", "Dolphins", "Eagles", "Forests", "Glaciers", "Honey", "Islands", "Jupiter",
          "Kangaroos", "Lightning", "Mountains", "Nitrogen", "Oceans", "Penguins", "Quartz", "Rainbows", "Saturn",
          "Tigers", "Umbrellas", "Volcanoes", "Whales", "Zebras"]


def prompts(n: int) -> list[dict]:
    return [{"id": f"p{i:02d}", "prompt": f"{TOPICS[i]}: what are they? One sentence."} for i in range(n)]


def teacher_cfg(url: str, **kw) -> dict:
    return {"base_url": url, "model": "smollm2", "api_key_env": None, "temperature": 0.0, "max_tokens": 12,
            "concurrency": 3, "timeout_s": 8.0, "max_attempts": 6, **kw}


def ask_directly(server: LlamaServer, prompt: str) -> str:
    """One answer straight from the server over stdlib HTTP: neither the proxy nor the client under test."""
    cfg = teacher_cfg(server.base_url)
    body = {"model": cfg["model"], "messages": [{"role": "user", "content": prompt}],
            "temperature": cfg["temperature"], "max_tokens": cfg["max_tokens"]}
    request = urllib.request.Request(f"{server.base_url}/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def fault_free(server) -> dict[str, str]:
    """Prompt id -> the server's answer at temperature 0, asked one at a time without faults."""
    ask_directly(server, "Hello!")  # the template's header is in the KV cache from here on, as in the runs
    answers = {p["id"]: ask_directly(server, p["prompt"]) for p in prompts(N_PROMPTS)}
    assert len(set(answers.values())) == N_PROMPTS  # distinct answers: a swap or duplicate would show
    return answers


def assert_fault_free_answers(rows: list[dict], fault_free: dict[str, str]) -> None:
    """Every row holds, whole, the answer a fault-free run gave its own prompt."""
    assert [r["teacher_response"] for r in rows] == [fault_free[r["id"]] for r in rows]
    assert all(r["teacher_meta"]["error"] is None for r in rows)


def run_cfg(tmp_path: Path, url: str, n: int, **kw):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts(n)), encoding="utf-8")
    return {"run_dir": str(tmp_path / "run"), "data": {"path": str(data)}, "teacher": teacher_cfg(url, **kw)}


def cached_rows(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_faults_every_row_answered_and_rerun_sends_nothing(server, fault_free, tmp_path):
    n = N_PROMPTS
    records = [{**p, "prompt": [{"role": "user", "content": p["prompt"]}]} for p in prompts(n)]
    with FaultProxy(upstream(server), RotatingPlan(FAULTS, max_faults=2), retry_after_s=1) as proxy:
        cfg = TeacherConfig(**teacher_cfg(proxy.base_url))
        rows, stats = collect(records, cfg, tmp_path / "cache.sqlite", policy=FAST, progress=False)

        faults = proxy.fault_counts()
        faulted = sum(faults.values())
        print(f"\n{proxy.received} requests, {faulted} faulted: {dict(faults)}; {stats.summary(cfg)}")
        assert faulted / proxy.received >= 0.30
        assert set(faults) == set(FAULTS), faults  # every kind of fault happened
        # Every prompt ends with its own whole answer: nothing lost, swapped, duplicated or cut.
        assert [r["id"] for r in rows] == [r["id"] for r in records]
        assert_fault_free_answers(rows, fault_free)
        assert stats.ok == n and stats.failed == 0
        assert stats.requests == proxy.received and stats.retries == stats.requests - n
        assert sum(r["teacher_meta"]["attempts"] for r in rows) == proxy.received
        # Retry-After: 1 was honoured: nothing came back for a 429'd request sooner than 1 s later.
        by_key: dict[str, list] = {}
        for s in proxy.seen:
            by_key.setdefault(s.key, []).append(s)
        for seen in by_key.values():
            for prev, nxt in zip(seen, seen[1:]):
                if prev.fault == "429":
                    assert nxt.t - prev.t >= 0.95

        before = proxy.received
        rows2, stats2 = collect(records, cfg, tmp_path / "cache.sqlite", policy=FAST, progress=False)
        assert proxy.received == before  # zero new requests
        assert stats2.cached == n and stats2.requests == 0
        assert [r["teacher_response"] for r in rows2] == [r["teacher_response"] for r in rows]


def test_failures_are_recorded_per_row_and_only_they_are_retried(server, fault_free, tmp_path):
    plan = RotatingPlan(always={"POISON": "503", "BADREQ": "400"}, max_faults=0)
    with FaultProxy(upstream(server), plan) as proxy:
        raw = run_cfg(tmp_path, proxy.base_url, 4, max_attempts=3)
        data = Path(raw["data"]["path"])
        lines = data.read_text().splitlines()
        lines += [json.dumps({"id": "poison", "prompt": "POISON question"}),
                  json.dumps({"id": "bad", "prompt": "BADREQ question"})]
        data.write_text("\n".join(lines) + "\n")
        cfg = parse_config(raw)
        assert run_collect(cfg, policy=FAST, progress=False) == 0
        rows = {r["id"]: r for r in read_jsonl(tmp_path / "run" / "teacher.jsonl")}
        assert len(rows) == 6
        assert rows["poison"]["teacher_response"] is None and "HTTP 503" in rows["poison"]["teacher_meta"]["error"]
        assert rows["poison"]["teacher_meta"]["attempts"] == 3
        assert rows["bad"]["teacher_response"] is None and "HTTP 400" in rows["bad"]["teacher_meta"]["error"]
        assert rows["bad"]["teacher_meta"]["attempts"] == 1
        assert_fault_free_answers([rows[f"p{i:02d}"] for i in range(4)], fault_free)
        assert proxy.received == 4 + 3 + 1

        proxy.plan = None  # the endpoint recovers: a rerun asks again for the two failed rows only
        assert run_collect(cfg, policy=FAST, progress=False) == 0
        assert proxy.received == 8 + 2
        rows = read_jsonl(tmp_path / "run" / "teacher.jsonl")
        assert all(r["teacher_response"] for r in rows) and len(rows) == 6


def test_api_key_never_written_or_logged(server, tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv("GAD_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with FaultProxy(upstream(server), require_auth="sk-some-other-key") as proxy:
        cfg = parse_config(run_cfg(tmp_path, proxy.base_url, 4, api_key_env="GAD_TEST_KEY", concurrency=1))
        # Wrong key: the endpoint answers 401 and echoes the key it got. Every row fails, nothing else is sent.
        assert run_collect(cfg, policy=FAST, progress=True) == 1
        assert proxy.received == 1
        rows = read_jsonl(tmp_path / "run" / "teacher.jsonl")
        assert all(r["teacher_response"] is None and "401" in r["teacher_meta"]["error"] for r in rows)
        assert "***" in rows[0]["teacher_meta"]["error"]
        # Right key: it reaches the endpoint (which checks it) and collection succeeds.
        proxy.require_auth = KEY
        assert run_collect(cfg, policy=FAST, progress=True) == 0
        assert proxy.received == 5
    run_dir = tmp_path / "run"
    out, err = capfd.readouterr()
    assert "teacher" in out and caplog.records
    for text in (caplog.text, out, err, "\n".join(proxy.access_log)):
        assert KEY not in text
    files = [p for p in run_dir.iterdir() if p.is_file()]
    assert {"teacher.jsonl", "teacher_cache.sqlite", "config.resolved.yaml"} <= {p.name for p in files}
    for path in files:  # includes the SQLite WAL / shm files
        assert KEY.encode() not in path.read_bytes(), path.name
    assert yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["teacher"]["api_key_env"] == "GAD_TEST_KEY"


def test_sigkill_mid_run_then_resume_gives_each_row_once(server, fault_free, tmp_path):
    n, concurrency = 20, 2
    with FaultProxy(upstream(server)) as proxy:
        raw = run_cfg(tmp_path, proxy.base_url, n, concurrency=concurrency)
        cfg_path = tmp_path / "run.yaml"
        cfg_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        cache = tmp_path / "run" / "teacher_cache.sqlite"
        cmd = [sys.executable, "-m", "gad_megatron.cli", "collect", "--config", str(cfg_path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        with open(tmp_path / "first.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + 180
            while cached_rows(cache) < 5 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, "collection finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        done_before = cached_rows(cache)
        first_requests = proxy.received
        assert 5 <= done_before < n
        assert not (tmp_path / "run" / "teacher.jsonl").exists()

        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        resumed_requests = proxy.received - first_requests

    rows = read_jsonl(tmp_path / "run" / "teacher.jsonl")
    ids = [r["id"] for r in rows]
    assert ids == [f"p{i:02d}" for i in range(n)] and len(set(ids)) == n  # each row exactly once
    assert_fault_free_answers(rows, fault_free)  # those cached before the kill and those asked after
    assert sum(r["teacher_meta"]["cached"] for r in rows) == done_before
    assert resumed_requests == n - done_before  # the rerun asked only for what was missing
    # Only the requests in flight at the kill were asked twice.
    assert proxy.received <= n + concurrency
    assert cached_rows(cache) == n
