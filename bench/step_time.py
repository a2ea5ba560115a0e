"""Seconds per GAD step, split by phase: the Megatron trainer beside the TRL baseline, same work.

    .venv/bin/python bench/step_time.py                        # SmolLM2-135M on CPU, ~12 minutes
    .venv/bin/python bench/step_time.py --random-weights       # no real weights: same architecture, random
    python bench/step_time.py --random-weights --steps 4 --batch-prompts 16 --num-generations 8 --max-response 256   (GPU)
    python bench/step_time.py --random-weights --config-override '{"num_hidden_layers": 24}'

The TRL side needs the bench extra (``pip install -e ".[bench]"``: trl 1.16). Both variants run
one GAD step after another on the same run config: the same model as G, D and KL reference,
the same prompts (Self-Instruct seed tasks from ../shared/data, their human reference as the
teacher text) in the same order, ``batch_prompts`` x ``num_generations`` rollouts of at most
``max_response`` tokens, fp32 on a CPU and bf16 on a GPU. (a) ``megatron``:
:func:`gad_megatron.trainer.steps.gad_step` on the context of
:func:`gad_megatron.trainer.run.build_context` (D in one pass when each prompt's teacher answer
and rollouts fit one micro-batch, as here); (b) ``trl``: ``bench/trl_baseline``'s
``GADTrainer`` with its default bounded-memory D update (two D forwards); (c)
``trl_single_pass``: the same with ``TrlSettings.disc_single_pass`` (one D forward, the whole step's
graph in memory). Each variant runs in a fresh
subprocess: megatron-core initialises torch.distributed for the whole process, and a process's
peak memory (RSS on a CPU) is only per variant that way. The first step is warm-up, excluded
from the medians. ``--random-weights`` saves a randomly initialised model of the same
architecture (rollouts then run to the length limit, which keeps lengths equal across variants).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from gad_megatron.config import RunConfig, parse_config
from gad_megatron.models.sources import load_tokenizer, resolve_model_path
from gad_megatron.trainer.setup import training_records
from trl_baseline.settings import TrlSettings  # bench/ is sys.path[0]

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "seed_tasks175.jsonl"
OUT = Path(__file__).resolve().parent / "results" / "step_time_megatron_vs_trl.json"
VARIANTS = ("megatron", "trl", "trl_single_pass")
PHASES = ("rollout", "scoring", "d_update", "g_update", "sync")


@dataclass(frozen=True)
class Settings:
    """The work both variants do; handed to each variant's subprocess as JSON."""

    model: str  # a local HF directory
    data: str
    steps: int
    batch_prompts: int
    num_generations: int
    micro_batch: int
    max_prompt: int
    max_response: int


def run_config(s: Settings, run_dir: str) -> RunConfig:
    """One config for both variants. Megatron splits batches by tokens, TRL by rows (its
    :class:`TrlSettings`, see :func:`trl_settings`): the token budget holds ``micro_batch``
    sequences of the longest allowed length, so a Megatron micro-batch has at least TRL's rows."""
    return parse_config({
        "run_dir": run_dir, "student": s.model,
        "data": {"path": s.data, "response_column": "reference", "max_prompt_length": s.max_prompt},
        "train": {"stage": "gad", "init_from": s.model, "batch_prompts": s.batch_prompts,
                  "num_generations": s.num_generations,
                  "max_response_length": s.max_response, "max_steps": s.steps, "save_steps": 10_000, "report_to": []},
        "parallel": {"precision": "bf16" if torch.cuda.is_available() else "fp32",
                     "micro_batch_tokens": s.micro_batch * (s.max_prompt + s.max_response)},
    })  # fmt: skip


def trl_settings(variant: str, s: Settings) -> TrlSettings:
    """The TRL baseline's own knobs for ``variant``: ``micro_batch`` rows per pass, D in one or two passes."""
    return TrlSettings(micro_batch_size=s.micro_batch, disc_single_pass=variant == "trl_single_pass")


def step_prompts(records: list[dict[str, Any]], s: Settings) -> list[list[dict[str, Any]]]:
    """The first ``steps x batch_prompts`` usable rows, ``batch_prompts`` per step, in file order."""
    need = s.steps * s.batch_prompts
    if len(records) < need:
        raise SystemExit(f"{s.data}: {len(records)} usable prompts, {need} needed")
    return [records[i : i + s.batch_prompts] for i in range(0, need, s.batch_prompts)]


def time_megatron(cfg: RunConfig, s: Settings) -> list[dict[str, float]]:
    """Per step: ``time/step`` and ``time/<phase>`` from ``gad_step``, and the mean rollout length."""
    from gad_megatron.parallel.launch import init_distributed
    from gad_megatron.trainer.run import build_context
    from gad_megatron.trainer.steps import gad_step

    init_distributed(1, 1, cfg.seed)
    ctx, _, records, _ = build_context(cfg, "gad")
    out = []
    for step, prompts in enumerate(step_prompts(records, s), start=1):
        m = gad_step(ctx, prompts, step)
        out.append({"step": m["time/step"], "len_mean": m["len_mean"],
                    **{p: m[f"time/{p}"] for p in PHASES if f"time/{p}" in m}})  # fmt: skip
    torch.distributed.destroy_process_group()
    return out


