"""``gad check`` under torchrun: the debugging entry point a user runs first on a laptop CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.torchrun import ENV, ROOT, free_port


def test_check_at_tensor_parallel_two_matches_transformers(tiny_model_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "gad_megatron.cli", "check", "--model", str(tiny_model_dir),
         "--tp", "2", "--prompt", "Hello there"],
        env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gad check: OK: TP=2 PP=1 world=2 (torchrun)" in proc.stdout
    diff = float(proc.stdout.split("max |logit diff| vs transformers ")[1].split()[0])
    assert diff < 1e-4
