"""Megatron policy and discriminator against transformers (fp32, CPU, gloo).

TP=1 in this process; TP=2, PP=2, EP=2 (Qwen3-MoE), TP=2 x PP=2 and TP=2 x EP=2 in torchrun
launches of ``tests/helpers/megatron_parity.py`` (one launch per process count, layouts run in turn).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gad_megatron.evaluation.hf_discriminator import score_sequences
from gad_megatron.models.discriminator import align_left, load_discriminator, new_head_weight, scores
from gad_megatron.models.policy import build_policy, full_logits
from tests.helpers.megatron_parity import padded_batch
from tests.helpers.tiny_hf import FAMILIES, MOE_FAMILIES, save_tiny_model
from tests.helpers.torchrun import run_torchrun

HELPER = Path(__file__).parent / "helpers" / "megatron_parity.py"
TOLERANCE = 1e-4


def run_parity(tmp_path: Path, nproc: int, *args: str) -> dict[str, dict[str, float]]:
    out = tmp_path / f"parity-{nproc}.json"
    run_torchrun(HELPER, nproc, str(out), *args)
    return json.loads(out.read_text())


def assert_parity(report: dict[str, float], families: tuple[str, ...] = FAMILIES + MOE_FAMILIES) -> None:
    for family in families:
        assert report[f"{family}/logits"] < TOLERANCE, report
        assert report[f"{family}/score"] < TOLERANCE, report
        assert report[f"{family}/score_left_vs_right"] < 1e-5, report
        assert report[f"{family}/policy_export"] == 0.0 and report[f"{family}/d_export"] == 0.0, report


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


@pytest.mark.parametrize(("family", "changes"), [
    ("llama", {}), ("qwen2", {}), ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("qwen3", {}), ("qwen3", {"tied": False}),
    ("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}),
], ids=["llama", "qwen2", "llama3-rope-scaling", "qwen3-tied", "qwen3-untied", "qwen3-moe", "qwen3-moe-unnormalised"])  # fmt: skip
def test_tp1_policy_logits_match_transformers(megatron_tp1: None, tmp_path: Path, family: str, changes: dict) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / family, family, **changes)
    policy = build_policy(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = full_logits(policy, ids)
    with torch.no_grad():
        assert (logits - hf(ids).logits).abs().max().item() < TOLERANCE


@pytest.mark.parametrize(("family", "source"), [("llama", "discriminator"), ("qwen2", "policy"),
                                                ("qwen3", "discriminator"), ("qwen3_moe", "discriminator")])  # fmt: skip
def test_tp1_discriminator_scores_match_transformers(megatron_tp1: None, tmp_path: Path, family: str, source: str) -> None:
    """From a saved HF D (its ``score.weight``) or a causal LM (its lm_head dropped, a new seeded head)."""
    from transformers import AutoModelForSequenceClassification

    model_dir = save_tiny_model(tmp_path / family, family, role=source)
    d = load_discriminator(model_dir, seed=3)
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32).eval()
    if source == "policy":
        hf.score.weight.data = new_head_weight(64, hf.config.initializer_range, seed=3)
    right, left = padded_batch(left=False), padded_batch(left=True)
    with torch.no_grad():
        reference = score_sequences(hf, *right)
    got_right, got_left = scores(d, *right), scores(d, *left)
    assert got_right.dtype == torch.float32 and got_right.shape == (3,)
    assert (got_right - reference).abs().max().item() < TOLERANCE
    assert (got_left - got_right).abs().max().item() < 1e-5


def test_bf16_models_have_one_parameter_dtype(megatron_tp1: None, tmp_path: Path) -> None:
    """megatron-core's distributed optimizer indexes a param group as if its params shared one
    dtype: the local spec's fp32 norms (and an fp32 D head) in bf16 models broke checkpoints on
    a GPU (found on an H200). D is built by the same function as G, plus its head."""
    from transformers import AutoConfig

    from gad_megatron.models.discriminator import build_discriminator

    d = build_discriminator(AutoConfig.from_pretrained(save_tiny_model(tmp_path / "llama", "llama")), torch.bfloat16)
    assert {p.dtype for p in d.model.parameters()} == {torch.bfloat16}
    hidden_SBH = torch.randn(3, 2, 64, dtype=torch.bfloat16)
    assert d.model.output_layer(hidden_SBH)[0].dtype == torch.float32  # scores in fp32


def test_align_left_moves_padding_to_the_end_and_rejects_holes() -> None:
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0], [1, 2, 3, 4]])
    mask = (ids != 0).long()
    aligned, last = align_left(ids, mask)
    assert aligned.tolist() == [[5, 6, 0, 0], [7, 8, 9, 0], [1, 2, 3, 4]] and last.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="contiguous span"):
        align_left(ids, torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="non-empty"):
        align_left(ids, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))


def test_tp2_pp2_and_ep2_on_two_processes(tmp_path: Path) -> None:
    report = run_parity(tmp_path, 2, "2x1", "1x2", "1x1x2")
    assert_parity(report["2x1"])
    assert_parity(report["1x2"])
    assert_parity(report["1x1x2"], MOE_FAMILIES)


def test_tp2_x_pp2_and_tp2_x_ep2_on_four_processes(tmp_path: Path) -> None:
    report = run_parity(tmp_path, 4, "2x2", "2x1x2")
    assert_parity(report["2x2"])
    assert_parity(report["2x1x2"], MOE_FAMILIES)


@pytest.mark.slow
def test_smollm2_tp1_logits_and_greedy_paris(megatron_tp1: None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gad_megatron.models.sources import resolve_model_path

    model_dir = resolve_model_path("smollm2-135m-instruct")
    policy = build_policy(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (full_logits(policy, ids) - hf(ids).logits).abs().max().item() < TOLERANCE
    prompt_length = ids.shape[1]
    for _ in range(24):  # greedy, one full forward per token (no KV cache): a parity check, not an engine
        next_id = full_logits(policy, ids)[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        if next_id.item() == tokenizer.eos_token_id:
            break
    answer = tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_pp2_logits_match_transformers(tmp_path: Path) -> None:
    from gad_megatron.models.sources import resolve_model_path

    report = run_parity(tmp_path, 2, "--hf-dir", resolve_model_path("smollm2-135m-instruct"), "1x2")
    assert report["1x2"]["logits"] < TOLERANCE, report
