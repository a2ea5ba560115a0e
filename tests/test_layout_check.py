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


@pytest.fixture(scope="module")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A Qwen3-MoE (4 experts, top-2) with the tiny Llama's tokenizer."""
    from gad_megatron.models.sources import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen3_moe") / "model", str(tiny_model_dir), family="qwen3_moe")


@pytest.mark.parametrize(("family", "layout", "shown"), [
    ("llama", ["--tp", "2"], "TP=2 PP=1"), ("qwen3", ["--tp", "2"], "TP=2 PP=1"),
    ("qwen3_moe", ["--ep", "2"], "TP=1 PP=1 EP=2"),
])  # fmt: skip
def test_check_at_two_ranks_matches_transformers(request: pytest.FixtureRequest, family: str, layout: list[str],
                                                 shown: str) -> None:  # fmt: skip
    fixture = {"llama": "tiny_model_dir", "qwen3": "tiny_qwen3_dir", "qwen3_moe": "tiny_qwen3_moe_dir"}[family]
    model_dir = request.getfixturevalue(fixture)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "gad_megatron.cli", "check", "--model", str(model_dir),
         *layout, "--prompt", "Hello there"],
        env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"gad check: OK: {shown} world=2 (torchrun)" in proc.stdout
    diff = float(proc.stdout.split("max |logit diff| vs transformers ")[1].split()[0])
    assert diff < 1e-4
