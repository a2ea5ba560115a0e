"""The rollout replicas' distribution logic on N gloo processes, no model involved.

    torchrun --nproc_per_node 4 tests/helpers/replica_check.py OUT.json

For several (engine ranks, replica size, data-parallel size) layouts, every rank runs
:func:`generate_for_step` with a recording ``generate`` whose rollouts encode (prompt, first prompt
of the share); then :func:`gad_megatron.trainer.steps.generate` with a recording engine, to see when it
sleeps. Rank 0 writes what every rank saw; the test asserts on it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch.distributed as dist

from gad_megatron.rollout.engine import Completion, SamplingParams
from gad_megatron.rollout.replicas import Replicas, generate_for_step
from gad_megatron.rollout.step import Rollout, RolloutSettings

N_PROMPTS = 6


def fake_rollout(prompt: int, share_index: int, first: int) -> Rollout:
    return Rollout(share_index, (prompt, first), (0.0, 0.0), f"p{prompt}", False, (prompt,))


def run_layout(engine_ranks: list[int], size: int, dp_size: int, diverge: bool = False) -> dict[str, Any]:
    replicas = Replicas.of(engine_ranks, size)
    rank = dist.get_rank()
    calls: list[Any] = []

    def generate(share: range) -> list[Rollout]:
        calls.append(list(share))
        salt = rank if diverge else 0  # a replica whose ranks sample differently
        return [fake_rollout(p + salt, i, share.start) for i, p in enumerate(share)]

    share = N_PROMPTS // dp_size
    dp_rank = rank % dp_size
    keep = range(dp_rank * share, (dp_rank + 1) * share)
    try:
        got = generate_for_step(replicas, N_PROMPTS, generate, keep)
    except RuntimeError as err:
        return {"error": str(err)}
    return {"calls": calls, "keep": list(keep), "got": [[r.prompt_index, *r.token_ids] for r in got]}


class RecordingEngine:
    """An InferenceEngine that records sleeps; completions are the prompt's first token."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        self.events.append(["generate", len(prompt_token_ids)])
        return [Completion(i, [ids[0]], "x", [0.0], "length") for i, ids in enumerate(prompt_token_ids)
                for _ in range(sampling.n)]  # fmt: skip

    def sleep(self, keep_weights: bool = True) -> None:
        self.events.append(["sleep", keep_weights])


def run_step_generate() -> list[Any]:
    from gad_megatron.models.sources import load_tokenizer
    from gad_megatron.text_encoding import TextEncoder
    from gad_megatron.trainer.steps import StepContext, generate

    engine = RecordingEngine()
    ctx = StepContext(
        g=None, d_lm=None, d=None, ref=None, engine=engine, replicas=Replicas.of(range(dist.get_world_size()), 1),
        encoder=TextEncoder(load_tokenizer(sys.argv[2]), 32, 1), rollout=RolloutSettings(n=2, max_tokens=1),
        token_budget=64, disc_loss="bt", clip=0.2, kl_beta=0.0, tis_cap=None, seed=0,
    )  # fmt: skip
    prompts = [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(dist.get_world_size())]
    for reload_follows in (True, False):
        generate(ctx, prompts, 1, reload_follows)
    return engine.events


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    report = {
        "vllm_tp2_dp4": run_layout(list(range(world)), 2, 4),  # trainer TP 1: replicas span two DP ranks
        "vllm_tp1_dp2": run_layout(list(range(world)), 1, 2),  # trainer TP 2: 4 replicas, 2 DP shares
        "hf_leaders_dp2": run_layout([0, 2], 1, 2),  # transformers engines on model-parallel leaders
        "diverging": run_layout(list(range(world)), 2, 4, diverge=True),
        "sleep": run_step_generate(),
    }
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, report)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(everyone, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
