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
