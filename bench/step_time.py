"""Time per GAD step, split by phase, beside TRL's plain GRPOTrainer with a frozen reward model.

    .venv/bin/python bench/step_time.py                      # SmolLM2-135M on CPU, ~10 minutes
    .venv/bin/python bench/step_time.py --steps 6 --num-generations 8 --max-response 128 --bf16

Both trainers run in the same process on the same prompts (Self-Instruct seed tasks from
../shared/data, their human reference as the "teacher" text), same batch and lengths. The
baseline's reward model is a same-size ``AutoModelForSequenceClassification`` that TRL runs
frozen under inference_mode: the difference is what co-training D costs. The first step of
each is treated as warm-up and excluded from the medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from gad.config import parse_config
from gad.models import load_tokenizer, resolve_model_path
from gad.trainers.gad import GADTrainer, _grpo_config, build_discriminator

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "seed_tasks175.jsonl"
PHASES = ("time_rollout", "time_scoring", "time_d_update", "time_g_update")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, and the phase metrics TRL logs."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.logs: list[dict] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
        self.step_times.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
        self.logs.append(dict(logs or {}))


def records(n: int) -> list[dict]:
    rows = [json.loads(l) for l in DATA.read_text().splitlines()][:n]
    return [{"id": r["id"], "prompt": r["prompt"], "teacher_response": r["reference"]} for r in rows]


def run_gad(cfg, dataset: Dataset, tokenizer) -> StepTimer:  # noqa: ANN001
    timer = StepTimer()
    args = _grpo_config(cfg, "gad")
    trainer = GADTrainer(
        model=resolve_model_path(cfg.student), args=args, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[timer], discriminator=build_discriminator(cfg, cfg.student, False, args.device),
    )
    trainer.train()
    return timer


def run_grpo_frozen_rm(cfg, dataset: Dataset, tokenizer) -> StepTimer:  # noqa: ANN001
    timer = StepTimer()
    path = resolve_model_path(cfg.student)
    reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    args: GRPOConfig = _grpo_config(cfg, "gad")
    trainer = GRPOTrainer(model=path, reward_funcs=[reward_model], args=args, train_dataset=dataset,
                          processing_class=tokenizer, reward_processing_classes=[tokenizer], callbacks=[timer])
    trainer.train()
    return timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-prompts", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--max-response", type=int, default=64)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fast on CPUs with AVX512-BF16 / AMX)")
    ap.add_argument("--out", default="bench/results/step_time.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config({
            "run_dir": tmp, "data": {"path": str(DATA), "max_prompt_length": 256},
            "train": {"batch_prompts": a.batch_prompts, "num_generations": a.num_generations,
                      "micro_batch_size": a.num_generations, "max_response_length": a.max_response,
                      "max_steps": a.steps, "save_steps": 10_000, "report_to": [], "bf16": a.bf16 or None},
        })
        tokenizer = load_tokenizer(cfg.student)
        dataset = Dataset.from_list(records(a.batch_prompts * a.steps))
        gad = run_gad(cfg, dataset, tokenizer)
        base = run_grpo_frozen_rm(cfg, dataset, tokenizer)
    gad_med = statistics.median(gad.step_times[1:])
    base_med = statistics.median(base.step_times[1:])
    phases = {p: statistics.median([l[p] for l in gad.logs[1:] if p in l]) for p in PHASES}
    result = {
        "date": date.today().isoformat(), "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU",
        "settings": vars(a), "gad_step_s": gad_med, "grpo_frozen_rm_step_s": base_med,
        "ratio": gad_med / base_med, "gad_phases_s": phases,
        "gad_len_mean": statistics.mean(l.get("completions/mean_length", 0) for l in gad.logs if "loss" in l),
        "grpo_len_mean": statistics.mean(l.get("completions/mean_length", 0) for l in base.logs if "loss" in l),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"GAD step {gad_med:.2f}s vs GRPO+frozen RM {base_med:.2f}s: ratio {result['ratio']:.2f}")


if __name__ == "__main__":
    main()
