""".venv/bin/python bench/collect_throughput.py --prompts 24 --max-tokens 32 --rounds 3

Teacher-collection throughput (prompts/s) against a local llama.cpp server (SmolLM2-135M-Instruct
GGUF on 127.0.0.1) at client concurrency 1, 2, 4 and 8, next to the server's own single-stream
rate: the same prompts sent one after another with a bare stdlib HTTP loop (no openai client, no
cache, no retries). Every gad run starts from an empty cache, so each prompt is really requested.
Greedy decoding and a fixed max_tokens keep the work per prompt the same in every row. The
configurations are measured in interleaved rounds (rotating order) and the median is reported, so
load from other processes on a shared machine spreads over all rows alike.

Prints a Markdown table and the machine details; paste them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from importlib import resources
from pathlib import Path

from gad_megatron.config import TeacherConfig
from gad_megatron.llama_server import LlamaServer
from gad_megatron.teacher.bulk import run_requests_with_stats


def load_prompts(n: int) -> list[list[dict]]:
    text = resources.files("gad_megatron.assets").joinpath("quickstart_prompts.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [rows[i % len(rows)]["prompt"] for i in range(n)]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def single_stream(base_url: str, model: str, prompts: list[list[dict]], max_tokens: int) -> tuple[float, int]:
    """Seconds and completion tokens for the prompts sent one by one with urllib."""
    tokens = 0
    t0 = time.perf_counter()
    for messages in prompts:
        body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}).encode()
        req = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            tokens += json.loads(resp.read())["usage"]["completion_tokens"]
    return time.perf_counter() - t0, tokens


def gad_run(server: LlamaServer, prompts: list[list[dict]], max_tokens: int, conc: int, cache: Path) -> tuple[float, int, int]:
    cfg = TeacherConfig(base_url=server.base_url, model=server.model, api_key_env=None, temperature=0.0,
                        max_tokens=max_tokens, concurrency=conc, timeout_s=600.0)
    requests = [(f"r{i}", p) for i, p in enumerate(prompts)]
    _, stats = run_requests_with_stats(cfg, requests, cache, progress=False)
    assert stats.ok == len(prompts) and stats.cached == 0, stats.summary(cfg)
    return stats.wall_s, stats.completion_tokens, stats.retries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: cores - 1, at most 8)")
    args = parser.parse_args()

    prompts = load_prompts(args.prompts)
    names = ["server single stream (urllib, sequential)"] + [f"gad collect, concurrency {c}" for c in args.concurrency]
    samples: dict[str, list[tuple[float, int, int]]] = {name: [] for name in names}
    load_before = os.getloadavg()
    with LlamaServer(n_ctx=2048, n_threads=args.threads) as server, tempfile.TemporaryDirectory() as tmp:
        single_stream(server.base_url, server.model, prompts[:2], args.max_tokens)  # warm-up
        for r in range(args.rounds):
            for i in range(len(names)):
                name = names[(i + r) % len(names)]
                if name.startswith("server"):
                    secs, tokens = single_stream(server.base_url, server.model, prompts, args.max_tokens)
                    samples[name].append((secs, tokens, 0))
                else:
                    conc = int(name.rsplit(" ", 1)[1])
                    samples[name].append(gad_run(server, prompts, args.max_tokens, conc, Path(tmp) / f"{r}-{conc}.sqlite"))
                print(f"round {r + 1}: {name}: {args.prompts / samples[name][-1][0]:.2f} prompts/s", flush=True)
        threads = server.n_threads

    print()
    print(f"date: {dt.datetime.now().astimezone().isoformat(timespec='minutes')}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}")
    print(f"server: llama-cpp-python, SmolLM2-135M-Instruct Q4_1, n_ctx 2048, {threads} threads; "
          f"{args.prompts} prompts, max_tokens {args.max_tokens}, greedy; median of {args.rounds} interleaved rounds")
    print(f"load average before / after: {' '.join(f'{x:.2f}' for x in load_before)} / "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| client | prompts/s (median) | min - max | completion tokens/s | retries |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        rates = [args.prompts / secs for secs, _, _ in samples[name]]
        tps = statistics.median(tokens / secs for secs, tokens, _ in samples[name])
        retries = sum(x[2] for x in samples[name])
        print(f"| {name} | {statistics.median(rates):.2f} | {min(rates):.2f} - {max(rates):.2f} | {tps:.1f} | {retries} |")


if __name__ == "__main__":
    main()
