"""``train.disc_pretrain``: D learns from cached rollouts of every training prompt before the
warmup's first step. The epoch loop honours epochs, target_acc and the lr (no Megatron); through
the CLI on a tiny model, D's accuracy on its own pairs rises, every epoch is logged at step 0,
the rollouts are cached, and a resumed warmup does not pretrain again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gad_megatron.config import DiscPretrainConfig
from gad_megatron.trainer import disc_pretrain
from tests.helpers.tiny_run import write_tiny_setup
from tests.test_megatron_stages import gad, metrics, ok


class _Optimizer:
    def __init__(self, lr: float) -> None:
        self.param_groups = [{"lr": lr}, {"lr": lr}]


def _fake_loop(monkeypatch: pytest.MonkeyPatch, val_accs: list[float]) -> tuple[Any, list[float]]:
    """A context whose D optimizer records nothing but its lr; epochs record the lr they ran at,
    validation returns ``val_accs`` in turn (the first: before any epoch)."""
    ctx = SimpleNamespace(d=SimpleNamespace(optimizer=_Optimizer(1e-6)), dp_size=1, seed=0)
    lrs: list[float] = []
    accs = iter(val_accs)

    def epoch(ctx: Any, groups: Any, batch_groups: int, order_seed: str) -> dict[str, float]:
        lrs.append(ctx.d.optimizer.param_groups[0]["lr"])
        return {"d_loss": 0.5, "d_acc": 0.5, "updates": float(len(groups) // batch_groups)}

    monkeypatch.setattr(disc_pretrain, "train_epoch", epoch)
    monkeypatch.setattr(disc_pretrain, "pair_accuracy_of", lambda ctx, groups: next(accs))
    return ctx, lrs


def test_epochs_lr_and_target_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, lrs = _fake_loop(monkeypatch, [0.5, 0.6, 0.7, 0.8])
    logged: list[dict[str, float]] = []
    cfg = DiscPretrainConfig(epochs=3, batch_prompts=2, learning_rate=3e-5)
    rows = disc_pretrain.pretrain_discriminator(ctx, ["g"] * 4, ["v"], cfg, logged.append, {"disc_pretrain/x": 1.0})
    assert rows == logged
    assert [r["disc_pretrain/epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["disc_pretrain/val_acc"] for r in rows] == [0.5, 0.6, 0.7, 0.8]
    assert rows[0]["disc_pretrain/x"] == 1.0 and "disc_pretrain/d_loss" not in rows[0]
    assert rows[1]["disc_pretrain/updates"] == 2
    assert lrs == [3e-5] * 3, "every epoch runs at disc_pretrain.learning_rate"
    assert [g["lr"] for g in ctx.d.optimizer.param_groups] == [1e-6, 1e-6], "D's own lr again after"

    ctx, lrs = _fake_loop(monkeypatch, [0.5, 0.6, 0.85, 0.9])
    target = DiscPretrainConfig(epochs=3, batch_prompts=2, target_acc=0.8)
    rows = disc_pretrain.pretrain_discriminator(ctx, ["g"] * 4, ["v"], target, lambda row: None)
    assert [r["disc_pretrain/epoch"] for r in rows] == [0, 1, 2], "stops after the epoch that reaches target_acc"
    assert lrs == [1e-6, 1e-6], "no learning_rate: D's own"


def test_validation_split_is_seeded_and_disjoint() -> None:
    records = [{"id": str(i)} for i in range(10)]
    train, val = disc_pretrain.split_validation(records, 3, seed=1)
    assert len(val) == 3 and len(train) == 7
    assert {r["id"] for r in train} | {r["id"] for r in val} == {str(i) for i in range(10)}
    assert disc_pretrain.split_validation(records, 3, seed=1) == (train, val)


def test_warmup_pretrains_d_on_cached_rollouts_then_resumes_without_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    """8 prompts: 2 held out, 6 in 3 updates an epoch of 2 prompts x 2 rollouts; then one warmup
    step. D's mean pre-update accuracy on its own pairs rises from the first epoch to the last;
    a resumed run (one more step) keeps the step-0 rows and does not pretrain again."""
    config = write_tiny_setup(tmp_path, tiny_model_dir, max_steps=1, save_steps=1, disc_only_steps=2,
                              disc_pretrain={"epochs": 4, "rollouts_per_prompt": 2, "batch_prompts": 2,
                                             "val_prompts": 2, "learning_rate": 1e-3})  # fmt: skip
    first_run = gad(config, "warmup")
    ok(first_run)
    # progress within each epoch (3 updates, a line after each: at most ~5 an epoch) and while sampling
    assert first_run.stderr.count("disc_pretrain: epoch update 3/3,") == 4, first_run.stderr[-3000:]
    assert "disc_pretrain: sampling 2 rollouts of 6 prompts, batch 3/3," in first_run.stderr
    stage = config.parent / "run" / "warmup"
    rows = metrics(stage)
    pre = [r for r in rows if r["step"] == 0]
    assert [r["disc_pretrain/epoch"] for r in pre] == [0, 1, 2, 3, 4]
    assert all(r["disc_pretrain/updates"] == 3 for r in pre[1:])
    assert all("disc_pretrain/val_acc" in r for r in pre)
    first, last = pre[1], pre[-1]
    assert last["disc_pretrain/d_acc"] > first["disc_pretrain/d_acc"], [r["disc_pretrain/d_acc"] for r in pre[1:]]
    assert last["disc_pretrain/d_loss"] < first["disc_pretrain/d_loss"]
    cached = [json.loads(line) for line in (stage / "disc_pretrain" / "rollouts.0-of-1.jsonl").read_text().splitlines()]
    assert len(cached) == 6 and all(len(g["rollout_ids"]) == 2 for g in cached)
    assert [r["step"] for r in rows if r["step"] > 0] == [1]

    shutil.rmtree(stage / "final")  # as if killed after step 1's checkpoint
    ok(gad(config, "warmup", "train.max_steps=2", resume=True))
    again = metrics(stage)
    assert [r for r in again if r["step"] == 0] == pre, "resumed after step 1: no second pretraining"
    assert [r["step"] for r in again if r["step"] > 0] == [1, 2]
