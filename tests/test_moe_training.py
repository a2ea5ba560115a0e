"""The trainer with a Qwen3-MoE student and discriminator: expert parallelism trains as one
process does and its checkpoints resume at another EP size; MoE at TP > 1 is refused before any
model loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gad_megatron.checkpoint import latest_checkpoint, read_meta
from tests.helpers.tiny_run import write_tiny_setup
from tests.test_megatron_stages import PER_STEP, gad, metrics, ok

SETS = ("train.max_steps=3", "train.save_steps=1", "train.keep_resume_states=3", "train.disc_only_steps=0")


@pytest.fixture(scope="module")
def moe_config(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from gad_megatron.models.sources import make_tiny_model

    root = tmp_path_factory.mktemp("moe")
    model = make_tiny_model(root / "model", str(tiny_model_dir), family="qwen3_moe")
    return write_tiny_setup(root / "setup", model)


@pytest.mark.slow
def test_expert_parallel_trains_as_one_process_and_resumes_at_ep1(moe_config: Path, tmp_path: Path) -> None:
    """Warmup then 3 GAD steps at EP=2 (2 processes, rollouts from weights streamed over the EP
    group) give 1 process's losses and gradient norms step by step; the EP=2 checkpoint saved
    after GAD step 1 resumes in 1 process (EP=1) and reproduces steps 2-3."""
    runs = {"one": (1, []), "ep2": (2, ["parallel.expert_parallel=2"])}
    for name, (nproc, layout) in runs.items():
        for stage in ("warmup", "gad"):
            ok(gad(moe_config, stage, f"run_dir={tmp_path / name}", *SETS, *layout, nproc=nproc))
    for stage in ("warmup", "gad"):
        one, ep = metrics(tmp_path / "one" / stage), metrics(tmp_path / "ep2" / stage)
        assert len(one) == 3 and all(r["grad_norm_g"] > 0 and r["grad_norm_d"] > 0 for r in one)
        for key in PER_STEP[stage]:
            assert [r[key] for r in ep] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-5), (stage, key)
    assert all(r["engine_logprob_diff_max"] < 1e-5 for r in metrics(tmp_path / "ep2" / "gad"))
    step1 = tmp_path / "ep2" / "gad" / "megatron" / "iter_0000001"
    assert read_meta(step1)["layout"] == {"world_size": 2, "tp": 1, "pp": 1, "ep": 2}
    resumed = tmp_path / "ep1" / "gad"
    (resumed / "megatron").mkdir(parents=True)
    shutil.copytree(step1, resumed / "megatron" / step1.name)
    ok(gad(moe_config, "gad", f"run_dir={tmp_path / 'ep1'}", *SETS, f"train.init_from={tmp_path / 'ep2' / 'warmup' / 'final'}",
           resume=True))  # fmt: skip
    rows, full = metrics(resumed), metrics(tmp_path / "ep2" / "gad")
    assert [r["step"] for r in rows] == [2, 3]
    for key in PER_STEP["gad"]:
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in full[1:]], rel=1e-5, abs=1e-5), key
    assert read_meta(latest_checkpoint(resumed / "megatron"))["layout"] == {"world_size": 1, "tp": 1, "pp": 1}


def test_moe_at_tensor_parallel_two_is_refused_before_loading(moe_config: Path, tmp_path: Path) -> None:
    proc = gad(moe_config, "warmup", f"run_dir={tmp_path / 'tp2'}", "parallel.tensor_parallel=2", nproc=2)
    assert proc.returncode != 0
    assert "the generator is a mixture of experts: parallel.tensor_parallel=2 needs sequence parallelism" in proc.stderr
