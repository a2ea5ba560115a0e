"""Integration: each stage runs 3 steps on a tiny model, checkpoints, logs every metric, chains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gad_megatron.config import ConfigError, load_config
from gad_megatron.losses import group_advantages
from gad_megatron.trainers import train_stage
from gad_megatron.trainers import gad as gad_module
from tests.helpers.tiny_run import write_tiny_setup

GAD_METRICS = {
    "d_loss", "d_acc", "teacher_score", "student_score", "reward_mean", "reward_std", "adv_std", "kl",
    "policy_loss", "grad_norm_g", "grad_norm_d", "len_mean", "len_max", "truncated_frac",
    "time_rollout", "time_scoring", "time_d_update", "time_g_update",
}


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    """warmup then gad from warmup's output dir; records the GAD trainer's rewards and advantages."""
    cfg_path = write_tiny_setup(tmp_path_factory.mktemp("chain"), tiny_model_dir)
    seen: dict = {"rewards": [], "advantages": [], "trainers": []}
    real_gen = gad_module.GADTrainer._generate_and_score_completions
    real_rewards = gad_module.GRPOTrainer._calculate_rewards
    real_train = gad_module.GADTrainer.train

    def gen(self, inputs):
        out = real_gen(self, inputs)
        seen["advantages"].append(out["advantages"].clone())
        return out

    def rewards(self, *a):
        r = real_rewards(self, *a)
        seen["rewards"].append(r[:, 0].clone())
        return r

    def train(self, *a, **k):
        seen["trainers"].append(self)
        return real_train(self, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(gad_module.GADTrainer, "_generate_and_score_completions", gen)
    mp.setattr(gad_module.GRPOTrainer, "_calculate_rewards", rewards)
    mp.setattr(gad_module.GADTrainer, "train", train)
    try:
        warm = train_stage(load_config(cfg_path, ["train.stage=warmup"]))
        n_warm = len(seen["rewards"])
        final = train_stage(load_config(cfg_path, ["train.stage=gad"]))
    finally:
        mp.undo()
    return {"cfg": cfg_path, "warmup": warm, "gad": final, "n_warm": n_warm, **seen}


def test_warmup_outputs(chained: dict) -> None:
    warm: Path = chained["warmup"]
    stage = warm.parent
    assert (stage / "checkpoint-2" / "COMPLETE").is_file() and (warm / "COMPLETE").is_file()
    for d in (stage / "checkpoint-2", warm):
        assert (d / "model.safetensors").is_file() and (d / "discriminator" / "model.safetensors").is_file()
    # a finished stage keeps weights per checkpoint, no optimizer state, no copy of final/ as checkpoint-3
    assert not list(stage.rglob("*optimizer.pt")) and not (stage / "checkpoint-3").exists()
    rows = metrics(stage)
    assert [r["step"] for r in rows[:3]] == [1, 2, 3]
    assert "sft_loss" not in rows[0], "the first disc_only_steps update D alone"
    assert all("sft_loss" in r for r in rows[1:3])
    for key in ("d_loss", "d_acc", "grad_norm_d", "time_rollout", "time_d_update", "len_mean"):
        assert all(key in r for r in rows[:3]), key


def test_gad_metrics_complete(chained: dict) -> None:
    rows = [r for r in metrics(chained["gad"].parent) if "d_loss" in r]
    assert len(rows) == 3
    for row in rows:
        missing = GAD_METRICS - set(row)
        assert not missing, missing
        assert all(isinstance(row[k], (int, float)) for k in GAD_METRICS)


def test_gad_starts_from_warmup_and_references_it(chained: dict) -> None:
    trainer = chained["trainers"][-1]
    warm = str(chained["warmup"])
    assert trainer.ref_model is not None and trainer.ref_model.config._name_or_path == warm
    assert trainer.args.beta == 0.001 and trainer.args.num_generations == 2
    # D continues from warmup's D (its trained head), not from a fresh head on the generator
    assert trainer.discriminator.model.config._name_or_path == str(Path(warm) / "discriminator")


def test_advantages_are_group_normalised_rewards(chained: dict) -> None:
    for rewards, adv in zip(chained["rewards"][chained["n_warm"]:], chained["advantages"][chained["n_warm"]:]):
        assert torch.allclose(adv, group_advantages(rewards, num_generations=2), atol=1e-5)


def test_discriminator_loads_with_transformers_alone(chained: dict) -> None:
    from transformers import AutoModelForSequenceClassification

    d = AutoModelForSequenceClassification.from_pretrained(chained["gad"] / "discriminator")
    assert d.config.num_labels == 1


def test_frozen_discriminator_and_ce_loss(chained: dict, tmp_path: Path) -> None:
    cfg = load_config(chained["cfg"], [
        "train.stage=gad", f"run_dir={tmp_path / 'frozen'}", f"train.init_from={chained['warmup']}",
        "train.freeze_discriminator=true", "train.max_steps=2",
    ])
    final = train_stage(cfg)
    before = load_file(chained["warmup"] / "discriminator" / "model.safetensors")
    after = load_file(final / "discriminator" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all("grad_norm_d" not in r for r in metrics(final.parent))
    ce = load_config(chained["cfg"], ["train.stage=warmup", f"run_dir={tmp_path / 'ce'}", "train.disc_loss=ce",
                                      "train.max_steps=1"])
    assert (train_stage(ce) / "COMPLETE").is_file()


def test_seqkd_stage(chained: dict, tmp_path: Path) -> None:
    cfg = load_config(chained["cfg"], ["train.stage=seqkd", f"run_dir={tmp_path}", "train.max_steps=3"])
    final = train_stage(cfg)
    assert (final / "model.safetensors").is_file() and (final / "COMPLETE").is_file()
    assert (final.parent / "checkpoint-2" / "COMPLETE").is_file()
    rows = [r for r in metrics(final.parent) if "loss" in r]
    assert len(rows) == 3 and all(r["loss"] > 0 for r in rows)


def test_batch_larger_than_data_is_a_config_error(chained: dict, tmp_path: Path) -> None:
    cfg = load_config(chained["cfg"], ["train.stage=warmup", f"run_dir={tmp_path}", "train.batch_prompts=64"])
    with pytest.raises(ConfigError, match="batch_prompts=64 but only 8 prompts"):
        train_stage(cfg)
