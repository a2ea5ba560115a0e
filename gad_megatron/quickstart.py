"""``gad quickstart``: distil a teacher into a student end to end, offline, on a laptop CPU.

    gad quickstart                      # ~20 minutes on 2 CPU cores (fp32; see docs/results.md)
    gad quickstart --tiny               # a smoke test: few prompts, few steps

Teacher: SmolLM2-135M-Instruct served by llama.cpp on 127.0.0.1, plus a hidden few-shot
context that gives it a distinctive answer style (``gad/assets/teacher_style.json``).
Student: the same model without that context (context distillation). Pipeline:
collect -> SeqKD -> warmup -> GAD -> generate (base, SeqKD, GAD) -> eval -> report.
A rerun reuses the teacher cache and every finished stage.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gad_megatron.collect import CACHE_NAME, collect
from gad_megatron.config import DEFAULT_STUDENT, RunConfig, TeacherConfig, parse_config, save_resolved_config
from gad_megatron.data import usable_rows, write_jsonl
from gad_megatron.style import load_quickstart_prompts, load_teacher_style, style_rate, style_rate_complete

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """How much work each stage gets. ``FULL`` fits 20 minutes on 2 idle AVX2 cores in fp32."""

    n_train: int
    n_test: int
    max_tokens: int  # training response length (teacher's train answers, rollouts)
    eval_max_tokens: int  # held-out answers of every model, teacher included: room the teacher rarely needs
    seqkd_steps: int
    warmup_steps: int
    gad_steps: int
    batch_prompts: int  # prompts per warmup / GAD step
    num_generations: int  # rollouts per prompt (N)
    seqkd_batch_prompts: int = 4
    gad_lr: float = 1e-5  # G's lr in the adversarial stage (SeqKD and D: 1e-5)
    # --discriminator likelihood-ratio: D's pretraining on rollouts of every training prompt
    d_pretrain_rollouts: int = 4  # per prompt
    d_pretrain_batch: int = 8  # prompts per D update
    d_pretrain_val: int = 16  # training prompts held out of it: disc_pretrain/val_acc


# GAD: the recipe the context-distillation study found steadier (docs/results.md): G lr 3e-6 and
# N = 8 rollouts of 2 prompts a step (KL stayed below 0.05; at 1e-5 and 4 x 4 it drifted to 0.17).
# Eval at twice the training length: the teacher's held-out answers average 25 tokens (docs/decisions.md).
FULL = Budget(n_train=160, n_test=40, max_tokens=48, eval_max_tokens=96, seqkd_steps=40, warmup_steps=5,
              gad_steps=12, batch_prompts=2, num_generations=8, seqkd_batch_prompts=4, gad_lr=3e-6)
TINY = Budget(n_train=8, n_test=4, max_tokens=24, eval_max_tokens=48, seqkd_steps=2, warmup_steps=2, gad_steps=2,
              batch_prompts=2, num_generations=2, seqkd_batch_prompts=2, d_pretrain_rollouts=2, d_pretrain_batch=2,
              d_pretrain_val=2)

# ``--discriminator``: the quickstart's D kinds. likelihood-ratio: D keeps its LM head and is first
# pretrained for one epoch on cached rollouts of every training prompt at lr 3e-5, the recipe that
# reached 0.86 held-out pair accuracy on this data where the score head stayed near 0.6
# (docs/benchmarks.md), at minutes the 20-minute budget does not have (docs/results.md).
DISCRIMINATORS = ("head", "likelihood-ratio")


def discriminator_fields(discriminator: str, budget: Budget) -> tuple[dict[str, Any], dict[str, Any]]:
    """The train fields of the warmup and GAD stages that make D of kind ``discriminator``."""
    if discriminator == "head":
        return {}, {}
    kind = {"disc_score": "likelihood_ratio"}
    pretrain = {"epochs": 1, "rollouts_per_prompt": budget.d_pretrain_rollouts, "learning_rate": 3e-5,
                "batch_prompts": budget.d_pretrain_batch, "val_prompts": budget.d_pretrain_val}  # fmt: skip
    return {**kind, "disc_pretrain": pretrain}, kind


def split_prompts(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A fixed shuffled split of the packaged prompts into train and held-out test."""
    prompts = load_quickstart_prompts()
    random.Random(seed).shuffle(prompts)
    return prompts[:n_train], prompts[n_train : n_train + n_test]


def teacher_config(max_tokens: int, base_url: str) -> TeacherConfig:
    """The llama.cpp teacher with the hidden few-shot style context, answering up to ``max_tokens``."""
    style = load_teacher_style()
    return TeacherConfig(
        base_url=base_url, model=DEFAULT_STUDENT, api_key_env=None, context_messages=list(style.context_messages),
        temperature=0.7, max_tokens=max_tokens, concurrency=2,
        cache_namespace=f"quickstart llama.cpp {DEFAULT_STUDENT}",  # the server's port changes every run
    )


