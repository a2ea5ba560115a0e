"""Checkpoint housekeeping: optimizer states only where --resume can use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gad_megatron.config import ConfigError
from gad_megatron.trainers.common import (
    D_OPTIMIZER_FILE,
    mark_complete,
    prune_resume_states,
    resolve_resume,
)


def fake_checkpoint(stage: Path, step: int, complete: bool = True) -> Path:
    ckpt = stage / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", D_OPTIMIZER_FILE):
        (ckpt / name).write_bytes(b"x")
    if complete:
        mark_complete(ckpt)
    return ckpt


def test_prune_keeps_weights_and_the_newest_states(tmp_path: Path) -> None:
    ckpts = [fake_checkpoint(tmp_path, s) for s in (2, 10, 4)]
    partial = fake_checkpoint(tmp_path, 12, complete=False)
    prune_resume_states(tmp_path, keep=1)
    by_step = {int(c.name.split("-")[1]): c for c in ckpts}
    for step in (2, 4):  # numeric order, not string order: checkpoint-10 is the newest
        assert sorted(p.name for p in by_step[step].iterdir()) == ["COMPLETE", "model.safetensors"]
    assert (by_step[10] / "optimizer.pt").is_file() and (by_step[10] / D_OPTIMIZER_FILE).is_file()
    assert (partial / "optimizer.pt").is_file(), "a checkpoint still being written is not touched"
    prune_resume_states(tmp_path, keep=0)
    assert sorted(tmp_path.rglob("*optimizer.pt")) == sorted([partial / "optimizer.pt", partial / D_OPTIMIZER_FILE])


def test_resume_takes_the_newest_resumable_checkpoint(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    partial = fake_checkpoint(tmp_path, 6, complete=False)
    prune_resume_states(tmp_path, keep=1)
    assert resolve_resume(tmp_path, "latest") == str(tmp_path / "checkpoint-4")
    assert not partial.exists(), "a partial checkpoint is removed on resume"
    with pytest.raises(ConfigError, match="not a resumable checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-2"))  # weights only
    assert resolve_resume(tmp_path, None) is None


def test_resume_with_nothing_resumable_starts_fresh(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path, 2)
    prune_resume_states(tmp_path, keep=0)
    assert resolve_resume(tmp_path, "latest") is None


def test_resume_of_a_finished_stage_keeps_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    from gad_megatron.config import load_config
    from gad_megatron.trainers import train_stage
    from tests.helpers.tiny_run import write_tiny_setup

    cfg = load_config(write_tiny_setup(tmp_path, tiny_model_dir), ["train.stage=gad"])
    final = tmp_path / "run" / "gad" / "final"
    final.mkdir(parents=True)
    mark_complete(final)
    (final / "model.safetensors").write_bytes(b"trained")
    assert train_stage(cfg, resume="latest") == final  # no warmup output needed: nothing is loaded
    assert (final / "model.safetensors").read_bytes() == b"trained"
