"""Megatron (TP x PP x EP) against transformers on tiny Llama (tied), Qwen2 (untied, QKV bias),
Qwen3 (tied, q/k norms, head_dim 32 != hidden / heads) and Qwen3-MoE (4 experts, top-2).

    torchrun --nproc_per_node N tests/helpers/megatron_parity.py OUT.json TPxPP[xEP] [...]
    torchrun --nproc_per_node N tests/helpers/megatron_parity.py OUT.json --hf-dir DIR TPxPP

The layouts run one after the other in the same processes (one launch, one import of
megatron-core and transformers); a layout with EP > 1 checks the MoE family only. Per layout and family: the policy's logits, D's scores with
right and left padding, and each model exported back to HF from every rank's live state dict.
With ``--hf-dir``: only the logits of that (real) causal LM.
Rank 0 writes ``{layout: {check: max abs difference over ranks}}``.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from gad_megatron.evaluation.hf_discriminator import score_sequences
from gad_megatron.models.convert import EXTRA_STATE, megatron_to_hf
from gad_megatron.models.discriminator import build_discriminator, scores
from gad_megatron.models.moe import globalize_experts
from gad_megatron.models.policy import MegatronLM, build_gpt, build_policy, full_logits, load_hf_weights
from gad_megatron.parallel.launch import init_distributed
from tests.helpers.tiny_hf import FAMILIES, MOE_FAMILIES, disk_state, tiny_model

LENGTHS = (12, 7, 1)


def padded_batch(left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences of LENGTHS tokens (the same on every rank), padded with token 0 to 12."""
    generator = torch.Generator().manual_seed(1)
    ids, mask = torch.zeros(len(LENGTHS), 12, dtype=torch.long), torch.zeros(len(LENGTHS), 12, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        span = slice(12 - n, 12) if left else slice(0, n)
        ids[row, span] = torch.randint(1, 300, (n,), generator=generator)
        mask[row, span] = 1
    return ids, mask


def export_difference(lm: MegatronLM, hf_model: torch.nn.Module) -> float:
    """Every rank's live state dict -> HF tensors; max abs difference to the HF model's saved
    tensors (inf if a tensor is missing or extra). Expert-parallel ranks' experts are merged."""
    from megatron.core import parallel_state

    local = {k: v.detach().cpu() for k, v in lm.model.state_dict().items() if not k.endswith(EXTRA_STATE)}
    key = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (key, parallel_state.get_expert_model_parallel_rank(), local))
    by_ep_rank: dict = {}
    for rank_key, ep_rank, state in reversed(everyone):  # data-parallel replicas: any copy will do
        by_ep_rank.setdefault(rank_key, {})[ep_rank] = state
    experts = getattr(lm.layout, "num_experts", 0)
    shards = {k: globalize_experts([states[e] for e in sorted(states)], experts) for k, states in by_ep_rank.items()}
    if lm.layout.tied and lm.layout.pp > 1:  # the last stage's output layer must equal the embedding
        for t in range(lm.layout.tp):
            embedding = shards[(t, 0)]["embedding.word_embeddings.weight"]
            if not torch.equal(shards[(t, lm.layout.pp - 1)]["output_layer.weight"], embedding):
                return float("inf")
    exported = megatron_to_hf(shards, lm.layout)
    expected = {k: v for k, v in disk_state(hf_model).items() if not (lm.layout.tied and k == "lm_head.weight")}
    if exported.keys() != expected.keys():
        return float("inf")
    return max((exported[k] - v).abs().max().item() for k, v in expected.items())


def logits_difference(lm: MegatronLM, hf_model: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Max abs difference of the logits, on the last pipeline stage only (None elsewhere)."""
    logits = full_logits(lm, ids)
    if logits is None:
        return {}
    with torch.no_grad():
        return {"logits": (logits - hf_model(ids).logits).abs().max().item()}


def check_real_model(hf_dir: str) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    return logits_difference(build_policy(hf_dir), hf_model, ids)


def check_tiny_models(families: tuple[str, ...]) -> dict[str, float]:
    """Inference parity: models in eval mode (megatron-core refuses MoE at TP > 1 without sequence
    parallelism in training mode only; dense models compute the same in both, without dropout)."""
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    right, left = padded_batch(left=False), padded_batch(left=True)
    results: dict[str, float] = {}
    for family in families:
        hf_policy = tiny_model(family, "policy", seed=0)
        policy = build_gpt(hf_policy.config)
        load_hf_weights(policy, disk_state(hf_policy))
        policy.model.eval()
        results.update({f"{family}/{k}": v for k, v in logits_difference(policy, hf_policy, ids).items()})
        results[f"{family}/policy_export"] = export_difference(policy, hf_policy)

        hf_d = tiny_model(family, "discriminator", seed=1)
        d = build_discriminator(hf_d.config)
        load_hf_weights(d, disk_state(hf_d))
        d.model.eval()
        with torch.no_grad():
            reference = score_sequences(hf_d, *right)
        got_right, got_left = scores(d, *right), scores(d, *left)
        results[f"{family}/score"] = (got_right - reference).abs().max().item()
        results[f"{family}/score_left_vs_right"] = (got_left - got_right).abs().max().item()
        results[f"{family}/d_export"] = export_difference(d, hf_d)
    return results


def main(out: str, layouts: list[str], hf_dir: str | None) -> None:
    from megatron.core import parallel_state

    report = {}
    for layout in layouts:
        tp, pp, ep = (int(x) for x in (layout + "x1").split("x")[:3])
        init_distributed(tp, pp, seed=0, ep=ep)
        families = MOE_FAMILIES if ep > 1 else FAMILIES + MOE_FAMILIES
        mine = check_real_model(hf_dir) if hf_dir else check_tiny_models(families)
        parallel_state.destroy_model_parallel()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        report[layout] = {k: max(r[k] for r in everyone if k in r) for k in sorted({k for r in everyone for k in r})}
    if dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(report, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("layouts", nargs="+")
    parser.add_argument("--hf-dir")
    args = parser.parse_args()
    main(args.out, args.layouts, args.hf_dir)
