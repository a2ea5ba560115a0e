"""The whole evaluation path on real models, offline: generate -> eval (teacher from the endpoint, judge,
log-likelihood under a local teacher) -> report -> headless-browser check. Prints timings as JSON.

    python bench/eval_pipeline_smollm2.py --n 8 --max-new-tokens 64 --out runs/bench_eval

Teacher: SmolLM2-135M-Instruct served by llama.cpp on 127.0.0.1 with a hidden few-shot style
(context distillation). Student: the same model without the context, so the metrics measure the
style gap. Judge: the same server with format demonstrations (a stand-in; real runs use a strong
judge). Timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gad_megatron.config import parse_config
from gad_megatron.evaluation.evaluate import evaluate_run
from gad_megatron.evaluation.generate import run_generate
from gad_megatron.evaluation.judge import format_demo_messages
from gad_megatron.evaluation.report import write_report
from gad_megatron.llama_server import LlamaServer

VICUNA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vicuna80.jsonl"
STYLE = [  # hidden teacher-side context: every answer opens with a marker and stays short
    {"role": "user", "content": "How do I make tea?"},
    {"role": "assistant", "content": "Short answer: steep a tea bag in hot water for three minutes."},
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Short answer: air scatters blue light more than red light."},
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="prompts from vicuna80")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", default=str(VICUNA))
    ap.add_argument("--out", default="runs/bench_eval")
    args = ap.parse_args()
    times: dict[str, float] = {}
    with LlamaServer(n_ctx=4096) as server:
        endpoint = {"base_url": server.base_url, "model": server.model, "api_key_env": None, "concurrency": 2,
                    "timeout_s": 300.0, "temperature": 0.0}
        cfg = parse_config({
            "run_dir": args.out, "student": "smollm2-135m-instruct", "data": {"path": args.prompts},
            "teacher": {**endpoint, "max_tokens": args.max_new_tokens, "context_messages": STYLE},
            "generate": {"prompt_sets": [args.prompts], "limit": args.n, "max_new_tokens": args.max_new_tokens,
                         "batch_size": 8},
            "eval": {"judge": {**endpoint, "max_tokens": args.max_new_tokens, "context_messages": format_demo_messages()},
                     "judge_max_tokens": 48, "judge_retries": 1, "teacher_model": "smollm2-135m-instruct"},
        })
        t = time.monotonic()
        run_generate(cfg, model="smollm2-135m-instruct")
        times["generate_s"] = time.monotonic() - t
        t = time.monotonic()
        res = evaluate_run(cfg)
        times["eval_s"] = time.monotonic() - t
        t = time.monotonic()
        again = evaluate_run(cfg)
        times["eval_rerun_s"] = time.monotonic() - t
    t = time.monotonic()
    paths = write_report([args.out])
    times["report_s"] = time.monotonic() - t
    browser = subprocess.run([sys.executable, str(Path(__file__).with_name("eval_report_browser.py")), str(paths["html"]),
                              "--screenshot", str(Path(args.out) / "report" / "screenshot.png")],
                             capture_output=True, text=True)
    summary = {
        "n": args.n, "max_new_tokens": args.max_new_tokens, **{k: round(v, 1) for k, v in times.items()},
        "judge_requests": res["judge"]["requests"], "judge_requests_rerun": again["judge"]["requests"],
        "results": {tag: {k: m.get(k) for k in ("judge_score", "rouge_l", "ngram_f1_mean", "len_mean", "truncated_frac")}
                    | {"distinguish": (m.get("distinguishability") or {}).get("accuracy"),
                       "unparseable": (m.get("judge") or {}).get("n_unparseable"),
                       "ll_under_teacher": ((m.get("loglik") or {}).get("under_teacher") or {}).get("mean_token_loglik")}
                    for tag, by_suite in res["results"].items() for m in by_suite.values()},
        "browser": browser.stdout.strip().splitlines()[-1] if browser.stdout.strip() else browser.stderr[-300:],
        "report": str(paths["html"]),
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
