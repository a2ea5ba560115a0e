"""GPU-only paths of the trainer and telemetry, on a real CUDA device (skipped without one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_megatron_stages import gad, metrics, ok
from tests.helpers.tiny_run import write_tiny_setup

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_nvml_reports_every_gpu() -> None:
    pytest.importorskip("pynvml")
    from gad_megatron.telemetry import gpu_metrics

    found = gpu_metrics()
    for index in range(torch.cuda.device_count()):
        assert 0 < found[f"gpu/{index}/memory_total_gib"] and 0 <= found[f"gpu/{index}/utilization_pct"] <= 100


def test_warmup_and_gad_stages_on_cuda_with_nccl(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The stages on a GPU: NCCL (+ gloo for CPU tensors), bf16 Megatron models, D in one pass,
    G's response-window logits, engine sync, checkpoint, export; then GAD from that warmup."""
    config = write_tiny_setup(tmp_path, tiny_model_dir)
    ok(gad(config, "warmup", "parallel.precision=bf16", "train.max_steps=2"))
    rows = metrics(tmp_path / "run" / "warmup")
    assert [r["step"] for r in rows] == [1, 2] and all(r["d_loss"] > 0 for r in rows)
    assert (tmp_path / "run" / "warmup" / "final" / "COMPLETE").is_file()
    ok(gad(config, "gad", "parallel.precision=bf16", "train.max_steps=2"))
    rows = metrics(tmp_path / "run" / "gad")
    assert [r["step"] for r in rows] == [1, 2]
    # bf16 trainer vs bf16 transformers engine: close, not equal (fp32 on a CPU agrees to 1e-4)
    assert all(abs(r["engine_logprob_diff"]) < 0.05 and abs(r["kl"]) < 0.05 for r in rows), rows


def test_likelihood_ratio_discriminator_on_cuda(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The likelihood-ratio D in bf16 on the GPU: its reference's forward, its scores in the one-pass
    update, the saved D's marker; then GAD from that warmup scores against the same reference."""
    import json

    config = write_tiny_setup(tmp_path, tiny_model_dir)
    sets = ["parallel.precision=bf16", "train.max_steps=2", "train.disc_score=likelihood_ratio"]
    ok(gad(config, "warmup", *sets))
    rows = metrics(tmp_path / "run" / "warmup")
    assert [r["step"] for r in rows] == [1, 2] and all(r["d_loss"] > 0 and r["time/d_reference"] > 0 for r in rows)
    marker = json.loads((tmp_path / "run" / "warmup" / "final" / "discriminator" / "gad_discriminator.json").read_text())
    assert marker["score"] == "likelihood_ratio"
    ok(gad(config, "gad", *sets))
    rows = metrics(tmp_path / "run" / "gad")
    assert [r["step"] for r in rows] == [1, 2] and all(abs(r["teacher_score"]) < 10 for r in rows)


def test_fp8_width_padding_on_cuda(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The FP8 padding path's shapes (widths rounded up to 16) through a bf16 GAD stage on the
    GPU: the losses stay those of unpadded micro-batches, to bf16's rounding."""
    config = write_tiny_setup(tmp_path, tiny_model_dir)
    sets = ["parallel.precision=bf16", f"train.init_from={tiny_model_dir}", "train.max_steps=2"]
    ok(gad(config, "gad", f"run_dir={tmp_path / 'plain'}", *sets))
    ok(gad(config, "gad", f"run_dir={tmp_path / 'pad16'}", *sets, "parallel.sequence_pad_multiple=16"))
    plain, padded = metrics(tmp_path / "plain" / "gad"), metrics(tmp_path / "pad16" / "gad")
    for key in ("d_loss", "teacher_score", "student_score"):
        assert [r[key] for r in padded] == pytest.approx([r[key] for r in plain], rel=2e-2, abs=2e-2), key


def test_transformers_engine_generates_on_the_gpu(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer) -> None:
    """Without train.use_vllm a GPU job's rollouts run on its GPU, not on the host."""
    from gad_megatron.config import load_config
    from gad_megatron.parallel.launch import destroy_distributed, init_distributed
    from gad_megatron.trainer.run import _engine

    init_distributed(1, 1, 0)
    try:
        cfg = load_config(write_tiny_setup(tmp_path, tiny_model_dir))
        engine, _ = _engine(cfg, str(tiny_model_dir), tiny_tokenizer, torch.bfloat16)
        assert engine.device.type == "cuda" and next(engine.model.parameters()).is_cuda
    finally:
        destroy_distributed()


def test_qwen3_under_the_transformer_engine_spec_matches_transformers(tmp_path: Path) -> None:
    """Qwen3's q/k norms as TE's spec builds them (TENorm, same tensor names as the local spec)
    and head_dim 32 != hidden / heads: fp32 logits against transformers on the GPU."""
    pytest.importorskip("transformer_engine")
    from transformers import AutoModelForCausalLM

    from gad_megatron.models.policy import build_policy, full_logits
    from gad_megatron.parallel.launch import destroy_distributed, init_distributed
    from tests.helpers.tiny_hf import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "qwen3", "qwen3")
    init_distributed(1, 1, 0)
    try:
        policy = build_policy(model_dir)
        assert policy.layout.spec == "te"
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            assert (full_logits(policy, ids) - hf(ids).logits).abs().max().item() < 1e-3
    finally:
        destroy_distributed()


def test_moe_policy_on_cuda_without_transformer_engine_matches_transformers(tmp_path: Path) -> None:
    """Qwen3-MoE on a GPU with the local spec: megatron-core's router needs the te_general_gemm fix
    on any TE-less machine (``mcore_fixes``); fp32 logits against transformers on the GPU."""
    from transformers import AutoModelForCausalLM

    from gad_megatron.models.policy import build_policy, full_logits
    from gad_megatron.parallel.launch import destroy_distributed, init_distributed
    from tests.helpers.tiny_hf import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "moe", "qwen3_moe")
    init_distributed(1, 1, 0)
    try:
        policy = build_policy(model_dir)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            diff = (full_logits(policy, ids) - hf(ids).logits).abs().max().item()
        print(f"moe fp32 cuda max logit diff vs transformers: {diff:.3e}")
        assert diff < 1e-3
    finally:
        destroy_distributed()


