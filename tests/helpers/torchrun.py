"""Launch a test helper script under torchrun (CPU, gloo) and fail with its stderr tail."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# ATEN_CPU_CAPABILITY=avx2: the same CPU kernels on every host. The layout tests compare training
# trajectories of 1 and 2 processes; on an AVX512 host torch's kernels round differently for the
# differently shaped per-rank matmuls, and 3 steps of Adam amplify that into a few percent (measured
# 2026-12-06: EP=2 vs 1 process, d_loss 0.516 vs 0.481 at step 3; equal with avx2 kernels).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
       "ATEN_CPU_CAPABILITY": "avx2",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: Path, nproc: int, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc script args`` on 127.0.0.1; asserts it exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
         "127.0.0.1", "--master_port", str(free_port()), str(script), *args],
        env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script.name} x{nproc} failed:\n{proc.stderr[-4000:]}"
    return proc
