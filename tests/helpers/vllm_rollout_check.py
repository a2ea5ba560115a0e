"""A real vLLM engine (the CPU build) fed by a Megatron policy through the resharding layer.

    torchrun --nproc_per_node N tests/helpers/vllm_rollout_check.py MODEL_DIR OUT.json --tp T --pp P --rollout-tp R

The policy (TP x PP) loads ``MODEL_DIR``; all its weights are then moved away from the checkpoint (the engine starts from it, so a sync that leaves stale weights shows), and
``sync_weights`` hands them to one ``VLLMEngine`` per rank (replicas of R ranks). Rollouts go
through the trainer's own path (:func:`generate_for_step` + :func:`rollout_step`: replica shares,
per-prompt seeds). Rank 0 writes ``OUT.json``:

* ``greedy_equal``: per prompt, the engine's greedy tokens equal a greedy loop over the
  policy's ``full_logits``;
* ``max_logprob_diff``: the largest |engine - trainer| log-prob of a sampled token
  (temperature 0.8) and of a greedy one;
* ``replica_tokens``: each rank's own completions (the ranks of a replica must agree);
* ``prompts_by_rank``: the step prompts each rank generated.
"""

from __future__ import annotations

import argparse
import json
import zlib
from typing import Any

import torch
import torch.distributed as dist

from gad_megatron.models.policy import MegatronLM, broadcast_from_last_stage, build_policy, full_logits
from gad_megatron.models.sources import load_tokenizer
from gad_megatron.parallel.launch import init_distributed
from gad_megatron.rollout.replicas import Replicas, generate_for_step
from gad_megatron.rollout.reshard import sync_weights
from gad_megatron.rollout.step import Rollout, RolloutSettings, rollout_step, stop_token_ids
from gad_megatron.rollout.vllm_engine import VLLMEngine
from gad_megatron.text_encoding import TextEncoder

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colours of the rainbow."}],
    [{"role": "user", "content": "Write one sentence about owls."}],
]
MAX_TOKENS = 12
NOISE = 0.005  # per weight: the model still answers sensibly, and every log-prob moves far more than 1e-4


def policy_logits(lm: MegatronLM, ids: list[int]) -> torch.Tensor:
    """The policy's fp32 logits [T, vocab] of one sequence, on every rank."""
    ids_BT = torch.tensor([ids])
    logits = full_logits(lm, ids_BT)
    return broadcast_from_last_stage(logits, (1, len(ids), lm.layout.vocab_size), torch.float32)[0].float()


def megatron_greedy(lm: MegatronLM, prompt: list[int], stop: set[int]) -> list[int]:
    out: list[int] = []
    for _ in range(MAX_TOKENS):
        token = int(policy_logits(lm, prompt + out)[-1].argmax())
        out.append(token)
        if token in stop:
            break
    return out


def trainer_logprobs(lm: MegatronLM, prompt: list[int], tokens: tuple[int, ...], temperature: float) -> torch.Tensor:
    logits = policy_logits(lm, prompt + list(tokens))[len(prompt) - 1 : -1]
    return (logits / (temperature or 1.0)).log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(1)


def move_weights(lm: MegatronLM) -> None:
    """Deterministic noise on every parameter, as training would move them. A TP-split parameter
    gets noise per shard, a replicated one (norms) the same on every rank; a tied output layer
    (the last stage's copy of the embedding at PP > 1) the embedding's own noise."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tied = lm.hf_config.tie_word_embeddings
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            key = "embedding" if name.endswith("word_embeddings.weight") or (tied and "output_layer" in name) else name
            shard = tp_rank if getattr(param, "tensor_model_parallel", False) else -1
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(zlib.crc32(f"{key}:{shard}".encode())))
            param.add_(noise.to(param.dtype) * NOISE)


def rollouts(engine: VLLMEngine, replicas: Replicas, encoder: TextEncoder, temperature: float,
             n: int, record: dict[str, Any]) -> list[Rollout]:  # fmt: skip
    settings = RolloutSettings(n=n, max_tokens=MAX_TOKENS, temperature=temperature)

    def run(share: range) -> list[Rollout]:
        out = rollout_step(engine, [PROMPTS[i] for i in share], encoder, encoder, settings, 0, 1, share.start)
        record.setdefault("prompts", []).extend(share)
        record.setdefault("tokens", []).append([list(r.token_ids) for r in out])
        return out

    return generate_for_step(replicas, len(PROMPTS), run, range(len(PROMPTS)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--rollout-tp", type=int, default=1)
    args = parser.parse_args()

    init_distributed(args.tp, args.pp, 0)
    lm = build_policy(args.model, torch.float32)
    move_weights(lm)
    tokenizer = load_tokenizer(args.model)
    engine = VLLMEngine(args.model, tokenizer, tensor_parallel_size=args.rollout_tp, dtype="float32",
                        kv_cache_bytes=64 << 20, max_model_len=256)  # fmt: skip
    replicas = Replicas.of(range(dist.get_world_size()), args.rollout_tp)
    sync_weights(lm, None, engine)
    encoder = TextEncoder(tokenizer, 64, MAX_TOKENS)
    stop = set(stop_token_ids(encoder))
    record: dict[str, Any] = {}
    greedy = rollouts(engine, replicas, encoder, 0.0, 1, record)
    sampled = rollouts(engine, replicas, encoder, 0.8, 4, record)
    greedy_equal, diffs = [], {"greedy": 0.0, "sampled": 0.0}
    for kind, batch, temperature in (("greedy", greedy, 0.0), ("sampled", sampled, 0.8)):
        for r in batch:
            prompt = encoder.prompt_ids(PROMPTS[r.prompt_index])
            ours = trainer_logprobs(lm, prompt, r.token_ids, temperature)
            diffs[kind] = max(diffs[kind], float((ours - torch.tensor(r.logprobs)).abs().max()))
            if kind == "greedy":
                greedy_equal.append(megatron_greedy(lm, prompt, stop) == list(r.token_ids))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, record)
    if dist.get_rank() == 0:
        report = {
            "greedy_equal": greedy_equal, "max_logprob_diff": diffs,
            "replica_tokens": [r.get("tokens") for r in everyone], "prompts_by_rank": [r.get("prompts") for r in everyone],
            "sampled_texts": sorted({r.text for r in sampled}), "n_sampled": len(sampled),
        }  # fmt: skip
        with open(args.out, "w") as fh:
            json.dump(report, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
