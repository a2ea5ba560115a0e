"""``gad collect``: ask the teacher once per prompt and write the data back with its answers.

Output ``<run_dir>/teacher.jsonl`` (written atomically): every input row, plus
``teacher_response`` (``null`` for a failed row) and ``teacher_meta``
``{finish_reason, prompt_tokens, completion_tokens, latency_s, attempts, flags, error, cached}``.
Answers are cached in ``<run_dir>/teacher_cache.sqlite``: an interrupted run resumes, a repeated
run sends nothing. The teacher-side system prompt / few-shot context is sent to the teacher only;
the rows keep the student's prompt unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from gad.config import ConfigError, RunConfig, TeacherConfig, save_resolved_config
from gad.data import load_records, read_jsonl, write_jsonl
from gad.teacher import Completion, RequestStats, RetryPolicy, run_requests_with_stats

log = logging.getLogger(__name__)

OUTPUT_NAME = "teacher.jsonl"
CACHE_NAME = "teacher_cache.sqlite"


def teacher_meta(completion: Completion) -> dict[str, Any]:
    return {
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "latency_s": completion.latency_s,
        "attempts": completion.attempts,
        "flags": list(completion.flags),
        "error": completion.error,
        "cached": completion.cached,
    }


def collect(
    records: Sequence[dict[str, Any]],
    teacher_cfg: TeacherConfig,
    cache_path: str | Path,
    *,
    policy: RetryPolicy | None = None,
    progress: bool | None = None,
) -> tuple[list[dict[str, Any]], RequestStats]:
    """Ask the teacher for every record's ``prompt``; return the rows with answers, and the counters.

    Rows come back in input order; a failed row has ``teacher_response`` ``None`` and
    ``teacher_meta["error"]`` set. With ``n > 1`` all answers are also in ``teacher_responses``.
    """
    requests = [(str(r["id"]), r["prompt"]) for r in records]
    results, stats = run_requests_with_stats(
        teacher_cfg, requests, cache_path, desc="teacher", policy=policy, progress=progress
    )
    rows = []
    for record in records:
        completion = results[str(record["id"])]
        row = {**record, "teacher_response": completion.text if completion.ok else None,
               "teacher_meta": teacher_meta(completion)}
        if completion.texts:
            row["teacher_responses"] = list(completion.texts)
        rows.append(row)
    return rows, stats


def _teacher_section(cfg: RunConfig) -> TeacherConfig:
    if cfg.teacher is None:
        raise ConfigError(
            "collect needs a 'teacher' section in the config: "
            "teacher: {base_url: http://127.0.0.1:8000/v1, model: my-teacher, api_key_env: OPENAI_API_KEY}"
        )
    return cfg.teacher


def run_collect(cfg: RunConfig, *, policy: RetryPolicy | None = None, progress: bool | None = None) -> int:
    """CLI entry: 0 when at least one row has an answer, 1 when every row failed."""
    teacher = _teacher_section(cfg)
    records = load_records(cfg.data)
    run_dir = Path(cfg.run_dir)
    save_resolved_config(cfg, run_dir)
    rows, stats = collect(records, teacher, run_dir / CACHE_NAME, policy=policy, progress=progress)
    out = write_jsonl(run_dir / OUTPUT_NAME, rows)
    print(stats.summary(teacher))
    print(f"teacher: wrote {len(rows)} rows to {out}")
    if stats.failed:
        print(f"teacher: {stats.failed} row(s) failed (teacher_response null, teacher_meta.error set); "
              "rerun `gad collect` to ask again for those only")
    return 1 if stats.ok == 0 else 0


def usable_rows(rows: Sequence[dict[str, Any]], keep_flagged: bool) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows fit for training and the counts of those left out (``failed``, ``flagged``)."""
    kept, dropped = [], {"failed": 0, "flagged": 0}
    for row in rows:
        if row.get("teacher_response") is None:
            dropped["failed"] += 1
        elif (row.get("teacher_meta") or {}).get("flags") and not keep_flagged:
            dropped["flagged"] += 1
        else:
            kept.append(row)
    return kept, dropped


def load_collected(cfg: RunConfig) -> list[dict[str, Any]]:
    """Training rows: ``<run_dir>/teacher.jsonl`` if collected, else the data's own teacher responses.

    Rows without a response are left out; so are flagged rows (empty, truncated, content-filtered)
    unless ``teacher.keep_flagged``. Counts of what was left out are logged.
    """
    path = Path(cfg.run_dir) / OUTPUT_NAME
    if path.is_file():
        rows, source = read_jsonl(path), str(path)
    else:
        rows, source = load_records(cfg.data), cfg.data.path
    keep_flagged = cfg.teacher.keep_flagged if cfg.teacher is not None else False
    kept, dropped = usable_rows(rows, keep_flagged)
    if dropped["failed"]:
        log.warning("%s: left out %d of %d rows without a teacher response", source, dropped["failed"], len(rows))
    if dropped["flagged"]:
        log.warning("%s: left out %d of %d flagged rows (empty / truncated / content filter); "
                    "set teacher.keep_flagged: true to keep them", source, dropped["flagged"], len(rows))
    if not kept:
        hint = "run `gad collect` first" if not path.is_file() else "see teacher_meta.error / flags in the file"
        raise ConfigError(f"{source}: no rows with a usable teacher response ({hint})")
    return kept
