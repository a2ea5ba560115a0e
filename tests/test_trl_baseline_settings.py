"""The TRL baseline (bench/trl_baseline) takes its TRL-only knobs from its own ``TrlSettings``,
not from the product's run config, and its modules still compile against the product."""

from __future__ import annotations

import py_compile
import sys
from pathlib import Path

import pytest

from gad_megatron.config import parse_config

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def baseline(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.syspath_prepend(str(BENCH))  # how bench/step_time.py imports it
    import trl_baseline.common as common
    from trl_baseline.settings import TrlSettings

    yield common, TrlSettings
    for name in [n for n in sys.modules if n == "trl_baseline" or n.startswith("trl_baseline.")]:
        del sys.modules[name]


def test_trainer_arguments_come_from_trl_settings(baseline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    common, TrlSettings = baseline  # noqa: N806 (a class)
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n')
    cfg = parse_config({"run_dir": str(tmp_path / "run"), "data": {"path": str(data)}, "train": {"save_steps": 7}})
    trl = TrlSettings(micro_batch_size=2, gradient_checkpointing=True, bf16=False, logging_steps=3,
                      trl_args={"warmup_ratio": 0.1})  # fmt: skip
    args = common.trainer_args(cfg, trl, "gad", sequences_per_step=8)
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (2, 4)
    assert args["gradient_checkpointing"] is True and args["bf16"] is False and args["logging_steps"] == 3
    assert args["warmup_ratio"] == 0.1 and args["save_steps"] == 7  # trl_args on top of the run config's
    with pytest.raises(ValueError, match="must be positive"):
        TrlSettings(micro_batch_size=0)


@pytest.mark.parametrize("module", sorted((BENCH / "trl_baseline").glob("*.py")), ids=lambda p: p.name)
def test_baseline_modules_compile(module: Path, tmp_path: Path) -> None:
    py_compile.compile(str(module), cfile=str(tmp_path / "out.pyc"), doraise=True)
