"""``gad check`` under torchrun: the debugging entry point a user runs first on a laptop CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.torchrun import ENV, ROOT, free_port


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A Qwen3 (q/k norms, head_dim 32 != 64 / 4) with the tiny Llama's tokenizer."""
    from gad_megatron.models.sources import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen3") / "model", str(tiny_model_dir), family="qwen3")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_check_at_tensor_parallel_two_matches_transformers(request: pytest.FixtureRequest, family: str) -> None:
    model_dir = request.getfixturevalue({"llama": "tiny_model_dir", "qwen3": "tiny_qwen3_dir"}[family])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "gad_megatron.cli", "check", "--model", str(model_dir),
         "--tp", "2", "--prompt", "Hello there"],
        env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gad check: OK: TP=2 PP=1 world=2 (torchrun)" in proc.stdout
    diff = float(proc.stdout.split("max |logit diff| vs transformers ")[1].split()[0])
    assert diff < 1e-4
