"""`gad plan`: layout checks, the memory model against published and measured numbers, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gad_megatron.cli import main
from gad_megatron.config import ParallelConfig, parse_config
from gad_megatron.planner import (
    KNOWN_MODELS,
    ModelShape,
    PlanError,
    activation_bytes,
    load_shape,
    make_layout,
    plan,
    refusal,
    stage_params,
    state_bytes,
)
from tests.helpers.planner_memory import train_and_measure
from tests.helpers.tiny_hf import save_tiny_model, tiny_config
from tests.helpers.torchrun import ROOT, run_torchrun

QWEN7B = ModelShape.from_hf(KNOWN_MODELS["qwen2.5-7b"])


def run_config(tmp_path: Path, **parallel: object) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n')
    return {"run_dir": str(tmp_path / "run"), "student": "Qwen/Qwen2.5-7B-Instruct", "data": {"path": str(data)},
            "train": {"use_vllm": True}, "parallel": parallel}  # fmt: skip


def bytes_per_param(precision: str, distributed: bool, dp: int) -> float:
    par = ParallelConfig(precision=precision, distributed_optimizer=distributed)
    params = sum(stage_params(QWEN7B, "policy", 1, 1, 0))
    return sum(state_bytes(QWEN7B, "policy", par, dp, 0).values()) / params


@pytest.mark.parametrize("dp", [1, 8, 64])
def test_bytes_per_parameter_match_megatron_docs(dp: int) -> None:
    # Megatron-LM docs/source/api-guide/distrib_optimizer.md, "bytes per parameter" table
    # (d = data-parallel size): bf16 params + fp32 grads: 18 without the distributed
    # optimizer, 6 + 12/d with it; fp32 params + fp32 grads: 16, and 8 + 8/d.
    assert bytes_per_param("bf16", False, dp) == pytest.approx(18, rel=1e-6)
    assert bytes_per_param("bf16", True, dp) == pytest.approx(6 + 12 / dp, rel=1e-6)
    assert bytes_per_param("fp32", False, dp) == pytest.approx(16, rel=1e-6)
    assert bytes_per_param("fp32", True, dp) == pytest.approx(8 + 8 / dp, rel=1e-6)


def test_known_model_parameter_count() -> None:
    # Qwen2.5-7B's model card: 7.61B parameters (vocabulary padding adds a few)
    assert sum(stage_params(QWEN7B, "policy", 1, 1, 0)) / 1e9 == pytest.approx(7.61, rel=0.01)
    assert load_shape("meta-llama/Llama-3.1-8B-Instruct").layers == 32  # the table, offline


@pytest.mark.parametrize("name", ["qwen3-4b", "qwen3-8b"])
@pytest.mark.parametrize("role", ["policy", "discriminator"])
def test_qwen3_parameter_count_equals_the_real_model(name: str, role: str) -> None:
    """Exactly the parameters of the transformers model built (on the meta device) from the table's
    config: head_dim 128 (not hidden / heads), q/k norms, tied (4B) and untied (8B) embeddings;
    D: the sequence classifier's [1, hidden] score instead of the lm_head. The vocabulary
    (151936 = 1187 x 128) needs no padding at TP=1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen3Config

    known = KNOWN_MODELS[name]
    config = Qwen3Config(**{k: v for k, v in known.items() if k != "model_type"}, num_labels=1)
    auto = AutoModelForSequenceClassification if role == "discriminator" else AutoModelForCausalLM
    with torch.device("meta"):
        real = sum(p.numel() for p in auto.from_config(config).parameters())
    assert sum(stage_params(ModelShape.from_hf(known), role, 1, 1, 0)) == real
    if role == "policy":  # the model cards: Qwen3-4B 4.0B, Qwen3-8B 8.2B parameters
        assert real / 1e9 == pytest.approx({"qwen3-4b": 4.02, "qwen3-8b": 8.19}[name], abs=0.01)


# The output layer and the embedding are each 15% of these models' bytes, 31% of a stage's at PP=2.
TINY = dict(hidden_size=128, intermediate_size=256, vocab_size=1000)
# Measured: weights and grads exact, optimizer 1.0e-5 to 1.8e-5 over (Adam's 4-byte step counter per tensor).
AGREEMENT = 1e-4


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Qwen2 (untied, QKV bias) and Llama (tied embeddings)."""
    root = tmp_path_factory.mktemp("planner")
    return {family: save_tiny_model(root / family, family, **TINY) for family in ("qwen2", "llama")}


def estimate(model_dir: str | Path, precision: str, distributed: bool, dp: int, pp: int, stage: int) -> dict[str, int]:
    """The planner's {weights, grads, optimizer} of the policy at ``model_dir`` on one GPU of ``stage``."""
    par = ParallelConfig(precision=precision, pipeline_parallel=pp, distributed_optimizer=distributed)
    return state_bytes(load_shape(str(model_dir)), "policy", par, dp, stage)


