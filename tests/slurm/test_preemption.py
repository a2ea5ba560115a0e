"""The trainer side of preemption, without Slurm: SIGUSR1 -> finish the step, checkpoint, exit 75."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gad_megatron import preemption
from gad_megatron.checkpoint import complete_checkpoints
from tests.helpers.tiny_run import write_tiny_setup


def test_flag_is_set_by_the_signal_only() -> None:
    previous = signal.getsignal(preemption.STOP_SIGNAL)
    try:
        preemption.install()
        assert not preemption.should_stop()
        os.kill(os.getpid(), preemption.STOP_SIGNAL)
        assert preemption.should_stop()  # not a process group: the local flag
    finally:
        signal.signal(preemption.STOP_SIGNAL, previous)
        preemption._requested.clear()


def test_seqkd_stops_with_a_resumable_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = write_tiny_setup(tmp_path, tiny_model_dir, max_steps=200, save_steps=1000)
    metrics, log = tmp_path / "run" / "seqkd" / "metrics.jsonl", tmp_path / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gad_megatron.cli", "train", "--config", str(cfg), "--stage",
                                 "seqkd"], env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=out)
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):  # mid-run: a step is done
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=300)
    stderr = log.read_text()
    assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
    checkpoints = complete_checkpoints(tmp_path / "run" / "seqkd" / "megatron")
    assert len(checkpoints) == 1, stderr[-3000:]
    assert 1 <= int(checkpoints[0].name.removeprefix("iter_")) < 200
    assert not (tmp_path / "run" / "seqkd" / "final").exists()  # stopped, not finished
