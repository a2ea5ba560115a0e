"""Evaluation prompt sets ("suites"): the paper's four by name, or any local file.

Built-in names (need network access to the Hugging Face Hub or GitHub):

- ``lmsys``    LMSYS-Chat, 500 held-out prompts of the paper's own data (GPT-5-Chat responses).
- ``dolly``    Dolly, 500 prompts from databricks-dolly-15k (deterministic sample; the paper's
               exact 500 are not published, so numbers are comparable in kind, not digit for digit).
- ``selfinst`` Self-Instruct's 252 user-oriented instructions.
- ``vicuna``   the 80 Vicuna benchmark questions.

Anything else is read as a file (JSONL / JSON / parquet) with :func:`gad_megatron.data.load_records`,
so every suite row has ``id``, ``prompt`` (chat messages) and, when the file has it,
``teacher_response``; other columns (``category``, ``reference``...) are kept.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gad_megatron.config import ConfigError, DataConfig
from gad_megatron.data import DataError, load_records, normalize_prompt

__all__ = ["Suite", "BUILTIN_SUITES", "load_suite", "suite_name"]


@dataclass
class Suite:
    """A named prompt set."""

    name: str
    records: list[dict[str, Any]]
    source: str = ""


@dataclass(frozen=True)
class _HubSuite:
    loader: Callable[[], list[dict[str, Any]]]
    size: int
    description: str


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _join(instruction: str, extra: str | None) -> str:
    # Same convention as the shared prompt files: instruction, blank line, input.
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction


def _load_lmsys() -> list[dict[str, Any]]:
    import datasets

    ds = datasets.load_dataset("ytz20/LMSYS-Chat-GPT-5-Chat-Response", split="test")
    rows = []
    for i, row in enumerate(ds):
        prompt = row.get("content") or row.get("prompt") or row.get("messages")
        if isinstance(prompt, list) and prompt and prompt[-1].get("role") == "assistant":
            prompt = prompt[:-1]  # a stored answer is not part of the prompt
        response = row.get("teacher_response") or row.get("response")
        rows.append({"id": str(row.get("id", f"lmsys-{i}")), "category": "lmsys", "prompt": prompt,
                     "teacher_response": response if isinstance(response, str) else None})
    return rows[:500]


def _load_dolly() -> list[dict[str, Any]]:
    import datasets

    ds = datasets.load_dataset("databricks/databricks-dolly-15k", split="train")
    order = list(range(len(ds)))
    random.Random(1234).shuffle(order)  # fixed seed: the same 500 on every machine
    rows = []
    for i in sorted(order[:500]):
        row = ds[i]
        rows.append({"id": f"dolly-{i}", "category": row.get("category", "dolly"),
                     "prompt": _user(_join(row["instruction"], row.get("context"))), "reference": row.get("response")})
    return rows


def _read_remote_jsonl(url: str) -> list[dict[str, Any]]:
    import datasets

    return list(datasets.load_dataset("json", data_files=url, split="train"))


def _load_selfinst() -> list[dict[str, Any]]:
    url = "https://raw.githubusercontent.com/yizhongw/self-instruct/main/human_eval/user_oriented_instructions.jsonl"
    rows = []
    for row in _read_remote_jsonl(url):
        inst = (row.get("instances") or [{}])[0]  # one prompt per instruction: the 252-prompt set
        rows.append({"id": str(row["id"]), "category": row.get("motivation_app", "selfinst"),
                     "prompt": _user(_join(row["instruction"], inst.get("input"))), "reference": inst.get("output")})
    return rows


def _load_vicuna() -> list[dict[str, Any]]:
    url = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/vicuna_bench/question.jsonl"
    return [{"id": f"vicuna-{row['question_id']}", "category": row.get("category", "vicuna"), "prompt": _user(row["turns"][0])}
            for row in _read_remote_jsonl(url)]


BUILTIN_SUITES: dict[str, _HubSuite] = {
    "lmsys": _HubSuite(_load_lmsys, 500, "LMSYS-Chat held-out prompts (paper's test set)"),
    "dolly": _HubSuite(_load_dolly, 500, "databricks-dolly-15k, 500 prompts"),
    "selfinst": _HubSuite(_load_selfinst, 252, "Self-Instruct user-oriented instructions"),
    "vicuna": _HubSuite(_load_vicuna, 80, "Vicuna benchmark questions"),
}


def suite_name(spec: str) -> str:
    """The name a suite is stored under: the built-in name, or the file's stem (filesystem-safe)."""
    if spec in BUILTIN_SUITES:
        return spec
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name.split(".")[0]) or "suite"


def _validate(rows: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{label}: row {i}"
        prompt = normalize_prompt(row.get("prompt"), where)
        if row["id"] in seen:
            raise DataError(f"{where}: duplicate id '{row['id']}'")
        seen.add(row["id"])
        out.append({**row, "prompt": prompt, "teacher_response": row.get("teacher_response")})
    return out


def load_suite(spec: str, limit: int | None = None) -> Suite:
    """Load a built-in suite by name or a local prompt file; ``limit`` keeps the first N prompts."""
    if spec in BUILTIN_SUITES:
        try:
            raw = BUILTIN_SUITES[spec].loader()
        except Exception as err:  # network / hub errors: say what was being fetched
            raise ConfigError(
                f"suite '{spec}' could not be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "it needs the Hugging Face Hub / GitHub. Offline, pass a local JSONL file instead."
            ) from None
        rows = _validate(raw, spec)
        return Suite(spec, rows[:limit] if limit else rows, source=spec)
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(BUILTIN_SUITES)
        raise ConfigError(f"prompt set not found: {spec} (not a file, and not a built-in suite: {known})")
    records = load_records(DataConfig(path=str(path), limit=limit))
    return Suite(suite_name(spec), records, source=str(path))
