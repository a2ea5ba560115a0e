"""Qwen3-MoE mapping: per-expert tensors, TP x PP round trip, expert-parallel numbering, refusals.
Pure tensor code (the Megatron models are in test_megatron_models.py)."""

from __future__ import annotations

import pytest
import torch

from gad_megatron.models.convert import hf_to_megatron, megatron_to_hf, stage_state_dicts
from gad_megatron.models.families import layout_from_hf, transformer_config_from_hf
from gad_megatron.models.moe import globalize_experts, localize_experts
from tests.helpers.tiny_hf import disk_state, tiny_config, tiny_model

EXPERT_FC1 = "decoder.layers.{}.mlp.experts.local_experts.{}.linear_fc1.weight"


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("role", ["policy", "discriminator"])
@pytest.mark.parametrize("spec", ["local", "te"])
def test_round_trip_tp2_pp2_is_bit_exact(role: str, spec: str) -> None:
    model = tiny_model("qwen3_moe", role)
    layout = layout_from_hf(model.config, tp=2, pp=2, role=role, spec=spec)
    original = disk_state(model)
    assert same(megatron_to_hf(hf_to_megatron(original, layout), layout), original)


def test_expert_tensors_fuse_gate_and_up_and_shard_per_tp_rank() -> None:
    hf = disk_state(tiny_model("qwen3_moe"))
    layout = layout_from_hf(tiny_config("qwen3_moe"), tp=2, pp=2)
    stage1 = stage_state_dicts(layout, hf, pp_rank=1)  # global layer 1 is stage 1's layer 0
    gate, up = hf["model.layers.1.mlp.experts.3.gate_proj.weight"], hf["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert gate.shape == (32, 64)
    fc1 = stage1[1][EXPERT_FC1.format(0, 3)]
    assert torch.equal(fc1, torch.cat([gate[16:], up[16:]]))  # TP rank 1: second halves of gate and up
    assert torch.equal(stage1[0]["decoder.layers.0.mlp.router.weight"], hf["model.layers.1.mlp.gate.weight"])
    assert stage1[0]["decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight"].shape == (64, 16)
    # The MoE layer keeps its own pre-MLP norm under the TE spec too (not fused into linear_fc1).
    te = layout_from_hf(tiny_config("qwen3_moe"), spec="te")
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in te.megatron_names()
    assert not any("mlp.linear_fc1" in n for n in te.megatron_names())


def test_expert_parallel_ranks_hold_their_experts_numbered_from_zero() -> None:
    hf = disk_state(tiny_model("qwen3_moe"))
    layout = layout_from_hf(tiny_config("qwen3_moe"))
    full = stage_state_dicts(layout, hf, 0)[0]
    ranks = [stage_state_dicts(layout, hf, 0, ep=(r, 2))[0] for r in range(2)]
    assert torch.equal(ranks[1][EXPERT_FC1.format(0, 1)], full[EXPERT_FC1.format(0, 3)])  # global 3 = rank 1's 1
    assert not any(".local_experts.2." in k for k in ranks[0]) and ranks[0].keys() == ranks[1].keys()
    assert all(same(localize_experts(full, 4, 2, r), ranks[r]) for r in range(2))
    assert same(globalize_experts(ranks, 4), full)


def test_routing_settings_follow_norm_topk_prob() -> None:
    normalised = transformer_config_from_hf(tiny_config("qwen3_moe"))
    assert (normalised.num_moe_experts, normalised.moe_router_topk, normalised.moe_ffn_hidden_size) == (4, 2, 32)
    assert not normalised.moe_router_pre_softmax and normalised.moe_aux_loss_coeff == 0.0
    assert transformer_config_from_hf(tiny_config("qwen3_moe", norm_topk_prob=False)).moe_router_pre_softmax


@pytest.mark.parametrize(("changes", "tp", "message"), [
    ({"mlp_only_layers": [1]}, 1, "qwen3_moe: mlp_only_layers=\\[1\\] is not supported"),
    ({"decoder_sparse_step": 2}, 1, "decoder_sparse_step=2 is not supported"),
    ({"num_experts_per_tok": 5}, 1, "num_experts_per_tok=5 must be between 1 and num_experts=4"),
    ({"moe_intermediate_size": 33}, 2, "TP=2 does not divide the 33 expert FFN size"),
])  # fmt: skip
def test_refusals(changes: dict, tp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layout_from_hf(tiny_config("qwen3_moe", **changes), tp=tp)


def test_expert_parallel_must_divide_the_experts() -> None:
    state = {EXPERT_FC1.format(0, e): torch.zeros(1) for e in range(4)}
    with pytest.raises(ValueError, match="EP=3 does not divide the 4 experts"):
        localize_experts(state, 4, 3, 0)


def test_trainer_refuses_moe_at_tp2_and_ep_that_does_not_divide() -> None:
    from gad_megatron.config import ConfigError
    from gad_megatron.models.moe import check_moe_training_layout

    check_moe_training_layout(tiny_config("qwen3_moe"), tp=1, ep=2, what="the generator")
    check_moe_training_layout(tiny_config("qwen3"), tp=2, ep=2, what="the discriminator")  # dense: EP ranks are DP
    with pytest.raises(ConfigError, match="the generator is a mixture of experts: parallel.tensor_parallel=2"):
        check_moe_training_layout(tiny_config("qwen3_moe"), tp=2, ep=1, what="the generator")
    with pytest.raises(ConfigError, match="parallel.expert_parallel=3 does not divide the 4 experts"):
        check_moe_training_layout(tiny_config("qwen3_moe"), tp=1, ep=3, what="the generator")