def build_config(run_dir: Path, budget: Budget, teacher: TeacherConfig, seed: int = 0) -> RunConfig:
    """The run's config; also written to ``run_dir/config.yaml`` so each stage can be rerun by hand."""
    raw: dict[str, Any] = {
        "run_dir": str(run_dir),
        "seed": seed,
        "student": DEFAULT_STUDENT,
        "data": {"path": str(run_dir / "data" / "train.jsonl"), "max_prompt_length": 256},
        "teacher": teacher.model_dump(),
        "train": {
            "batch_prompts": budget.batch_prompts, "num_generations": budget.num_generations,
            "max_response_length": budget.max_tokens,
            # A 135M model and a few dozen steps: rates well above the paper's 7B values (1e-6).
            "learning_rate": 1e-5, "disc_learning_rate": 1e-5,
            "save_steps": 1000, "report_to": ["tensorboard"],
            "keep_resume_states": 0,  # a finished stage keeps its HF weights only (disk: 3 GB a stage otherwise)
        },
        # Several sequences per micro-batch: on 2 cores, bigger matmuls beat more of them.
        "parallel": {"micro_batch_tokens": 2048},
        "generate": {"prompt_sets": [str(run_dir / "data" / "test.jsonl")], "max_new_tokens": budget.eval_max_tokens,
                     "batch_size": 16},
        "eval": {"teacher_model": DEFAULT_STUDENT, "collect_teacher": False},
    }
    cfg = parse_config(raw, source="quickstart")
    save_resolved_config(cfg, run_dir, name="config.yaml")
    return cfg


def collect_teacher(run_dir: Path, budget: Budget, train: list[dict], test: list[dict]) -> TeacherConfig:
    """Serve the teacher, answer train + test prompts (cached), write data/train.jsonl and data/test.jsonl.

    Train prompts are answered up to the training response length, test prompts up to the eval budget
    that the students also generate with. Returns the training teacher (written to the run's config).
    """
    from gad_megatron.llama_server import LlamaServer

    # Nothing else computes during collection (the client only waits): the server gets every core.
    with LlamaServer(n_ctx=2048, n_threads=os.cpu_count() or 1) as server:
        teacher = teacher_config(budget.max_tokens, server.base_url)
        by_id: dict[str, dict] = {}
        for prompts, max_tokens in ((train, budget.max_tokens), (test, budget.eval_max_tokens)):
            rows, stats = collect(prompts, teacher_config(max_tokens, server.base_url), run_dir / CACHE_NAME)
            log.info("teacher, %d tokens: %d answered (%d cached), %d failed", max_tokens, stats.ok, stats.cached,
                     stats.failed)
            by_id.update((r["id"], r) for r in rows)
    kept, dropped = usable_rows([by_id[r["id"]] for r in train], keep_flagged=False)
    log.info("train: %d prompts with a usable teacher answer (%s left out)", len(kept), dropped)
    write_jsonl(run_dir / "data" / "train.jsonl", kept)
    write_jsonl(run_dir / "data" / "test.jsonl", [by_id[r["id"]] for r in test if by_id[r["id"]]["teacher_response"]])
    return teacher


def train_all(cfg: RunConfig, budget: Budget, fresh: bool, discriminator: str = "head") -> dict[str, Path]:
    """SeqKD, then GAD's warmup and adversarial stages with D of kind ``discriminator`` (one of
    :data:`DISCRIMINATORS`). A finished stage (``final/COMPLETE``) is reused when it was trained
    with the same train settings and no stage before it was trained again.

    The paper's generator warmup is SFT on the teacher text, which is what SeqKD is: the SeqKD
    model is the warmed-up generator, and the warmup stage trains only D on its rollouts
    (``disc_only_steps`` = all warmup steps). This saves a second SFT pass on a CPU budget and
    makes the comparison exact: GAD = SeqKD + the adversarial stage.
    """
    warmup_d, gad_d = discriminator_fields(discriminator, budget)
    seqkd, fresh = train_once(cfg, "seqkd", budget.seqkd_steps, fresh, batch_prompts=budget.seqkd_batch_prompts)
    warmup, fresh = train_once(cfg, "warmup", budget.warmup_steps, fresh, init_from=str(seqkd),
                               disc_only_steps=budget.warmup_steps, **warmup_d)  # fmt: skip
    gad, _ = train_once(cfg, "gad", budget.gad_steps, fresh, learning_rate=budget.gad_lr, **gad_d)
    return {"seqkd": seqkd, "warmup": warmup, "gad": gad}


