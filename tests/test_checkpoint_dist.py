"""Distributed checkpoints: reshard TP=2 / PP=2 -> 1, exact resume, RNG, partial saves, retention.

The resharding checks run a tiny G + D training run under torchrun
(``tests/helpers/checkpoint_dist.py``: one 2-process launch saving at TP=2 then PP=2, one
single-process launch loading both at TP=1 x PP=1); the rest run in this process at TP=1.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gad_megatron.checkpoint import (
    COMPLETE,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    save_models,
)
from tests.helpers.torchrun import run_torchrun

HELPER = Path(__file__).parent / "helpers" / "checkpoint_dist.py"
LAYOUTS = ("2x1", "1x2")


def run_helper(work: Path, nproc: int, mode: str) -> dict[str, dict[str, float]]:
    run_torchrun(HELPER, nproc, mode, str(work), *LAYOUTS)
    return json.loads((work / f"report-{mode}.json").read_text())


def interrupt_saves(run_dir: Path) -> list[Path]:
    """What killed saves of steps 2 and 3 leave: data not yet renamed; renamed, no COMPLETE."""
    done = run_dir / "iter_0000001"
    before_rename, before_marker = run_dir / ".tmp-iter_0000002", run_dir / "iter_0000003"
    for partial in (before_rename, before_marker):
        shutil.copytree(done, partial)
        (partial / COMPLETE).unlink()
    data = next((before_marker / "dist").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])  # cut short mid-write
    return [before_rename, before_marker]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any], list[Path]]:
    work = tmp_path_factory.mktemp("checkpoint-dist")
    saved = run_helper(work, 2, "save")
    partials = [p for layout in LAYOUTS for p in interrupt_saves(work / layout / "run")]
    loaded = run_helper(work, 1, "load")
    return work, saved, loaded, partials


def full_tensors(dist_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a dist checkpoint, whole (torch's DCP reader, no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(dist_dir, out)
    return torch.load(out, weights_only=False)


VOCAB = 300  # the tiny models' real vocabulary; dist checkpoints hold it padded to a TP-dependent size


def assert_same_state(work: Path, layout: str) -> None:
    """The TP=1 re-save of the loaded state holds the saved numbers: weights, Adam moments,
    main params, schedulers, param groups. A vocabulary tensor (padded to a multiple of 128 x TP)
    must hold the same real rows and nothing but zeros in its padding, at either size."""
    original, resaved = (work / layout / d / "iter_0000001" / "dist" for d in ("run", "resaved"))
    a, b = full_tensors(original, work / "a.pt"), full_tensors(resaved, work / "b.pt")
    assert a.keys() == b.keys() and any(k.startswith("optimizer.state.exp_avg_sq.") for k in a)
    for key, x in a.items():
        y = b[key]
        if not torch.is_tensor(x):
            continue
        if x.shape != y.shape:
            assert x.shape[1:] == y.shape[1:] and min(x.shape[0], y.shape[0]) >= VOCAB, key
            assert not x[VOCAB:].any() and not y[VOCAB:].any(), f"{key}: non-zero vocabulary padding"
            x, y = x[:VOCAB], y[:VOCAB]
        assert torch.equal(x, y), key
    common = [torch.load(d / "common.pt", weights_only=False) for d in (original, resaved)]
    assert common[0] == common[1]


def test_resume_at_the_same_layout_is_exact_with_rng(runs: tuple) -> None:
    _, saved, _, _ = runs
    for layout in LAYOUTS:
        report = saved[layout]
        assert report["rng_equal"] == 1.0 and report["extra_state_equal"] == 1.0, report
        assert report["fresh_vs_saved"] > 1e-2, "the resumed objects start from other weights"
        assert report["resume_loss2_diff"] == 0.0 and report["resume_weights2_diff"] == 0.0, report


def test_tp2_checkpoint_loads_at_tp1(runs: tuple) -> None:
    work, _, loaded, _ = runs
    report = loaded["2x1"]
    assert report["weights_diff"] == 0.0 and report["logits_vs_tp1_reference"] == 0.0, report
    # TP=1 and TP=2 sum the row-parallel products in another order: rounding only
    assert report["logits_vs_saving_layout"] < 1e-5 and report["loss2_diff"] < 1e-5, report
    assert report["weights2_update_error"] < 1e-3, report
    assert_same_state(work, "2x1")


def test_pp2_checkpoint_loads_at_pp1(runs: tuple) -> None:
    work, _, loaded, _ = runs
    report = loaded["1x2"]
    assert report["weights_diff"] == 0.0 and report["logits_vs_tp1_reference"] == 0.0, report
    assert report["logits_vs_saving_layout"] == 0.0 and report["loss2_diff"] == 0.0, report
    assert report["weights2_update_error"] < 1e-4, report  # tied-embedding gradients summed in another order
    assert_same_state(work, "1x2")


def test_killed_saves_leave_the_previous_checkpoint(runs: tuple) -> None:
    work, _, loaded, partials = runs
    assert all(loaded[layout]["loaded_step"] == 1.0 for layout in LAYOUTS), loaded
    assert not any(p.exists() for p in partials), "latest_checkpoint(clean=True) removes partial saves"
    assert latest_checkpoint(work / "2x1" / "run") == work / "2x1" / "run" / "iter_0000001"


# --- in this process, TP=1 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy() -> Iterator[Any]:
    from gad_megatron.models.policy import build_gpt, load_hf_weights
    from gad_megatron.parallel.launch import destroy_distributed, init_distributed
    from tests.helpers.tiny_hf import tiny_model

    init_distributed(tp=1, pp=1, seed=0)
    hf = tiny_model("llama", num_hidden_layers=2)
    lm = build_gpt(hf.config)
    load_hf_weights(lm, hf.state_dict())
    yield lm
    destroy_distributed()


class Counter:
    """A stand-in scheduler: anything with state_dict / load_state_dict."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = state["steps"]