class StepTimer(TrainerCallback):
    """Wall time of each TRL optimizer step, and its per-step training logs."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.logs: list[dict[str, float]] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:  # per-step training logs (logging_steps=1), not the run summary
            self.logs.append(dict(logs))


def time_trl(cfg: RunConfig, s: Settings, variant: str) -> list[dict[str, float]]:
    """Per step: wall time of TRL's optimizer step, the phase times the baseline logs, mean length."""
    from datasets import Dataset
    from transformers import set_seed
    from trl_baseline.gad import GADTrainer, _grpo_config, build_discriminator  # bench/ is sys.path[0]

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(s.model)
    rows = [r for batch in step_prompts(training_records(cfg, tokenizer), s) for r in batch]
    trl = trl_settings(variant, s)
    args = _grpo_config(cfg, trl, "gad")
    args.shuffle_dataset = False  # the rows in file order, as the Megatron variant takes them
    timer = StepTimer()
    trainer = GADTrainer(model=s.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[timer], discriminator=build_discriminator(cfg, trl, s.model, False, args.device))  # fmt: skip
    trainer.train()
    return [{"step": sec, "len_mean": log["completions/mean_length"],
             **{p: log[f"time_{p}"] for p in PHASES if f"time_{p}" in log}}  # TRL has no sync: G generates itself
            for sec, log in zip(timer.seconds, timer.logs)]  # fmt: skip


def run_variant(variant: str, s: Settings, out: Path) -> None:
    """Subprocess entry: time ``variant`` and write its per-step times and peak memory to ``out``."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = run_config(s, run_dir)
        steps = time_megatron(cfg, s) if variant == "megatron" else time_trl(cfg, s, variant)
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result: dict[str, Any] = {"steps": steps, "peak_rss_gib": peak_rss_kib / 2**20}
    if torch.cuda.is_available():
        result["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out.write_text(json.dumps(result))


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians over the steps after the first (warm-up); the raw per-step numbers kept beside them."""
    timed = raw["steps"][1:]
    return {
        "step_s": statistics.median(st["step"] for st in timed),
        "phases_s": {p: statistics.median(st[p] for st in timed) if p in timed[0] else None for p in PHASES},
        "len_mean": statistics.mean(st["len_mean"] for st in timed),
        **{k: v for k, v in raw.items() if k.startswith("peak_")},
        "per_step": raw["steps"],
    }


def random_copy(spec: str, out: Path, overrides: dict[str, Any]) -> str:
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
    cpuinfo = Path("/proc/cpuinfo")
    names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")] \
        if cpuinfo.exists() else []  # fmt: skip
    cpu = names[0] if names else platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, no GPU, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="G, D and KL reference (alias, hub id or dir)")
    ap.add_argument("--random-weights", action="store_true", help="same architecture, random weights")
    ap.add_argument("--config-override", type=json.loads, default={},
                    help='with --random-weights: JSON of model config fields to change, e.g. \'{"num_hidden_layers": 24}\'')
    ap.add_argument("--data", type=Path, default=DATA, help="JSONL with prompt and reference (teacher text)")
    ap.add_argument("--steps", type=int, default=3, help="the first is warm-up")
    ap.add_argument("--batch-prompts", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=None, help="rows per TRL micro-batch; default: num_generations")
    ap.add_argument("--max-prompt", type=int, default=256, help="prompts longer than this (tokens) are skipped")
    ap.add_argument("--max-response", type=int, default=48)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # subprocess mode: one variant
    ap.add_argument("--settings", type=json.loads, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        run_variant(a.variant, Settings(**a.settings), a.out)
        return
    if a.steps < 2:
        ap.error("--steps must be at least 2: the first step is warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        if a.random_weights:
            model = random_copy(a.model, Path(tmp) / "model", a.config_override)
        else:
            model = resolve_model_path(a.model)
        s = Settings(model=model, data=str(a.data), steps=a.steps, batch_prompts=a.batch_prompts,
                     num_generations=a.num_generations, micro_batch=a.micro_batch or a.num_generations,
                     max_prompt=a.max_prompt, max_response=a.max_response)  # fmt: skip
        runs = {}
        for variant in VARIANTS:
            out = Path(tmp) / f"{variant}.json"
            subprocess.run([sys.executable, __file__, "--variant", variant, "--settings", json.dumps(asdict(s)),
                            "--out", str(out)], check=True)  # fmt: skip
            runs[variant] = summarise(json.loads(out.read_text()))
    settings = {**vars(a), "data": str(a.data), "out": str(a.out), "micro_batch": s.micro_batch}
    for key in ("variant", "settings"):
        settings.pop(key)
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "command": shlex.join(["python", *sys.argv]),
        "settings": settings,
        "runs": runs,
        "ratio_megatron_to_trl": runs["megatron"]["step_s"] / runs["trl"]["step_s"],
        "ratio_megatron_to_trl_single_pass": runs["megatron"]["step_s"] / runs["trl_single_pass"]["step_s"],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for variant, r in runs.items():
        phases = ", ".join(f"{p} {v:.2f}" for p, v in r["phases_s"].items() if v is not None)
        print(f"{variant}: {r['step_s']:.2f} s/step ({phases})")
    print(f"Megatron / TRL: {result['ratio_megatron_to_trl']:.2f}, Megatron / TRL single pass: "
          f"{result['ratio_megatron_to_trl_single_pass']:.2f} -> {a.out}")


if __name__ == "__main__":
    main()