def train_once(cfg: RunConfig, stage: str, max_steps: int, fresh: bool = False, **train: Any) -> tuple[Path, bool]:
    """Train one stage for ``max_steps`` (extra ``train`` fields override), unless it finished
    earlier with the same train settings. -> (its ``final`` dir, whether it was trained now)"""
    from gad_megatron.config import ConfigError, TrainConfig, load_config
    from gad_megatron.trainer.run import COMPLETE_MARKER, train_stage
    from gad_megatron.trainer.setup import stage_dir

    updates = {"stage": stage, "max_steps": max_steps, **train}
    wanted = TrainConfig.model_validate({**cfg.train.model_dump(), **updates})
    final, saved = stage_dir(cfg, stage) / "final", stage_dir(cfg, stage) / "config.resolved.yaml"
    if (final / COMPLETE_MARKER).is_file() and not fresh:
        try:  # a config an older version wrote (a field since renamed) is a change, not a crash
            before = load_config(saved).train if saved.is_file() else None
        except ConfigError as err:
            log.info("%s: cannot read its saved settings (%s)", stage, str(err).splitlines()[0])
            before = None
        if before == wanted:
            log.info("%s: reusing %s", stage, final)
            return final, False
        changed = sorted(k for k in wanted.model_fields if before is None or getattr(before, k) != getattr(wanted, k))
        log.info("%s: training again, its settings changed (%s)", stage, ", ".join(changed))
    return train_stage(cfg.model_copy(update={"train": wanted})), True


def add_style_rates(cfg: RunConfig) -> dict[str, float | None]:
    """Share of each model's test responses carrying the teacher's style markers; stored in results.json.

    Per model and suite: ``style_rate`` over all responses and ``style_rate_complete`` over the
    ``n_complete`` responses not cut at the token cap (a cut answer loses its closing marker, so the
    plain rate rewards short answers). Returns the complete-answer rate per model, the headline.
    """
    from gad_megatron.data import read_jsonl
    from gad_megatron.evaluation.evaluate import write_json

    style = load_teacher_style()
    path = Path(cfg.run_dir) / "eval" / "results.json"
    results = json.loads(path.read_text())
    rates = {}
    for tag in results["models"]:
        for suite, metrics in results["results"][tag].items():
            gen = Path(cfg.run_dir) / "generations" / tag / f"{suite}.jsonl"
            rows = read_jsonl(gen)
            metrics["style_rate"] = style_rate((r["response"] for r in rows), style)
            metrics["style_rate_complete"], metrics["n_complete"] = style_rate_complete(rows, style)
            rates[tag] = metrics["style_rate_complete"]
    write_json(path, results)
    return rates


def print_summary(cfg: RunConfig, seconds: float, report: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    results = json.loads((Path(cfg.run_dir) / "eval" / "results.json").read_text())
    table = Table(title="gad quickstart: held-out prompts")
    cols = ("model", "style, complete answers", "style, all", "truncated", "log-lik under teacher", "distinguishable",
            "ROUGE-L", "length")
    for col in cols:
        table.add_column(col, justify="right")
    for tag in results["models"]:
        for m in results["results"][tag].values():
            ll = ((m.get("loglik") or {}).get("under_teacher") or {}).get("mean_token_loglik")
            dist = (m.get("distinguishability") or {}).get("accuracy")
            fmt = lambda v, p: "-" if v is None else p.format(v)  # noqa: E731
            table.add_row(tag, fmt(m.get("style_rate_complete"), "{:.0%}"), fmt(m.get("style_rate"), "{:.0%}"),
                          fmt(m.get("truncated_frac"), "{:.0%}"), fmt(ll, "{:.3f}"), fmt(dist, "{:.0%}"),
                          fmt(m.get("rouge_l"), "{:.3f}"), fmt(m.get("len_mean"), "{:.1f}"))
    console = Console()
    console.print(table)
    console.print(f"finished in {seconds / 60:.1f} min. Report: {report}")


def run_quickstart(run_dir: str = "runs/quickstart", tiny: bool = False, fresh: bool = False,
                   discriminator: str = "head") -> int:
    from gad_megatron.evaluation.evaluate import evaluate_run
    from gad_megatron.evaluation.generate import run_generate
    from gad_megatron.evaluation.report import write_report

    start = time.monotonic()
    budget = TINY if tiny else FULL
    root = Path(run_dir).resolve()
    train, test = split_prompts(budget.n_train, budget.n_test)
    cfg = build_config(root, budget, collect_teacher(root, budget, train, test))
    finals = train_all(cfg, budget, fresh, discriminator)
    for spec in (DEFAULT_STUDENT, str(finals["seqkd"]), str(finals["gad"])):
        run_generate(cfg, model=spec)
    evaluate_run(cfg)
    add_style_rates(cfg)
    report = write_report([root])["html"]
    print_summary(cfg, time.monotonic() - start, report)
    return 0
