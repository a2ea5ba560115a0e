"""``gad eval``: score every model's generations on every suite; write ``<run_dir>/eval/results.json``.

Inputs: ``<run_dir>/generations/<tag>/<suite>.jsonl`` (from ``gad generate``) and the teacher's
responses to the same prompts, taken from (first that applies) ``generations/teacher/<suite>.jsonl``,
the suite file's ``teacher_response`` column, or the ``teacher`` endpoint (cached, like ``gad collect``).

Per model and suite: response lengths (all counted with the student's tokenizer, so models with
different tokenizers compare), share truncated, ROUGE-L and n-gram F1 (n = 1..6) against the
teacher, ROUGE-L against a human ``reference`` where the suite has one, the judge score (paper's
protocol, see :mod:`gad_megatron.evaluation.judge`) and its length-controlled version
(:mod:`gad_megatron.evaluation.length_control`), distinguishability, and, with a local teacher copy,
log-likelihood diagnostics. The teacher itself appears as the model ``teacher`` (lengths, judge).
Per-prompt details: ``eval/<tag>/<suite>.jsonl``; judge references: ``eval/judge_references/``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

from gad_megatron.config import ConfigError, RunConfig
from gad_megatron.data import read_jsonl, write_atomic, write_jsonl
from gad_megatron.evaluation.generate import generations_path, tag_order
from gad_megatron.evaluation.length_control import length_controlled_score
from gad_megatron.evaluation.suites import Suite, load_suite
from gad_megatron.evaluation.text_metrics import length_stats, mean, ngram_f1_all, repetition, rouge_l_f1

log = logging.getLogger(__name__)

__all__ = ["TEACHER_TAG", "evaluate_run", "run_eval", "model_tags", "teacher_responses", "write_json"]

TEACHER_TAG = "teacher"
MAX_N = 6


def _finite(obj: Any) -> Any:
    """NaN / inf become None: strict JSON, and a missing value is not mistaken for a number."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomic JSON write: a crash never leaves half a results file. NaN/inf become null."""
    obj = _finite(obj)
    return write_atomic(path, lambda fh: json.dump(obj, fh, ensure_ascii=False, indent=1, allow_nan=False))


def model_tags(run_dir: str | Path) -> list[str]:
    """Model tags with generations in a run dir, the teacher excluded."""
    root = Path(run_dir) / "generations"
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and p.name != TEACHER_TAG and any(p.glob("*.jsonl"))]
    return sorted(tags, key=tag_order)


def _suites(cfg: RunConfig, tags: list[str]) -> list[Suite]:
    if cfg.generate.prompt_sets:
        return [load_suite(s, limit=cfg.generate.limit) for s in cfg.generate.prompt_sets]
    # No prompt sets configured: evaluate whatever was generated, prompts taken from the generations.
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    for tag in tags:
        for path in sorted((Path(cfg.run_dir) / "generations" / tag).glob("*.jsonl")):
            rows = by_name.setdefault(path.stem, {})
            for row in read_jsonl(path):
                rows.setdefault(row["id"], {"id": row["id"], "prompt": row["prompt"]})
    return [Suite(name, list(rows.values()), source="generations") for name, rows in sorted(by_name.items())]


def _length_counter(cfg: RunConfig) -> Callable[[str], int] | None:
    from gad_megatron.models.sources import load_tokenizer

    try:
        tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - lengths fall back to each model's own count
        log.warning("lengths: cannot load the student tokenizer (%s); using each model's own token counts", err)
        return None
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def teacher_responses(cfg: RunConfig, suite: Suite) -> dict[str, dict[str, Any]] | None:
    """The teacher's rows for a suite (``id -> {response, num_tokens, finish_reason}``), or None."""
    ids = [r["id"] for r in suite.records]
    path = generations_path(cfg.run_dir, TEACHER_TAG, suite.name)
    if path.is_file():
        rows = {r["id"]: r for r in read_jsonl(path)}
        if all(i in rows for i in ids):
            return rows
    rows_list: list[dict[str, Any]] | None = None
    if all(r.get("teacher_response") is not None for r in suite.records):
        rows_list = [{"id": r["id"], "prompt": r["prompt"], "response": r["teacher_response"].strip(),
                      "num_tokens": None, "finish_reason": (r.get("teacher_meta") or {}).get("finish_reason", "stop")}
                     for r in suite.records]
    elif cfg.teacher is not None and cfg.eval.collect_teacher:
        from gad_megatron.collect import CACHE_NAME, collect

        collected, stats = collect(suite.records, cfg.teacher, Path(cfg.run_dir) / CACHE_NAME)
        log.info("teacher on %s: %d answered (%d from cache), %d failed", suite.name, stats.ok, stats.cached, stats.failed)
        rows_list = [{"id": r["id"], "prompt": r["prompt"], "response": r["teacher_response"].strip(),
                      "num_tokens": r["teacher_meta"]["completion_tokens"], "finish_reason": r["teacher_meta"]["finish_reason"]}
                     for r in collected if r["teacher_response"] is not None]
    if rows_list is None:
        return None
    for row in rows_list:
        row["model"] = TEACHER_TAG
    write_jsonl(path, rows_list)  # the report shows the teacher next to the students
    return {r["id"]: r for r in rows_list}


