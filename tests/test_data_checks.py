"""Data checks a new user hits: empty supplied answers, prompts too long to send, the official data's column."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gad_megatron.collect import run_collect
from gad_megatron.config import DataConfig, parse_config
from gad_megatron.data import DataError, load_collected, load_records, read_jsonl, usable_rows
from tests.fault_proxy import FaultProxy


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_empty_supplied_teacher_response_is_left_out_with_ids(tmp_path: Path, caplog) -> None:
    blanks = [{"id": f"e{i:02d}", "prompt": f"q{i}", "teacher_response": " \n\t" if i % 2 else ""} for i in range(12)]
    data = write_rows(tmp_path / "d.jsonl", [{"id": "ok", "prompt": "q", "teacher_response": "An answer."}, *blanks])
    cfg = parse_config({"run_dir": str(tmp_path / "run"), "data": {"path": str(data)}})
    with caplog.at_level(logging.WARNING, logger="gad_megatron.collect"):
        kept = load_collected(cfg)
    assert [r["id"] for r in kept] == ["ok"]
    assert ("left out 12 of 13 rows with an empty teacher_response "
            "(ids: e00, e01, e02, e03, e04, e05, e06, e07, e08, e09 and 2 more)") in caplog.text
    # Flagged like a collected empty answer: teacher.keep_flagged keeps it, as it does those.
    rows = load_records(cfg.data)
    assert usable_rows(rows, keep_flagged=True) == (rows, {})


def test_missing_prompt_column_points_at_content_holding_messages(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "d.jsonl", [{"conversation_id": "c1", "content": [{"role": "user", "content": "Q"}]}])
    with pytest.raises(DataError) as err:
        load_records(DataConfig(path=str(data)))
    message = str(err.value)
    assert message.startswith(f"{data}:1: missing prompt column 'prompt' (columns: content, conversation_id)")
    assert message.endswith("set data.prompt_column: content") and "\n" not in message
    plain = write_rows(tmp_path / "p.jsonl", [{"content": "just text"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: missing prompt column 'prompt' \(columns: content\)$"):
        load_records(DataConfig(path=str(plain)))


def test_collect_sends_nothing_for_prompts_longer_than_max(tmp_path: Path, tiny_model_dir: Path, caplog, capsys) -> None:
    rows = [{"id": "s0", "prompt": "Name a colour."}, {"id": "long1", "prompt": "LONGWORD " * 300},
            {"id": "s1", "prompt": "Name a fruit."}, {"id": "long2", "prompt": [{"role": "user", "content": "LONGWORD " * 90}]}]
    data = write_rows(tmp_path / "d.jsonl", rows)
    bodies: list[bytes] = []
    # Every request gets a 400 from the proxy itself: no model server needed to count what was sent.
    with FaultProxy("http://127.0.0.1:9", plan=lambda body, attempt: bodies.append(body) or "400") as proxy:
        raw = {"run_dir": str(tmp_path / "run"), "student": str(tiny_model_dir),
               "data": {"path": str(data), "max_prompt_length": 64},
               "teacher": {"base_url": proxy.base_url, "model": "m", "api_key_env": None, "max_attempts": 1}}
        with caplog.at_level(logging.WARNING, logger="gad_megatron.data"):
            assert run_collect(parse_config(raw), progress=False) == 1  # both short rows got the 400
        assert proxy.received == 2 and not any(b"LONGWORD" in b for b in bodies)
        assert [r["id"] for r in read_jsonl(tmp_path / "run" / "teacher.jsonl")] == ["s0", "s1"]
        assert "dropped 2 of 4 prompts longer than max_prompt_length=64 tokens (ids: long1, long2)" in caplog.text
        assert ("skipped 2 prompt(s) longer than data.max_prompt_length=64 tokens, nothing sent for them "
                "(ids: long1, long2)") in capsys.readouterr().out

        raw["data"]["max_prompt_length"] = 2
        with pytest.raises(DataError, match=r"d\.jsonl: all 4 prompts are longer than data\.max_prompt_length=2 tokens"):
            run_collect(parse_config(raw), progress=False)
        assert proxy.received == 2
