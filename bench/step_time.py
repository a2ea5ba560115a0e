"""Time per GAD step, split by phase, beside TRL's plain GRPOTrainer with a frozen reward model.

    .venv/bin/python bench/step_time.py                      # SmolLM2-135M on CPU, ~15 minutes
    .venv/bin/python bench/step_time.py --steps 6 --num-generations 8 --max-response 128 --bf16
    python bench/step_time.py --random-weights --batch-prompts 16 --num-generations 8 --max-response 256   (GPU)

Three trainers run in the same process on the same prompts (Self-Instruct seed tasks from
../shared/data, their human reference as the "teacher" text), same batch and lengths: GAD with
D's single-pass update (``train.disc_single_pass``), GAD with the default bounded-memory
update (D re-run per micro-batch), and TRL's GRPO whose reward model is a same-size
``AutoModelForSequenceClassification`` run frozen under inference_mode: the difference is what
co-training D costs. The first step of each is warm-up, excluded from the medians. On a GPU
the peak memory of each run is recorded too. ``--random-weights`` builds a model of the same
architecture with random weights (a machine without the real weights; rollouts then run to the
length limit, which only makes timings steadier).
"""

from __future__ import annotations

import argparse
import gc
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

from gad_megatron.config import parse_config
from gad_megatron.models.sources import load_tokenizer, resolve_model_path
from gad_megatron.trainers.gad import GADTrainer, _grpo_config, build_discriminator

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "seed_tasks175.jsonl"
VARIANTS = ("gad_single_pass", "gad_recompute", "grpo_frozen_rm")
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


def records(path: Path, n: int) -> list[dict]:
    rows = [json.loads(l) for l in path.read_text().splitlines()][:n]
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


def random_copy(spec: str, out: Path, overrides: dict) -> str:
    """The architecture (with ``overrides`` applied) and tokenizer of ``spec``, freshly initialised weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(path)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    load_tokenizer(path).save_pretrained(out)
    return str(out)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.machine()} {torch.get_num_threads()} threads, CPU, torch {torch.__version__}"


def timed(variant: str, cfg, dataset: Dataset, tokenizer) -> dict:  # noqa: ANN001
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        if variant == "grpo_frozen_rm":
            timer = run_grpo_frozen_rm(cfg, dataset, tokenizer)
        else:
            train = cfg.train.model_copy(update={"disc_single_pass": variant == "gad_single_pass"})
            timer = run_gad(cfg.model_copy(update={"train": train}), dataset, tokenizer)
    except torch.OutOfMemoryError:
        return {"error": "out of memory", "total_gpu_mem_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}
    out = {
        "step_s": statistics.median(timer.step_times[1:]),
        "len_mean": statistics.mean(l.get("completions/mean_length", 0) for l in timer.logs if "loss" in l),
    }
    if variant != "grpo_frozen_rm":
        out["phases_s"] = {p: statistics.median([l[p] for l in timer.logs[1:] if p in l]) for p in PHASES}
    if torch.cuda.is_available():
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="generator, D and reward model (same size)")
    ap.add_argument("--random-weights", action="store_true", help="same architecture, random weights")
    ap.add_argument("--config-override", type=json.loads, default={},
                    help='with --random-weights: JSON of config fields to change, e.g. \'{"num_hidden_layers": 24}\'')
    ap.add_argument("--data", type=Path, default=DATA, help="JSONL with prompt and reference (teacher text)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-prompts", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=None, help="default: num_generations")
    ap.add_argument("--max-response", type=int, default=64)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (on by default on a GPU)")
    ap.add_argument("--out", default="bench/results/step_time.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = random_copy(a.model, Path(tmp) / "model", a.config_override) if a.random_weights else a.model
        cfg = parse_config({
            "run_dir": tmp, "student": model, "data": {"path": str(a.data), "max_prompt_length": 256},
            "train": {"batch_prompts": a.batch_prompts, "num_generations": a.num_generations,
                      "micro_batch_size": a.micro_batch or a.num_generations, "max_response_length": a.max_response,
                      "max_steps": a.steps, "save_steps": 10_000, "report_to": [], "bf16": a.bf16 or None},
        })
        tokenizer = load_tokenizer(cfg.student)
        dataset = Dataset.from_list(records(a.data, a.batch_prompts * a.steps))
        runs = {v: timed(v, cfg, dataset, tokenizer) for v in VARIANTS}
    base = runs["grpo_frozen_rm"].get("step_s")
    result = {
        "date": date.today().isoformat(), "machine": machine(), "settings": {**vars(a), "data": str(a.data)},
        "runs": runs,
        "ratio_to_grpo": {v: runs[v]["step_s"] / base for v in VARIANTS[:2] if base and "step_s" in runs[v]},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    for v, ratio in result["ratio_to_grpo"].items():
        print(f"{v}: {runs[v]['step_s']:.2f}s/step vs GRPO+frozen RM {base:.2f}s: ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
