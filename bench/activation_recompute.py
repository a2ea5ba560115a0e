"""Peak memory of one training forward + backward with ``parallel.recompute_activations`` none /
selective / full, on a CPU.

    .venv/bin/python bench/activation_recompute.py      # 4 layers, hidden 512, 1 x 2048 tokens: ~3 min on 2 cores

A random Llama-like megatron-core GPTModel (local spec, fp32, as the CPU trainer builds it; vocab
8,192 so the logits do not dwarf the layers) with Megatron DDP, one micro-batch through
megatron-core's schedule with a token-mean NLL, as the trainer runs it
(:func:`gad_megatron.trainer.actor.run_micro_batches`); no optimizer step. Each setting runs in a
fresh subprocess: after the model is built and a small warm-up step ran, the process's peak RSS
is reset (``/proc/self/clear_refs``, Linux) and the measured step runs. Reported: the peak RSS
above the RSS before the step (``extra_mib``: activations, autograd graph, gradients and their
buffers' first touch), and the step's time.
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
from types import SimpleNamespace
from typing import Any

import torch
from loss_memory import status_kib, write_result  # bench/ is sys.path[0]

MODES = ("none", "selective", "full")


def build_actor_for(mode: str, layers: int, hidden: int, vocab: int) -> Any:
    """A random Llama-like policy with ``mode``'s recompute settings, in Megatron DDP (+ optimizer)."""
    from transformers import LlamaConfig

    from gad_megatron.models.policy import build_gpt
    from gad_megatron.models.recompute import recompute_overrides
    from gad_megatron.trainer.actor import TRAINING_OVERRIDES, build_actor

    hf_config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                            num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                            max_position_embeddings=8192, tie_word_embeddings=False)  # fmt: skip
    lm = build_gpt(hf_config, "policy", torch.float32, initialize=True, **TRAINING_OVERRIDES, **recompute_overrides(mode))  # type: ignore[arg-type]
    return build_actor(lm, lr=1e-6, clip_grad=1.0, distributed_optimizer=False)


def train_pass(actor: Any, rows: int, tokens: int, vocab: int) -> None:
    """One forward + backward of a next-token NLL on random tokens (gradients in DDP's buffers)."""
    from gad_megatron.trainer.actor import run_micro_batches, zero_grad

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, tokens + 1), generator=gen)
    batch = SimpleNamespace(input_ids_BT=ids[:, :-1], labels_BT=ids[:, 1:])

    def forward(model: torch.nn.Module, b: Any) -> torch.Tensor:
        return model(input_ids=b.input_ids_BT, position_ids=None, attention_mask=None, labels=b.labels_BT)

    def loss(per_token_BT: torch.Tensor, b: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return per_token_BT.float().sum(), torch.tensor(per_token_BT.numel(), dtype=torch.int), {}

    zero_grad(actor)
    run_micro_batches(actor.ddp, [batch], forward, loss, train=True)


def measure(mode: str, layers: int, hidden: int, vocab: int, rows: int, tokens: int) -> dict[str, float]:
    """One setting in this (fresh) process."""
    from gad_megatron.parallel.launch import init_distributed

    init_distributed(1, 1, 0)
    actor = build_actor_for(mode, layers, hidden, vocab)
    train_pass(actor, 1, 64, vocab)  # warm-up: library start-up and the gradient buffers' first touch
    baseline = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    train_pass(actor, rows, tokens, vocab)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in actor.module.parameters())
    return {"extra_mib": (status_kib("VmHWM") - baseline) / 1024, "seconds": seconds, "params_m": params / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rows", type=int, default=1, help="sequences in the micro-batch")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--out", default="bench/results/activation_recompute.json")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    shape = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
             "--rows", str(args.rows), "--tokens", str(args.tokens)]  # fmt: skip
    if args.one:
        print(json.dumps(measure(args.one, args.layers, args.hidden, args.vocab, args.rows, args.tokens)))
        return
    runs: dict[str, dict[str, float]] = {}
    for mode in MODES:
        child = subprocess.run([sys.executable, __file__, "--one", mode, *shape], capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"{mode}: exit {child.returncode}\n{child.stderr[-3000:]}")
        runs[mode] = json.loads(child.stdout.strip().splitlines()[-1])
        runs[mode]["extra_vs_none"] = runs[mode]["extra_mib"] / runs["none"]["extra_mib"]
        print(f"{mode:>9}: {runs[mode]}", flush=True)
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU, torch {torch.__version__}",
        "command": " ".join(["python", *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("one", "out")},
        "runs": runs,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
