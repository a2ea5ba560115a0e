"""The trainer with a Qwen3-MoE student and discriminator: expert parallelism trains exactly as
plain data parallelism over the same two processes (warmup, then GAD with rollouts from weights
streamed over the EP group), and MoE at TP > 1 is refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from gad_megatron.checkpoint import latest_checkpoint, read_meta
from tests.helpers.tiny_run import write_tiny_setup
from tests.test_megatron_stages import PER_STEP, gad, metrics, ok

SETS = ("train.max_steps=2", "train.save_steps=100", "train.disc_only_steps=0")


@pytest.fixture(scope="module")
def moe_config(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from gad_megatron.models.sources import make_tiny_model

    root = tmp_path_factory.mktemp("moe")
    model = make_tiny_model(root / "model", str(tiny_model_dir), family="qwen3_moe")
    return write_tiny_setup(root / "setup", model)


@pytest.mark.slow
def test_expert_parallel_trains_as_data_parallel(moe_config: Path, tmp_path: Path) -> None:
    runs = {"dp2": [], "ep2": ["parallel.expert_parallel=2"]}
    for name, layout in runs.items():
        for stage in ("warmup", "gad"):
            ok(gad(moe_config, stage, f"run_dir={tmp_path / name}", *SETS, *layout, nproc=2))
    for stage in ("warmup", "gad"):
        dp, ep = metrics(tmp_path / "dp2" / stage), metrics(tmp_path / "ep2" / stage)
        assert len(dp) == 2 and all(r["grad_norm_g"] > 0 and r["grad_norm_d"] > 0 for r in dp)
        for key in PER_STEP[stage]:
            assert [r[key] for r in ep] == pytest.approx([r[key] for r in dp], rel=1e-4, abs=2e-5), (stage, key)
    assert all(r["engine_logprob_diff_max"] < 1e-5 for r in metrics(tmp_path / "ep2" / "gad"))
    for name, ep in (("dp2", {}), ("ep2", {"ep": 2})):  # the layout each run trained at
        assert read_meta(latest_checkpoint(tmp_path / name / "gad" / "megatron"))["layout"] == {
            "world_size": 2, "tp": 1, "pp": 1, **ep}


def test_moe_at_tensor_parallel_two_is_refused_before_loading(moe_config: Path, tmp_path: Path) -> None:
    proc = gad(moe_config, "warmup", f"run_dir={tmp_path / 'tp2'}", "parallel.tensor_parallel=2", nproc=2)
    assert proc.returncode != 0
    assert "the generator is a mixture of experts: parallel.tensor_parallel=2 needs sequence parallelism" in proc.stderr
