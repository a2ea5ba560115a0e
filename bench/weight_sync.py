"""Seconds and GB/s of one full weight sync (Megatron policy -> TransformersEngine) on CPU.

    .venv/bin/python bench/weight_sync.py

    .venv/bin/python bench/weight_sync.py --models smollm2-135m --buckets-mib 16 64 --rounds 2   (quicker)

One torchrun launch per world size (1 process: TP=1; 2 processes: TP=2, then PP=2), gloo.
Models: SmolLM2-135M-Instruct (real weights, fp32) and a random Llama of TinyLlama-1.1B's shape
(bf16, 1.1 B parameters). The engine lives on rank 0 only, so every layout delivers the whole
model once, through every path of the resharding layer: TP=1 reads the parameters in place,
TP=2 gathers each bucket over TP, PP=2 sends the second stage's buckets point to point.

Per layout, model and bucket size (16, 64, 256 MiB): ``--rounds`` timed syncs (after one
warm-up), each followed on rank 0 by a plain ``Tensor.copy_`` of the same total bytes (through
256 MiB buffers, larger than any cache). The figure of merit is the fastest sync over the
fastest memcpy (on a shared machine the fastest round is the least disturbed; medians are in
the JSON). Then one sync under torch's profiler gives its peak extra memory per rank, against
the bound ``max(bucket, largest tensor) + largest tensor``. Writes ``--out`` (default
bench/results/weight_sync.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "weight_sync.json"
LAYOUTS = {1: ("1x1",), 2: ("2x1", "1x2")}
MODELS = ("smollm2-135m", "llama-1.1b-random")
TINYLLAMA_SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
MEMCPY_CHUNK = 256 << 20


def hf_config_and_dtype(model: str) -> tuple[Any, torch.dtype, str | None]:
    """(HF config, dtype, weights dir or None for random weights)."""
    from transformers import AutoConfig, LlamaConfig

    if model == "smollm2-135m":
        from gad_megatron.models.sources import resolve_model_path

        path = resolve_model_path("smollm2-135m-instruct")
        return AutoConfig.from_pretrained(path), torch.float32, path
    return LlamaConfig(**TINYLLAMA_SHAPE), torch.bfloat16, None


def memcpy_seconds(total_bytes: int) -> float:
    """Seconds for ``copy_`` of ``total_bytes`` through two 256 MiB buffers (warm, untimed first pass)."""
    src = torch.ones(min(total_bytes, MEMCPY_CHUNK), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for done in range(0, total_bytes, src.numel()):
        n = min(src.numel(), total_bytes - done)
        dst[:n].copy_(src[:n])
    return time.perf_counter() - start


def bench_model(model: str, buckets_mib: list[int], rounds: int) -> list[dict[str, Any]]:
    """Every bucket size for one model at the current layout; rows on rank 0, [] elsewhere."""
    import torch.distributed as dist

    from gad_megatron.models.policy import build_gpt, build_policy
    from gad_megatron.rollout.hf_engine import TransformersEngine
    from gad_megatron.rollout.reshard import plan_buckets, sync_weights

    config, dtype, path = hf_config_and_dtype(model)
    if path:
        lm = build_policy(path, dtype)
    else:  # random weights, written once so that every page is real memory, as after training
        lm = build_gpt(config, dtype=dtype)
        for param in lm.model.parameters():
            param.data.normal_(0.0, 0.02)
    engine = TransformersEngine.from_config(config, tokenizer=None, dtype=dtype) if dist.get_rank() == 0 else None
    largest = max(t.numel * b.tp * b.dtype.itemsize for b in plan_buckets(lm, lm.layout) for t in b.tensors)
    rows = []
    for mib in buckets_mib:
        bucket = mib << 20
        syncs, copies = [], []
        for _ in range(rounds + 1):  # the first is warm-up
            dist.barrier()
            syncs.append(sync_weights(lm, None, engine, bucket))
            # Right after each sync, so both see the same load on a shared machine.
            copies.append(memcpy_seconds(syncs[-1].bytes) if engine is not None else 0.0)
        peak = sync_weights(lm, None, engine, bucket, measure_memory=True).peak_bytes
        peaks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)
        if engine is not None:
            # The fastest round is the cost without the other jobs' interference; the median is kept too.
            seconds, copy = min(s.seconds for s in syncs[1:]), min(copies[1:])
            gb = syncs[-1].bytes / 1e9
            rows.append(dict(
                model=model, dtype=str(dtype).removeprefix("torch."), bucket_mib=mib, seconds=seconds, gb=gb,
                gb_per_s=gb / seconds, tensors=syncs[-1].tensors, memcpy_seconds=copy, ratio_to_memcpy=seconds / copy,
                median_seconds=statistics.median(s.seconds for s in syncs[1:]),
                median_memcpy_seconds=statistics.median(copies[1:]),
                peak_mib_per_rank=[p / 2**20 for p in peaks], bound_mib=(max(bucket, largest) + largest) / 2**20,
                largest_tensor_mib=largest / 2**20,
            ))  # fmt: skip
    del lm, engine
    return rows


def worker(out: str, models: list[str], buckets_mib: list[int], rounds: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from gad_megatron.models.families import layout_from_hf
    from gad_megatron.parallel.launch import init_distributed

    rows = []
    world = int(os.environ["WORLD_SIZE"])
    for layout in LAYOUTS[world]:
        tp, pp = (int(x) for x in layout.split("x"))
        init_distributed(tp, pp, seed=0)
        for model in models:
            try:  # SmolLM2-135M's 9 heads and 3 KV heads do not split over TP=2
                layout_from_hf(hf_config_and_dtype(model)[0], tp, pp)
            except ValueError as error:
                rows.append(dict(layout=f"TP={tp} PP={pp}", model=model, skipped=str(error)))
                continue
            rows += [dict(layout=f"TP={tp} PP={pp}", **r) for r in bench_model(model, buckets_mib, rounds)]
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | layout | bucket | sync s (best) | GB/s | memcpy s (best) | sync / memcpy "
             "| peak extra MiB (ranks) | bound MiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['layout']} | | skipped: {r['skipped']} | | | | | |")
            continue
        peaks = " / ".join(f"{p:.0f}" for p in r["peak_mib_per_rank"])
        lines.append(f"| {r['model']} ({r['dtype']}, {r['gb']:.2f} GB) | {r['layout']} | {r['bucket_mib']} MiB | "
                     f"{r['seconds']:.2f} | {r['gb_per_s']:.2f} | {r['memcpy_seconds']:.3f} | "
                     f"{r['ratio_to_memcpy']:.1f} | {peaks} | {r['bound_mib']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--buckets-mib", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set by the launcher: the rows' output file
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.models, args.buckets_mib, args.rounds)

    rows, start = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in LAYOUTS:
            out = Path(tmp) / f"rows-{nproc}.json"
            subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                 "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", str(out), "--models",
                 *args.models, "--buckets-mib", *map(str, args.buckets_mib), "--rounds", str(args.rounds)],
                # The cores shared out between the ranks, the same for the sync and the memcpy.
                env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)),
                     "PYTHONWARNINGS": "ignore"}, cwd=ROOT, check=True,
            )  # fmt: skip
            rows += json.loads(out.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "torch": torch.__version__,
        "wall_seconds": round(time.time() - start), "load_average_1_5_15": os.getloadavg(), "rows": rows,
    }, indent=1))  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
