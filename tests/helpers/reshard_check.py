"""Weight sync from a Megatron policy (TP x PP) into a TransformersEngine on every rank.

    torchrun --nproc_per_node N tests/helpers/reshard_check.py OUT_DIR TPxPP[xEP] [...]
    torchrun --nproc_per_node 1 tests/helpers/reshard_check.py OUT_DIR --hf-dir DIR 1x1

Per layout and model (tiny Llama with tied embeddings, tiny Qwen2 with QKV bias, tiny Qwen3 with
q/k norms and head_dim != hidden / heads, tiny Qwen3-MoE at TP = 1 (only it at EP > 1), or the
real model of ``--hf-dir``), in the same processes:

* sync at two bucket sizes: engine logits vs the policy's gathered logits, and the sync's
  peak extra memory (torch profiler) minus its bound ``max(bucket, largest) + largest``;
* greedy rollouts of the engine vs a greedy loop over the policy's ``full_logits``;
* one Megatron-DDP optimizer step: the engine is stale before the second sync, and after it
  equals the new policy and differs from the old one;
* a stream to rank 0 only (the others yield nothing), and an HF export (sharded safetensors)
  loaded back by transformers; a second export into the same directory is refused everywhere.

Rank 0 writes ``OUT_DIR/report.json``: ``{layout: {model/check: worst value over ranks}}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gad_megatron.models.policy import MegatronLM, broadcast_from_last_stage, build_gpt, full_logits, load_hf_weights
from gad_megatron.parallel.launch import init_distributed
from gad_megatron.rollout.engine import SamplingParams
from gad_megatron.rollout.hf_engine import TransformersEngine
from gad_megatron.rollout.hf_export import export_hf
from gad_megatron.rollout.reshard import plan_buckets, stream_hf_weights, sync_weights
from tests.helpers.tiny_hf import FAMILIES, MOE_FAMILIES, disk_state, tiny_model

GREEDY_TOKENS = 6


class _Tokenizer:
    """What the engine needs of a tokenizer when the test compares token ids only."""

    pad_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def policy_logits(lm: MegatronLM, ids_BT: torch.Tensor) -> torch.Tensor:
    """The policy's logits [B, T, vocab] on every rank (computed on the last stage)."""
    logits = full_logits(lm, ids_BT)
    return broadcast_from_last_stage(logits, (*ids_BT.shape, lm.layout.vocab_size), torch.float32)


