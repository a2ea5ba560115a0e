"""Extra peak memory of the fused log-prob path vs a full fp32 log_softmax, forward + backward.

    .venv/bin/python bench/loss_memory.py          # 4,096 x 49,152 logits, bf16 and fp32: ~3 min on 2 cores

Each variant runs in a fresh subprocess. The logits (the input) are made first; then the
process's peak RSS is reset (``/proc/self/clear_refs``, Linux) and one forward + backward runs:
per-token log-probs of random targets, an upstream gradient on them, and the gradient w.r.t.
the logits (which the real step passes on to the output layer, so both variants must produce
it). Reported: the peak RSS above the RSS with the input in place (``extra_mib``), and the time.

* ``unfused``: ``log_softmax(logits.float() / temperature)`` over the whole [tokens, vocab],
  gather, autograd backward.
* ``fused``: ``gad_megatron.loss.vocab_parallel_logprobs`` at TP=1 (chunks of ``--chunk``
  tokens in fp32; backward writes the gradient into the logits' storage).
* ``fused+entropy``: the same, also returning the per-token entropy.

A small warm-up of the same variant runs before the reset, so library start-up is not counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

VARIANTS = ("unfused", "fused", "fused+entropy")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TEMPERATURE = 0.8


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_result(out: str, result: dict) -> None:
    """``result`` as indented JSON at ``out`` (its folder made if missing)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def logit_grad(
    variant: str, logits: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Forward the log-probs, backward ``upstream``; returns d(upstream . logprobs)/d(logits)."""
    from gad_megatron.loss import vocab_parallel_logprobs

    if variant == "unfused":
        logprobs = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1).gather(1, target[:, None]).squeeze(1)
    else:
        entropy = variant == "fused+entropy"
        logprobs, _ = vocab_parallel_logprobs(logits, target, chunk_tokens=chunk, real_vocab_size=logits.shape[1],
                                              temperature=TEMPERATURE, with_entropy=entropy)  # fmt: skip
    (grad,) = torch.autograd.grad(logprobs, logits, upstream)
    return grad


def make_inputs(tokens: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Logits filled a slice at a time (no fp32 copy of the whole input ever exists), targets, upstream."""
    gen = torch.Generator().manual_seed(0)
    leaf = torch.empty(tokens, vocab, dtype=dtype)
    for start in range(0, tokens, 256):
        leaf[start : start + 256] = torch.randn(min(256, tokens - start), vocab, generator=gen) * 2
    leaf.requires_grad_()
    # A view, not the leaf itself: like the output layer's logits in a real step (the fused path refuses leaves).
    target, upstream = torch.randint(0, vocab, (tokens,), generator=gen), torch.randn(tokens, generator=gen)
    return leaf, leaf.view(tokens, vocab), target, upstream


def measure(variant: str, dtype: str, tokens: int, vocab: int, chunk: int) -> dict[str, float]:
    """One variant in this (fresh) process."""
    _, small, small_target, small_up = make_inputs(64, 1024, DTYPES[dtype])
    logit_grad(variant, small, small_target, small_up, chunk=16)  # warm-up
    leaf, logits, target, upstream = make_inputs(tokens, vocab, DTYPES[dtype])
    del small, small_target, small_up
    baseline = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    grad = logit_grad(variant, logits, target, upstream, chunk)
    seconds = time.perf_counter() - start
    extra_mib = (status_kib("VmHWM") - baseline) / 1024
    assert grad.shape == logits.shape and torch.isfinite(grad).all()  # after the reading: isfinite allocates [T, V]
    return {"input_mib": logits.numel() * logits.element_size() / 2**20, "extra_mib": extra_mib, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk", type=int, default=1024, help="chunk_tokens of the fused path")
    parser.add_argument("--out", default="bench/results/loss_memory.json")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.tokens, args.vocab, args.chunk)))
        return
    runs: dict[str, dict[str, float]] = {}
    for dtype in DTYPES:
        for variant in VARIANTS:
            child = subprocess.run(
                [sys.executable, __file__, "--one", variant, dtype, "--tokens", str(args.tokens),
                 "--vocab", str(args.vocab), "--chunk", str(args.chunk)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[f"{variant}/{dtype}"] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{variant:>14} {dtype}: {runs[f'{variant}/{dtype}']}", flush=True)
        for variant in VARIANTS[1:]:
            ratio = runs[f"{variant}/{dtype}"]["extra_mib"] / runs[f"unfused/{dtype}"]["extra_mib"]
            runs[f"{variant}/{dtype}"]["extra_vs_unfused"] = ratio
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU, torch {torch.__version__}",
        "settings": {"tokens": args.tokens, "vocab": args.vocab, "chunk_tokens": args.chunk,
                     "temperature": TEMPERATURE},  # fmt: skip
        "runs": runs,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
