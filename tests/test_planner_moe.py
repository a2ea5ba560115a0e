"""``gad plan`` with a mixture-of-experts student: parameters, expert-parallel sharding, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from gad_megatron.config import ParallelConfig, parse_config
from gad_megatron.planner import KNOWN_MODELS, ModelShape, PlanError, expert_params, plan, stage_params, state_bytes

MOE = ModelShape.from_hf(KNOWN_MODELS["qwen3-30b-a3b"])


@pytest.mark.parametrize("role", ["policy", "discriminator"])
def test_parameter_count_equals_the_real_model(role: str) -> None:
    """Exactly the parameters of transformers' Qwen3-MoE built on the meta device from the table's
    config (router [128, 2048] per layer, 128 experts of FFN 768, no dense FFN); the model card: 30.5B."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen3MoeConfig

    known = KNOWN_MODELS["qwen3-30b-a3b"]
    config = Qwen3MoeConfig(**{k: v for k, v in known.items() if k != "model_type"}, num_labels=1)
    auto = AutoModelForSequenceClassification if role == "discriminator" else AutoModelForCausalLM
    with torch.device("meta"):
        real = sum(p.numel() for p in auto.from_config(config).parameters())
    assert sum(stage_params(MOE, role, 1, 1, 0)) == real
    if role == "policy":
        assert real / 1e9 == pytest.approx(30.53, abs=0.01)


def test_experts_split_over_ep_and_their_optimizer_over_dp_per_ep() -> None:
    """EP=8 of DP=8: each GPU holds 1/8 of the experts, and each expert's Adam states are not
    sharded further (expert-data-parallel size 1); the rest shards over all 8 DP ranks."""
    one, eight = (state_bytes(MOE, "policy", ParallelConfig(expert_parallel=ep), 8, 0) for ep in (1, 8))
    experts = expert_params(MOE, 1, 1, 1)
    assert experts == 48 * 128 * 3 * 2048 * 768
    assert one["weights"] - eight["weights"] == 2 * (experts - experts // 8)  # bf16
    rest = sum(stage_params(MOE, "policy", 1, 1, 0)) - experts
    assert eight["optimizer"] == rest * 12 // 8 + experts // 8 * 12
    assert one["optimizer"] == rest * 12 // 8 + experts * 12 // 8


def run_config(tmp_path: Path, **parallel: object) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n')
    return {"run_dir": str(tmp_path / "run"), "student": "Qwen/Qwen3-30B-A3B", "data": {"path": str(data)},
            "train": {"use_vllm": True}, "parallel": parallel}  # fmt: skip


@pytest.mark.parametrize(("parallel", "nodes", "message"), [
    ({"expert_parallel": 3}, 3, "EP=3 does not divide the 128 experts"),
    ({"expert_parallel": 16}, 1, "world size 8 is not a multiple of TP x EP x PP = 1 x 16 x 1"),
    ({"tensor_parallel": 2, "expert_parallel": 4}, 1, "TP=2 with a mixture-of-experts model needs sequence parallelism"),
])  # fmt: skip
def test_layouts_that_do_not_divide_are_refused(tmp_path: Path, parallel: dict, nodes: int, message: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PlanError, match=message):
        plan(parse_config(run_config(tmp_path, **parallel)), nodes, 8)


def test_state_estimate_at_ep2_matches_allocated_bytes(tmp_path: Path) -> None:
    """A tiny Qwen3-MoE at EP=2 on 2 ranks (torchrun, gloo), bf16 with the distributed optimizer:
    each rank's weights, fp32 main grads and optimizer states as megatron-core allocates them
    after an SFT step (half the experts per rank, their Adam states unsharded, the rest sharded
    over DP=2) equal the planner's estimate to 1e-3 (the issue asks 1%). Measured 3.1e-4 on weights and
    grads: the distributed optimizer's buffers align each parameter to 64 values and pad each bucket
    to lcm(DP, 128) values (128 values here, two buffers: dense and expert), which the planner leaves
    out; at a real model's size that is below 1e-6."""
    import json

    from gad_megatron.planner import load_shape
    from tests.helpers.tiny_hf import save_tiny_model
    from tests.helpers.torchrun import ROOT, run_torchrun

    model = save_tiny_model(tmp_path / "moe", "qwen3_moe", hidden_size=128, intermediate_size=256, vocab_size=1000)
    out = tmp_path / "bytes.json"
    run_torchrun(ROOT / "tests/helpers/planner_memory.py", 2, str(out), "1", "2", "bf16", "1", str(model))
    rows = json.loads(out.read_text())
    assert [(row["stage"], row["dp"]) for row in rows] == [(0, 2), (0, 2)]
    shape = load_shape(str(model))
    one_rank = state_bytes(shape, "policy", ParallelConfig(precision="bf16", expert_parallel=2), 2, 0)
    whole = state_bytes(shape, "policy", ParallelConfig(precision="bf16"), 2, 0)
    assert one_rank["weights"] < whole["weights"], "EP=2 holds half the experts"
    for row in rows:
        measured = {key: row[key] for key in ("weights", "grads", "optimizer")}
        assert measured == pytest.approx(one_rank, rel=1e-3), row
