"""Prompt data: load JSONL / JSON / parquet / hub datasets into one schema, with precise errors.

Every row becomes ``{"id": str, "prompt": [{"role", "content"}, ...], "teacher_response": str | None,
**other columns}``. A problem names the file and line (or record) and raises :class:`DataError`.
Training rows come from :func:`load_collected`: ``gad collect``'s output when there is one, else
the data's own teacher responses, without the rows whose answer is missing or flagged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO

from gad_megatron.config import ConfigError, DataConfig, RunConfig
from gad_megatron.teacher.results import response_flags

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
COLLECTED_NAME = "teacher.jsonl"  # in the run dir: written by ``gad collect``, read by load_collected
Messages = list[dict[str, str]]


class DataError(ConfigError):
    """Bad input data; the message names the file and the line or record."""


def prompt_id(prompt: Messages) -> str:
    """Stable id derived from the prompt's content (used when the data has no id column)."""
    canonical = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def normalize_prompt(value: Any, where: str) -> Messages:
    """Turn a plain string or a list of chat messages into validated chat messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: prompt must be a string or a non-empty list of messages, got {type(value).__name__}")
    messages: Messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role '{msg['role']}'; expected one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str):
            raise DataError(f"{where}: message {i} content must be a string")
        messages.append({"role": msg["role"], "content": msg["content"]})
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the last message must have role 'user', got '{messages[-1]['role']}'")
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise DataError(f"{where}: empty prompt")
    return messages


def format_ids(ids: Sequence[str], limit: int = 10) -> str:
    """``a, b, c``: at most ``limit`` ids then how many more, so a warning stays one readable line."""
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown} and {len(ids) - limit} more"


def _prompt_column_hint(row: dict[str, Any]) -> str:
    """Point at ``content`` when it holds chat messages: the official GAD data (LMSYS-Chat-GPT-5) names it so."""
    content = row.get("content")
    if isinstance(content, list) and content and all(isinstance(m, dict) and "role" in m for m in content):
        return "; its 'content' column holds chat messages: set data.prompt_column: content"
    return ""


def _to_record(row: Any, cfg: DataConfig, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if cfg.prompt_column not in row:
        raise DataError(f"{where}: missing prompt column '{cfg.prompt_column}' "
                        f"(columns: {', '.join(sorted(row)) or 'none'}){_prompt_column_hint(row)}")
    prompt = normalize_prompt(row[cfg.prompt_column], where)
    response = row.get(cfg.response_column)
    if response is not None and not isinstance(response, str):
        raise DataError(f"{where}: column '{cfg.response_column}' must be a string or null")
    rid = row.get(cfg.id_column)
    extra = {k: v for k, v in row.items() if k not in {cfg.prompt_column, cfg.response_column, cfg.id_column}}
    return {**extra, "id": str(rid) if rid is not None else prompt_id(prompt), "prompt": prompt, "teacher_response": response}


def _read_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 (byte {err.start})") from None
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None


def _read_json(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    for i, row in enumerate(data):
        yield f"{path}: record {i}", row


def _read_table(rows: Iterable[dict[str, Any]], label: str) -> Iterable[tuple[str, Any]]:
    for i, row in enumerate(rows):
        yield f"{label}: row {i}", row


def _iter_rows(cfg: DataConfig) -> Iterable[tuple[str, Any]]:
    path = Path(cfg.path).expanduser()
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return _read_table(pq.read_table(path).to_pylist(), str(path))
    if path.exists():
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .json or .parquet)")
    import datasets

    return _read_table(datasets.load_dataset(cfg.path, split=cfg.split), f"{cfg.path}[{cfg.split}]")


def load_records(cfg: DataConfig) -> list[dict[str, Any]]:
    """Load and validate every row; raise :class:`DataError` naming the file and line on the first bad one."""
    records: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for where, row in _iter_rows(cfg):
        record = _to_record(row, cfg, where)
        if record["id"] in seen:
            raise DataError(f"{where}: duplicate id '{record['id']}' (first at {seen[record['id']]})")
        seen[record["id"]] = where
        records.append(record)
        if cfg.limit and len(records) >= cfg.limit:
            break
    if not records:
        raise DataError(f"{cfg.path}: no records")
    return records


def prompt_token_length(tokenizer: Any, prompt: Messages) -> int:
    """Length in tokens of the prompt as the student sees it (chat template + generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        return len(ids)
    return len(tokenizer("\n".join(m["content"] for m in prompt), add_special_tokens=True)["input_ids"])


def filter_long_prompts(
    records: list[dict[str, Any]], tokenizer: Any, max_len: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Drop prompts longer than ``max_len`` tokens; return the kept rows and the dropped ids (logged)."""
    kept, dropped = [], []
    for record in records:
        if prompt_token_length(tokenizer, record["prompt"]) <= max_len:
            kept.append(record)
        else:
            dropped.append(str(record["id"]))
    if dropped:
        log.warning("dropped %d of %d prompts longer than max_prompt_length=%d tokens (ids: %s)",
                    len(dropped), len(records), max_len, format_ids(dropped))
    return kept, dropped


def write_atomic(path: str | Path, write: Callable[[TextIO], None]) -> Path:
    """Write a text file atomically: ``write(fh)`` into a temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSONL, atomically."""
    return write_atomic(path, lambda fh: fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file this project wrote (no schema checks)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# Why a row is left out of training: ``failed`` or the first of its answer's flags.
LEFT_OUT = {
    "failed": "without a teacher response",
    "empty": "with an empty teacher_response",
    "truncated": "with a truncated teacher_response (finish_reason length)",
    "content_filter": "with a refused teacher_response (content filter)",
}


def answer_flags(row: dict[str, Any]) -> list[str]:
    """Quality flags of a row's answer, as ``gad collect`` stored them or, for text supplied with the data, as
    :func:`response_flags` finds them (only ``empty`` then: there is no finish reason)."""
    meta = row.get("teacher_meta")
    if isinstance(meta, dict):
        return list(meta.get("flags") or [])
    return response_flags([row["teacher_response"]], [None])


def usable_rows(rows: Sequence[dict[str, Any]], keep_flagged: bool) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Rows fit for training, and the ids of those left out by reason (a key of :data:`LEFT_OUT`)."""
    kept: list[dict[str, Any]] = []
    left_out: dict[str, list[str]] = {}
    for row in rows:
        if row.get("teacher_response") is None:
            reason = "failed"
        else:
            flags = [] if keep_flagged else answer_flags(row)
            reason = flags[0] if flags else None
        if reason is None:
            kept.append(row)
        else:
            left_out.setdefault(reason, []).append(str(row["id"]))
    return kept, left_out


def load_collected(cfg: RunConfig) -> list[dict[str, Any]]:
    """Training rows: ``<run_dir>/teacher.jsonl`` if collected, else the data's own teacher responses.

    Rows without a response are left out; so are flagged rows (empty, whether collected or supplied;
    truncated; content-filtered) unless ``teacher.keep_flagged``. Counts and ids left out are logged.
    """
    path = Path(cfg.run_dir) / COLLECTED_NAME
    if path.is_file():
        rows, source = read_jsonl(path), str(path)
    else:
        rows, source = load_records(cfg.data), cfg.data.path
    keep_flagged = cfg.teacher.keep_flagged if cfg.teacher is not None else False
    kept, left_out = usable_rows(rows, keep_flagged)
    for reason, ids in left_out.items():
        hint = "" if reason == "failed" else "; set teacher.keep_flagged: true to keep them"
        log.warning("%s: left out %d of %d rows %s (ids: %s)%s",
                    source, len(ids), len(rows), LEFT_OUT.get(reason, f"flagged '{reason}'"), format_ids(ids), hint)
    if not kept:
        hint = "run `gad collect` first" if not path.is_file() else "see teacher_meta.error / flags in the file"
        raise ConfigError(f"{source}: no rows with a usable teacher response ({hint})")
    return kept
