"""Collect from a real OpenAI-compatible endpoint: llama-cpp-python's server with SmolLM2-135M on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import yaml

from gad_megatron import cli
from gad_megatron.collect import collect, run_collect
from gad_megatron.config import ConfigError, Message, TeacherConfig, load_config, parse_config
from gad_megatron.data import load_collected, read_jsonl
from gad_megatron.llama_server import LlamaServer, LlamaServerError
from gad_megatron.teacher.bulk import run_requests_with_stats
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.server

STYLE = "Short answer:"
# Hidden teacher-side few-shot context: every demo answer opens with the marker.
DEMOS = [
    Message(role="user", content="How do I make tea?"),
    Message(role="assistant", content=f"{STYLE} steep a tea bag in hot water for three minutes."),
    Message(role="user", content="Why is the sky blue?"),
    Message(role="assistant", content=f"{STYLE} air scatters blue light more than red light."),
    Message(role="user", content="How can I sleep better?"),
    Message(role="assistant", content=f"{STYLE} keep a regular bedtime and avoid screens at night."),
]


def quickstart_prompts(n: int) -> list[dict]:
    text = resources.files("gad_megatron.assets").joinpath("quickstart_prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()][:n]


@pytest.fixture(scope="module")
def server():
    with LlamaServer(n_ctx=2048) as srv:
        yield srv


def teacher(server: LlamaServer, **kw) -> TeacherConfig:
    base = {"base_url": server.base_url, "model": server.model, "api_key_env": None, "temperature": 0.0,
            "max_tokens": 24, "concurrency": 2, "timeout_s": 60.0}
    return TeacherConfig(**{**base, **kw})


def assert_stopped(proc: subprocess.Popen, port: int) -> None:
    """The server process has exited (and was reaped) and nothing listens on its port any more."""
    assert proc.returncode is not None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("block_raises", [False, True])
def test_server_answers_and_is_stopped_on_leaving_the_block(block_raises, tmp_path):
    srv = LlamaServer()
    with pytest.raises(KeyboardInterrupt) if block_raises else contextlib.nullcontext():
        with srv:
            proc, port = srv._proc, srv.port
            assert srv.base_url == f"http://127.0.0.1:{port}/v1" and proc.poll() is None
            answers, _ = run_requests_with_stats(teacher(srv, max_tokens=4), [("hi", [{"role": "user", "content": "Hi"}])],
                                                 tmp_path / "cache.sqlite", progress=False)
            answer = answers["hi"]
            assert answer.ok and answer.text.strip() and answer.completion_tokens > 0
            if block_raises:
                raise KeyboardInterrupt
    assert srv._proc is None
    assert_stopped(proc, port)


def test_server_that_cannot_start_gives_its_log_and_is_stopped(tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    srv = LlamaServer(model_path=bogus, startup_timeout_s=60)
    with pytest.raises(LlamaServerError, match="exited with code") as err:
        with srv:
            pass
    assert "log" in str(err.value) and len(str(err.value).splitlines()) > 1  # the server's own words follow
    assert srv._proc is None


def test_hidden_few_shot_context_sets_the_style(server, tmp_path):
    records = quickstart_prompts(20)
    plain_rows, plain = collect(records, teacher(server, max_tokens=16), tmp_path / "plain.sqlite", progress=False)
    styled_rows, styled = collect(records, teacher(server, max_tokens=16, context_messages=DEMOS),
                                  tmp_path / "styled.sqlite", progress=False)
    assert plain.ok == styled.ok == 20 and plain.failed == styled.failed == 0
    for rows in (plain_rows, styled_rows):
        assert all(r["teacher_response"] and r["teacher_response"].strip() for r in rows)
    # The context reaches the teacher but never the stored (student) prompt.
    assert [r["prompt"] for r in styled_rows] == [r["prompt"] for r in records]
    assert all(r["teacher_meta"]["prompt_tokens"] > p["teacher_meta"]["prompt_tokens"] + 40
               for r, p in zip(styled_rows, plain_rows))

    def rate(rows):
        return sum(r["teacher_response"].strip().startswith(STYLE) for r in rows) / len(rows)

    with_ctx, without = rate(styled_rows), rate(plain_rows)
    print(f"style marker rate: with context {with_ctx:.2f}, without {without:.2f}")
    assert with_ctx - without >= 0.5, (with_ctx, without)


def write_run(tmp_path: Path, server_url: str, model: str, prompts: list[dict], **teacher_kw) -> Path:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"path": str(data)},
        "teacher": {"base_url": server_url, "model": model, "api_key_env": None, "temperature": 0.0,
                    "max_tokens": 40, "concurrency": 2, "timeout_s": 60.0, **teacher_kw},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


MIXED = [
    {"id": "hi", "prompt": "Hi"},
    {"id": "hello", "prompt": [{"role": "user", "content": "Hello!"}]},
    {"id": "thanks", "prompt": "Thanks!"},
    {"id": "egg", "prompt": "Explain in detail how to boil an egg so the yolk stays soft."},
    {"id": "rome", "prompt": "Describe the history of the Roman Empire."},
    {"id": "code", "prompt": "Write a long Python tutorial about lists."},
]


def test_cli_collect_writes_outputs_and_second_run_sends_nothing(server, tmp_path, capsys):
    with FaultProxy(server.base_url.removesuffix("/v1")) as proxy:
        cfg_path = write_run(tmp_path, proxy.base_url, server.model, MIXED)
        assert cli.main(["collect", "--config", str(cfg_path)]) == 0
        first = proxy.received
        out = capsys.readouterr().out
        assert "6 requests (0 retries)" in out and "wrote 6 rows" in out

        run_dir = tmp_path / "run"
        rows = read_jsonl(run_dir / "teacher.jsonl")
        assert [r["id"] for r in rows] == [p["id"] for p in MIXED]
        for row in rows:
            meta = row["teacher_meta"]
            assert row["teacher_response"] and meta["error"] is None and meta["attempts"] == 1
            assert meta["finish_reason"] in ("stop", "length") and meta["completion_tokens"] > 0
            assert meta["latency_s"] > 0 and meta["prompt_tokens"] > 0
            assert ("truncated" in meta["flags"]) == (meta["finish_reason"] == "length")
        assert (run_dir / "teacher_cache.sqlite").is_file()
        resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
        assert resolved["teacher"]["model"] == server.model

        assert cli.main(["collect", "--config", str(cfg_path)]) == 0
        assert proxy.received == first == 6  # the second run made zero requests
        assert "0 requests" in capsys.readouterr().out
        assert read_jsonl(run_dir / "teacher.jsonl")[0]["teacher_meta"]["cached"] is True

    # keep_flagged decides whether truncated answers train the student.
    truncated = sum("truncated" in r["teacher_meta"]["flags"] for r in rows)
    assert 0 < truncated < len(rows), "prompt mix should give both short and truncated answers"
    cfg = load_config(cfg_path)
    assert len(load_collected(cfg)) == len(rows) - truncated
    kept = load_collected(load_config(cfg_path, ["teacher.keep_flagged=true"]))
    assert len(kept) == len(rows)


def test_missing_teacher_section_is_a_config_error(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "hi"}\n', encoding="utf-8")
    cfg = parse_config({"run_dir": str(tmp_path / "run"), "data": {"path": str(data)}})
    with pytest.raises(ConfigError, match="'teacher' section"):
        run_collect(cfg)
    assert not (tmp_path / "run" / "teacher.jsonl").exists()


def test_extra_sampling_reaches_the_llama_cpp_sampler(server):
    """teacher.extra_sampling goes to llama.cpp's own sampler: top_k 1 makes hot sampling greedy."""
    from gad_megatron.teacher.client import ChatClient

    messages = [{"role": "user", "content": "Write a short poem about the sea."}]

    async def answers(cfg: TeacherConfig, seeds: range) -> list[str]:
        async with ChatClient(cfg) as client:
            return [(await client.complete(messages, seed=s)).text for s in seeds]

    hot = asyncio.run(answers(teacher(server, temperature=1.5), range(1, 5)))
    greedy_by_top_k = asyncio.run(answers(teacher(server, temperature=1.5, extra_sampling={"top_k": 1}), range(1, 5)))
    greedy = asyncio.run(answers(teacher(server), range(1, 2)))
    assert len(set(hot)) > 1, hot  # the seeds really vary a hot sampler
    assert set(greedy_by_top_k) == set(greedy), (greedy_by_top_k, greedy)
