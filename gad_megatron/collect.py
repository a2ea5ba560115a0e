"""``gad collect``: ask the teacher once per prompt and write the data back with its answers.

Output ``<run_dir>/teacher.jsonl`` (written atomically; training reads it through
:func:`gad_megatron.data.load_collected`): every input row, plus
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

from gad_megatron.config import ConfigError, RunConfig, TeacherConfig, save_resolved_config
from gad_megatron.data import COLLECTED_NAME, DataError, filter_long_prompts, format_ids, load_records, write_jsonl
from gad_megatron.teacher.bulk import run_requests_with_stats
from gad_megatron.teacher.results import Completion, RequestStats
from gad_megatron.teacher.retry import RetryPolicy

log = logging.getLogger(__name__)

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


def prompts_that_fit(cfg: RunConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """The data's rows whose prompt fits ``data.max_prompt_length`` (student tokens), and the other rows' ids.

    Training drops the longer prompts anyway, and a paid teacher would bill every one of them.
    """
    from gad_megatron.models.sources import load_tokenizer  # torch + transformers: only once the data loaded

    records = load_records(cfg.data)
    tokenizer = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    kept, too_long = filter_long_prompts(records, tokenizer, cfg.data.max_prompt_length)
    if not kept:
        raise DataError(f"{cfg.data.path}: all {len(records)} prompts are longer than "
                        f"data.max_prompt_length={cfg.data.max_prompt_length} tokens; nothing to send")
    return kept, too_long


def run_collect(cfg: RunConfig, *, policy: RetryPolicy | None = None, progress: bool | None = None) -> int:
    """CLI entry: 0 when at least one row has an answer, 1 when every row failed."""
    teacher = _teacher_section(cfg)
    records, too_long = prompts_that_fit(cfg)
    run_dir = Path(cfg.run_dir)
    save_resolved_config(cfg, run_dir)
    rows, stats = collect(records, teacher, run_dir / CACHE_NAME, policy=policy, progress=progress)
    out = write_jsonl(run_dir / COLLECTED_NAME, rows)
    print(stats.summary(teacher))
    if too_long:
        print(f"teacher: skipped {len(too_long)} prompt(s) longer than data.max_prompt_length="
              f"{cfg.data.max_prompt_length} tokens, nothing sent for them (ids: {format_ids(too_long)})")
    print(f"teacher: wrote {len(rows)} rows to {out}")
    if stats.failed:
        print(f"teacher: {stats.failed} row(s) failed (teacher_response null, teacher_meta.error set); "
              "rerun `gad collect` to ask again for those only")
    return 1 if stats.ok == 0 else 0