@pytest.mark.parametrize(("family", "precision", "distributed"), [
    ("qwen2", "fp32", True), ("llama", "fp32", False),  # fp32: the parameter is its own master copy
    ("qwen2", "bf16", False), ("llama", "bf16", True),  # bf16: fp32 main params (Float16Optimizer / sharded)
])  # fmt: skip
def test_state_estimate_matches_allocated_bytes(megatron_tp1: None, tiny_dirs: dict[str, Path], family: str,
                                                precision: str, distributed: bool) -> None:  # fmt: skip
    """Weights, fp32 main grads and optimizer states megatron-core allocates after a trainer SFT step, TP=PP=DP=1."""
    measured = train_and_measure(tiny_dirs[family], precision, distributed)
    assert measured == pytest.approx(estimate(tiny_dirs[family], precision, distributed, 1, 1, 0), rel=AGREEMENT)


@pytest.mark.parametrize(("pp", "dp"), [(1, 2), (2, 1)], ids=["dp2-distributed-optimizer", "pp2"])
def test_state_estimate_per_rank_matches_allocated_bytes(tiny_dirs: dict[str, Path], tmp_path: Path,
                                                         pp: int, dp: int) -> None:  # fmt: skip
    """bf16 with the distributed optimizer on 2 ranks (torchrun, gloo): at DP=2 each rank's optimizer shard,
    at PP=2 each stage's parameters, the last stage's copy of Llama's tied embedding included."""
    out = tmp_path / "bytes.json"
    run_torchrun(ROOT / "tests/helpers/planner_memory.py", 2, str(out), str(pp), "1", "bf16", "1",
                 *map(str, tiny_dirs.values()))  # fmt: skip
    rows = json.loads(out.read_text())
    assert sorted((row["model"], row["stage"], row["dp"]) for row in rows) == sorted(
        (str(d), stage, dp) for d in tiny_dirs.values() for stage in range(pp) for _ in range(dp))
    for row in rows:
        measured = {key: row[key] for key in ("weights", "grads", "optimizer")}
        assert measured == pytest.approx(estimate(row["model"], "bf16", True, dp, pp, row["stage"]), rel=AGREEMENT), row


@pytest.mark.parametrize(("parallel", "nodes", "message"), [
    ({"tensor_parallel": 8}, 1, "TP=8 does not divide the 28 attention heads"),
    ({"tensor_parallel": 4, "pipeline_parallel": 3}, 3, "PP=3 does not divide the 28 layers"),
    ({"tensor_parallel": 3}, 1, "not a multiple of TP x PP"),
    ({"rollout_tensor_parallel": 3}, 1, "does not divide the 8 GPUs of a node"),
])  # fmt: skip
def test_layouts_that_do_not_divide_are_refused(tmp_path: Path, parallel: dict, nodes: int, message: str) -> None:
    cfg = parse_config(run_config(tmp_path, **parallel))
    with pytest.raises(PlanError, match=message):
        plan(cfg, nodes, 8)


def test_full_recompute_keeps_each_layers_input_and_one_layer() -> None:
    """Full recompute: L layer inputs (bf16 [tokens, h]) + one layer's activations; selective
    frees only attention scores, which the flash-attention estimate never counted."""
    none, selective, full = (activation_bytes(QWEN7B, ParallelConfig(recompute_activations=mode), False)["activations"]
                             for mode in ("none", "selective", "full"))  # fmt: skip
    tokens, layers, h = ParallelConfig().micro_batch_tokens, QWEN7B.layers, QWEN7B.hidden
    assert selective == none
    assert full == tokens * 2 * h * layers + none // layers
    assert full < none / 5  # Qwen2.5-7B: 28 layers


def test_kv_heads_and_padded_vocab() -> None:
    shape = ModelShape.from_hf(tiny_config("qwen2", num_key_value_heads=1))  # vocab 300: padded, never refused
    with pytest.raises(PlanError, match="TP=2 does not divide the 1 KV heads"):
        make_layout(ParallelConfig(tensor_parallel=2), 1, 2, [shape])
    assert make_layout(ParallelConfig(), 1, 2, [shape]).dp == 2


def test_plan_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    cfg = parse_config(run_config(tmp_path))  # 7B G + D + reference on TP=1 of one GPU
    result = plan(cfg, 1, 1)
    assert result.layout.dp == 1 and refusal(result, cfg).startswith("needs ")


def test_cli_prints_layout_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path, tensor_parallel=4, rollout_tensor_parallel=2)))
    assert main(["plan", "--config", str(path), "--nodes", "1", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "TP=4 PP=1 DP=2; vLLM TP=2 x 4 replicas" in out and "G optimizer" in out
    assert main(["plan", "--config", str(path), "--nodes", "1", "--gpus-per-node", "4"]) == 2
    assert "gad: error:" in capsys.readouterr().err
