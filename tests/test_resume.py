"""Kill a run after a checkpoint, resume it, and get the same next steps as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.tiny_run import write_tiny_setup

COMPARED = ("loss", "d_loss", "d_acc", "reward_mean", "kl", "teacher_score", "student_score")


def gad_cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gad_megatron.cli", "train", "--config", str(cfg), "--stage", "gad", *extra]


def last_rows_by_step(stage_dir: Path) -> dict[int, dict]:
    rows = [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "d_loss" in r}


def test_kill_and_resume_matches_uninterrupted(tmp_path: Path, tiny_model_dir: Path) -> None:
    common = dict(max_steps=4, save_steps=2, init_from=str(tiny_model_dir))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    ref_cfg = write_tiny_setup(tmp_path / "ref", tiny_model_dir, **common)
    subprocess.run(gad_cmd(ref_cfg), check=True, env=env, capture_output=True)

    cfg = write_tiny_setup(tmp_path / "killed", tiny_model_dir, **common)
    stage = tmp_path / "killed" / "run" / "gad"
    proc = subprocess.Popen(gad_cmd(cfg), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (stage / "checkpoint-2" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (stage / "final").exists(), "the run was killed before it finished"

    resumed = subprocess.run(gad_cmd(cfg, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = last_rows_by_step(tmp_path / "ref" / "run" / "gad")
    got = last_rows_by_step(stage)
    for step in (3, 4):
        for key in COMPARED:
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])
