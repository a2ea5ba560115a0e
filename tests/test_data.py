"""Data layer: formats, schema normalisation and every error path (file and line named)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gad_megatron.config import DataConfig
from gad_megatron.data import DataError, filter_long_prompts, load_records, prompt_id, read_jsonl, write_jsonl


def jsonl(tmp_path: Path, lines: list[str | bytes], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


def load(path: Path, **kw) -> list[dict]:
    return load_records(DataConfig(path=str(path), **kw))


def test_chat_and_plain_prompts(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [
        json.dumps({"id": 1, "prompt": [{"role": "user", "content": "Hi"}], "teacher_response": "Hello", "cat": "x"}),
        json.dumps({"prompt": "Plain string"}),
    ])
    rows = load(path)
    assert rows[0] == {"id": "1", "prompt": [{"role": "user", "content": "Hi"}], "teacher_response": "Hello", "cat": "x"}
    assert rows[1]["prompt"] == [{"role": "user", "content": "Plain string"}]
    assert rows[1]["id"] == prompt_id(rows[1]["prompt"]) and rows[1]["teacher_response"] is None


def test_official_gad_content_column(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [json.dumps({"content": [{"role": "user", "content": "Q"}]})])
    assert load(path, prompt_column="content")[0]["prompt"][0]["content"] == "Q"


def test_derived_id_is_stable(tmp_path: Path) -> None:
    a = jsonl(tmp_path, [json.dumps({"prompt": "same"})], "a.jsonl")
    b = jsonl(tmp_path, [json.dumps({"prompt": "same"})], "b.jsonl")
    assert load(a)[0]["id"] == load(b)[0]["id"]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "ok"}', '{"prompt": "broken"'], r"d\.jsonl:2: malformed JSON"),
    (['{"prompt": "ok"}', '{"question": "x"}'], r"d\.jsonl:2: missing prompt column 'prompt'"),
    (['{"prompt": "   "}'], r"d\.jsonl:1: empty prompt"),
    (['{"prompt": [{"role": "user", "content": ""}]}'], r"d\.jsonl:1: empty prompt"),
    (['{"prompt": [{"role": "bot", "content": "x"}]}'], r"d\.jsonl:1: message 0 has role 'bot'"),
    (['{"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'],
     r"d\.jsonl:1: the last message must have role 'user'"),
    (['{"prompt": [{"role": "user"}]}'], r"d\.jsonl:1: message 0 must be an object"),
    (['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'], r"d\.jsonl:2: duplicate id 'a'"),
    (['{"prompt": "x", "teacher_response": 3}'], r"d\.jsonl:1: column 'teacher_response' must be a string"),
    (['[1, 2]'], r"d\.jsonl:1: expected a JSON object"),
])
def test_error_names_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(DataError, match=message):
        load(jsonl(tmp_path, lines))


def test_non_utf8_names_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path, ['{"prompt": "ok"}', b'{"prompt": "caf\xe9"}'])
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8"):
        load(path)


def test_json_and_parquet(tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": [{"role": "user", "content": "two"}]}]
    j = tmp_path / "d.json"
    j.write_text(json.dumps(rows))
    assert [r["id"] for r in load(j)] == ["a", "b"]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"prompt": "x"},\n{oops}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        load(bad)
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "prompt": "one"}, {"id": "b", "prompt": ""}]), p)
    with pytest.raises(DataError, match=r"d\.parquet: row 1: empty prompt"):
        load(p)


def test_limit_and_empty_file(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [json.dumps({"prompt": f"p{i}"}) for i in range(5)])
    assert len(load(path, limit=2)) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load(empty)


def test_long_prompts_are_counted(tmp_path: Path, tiny_tokenizer) -> None:
    rows = [{"id": "s", "prompt": [{"role": "user", "content": "short"}]},
            {"id": "l", "prompt": [{"role": "user", "content": "word " * 400}]}]
    kept, dropped = filter_long_prompts(rows, tiny_tokenizer, max_len=64)
    assert [r["id"] for r in kept] == ["s"] and dropped == ["l"]


def test_write_jsonl_atomic_roundtrip(tmp_path: Path) -> None:
    rows = [{"id": "x", "text": "héllo"}]
    path = write_jsonl(tmp_path / "sub" / "out.jsonl", rows)
    assert read_jsonl(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]
