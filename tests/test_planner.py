"""`gad plan`: layout checks, the memory model against published and measured numbers, the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gad_megatron.cli import main
from gad_megatron.config import ParallelConfig, parse_config
from gad_megatron.planner import (
    KNOWN_MODELS,
    ModelShape,
    PlanError,
    load_shape,
    make_layout,
    plan,
    refusal,
    stage_params,
    state_bytes,
)
from tests.helpers.tiny_hf import save_tiny_model, tiny_config

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


@pytest.fixture(scope="module")
def megatron_tp1() -> Iterator[None]:
    from gad_megatron.parallel.launch import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, seed=0)
    yield
    destroy_distributed()


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # untied + QKV bias; tied
def test_state_estimate_matches_allocated_bytes(megatron_tp1: None, tmp_path: Path, family: str) -> None:
    """Weights + main grads + Adam states actually allocated by megatron-core, fp32 on CPU."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from gad_megatron.models.policy import build_policy

    changes = dict(hidden_size=128, intermediate_size=256, vocab_size=1000)
    policy = build_policy(save_tiny_model(tmp_path / family, family, **changes))
    ddp = DistributedDataParallel(policy.config, DistributedDataParallelConfig(use_distributed_optimizer=True), policy.model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), [ddp])
    tokens = torch.randint(0, 1000, (2, 8))
    ddp(tokens, torch.arange(8).expand(2, -1), None, labels=tokens).float().mean().backward()
    ddp.finish_grad_sync()
    optimizer.step()  # Adam allocates its moments on the first step

    params = [p for p in ddp.parameters()]
    grads = [p.main_grad for p in params]
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [t for opt in inner for s in opt.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    measured = _unique_bytes(params) + _unique_bytes(grads) + _unique_bytes(states)

    shape = ModelShape.from_hf(tiny_config(family, **changes))
    estimate = sum(state_bytes(shape, "policy", ParallelConfig(precision="fp32"), dp=1, stage=0).values())
    assert estimate == pytest.approx(measured, rel=0.2)


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
