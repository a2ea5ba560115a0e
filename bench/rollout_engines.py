"""Seconds per quickstart rollout step: vLLM's CPU build against the transformers engine, same run.

    .venv/bin/python bench/rollout_engines.py                 # ~3 minutes on 2 cores
    .venv/bin/python bench/rollout_engines.py --repeats 8 --max-tokens 96

The work is the quickstart's GAD rollout step: SmolLM2-135M-Instruct (fp32), 2 quickstart prompts
x 8 samples of at most 48 tokens at temperature 0.8, through :func:`rollout_step` (chat template,
stop tokens, re-encoding for D), then a weight sync of the full state dict (``update_weights``:
the trainer syncs after every G update). Each engine runs in its own subprocess (vLLM takes over
the process's thread settings), the two alternate ``--rounds`` times so that machine noise hits
both, and the first step of each subprocess is warm-up, excluded. Results: median seconds per
rollout step and per sync, generated tokens/s, and the vLLM / transformers ratio, in
``bench/results/rollout_engines.json`` (docs/benchmarks.md has the recorded run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).resolve().parent / "results" / "rollout_engines.json"
ENGINES = ("transformers", "vllm")


def measure(engine_name: str, repeats: int, max_tokens: int, n: int, prompts: int) -> dict[str, Any]:
    """In this process: build ``engine_name`` on SmolLM2, time ``repeats`` rollout steps and syncs."""
    from safetensors.torch import load_file

    from gad_megatron.models.sources import load_tokenizer, resolve_model_path
    from gad_megatron.rollout.step import RolloutSettings, rollout_step
    from gad_megatron.style import load_quickstart_prompts
    from gad_megatron.text_encoding import TextEncoder

    model = resolve_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(model)
    started = time.perf_counter()
    if engine_name == "vllm":
        from transformers import AutoConfig

        from gad_megatron.rollout.vllm_engine import VLLMEngine, kv_cache_bytes

        kv = kv_cache_bytes(AutoConfig.from_pretrained(model), prompts * n, 256 + max_tokens, torch.float32)
        engine = VLLMEngine(model, tokenizer, dtype="float32", max_model_len=256 + max_tokens, kv_cache_bytes=kv)
    else:
        from gad_megatron.rollout.hf_engine import TransformersEngine

        engine = TransformersEngine.from_pretrained(model)
    build_s = time.perf_counter() - started
    weights = load_file(str(Path(model) / "model.safetensors"))
    encoder = TextEncoder(tokenizer, 256, max_tokens)
    batch = [p["prompt"] for p in load_quickstart_prompts()[:prompts]]
    settings = RolloutSettings(n=n, max_tokens=max_tokens, temperature=0.8)
    steps, syncs, tokens = [], [], []
    for step in range(repeats + 1):
        t0 = time.perf_counter()
        rollouts = rollout_step(engine, batch, encoder, encoder, settings, run_seed=0, step=step, first_prompt=0)
        t1 = time.perf_counter()
        engine.update_weights(iter(weights.items()))
        t2 = time.perf_counter()
        if step:  # the first is warm-up
            steps.append(t1 - t0)
            syncs.append(t2 - t1)
            tokens.append(sum(r.length for r in rollouts))
    return {"engine": engine_name, "build_s": build_s, "step_s": steps, "sync_s": syncs, "tokens": tokens,
            "threads": torch.get_num_threads()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed rollout steps per subprocess")
    parser.add_argument("--rounds", type=int, default=2, help="subprocesses per engine, alternating")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    work = (args.repeats, args.max_tokens, args.num_generations, args.prompts)
    if args.worker:
        print(json.dumps(measure(args.worker, *work)))
        return
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ENGINES}
    for _ in range(args.rounds):
        for name in ENGINES:
            cmd = [sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats), "--max-tokens",
                   str(args.max_tokens), "--num-generations", str(args.num_generations), "--prompts", str(args.prompts)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{name}: {statistics.median(runs[name][-1]['step_s']):.2f} s/step", flush=True)
    summary = {}
    for name, results in runs.items():
        steps = [s for r in results for s in r["step_s"]]
        tokens = [t for r in results for t in r["tokens"]]
        summary[name] = {
            "step_s_median": statistics.median(steps), "sync_s_median": statistics.median(s for r in results for s in r["sync_s"]),
            "tokens_per_s": sum(tokens) / sum(steps), "build_s": statistics.median(r["build_s"] for r in results),
            "tokens_per_step": statistics.median(tokens),
        }  # fmt: skip
    ratio = summary["vllm"]["step_s_median"] / summary["transformers"]["step_s_median"]
    report = {
        "date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores", "torch": torch.__version__, "work": dict(zip(("repeats", "max_tokens",
        "num_generations", "prompts"), work)), "summary": summary, "vllm_over_transformers_step": ratio, "runs": runs,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for name, row in summary.items():
        print(f"{name:>12}: {row['step_s_median']:.2f} s/step ({row['tokens_per_s']:.0f} tokens/s), "
              f"sync {row['sync_s_median']:.2f} s, build {row['build_s']:.1f} s")  # fmt: skip
    print(f"vLLM / transformers (s per rollout step): {ratio:.2f}  -> {args.out}")


if __name__ == "__main__":
    main()
