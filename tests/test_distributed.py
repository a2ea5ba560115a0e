"""Two CPU processes (torchrun, gloo): D's gradients are averaged like DDP's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.tiny_run import write_tiny_setup

HELPER = Path(__file__).parent / "helpers" / "dist_d_step.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(*args: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(port), *args]


def test_discriminator_step_two_ranks_equals_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(HELPER), str(tiny_model_dir), str(single)], check=True, env=ENV)
    proc = subprocess.run(torchrun(str(HELPER), str(tiny_model_dir), str(double)), env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(single), torch.load(double)
    assert torch.equal(one["before"], two["before"])
    assert not torch.equal(one["before"], one["after"]), "the step must change D"
    assert torch.allclose(one["after"], two["after"], atol=1e-6), (one["after"] - two["after"]).abs().max()


def test_gad_trainer_runs_on_two_cpu_processes(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = write_tiny_setup(tmp_path, tiny_model_dir, max_steps=2, init_from=str(tiny_model_dir), batch_prompts=2,
                           num_generations=2, micro_batch_size=1)
    proc = subprocess.run(torchrun("-m", "gad_megatron.cli", "train", "--config", str(cfg), "--stage", "gad"),
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "gad" / "final" / "discriminator" / "model.safetensors").is_file()


def test_warmup_sft_row_once_per_prompt_when_rollouts_span_processes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """1 prompt x 4 rollouts on 2 processes: 2 rollouts each, but one teacher-text SFT row in all."""
    cfg = write_tiny_setup(tmp_path, tiny_model_dir, max_steps=2, batch_prompts=1, num_generations=4,
                           micro_batch_size=2, disc_only_steps=0)
    proc = subprocess.run(torchrun("-m", "gad_megatron.cli", "train", "--config", str(cfg), "--stage", "warmup"),
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / "run" / "warmup" / "metrics.jsonl").read_text().splitlines()]
    counts = [r["sft_prompts"] for r in rows if "sft_prompts" in r]
    assert counts == [1.0, 1.0], counts