def engine_logits(engine: TransformersEngine, ids_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(ids_BT).logits.float()


def megatron_greedy(lm: MegatronLM, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by full forwards (no KV cache): a reference, not an engine."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(policy_logits(lm, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def train_step(lm: MegatronLM, ddp: Any, optimizer: Any, tokens_BT: torch.Tensor) -> None:
    """One next-token-loss step through megatron-core's schedule (any PP)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    position_ids_BT = torch.arange(tokens_BT.shape[1]).expand_as(tokens_BT)

    def forward_step(_data: Any, module: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        out = module(tokens_BT, position_ids_BT, None, labels=tokens_BT)
        return out, lambda per_token: (per_token.float().mean(), {})

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp], num_microbatches=1,
        seq_length=tokens_BT.shape[1], micro_batch_size=tokens_BT.shape[0], forward_only=False,
    )  # fmt: skip
    optimizer.step()


def check_model(hf_model: Any, prompts: list[list[int]], out_dir: Path, tag: str) -> dict[str, float]:
    """Every check for one HF model at the current layout; {check: value} on this rank."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    lm = build_gpt(hf_model.config)
    load_hf_weights(lm, disk_state(hf_model))
    # As Megatron-LM's training loop: without it the schedule never all-reduces the gradients of
    # the tied embedding and its last-stage copy (PP > 1), and the two drift apart.
    lm.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(lm.config, DistributedDataParallelConfig(), lm.model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [ddp])
    engine = TransformersEngine.from_config(hf_model.config, _Tokenizer())
    vocab = hf_model.config.vocab_size
    ids_BT = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    result: dict[str, float] = {}

    largest = max(t.numel * b.tp * b.ep * b.dtype.itemsize for b in plan_buckets(lm, lm.layout) for t in b.tensors)
    for bucket in (largest // 2, 4 * largest):  # below and above the largest tensor
        stats = sync_weights(lm, None, engine, bucket, measure_memory=True)
        assert stats.peak_bytes is not None
        result[f"peak_over_bound_{bucket}"] = stats.peak_bytes - (max(bucket, largest) + largest)
        result[f"peak_bytes_{bucket}"] = stats.peak_bytes
    old_BTV = policy_logits(lm, ids_BT)
    result["logits"] = (engine_logits(engine, ids_BT) - old_BTV).abs().max().item()

    greedy = engine.generate(prompts, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0))
    reference = [megatron_greedy(lm, p, GREEDY_TOKENS) for p in prompts]
    result["greedy_mismatches"] = sum(c.token_ids != r for c, r in zip(greedy, reference))

    train_step(lm, ddp, optimizer, ids_BT)
    new_BTV = policy_logits(lm, ids_BT)
    result["stale_before_resync"] = -(engine_logits(engine, ids_BT) - new_BTV).abs().max().item()  # must be < 0
    sync_weights(lm, None, engine, 4 * largest)
    result["logits_after_step"] = (engine_logits(engine, ids_BT) - new_BTV).abs().max().item()
    result["old_vs_resynced"] = -(engine_logits(engine, ids_BT) - old_BTV).abs().max().item()  # must be < 0

    names = [name for name, _ in stream_hf_weights(lm, None, largest, dst_ranks=[0])]
    expected = {k for k in disk_state(hf_model) if not (lm.layout.tied and k == "lm_head.weight")}
    exact = sorted(names) == sorted(expected) if dist.get_rank() == 0 else not names
    result["dst0_stream_wrong"] = float(not exact)

    exported = export_hf(lm, None, out_dir / tag, max_shard_bytes=largest * 3)
    reloaded = type(hf_model).from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        result["export_logits"] = (reloaded(ids_BT).logits - new_BTV).abs().max().item()
    result["export_single_file"] = float(len(list(exported.glob("*.safetensors"))) < 2)
    try:  # refused on every rank, none left waiting in a collective
        export_hf(lm, None, exported)
        result["export_overwrote"] = 1.0
    except FileExistsError:
        result["export_overwrote"] = 0.0
    return result


def chat_prompts(hf_dir: str) -> list[list[int]]:
    """Questions rendered by the model's chat template, as the rollout step renders them."""
    from gad_megatron.models.sources import load_tokenizer
    from gad_megatron.text_encoding import TextEncoder

    encoder = TextEncoder(load_tokenizer(hf_dir), max_prompt_length=128, max_response_length=GREEDY_TOKENS)
    questions = ["What is the capital of France?", "Name a colour.", "Say hello in French."]
    return [encoder.prompt_ids([{"role": "user", "content": q}]) for q in questions]


def main(out_dir: str, layouts: list[str], hf_dir: str | None) -> None:
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    report = {}
    for layout in layouts:
        tp, pp, ep = (int(x) for x in (layout + "x1").split("x")[:3])
        init_distributed(tp, pp, seed=0, ep=ep)
        if hf_dir:
            models = {"real": AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()}
            prompts = chat_prompts(hf_dir)
        else:
            # MoE trains at TP = 1 only (megatron-core needs sequence parallelism for MoE with TP).
            families = MOE_FAMILIES if ep > 1 else FAMILIES + (MOE_FAMILIES if tp == 1 else ())
            models = {family: tiny_model(family, "policy", seed=0) for family in families}
            prompts = [[5, 17, 42], [7] * 9, [100, 3, 250, 11, 60]]
        mine = {f"{name}/{k}": v for name, hf in models.items()
                for k, v in check_model(hf, prompts, out, f"{layout}-{name}").items()}  # fmt: skip
        parallel_state.destroy_model_parallel()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        report[layout] = {k: max(r[k] for r in everyone) for k in sorted(mine)}
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("layouts", nargs="+")
    parser.add_argument("--hf-dir")
    args = parser.parse_args()
    main(args.out_dir, args.layouts, args.hf_dir)