class Killed(Exception):
    """The process dying right after the data was written, before the checkpoint is committed."""


def weights(lm: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items() if torch.is_tensor(v)}


def test_a_save_failing_mid_write_keeps_the_previous_one(
    policy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron.core import dist_checkpointing

    counter = Counter()
    save_checkpoint(tmp_path, 1, {"policy": policy}, schedulers={"s": counter}, extra_state={"sample": 4})
    before = weights(policy)
    real_save = dist_checkpointing.save

    def dies_after_writing(*args: Any, **kwargs: Any) -> None:
        real_save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(dist_checkpointing, "save", dies_after_writing)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(1.0)
    counter.steps = 7
    with pytest.raises(Killed):
        save_checkpoint(tmp_path, 2, {"policy": policy}, schedulers={"s": counter}, extra_state={"sample": 8})
    assert (tmp_path / ".tmp-iter_0000002").is_dir() and not (tmp_path / "iter_0000002").exists()
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "iter_0000001"
    assert load_checkpoint(latest, {"policy": policy}, schedulers={"s": counter}) == {"sample": 4}
    assert counter.steps == 0
    after = weights(policy)
    assert all(torch.equal(before[k], after[k]) for k in before)

    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    assert save_checkpoint(tmp_path, 2, {"policy": policy}) == tmp_path / "iter_0000002"  # replaces the stale tmp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002"]


def test_retention_keeps_the_newest(policy: Any, tmp_path: Path) -> None:
    (tmp_path / ".tmp-iter_0000009").mkdir(parents=True)  # an old killed save
    for step in (1, 2, 10, 11):  # numeric order: iter_0000010 is newer than iter_0000002
        save_checkpoint(tmp_path, step, {"policy": policy}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000010", "iter_0000011"]
    assert read_meta(latest_checkpoint(tmp_path))["step"] == 11


def test_rng_is_restored(policy: Any, tmp_path: Path) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    def draws() -> list[float]:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            tracked = torch.rand(1).item()
        return [random.random(), float(np.random.rand()), torch.rand(1).item(), tracked]

    path = save_checkpoint(tmp_path, 1, {"policy": policy})
    expected = draws()
    load_checkpoint(path, {"policy": policy})
    assert draws() == expected


def test_model_only_checkpoints_and_load_errors(policy: Any, tmp_path: Path) -> None:
    path = save_models(tmp_path / "m", {"policy": policy})
    meta = read_meta(path)
    assert meta["models"] == {"policy": {"role": "policy", "dtype": "float32"}}
    assert meta["optimizers"] == [] and not meta["rng"] and not (path / "rng").exists()
    assert (path / "hf" / "policy" / "config.json").is_file()
    load_checkpoint(path, {"policy": policy})
    with pytest.raises(ValueError, match=r"has no models \['discriminator'\]"):
        load_checkpoint(path, {"discriminator": policy})
    (path / COMPLETE).unlink()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(path, {"policy": policy})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "run", 1, {"policy": policy}, extra_state={"bad": object()})
    assert latest_checkpoint(tmp_path / "run") is None