def test_moe_gad_in_bf16_on_cuda_without_routing_replay(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A tiny Qwen3-MoE through warmup and 3 GAD steps in bf16 on the GPU, rollouts from the bf16
    transformers engine, no routing replay: the engine/trainer log-prob gap it leaves (printed,
    recorded in docs/decisions.md) stays in the range the dense bf16 stage shows."""
    from gad_megatron.models.sources import make_tiny_model

    model = make_tiny_model(tmp_path / "model", str(tiny_model_dir), family="qwen3_moe")
    config = write_tiny_setup(tmp_path / "setup", model)
    sets = ("parallel.precision=bf16", "train.disc_only_steps=0", "train.save_steps=100")
    ok(gad(config, "warmup", *sets, "train.max_steps=1"))
    ok(gad(config, "gad", *sets, "train.max_steps=3"))
    rows = metrics(tmp_path / "setup" / "run" / "gad")
    for r in rows:
        print(f"moe bf16 cuda gad step {r['step']}: engine_logprob_diff {r['engine_logprob_diff']:.3e} "
              f"max {r['engine_logprob_diff_max']:.3e} kl {r['kl']:.3e}")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(abs(r["engine_logprob_diff"]) < 0.05 for r in rows), rows


def test_moe_under_the_transformer_engine_spec_matches_transformers(tmp_path: Path) -> None:
    """Qwen3-MoE as TE's spec builds it (TE linears in the experts, same tensor names)."""
    pytest.importorskip("transformer_engine")
    from transformers import AutoModelForCausalLM

    from gad_megatron.models.policy import build_policy, full_logits
    from gad_megatron.parallel.launch import destroy_distributed, init_distributed
    from tests.helpers.tiny_hf import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "moe", "qwen3_moe")
    init_distributed(1, 1, 0)
    try:
        policy = build_policy(model_dir)
        assert policy.layout.spec == "te"
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
        with torch.no_grad():
            assert (full_logits(policy, ids) - hf(ids).logits).abs().max().item() < 1e-3
    finally:
        destroy_distributed()
