"""The trainer side of preemption, without Slurm: SIGUSR1 -> finish the step, checkpoint, exit 75;
``--resume`` then starts after that checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gad_megatron import preemption
from gad_megatron.checkpoint import complete_checkpoints
from gad_megatron.data import read_jsonl
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


def train(cfg: Path, *argv: str) -> list[str]:
    return [sys.executable, "-m", "gad_megatron.cli", "train", "--config", str(cfg), "--stage", "seqkd", *argv]


def test_seqkd_stops_with_a_checkpoint_and_resumes_from_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    """SIGUSR1 mid-run: exit 75 with a checkpoint of the step in flight; ``--resume`` starts after it
    (``starts.jsonl`` says from where) and logs only the steps that follow."""
    cfg = write_tiny_setup(tmp_path, tiny_model_dir, max_steps=200, save_steps=1000)
    stage = tmp_path / "run" / "seqkd"
    metrics, log, env = stage / "metrics.jsonl", tmp_path / "train.log", {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(train(cfg), env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):  # mid-run: a step is done
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    proc.wait(timeout=300)
    stderr = log.read_text()
    assert proc.returncode == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
    checkpoints = complete_checkpoints(stage / "megatron")
    assert len(checkpoints) == 1, stderr[-3000:]
    stopped = int(checkpoints[0].name.removeprefix("iter_"))
    assert 1 <= stopped < 200
    assert not (stage / "final").exists()  # stopped, not finished

    total = stopped + 2
    resumed = subprocess.run(train(cfg, "--resume", "--set", f"train.max_steps={total}"), env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first, second = read_jsonl(stage / "starts.jsonl")
    assert (first["resume"], first["checkpoint"], first["step"]) == (None, None, 0)
    assert (second["resume"], second["checkpoint"], second["step"]) == ("latest", str(checkpoints[0]), stopped)
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    # The steps up to the checkpoint were logged by the first run, the rest after the resumed one started.
    assert [r["time"] < second["time"] for r in rows] == [s <= stopped for s in range(1, total + 1)]
