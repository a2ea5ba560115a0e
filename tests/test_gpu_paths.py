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