def _load_generations(cfg: RunConfig, tag: str, suite: Suite) -> dict[str, dict[str, Any]] | None:
    path = generations_path(cfg.run_dir, tag, suite.name)
    return {r["id"]: r for r in read_jsonl(path)} if path.is_file() else None


def _generation_model(cfg: RunConfig, tag: str, suite: Suite) -> str | None:
    """The model spec that wrote a generations file (from its meta), if known."""
    meta = generations_path(cfg.run_dir, tag, suite.name).with_suffix(".meta.json")
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("model") or None
    except (OSError, json.JSONDecodeError):
        return None


def _text_metrics(rows: dict[str, dict[str, Any]], ids: list[str], teacher: dict[str, dict[str, Any]] | None,
                  suite: Suite, count: Callable[[str], int] | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Lengths and overlap metrics; ``teacher`` is None for the teacher itself (nothing to compare with)."""
    refs = {r["id"]: r.get("reference") for r in suite.records}
    details: dict[str, dict[str, Any]] = {}
    for rid in ids:
        row = rows[rid]
        d: dict[str, Any] = {"id": rid, "finish_reason": row.get("finish_reason"),
                             "num_tokens": count(row["response"]) if count else row.get("num_tokens"),
                             "repetition": repetition(row["response"])}
        t = (teacher or {}).get(rid)
        if t is not None:
            d["rouge_l"] = rouge_l_f1(row["response"], t["response"])
            d["ngram_f1"] = list(ngram_f1_all(row["response"], t["response"], MAX_N).values())
        if isinstance(refs.get(rid), str) and refs[rid].strip():
            d["rouge_l_human"] = rouge_l_f1(row["response"], refs[rid])
        details[rid] = d
    ds = list(details.values())
    counted = [d for d in ds if isinstance(d["num_tokens"], int)]
    metrics: dict[str, Any] = {"n": len(ds), "length": length_stats([d["num_tokens"] for d in counted],
                                                                     [d["finish_reason"] for d in counted])}
    metrics["len_mean"] = metrics["length"].get("mean")
    metrics["repetition"] = mean(d["repetition"] for d in ds)
    metrics["truncated_frac"] = sum(d["finish_reason"] == "length" for d in ds) / len(ds) if ds else None
    with_t = [d for d in ds if "rouge_l" in d]
    if with_t:
        metrics["rouge_l"] = mean(d["rouge_l"] for d in with_t)
        metrics["ngram_f1"] = {str(n + 1): mean(d["ngram_f1"][n] for d in with_t) for n in range(MAX_N)}
        metrics["ngram_f1_mean"] = mean(metrics["ngram_f1"].values())
    if any("rouge_l_human" in d for d in ds):
        metrics["rouge_l_human"] = mean(d["rouge_l_human"] for d in ds if "rouge_l_human" in d)
    return metrics, details


def _judge_score_lc(judged: list[dict[str, Any]], rows: dict[str, dict[str, Any]], references: dict[str, str | None],
                    count: Callable[[str], int] | None) -> float | None:
    """Length-controlled judge score over the scored prompts.

    Lengths are in student tokens, or in characters when the student tokenizer is not available.
    """
    size = count or len
    scored = [d for d in judged if d.get("score") is not None]
    return length_controlled_score([d["score"] for d in scored], [size(rows[d["id"]]["response"]) for d in scored],
                                   [size(references[d["id"]] or "") for d in scored])


def spread(ids: list[str], limit: int | None) -> list[str]:
    """At most ``limit`` of ``ids``, evenly spaced in order (all when ``limit`` is None): a suite
    concatenated from several prompt sets keeps a share of each, where a prefix would keep the first."""
    if limit is None or limit >= len(ids):
        return ids
    return [ids[k * len(ids) // limit] for k in range(limit)]


class _LoglikContext:
    """The local teacher (loaded once) and its teacher-side context."""

    def __init__(self, cfg: RunConfig):
        from gad_megatron.models.sources import load_causal_lm, load_tokenizer

        spec = cfg.eval.teacher_model
        self.model = load_causal_lm(spec, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer = load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)
        context: list[dict[str, str]] = []
        if cfg.teacher is not None:
            if cfg.teacher.system_prompt:
                context.append({"role": "system", "content": cfg.teacher.system_prompt})
            context += [{"role": m.role, "content": m.content} for m in cfg.teacher.context_messages]
        self.context = context


def _loglik_metrics(cfg: RunConfig, lctx: _LoglikContext, tag: str, suite: Suite, rows: dict[str, dict[str, Any]],
                    ids: list[str], teacher: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    from gad_megatron.evaluation.loglik import candidate_loglik, teacher_loglik
    from gad_megatron.models.sources import load_causal_lm, load_tokenizer

    prompts = {r["id"]: r["prompt"] for r in suite.records}
    ids = spread(ids, cfg.eval.loglik_max_examples)
    out: dict[str, Any] = {}
    out["under_teacher"] = teacher_loglik(lctx.model, lctx.tokenizer, [prompts[i] for i in ids],
                                          [rows[i]["response"] for i in ids], lctx.context,
                                          finished=[rows[i].get("finish_reason") != "length" for i in ids])
    out["under_teacher"]["per_prompt"] = dict(zip(ids, out["under_teacher"].pop("per_response")))
    spec = _generation_model(cfg, tag, suite)
    if teacher is not None and spec and tag != TEACHER_TAG:
        t_ids = [i for i in ids if i in teacher]
        try:
            model = load_causal_lm(spec, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:  # ConfigError is a ValueError; a moved checkpoint, no hub access
            log.warning("%s: cannot load %s for the teacher-under-model diagnostic: %s", tag, spec, err)
            return out
        try:
            tok = load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError, TypeError):
            tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
        out["teacher_under_model"] = candidate_loglik(model, tok, [prompts[i] for i in t_ids],
                                                      [teacher[i]["response"] for i in t_ids],
                                                      finished=[teacher[i].get("finish_reason") != "length" for i in t_ids])
        out["teacher_under_model"]["per_prompt"] = dict(zip(t_ids, out["teacher_under_model"].pop("per_response")))
        del model
    return out


def evaluate_run(cfg: RunConfig) -> dict[str, Any]:
    """Compute every metric for every (model, suite); write results and details; return the results."""
    from gad_megatron.evaluation.distinguish import discriminator_distinguishability, distinguishability
    from gad_megatron.evaluation.judge import JudgeClient, judge_pairs, judge_references

    run_dir = Path(cfg.run_dir)
    ev = cfg.eval
    tags = list(ev.models) or model_tags(run_dir)
    if not tags:
        raise ConfigError(f"{run_dir / 'generations'}: no generations to evaluate; run `gad generate` first")
    suites = _suites(cfg, tags)
    count = _length_counter(cfg)
    client = JudgeClient(ev.judge, run_dir / "eval" / "judge_cache.sqlite") if ev.judge else None
    lctx = _LoglikContext(cfg) if ev.teacher_model else None
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()

    for suite in suites:
        ids = [r["id"] for r in suite.records]
        by_id = {r["id"]: r for r in suite.records}
        teacher = teacher_responses(cfg, suite)
        if teacher is None:
            log.warning("%s: no teacher responses (no generations/teacher file, no teacher_response column, "
                        "no teacher endpoint): metrics against the teacher are skipped", suite.name)
        references = None
        if client is not None:
            references = judge_references(client, suite.records, temperature=ev.judge_temperature,
                                          desc=f"judge references / {suite.name}")
            write_jsonl(run_dir / "eval" / "judge_references" / f"{suite.name}.jsonl",
                        [{"id": i, "reference": references[i]} for i in ids])
        candidates = [(t, _load_generations(cfg, t, suite)) for t in tags]
        if teacher is not None:
            candidates.append((TEACHER_TAG, teacher))
        for tag, rows in candidates:
            if rows is None:
                log.warning("%s / %s: no generations file, skipped", tag, suite.name)
                continue
            have = [i for i in ids if i in rows]
            if len(have) < len(ids):
                log.warning("%s / %s: %d of %d prompts have no response", tag, suite.name, len(ids) - len(have), len(ids))
            metrics, details = _text_metrics(rows, have, None if tag == TEACHER_TAG else teacher, suite, count)
            metrics["n_missing"] = len(ids) - len(have)
            if client is not None and references is not None:
                run = judge_pairs(client, [by_id[i] for i in have], {i: rows[i]["response"] for i in have}, references,
                                  both_orders=ev.judge_both_orders, temperature=ev.judge_temperature,
                                  max_tokens=ev.judge_max_tokens, retries=ev.judge_retries, desc=f"judge {tag} / {suite.name}")
                metrics["judge"] = run.summary()
                metrics["judge_score"] = run.score
                metrics["judge_score_lc"] = _judge_score_lc(run.details, rows, references, count)
                for d in run.details:
                    details[d["id"]]["judge"] = {k: v for k, v in d.items() if k != "id"}
            if teacher is not None and tag != TEACHER_TAG and ev.distinguishability:
                both = [i for i in have if i in teacher and teacher[i]["response"]]
                t_texts, c_texts = [teacher[i]["response"] for i in both], [rows[i]["response"] for i in both]
                if ev.distinguish_classifier == "discriminator":
                    metrics["distinguishability"] = discriminator_distinguishability(
                        cfg.student, [by_id[i]["prompt"] for i in both], t_texts, c_texts, seed=cfg.seed)
                else:
                    metrics["distinguishability"] = distinguishability(t_texts, c_texts, seed=cfg.seed)
                for i, share in zip(both, metrics["distinguishability"].pop("per_prompt", [])):
                    details[i]["distinguished"] = share
            if lctx is not None:
                metrics["loglik"] = _loglik_metrics(cfg, lctx, tag, suite, rows, have, teacher)
                for kind, scores in metrics["loglik"].items():
                    for i, value in scores.pop("per_prompt").items():
                        details[i][f"loglik_{kind}"] = value
            write_jsonl(run_dir / "eval" / tag / f"{suite.name}.jsonl", [details[i] for i in have])
            results.setdefault(tag, {})[suite.name] = metrics

    out = {
        "run_dir": str(run_dir),
        "suites": [s.name for s in suites],
        "models": [t for t in tags if t in results] + ([TEACHER_TAG] if TEACHER_TAG in results else []),
        "results": results,
        "judge": {"model": ev.judge.model, "requests": client.requests, "both_orders": ev.judge_both_orders}
        if client else None,
        "length_unit": "student tokenizer tokens" if count else "each model's own tokens",
        "seconds": round(time.monotonic() - started, 2),
    }
    write_json(run_dir / "eval" / "results.json", out)
    return out


def _print_summary(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gad eval: {res['run_dir']}")
    for col in ("model", "suite", "judge", "judge LC", "ROUGE-L", "F1 1-6", "len", "trunc", "distinguish"):
        table.add_column(col)
    fmt = lambda v, p="{:.1f}": "-" if v is None else p.format(v)  # noqa: E731
    for tag in res["models"]:
        for suite, m in res["results"][tag].items():
            dist = (m.get("distinguishability") or {}).get("accuracy")
            table.add_row(tag, suite, fmt(m.get("judge_score")), fmt(m.get("judge_score_lc")),
                          fmt(m.get("rouge_l"), "{:.3f}"), fmt(m.get("ngram_f1_mean"), "{:.3f}"), fmt(m.get("len_mean")),
                          fmt(m.get("truncated_frac"), "{:.0%}"), fmt(dist, "{:.0%}"))
    Console(stderr=True).print(table)


def run_eval(cfg: RunConfig) -> int:
    """CLI entry: 0 on success (unparseable judge outputs are reported, not fatal)."""
    res = evaluate_run(cfg)
    _print_summary(res)
    print(f"eval: wrote {Path(cfg.run_dir) / 'eval' / 'results.json'}")
    return 0
