"""Context distillation study: base vs SeqKD vs GAD (vs GAD with a frozen D), over seeds.

    .venv/bin/python bench/context_distillation.py                    # 3 seeds with the frozen-D ablation
    .venv/bin/python bench/context_distillation.py --seeds 3 4        # more seeds into the same --out

Teacher: SmolLM2-135M (llama.cpp, 127.0.0.1) + the quickstart's hidden few-shot style.
Train prompts: Self-Instruct seed tasks (175); held out, two sets of different kinds: Vicuna (80
open questions) and MT-Bench first turns (80: writing, roleplay, reasoning, math, coding,
extraction, STEM, humanities), all read from ../shared/data at run time. Per seed: SeqKD; a D-only warmup from the SeqKD model
that ends once D's pair accuracy is high (``--warmup-until-d-acc``, capped by
``--warmup-steps``); GAD at a low generator lr (``--gad-lr``) for more steps, N rollouts per
prompt; with ``--frozen`` also the off-policy ablation (GAD from the same warmup with D frozen).
Then greedy generation on the held-out prompts, `gad eval` metrics plus the style rate, and a
summary over seeds (mean, std) written to ``<out>/summary.json`` and ``<out>/summary.md``; the
paired statistics and per-seed curves of ``bench/study_analysis.py`` (``paired.md``,
``training_curves.png``). A seed whose evaluation finished is read back, not rerun, so an
interrupted study resumes where it stopped and later seeds can be added to the same ``--out``;
``--reevaluate`` scores finished seeds again from their generations (after a metric changes, or
to judge them with ``--judge-url``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

from gad_megatron.config import DEFAULT_STUDENT, RunConfig, TeacherConfig
from gad_megatron.data import read_jsonl
from gad_megatron.evaluation.evaluate import evaluate_run
from gad_megatron.evaluation.generate import run_generate
from gad_megatron.quickstart import (DISCRIMINATORS, FULL, Budget, add_style_rates, build_config, collect_teacher,
                                     discriminator_fields, train_once)
from study_analysis import analyse  # bench/ is sys.path[0]

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METRICS = {
    "style_rate": lambda m: m.get("style_rate"),
    "loglik_under_teacher": lambda m: ((m.get("loglik") or {}).get("under_teacher") or {}).get("mean_token_loglik"),
    "teacher_loglik_under_model": lambda m: ((m.get("loglik") or {}).get("teacher_under_model") or {}).get("mean_token_loglik"),
    "distinguishability": lambda m: (m.get("distinguishability") or {}).get("accuracy"),
    "rouge_l": lambda m: m.get("rouge_l"),
    "repetition": lambda m: m.get("repetition"),
    "judge_score": lambda m: m.get("judge_score"),
    "judge_score_lc": lambda m: m.get("judge_score_lc"),
    "len_mean": lambda m: m.get("len_mean"),
}


def prompts(name: str) -> list[dict]:
    return [{"id": r["id"], "prompt": r["prompt"]} for r in read_jsonl(DATA / name)]


def run_seed(root: Path, seed: int, budget: Budget, teacher: TeacherConfig, recipe: argparse.Namespace) -> dict:
    run = root / f"seed{seed}"
    results = run / "eval" / "results.json"
    if results.is_file() and not recipe.reevaluate:
        return json.loads(results.read_text())
    (run / "data").mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "test.jsonl"):
        (run / "data" / name).write_text((root / "data" / name).read_text())
    cfg = seed_config(run, budget, teacher, seed, recipe)
    if not results.is_file():
        train_and_generate(cfg, run, budget, recipe)
    evaluate_run(cfg)
    add_style_rates(cfg)
    return json.loads(results.read_text())


def seed_config(run: Path, budget: Budget, teacher: TeacherConfig, seed: int, recipe: argparse.Namespace) -> RunConfig:
    """The quickstart's config for one seed, evaluated on 80 log-likelihood prompts (every other one:
    40 of each held-out set; scoring under the teacher carries its ~330-token context) and judged
    by ``--judge-url`` when given."""
    cfg = build_config(run, budget, teacher, seed=seed)
    judge = None
    if recipe.judge_url:
        judge = TeacherConfig(base_url=recipe.judge_url, model=recipe.judge_model, api_key_env=recipe.judge_key_env)
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"loglik_max_examples": 80, "judge": judge})})


def train_and_generate(cfg: RunConfig, run: Path, budget: Budget, recipe: argparse.Namespace) -> None:
    warmup_d, gad_d = discriminator_fields(recipe.discriminator, budget)
    seqkd, fresh = train_once(cfg, "seqkd", budget.seqkd_steps, batch_prompts=recipe.seqkd_batch_prompts)
    warm, fresh = train_once(cfg, "warmup", budget.warmup_steps, fresh, init_from=str(seqkd),
                             disc_only_steps=budget.warmup_steps, warmup_until_d_acc=recipe.warmup_until_d_acc,
                             **warmup_d)  # fmt: skip
    gad, _ = train_once(cfg, "gad", budget.gad_steps, fresh, learning_rate=recipe.gad_lr, **gad_d)
    models = [DEFAULT_STUDENT, str(seqkd), str(gad)]
    if recipe.frozen:
        frozen_cfg = cfg.model_copy(update={"run_dir": str(run / "frozen")})
        models.append(str(train_once(frozen_cfg, "gad", budget.gad_steps, fresh, init_from=str(warm),
                                     freeze_discriminator=True, learning_rate=recipe.gad_lr, **gad_d)[0]))  # fmt: skip
    for spec in models:
        run_generate(cfg, model=spec)


def summarize(results: list[dict]) -> dict:
    """model -> metric -> {mean, std, values} over seeds."""
    out: dict = {}
    for res in results:
        for tag in res["models"]:
            m = res["results"][tag]["test"]
            for name, get in METRICS.items():
                v = get(m)
                if v is not None:
                    out.setdefault(tag, {}).setdefault(name, []).append(v)
    return {tag: {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
                  for k, v in ms.items()} for tag, ms in out.items()}


def markdown(summary: dict) -> str:
    cols = list(METRICS)
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for tag, ms in summary.items():
        cells = [f"{ms[c]['mean']:.3f} ± {ms[c]['std']:.3f}" if c in ms else "-" for c in cols]
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/context_distillation")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--warmup-steps", type=int, default=10, help="cap on the D-only warmup")
    ap.add_argument("--warmup-until-d-acc", type=float, default=0.9,
                    help="end the warmup once D's pair accuracy (mean of 3 steps) reaches this")
    ap.add_argument("--gad-steps", type=int, default=16)
    ap.add_argument("--discriminator", choices=DISCRIMINATORS, default="head",
                    help="D's kind, as gad quickstart's (likelihood-ratio: pretrained on cached rollouts first)")
    ap.add_argument("--gad-lr", type=float, default=3e-6, help="the generator's lr in GAD")
    ap.add_argument("--batch-prompts", type=int, default=2, help="prompts per GAD / warmup step")
    ap.add_argument("--num-generations", type=int, default=8, help="rollouts per prompt (N)")
    ap.add_argument("--seqkd-steps", type=int, default=40)
    ap.add_argument("--seqkd-batch-prompts", type=int, default=8)
    ap.add_argument("--frozen", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the frozen-D ablation (doubles GAD's time)")
    ap.add_argument("--judge-url", help="OpenAI-compatible judge endpoint (paper: GPT-4o); adds the judge score and "
                    "its length-controlled version. Finished seeds are judged with --reevaluate")
    ap.add_argument("--judge-model", default="gpt-4o", help="the judge's model name at --judge-url")
    ap.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                    help="environment variable holding the judge's API key (the key is never written)")
    ap.add_argument("--reevaluate", action="store_true",
                    help="score finished seeds again with the current evaluation code (their generations are kept)")
    return ap


def main() -> None:
    a = main_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.monotonic()
    root = Path(a.out).resolve()
    budget = replace(FULL, seqkd_steps=a.seqkd_steps, warmup_steps=a.warmup_steps, gad_steps=a.gad_steps,
                     batch_prompts=a.batch_prompts, num_generations=a.num_generations)
    teacher = collect_teacher(root, budget, prompts("seed_tasks175.jsonl"),
                              prompts("vicuna80.jsonl") + prompts("mtbench80_turn1.jsonl"))
    results = [run_seed(root, seed, budget, teacher, a) for seed in a.seeds]
    summary = summarize(results)
    (root / "summary.json").write_text(json.dumps({"settings": vars(a), "budget": budget.__dict__, "summary": summary,
                                                   "minutes": (time.monotonic() - start) / 60}, indent=1))
    (root / "summary.md").write_text(markdown(summary))
    analyse(root)
    print(markdown(summary))
    print((root / "paired.md").read_text())
    print(f"done in {(time.monotonic() - start) / 60:.1f} min: {root / 'summary.md'}")


if __name__ == "__main__":
    main()
