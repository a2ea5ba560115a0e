"""gad_megatron.trainer.metrics: metrics.jsonl (and its resume), TensorBoard, console, NaN check, MFU."""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
import torch

from gad_megatron.config import ConfigError
from gad_megatron.trainer import metrics as m
from gad_megatron.trainer.metrics import MetricsLogger, NonFiniteError, PhaseTimer, check_finite, estimate_mfu, peak_flops


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def _run(tmp_path, steps, resume_step=0, **kw) -> MetricsLogger:
    with MetricsLogger.open(tmp_path, "gad", 6, [], 0, resume_step=resume_step, stream=io.StringIO(), **kw) as log:
        for step in steps:
            log.log(step, {"d_loss": 0.5 + step, "d_acc": 0.75})
    return log


def test_jsonl_lines_and_resume_truncation(tmp_path, monkeypatch):
    monkeypatch.setattr(m, "gpu_metrics", lambda: {"gpu/0/utilization_pct": 50.0})
    log = _run(tmp_path, range(1, 5))
    rows = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert list(rows[0])[:2] == ["step", "time"] and rows[0]["d_loss"] == 1.5
    assert rows[0]["gpu/0/utilization_pct"] == 50.0  # GPU telemetry merged into every step
    with log.path.open("a") as fh:
        fh.write('{"step": 5, "d_lo')  # a job killed mid-write
    _run(tmp_path, range(3, 7), resume_step=3)  # resumed from the checkpoint after step 2
    assert _steps(log.path) == [1, 2, 3, 4, 5, 6]
    _run(tmp_path, [1])  # a fresh run starts a fresh file
    assert _steps(log.path) == [1]


def test_tensorboard_events_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger.open(tmp_path, "gad", 3, ["tensorboard"], 0, stream=io.StringIO()) as log:
        for step in (1, 2, 3):
            log.log(step, {"d_loss": float(step), "note": "text is not a scalar"})
    events = EventAccumulator(str(tmp_path / "gad" / "tb"))
    events.Reload()
    assert "d_loss" in events.Tags()["scalars"] and "note" not in events.Tags()["scalars"]
    assert [(e.step, e.value) for e in events.Scalars("d_loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_plain_console_without_tty(tmp_path):
    out = io.StringIO()  # not a TTY: plain lines, no live bar
    with MetricsLogger.open(tmp_path, "gad", 20, [], 0, log_every=10, stream=out) as log:
        for step in range(1, 21):
            log.log(step, {"d_loss": 0.69, "d_acc": 0.5, "reward_std": 0.1, "kl": 0.01, "len_mean": 12.0})
    lines = out.getvalue().splitlines()
    assert [line.split("|")[0] for line in lines] == ["[gad] step 1/20 ", "[gad] step 10/20 ", "[gad] step 20/20 "]
    assert "s/step" in lines[0] and "ETA 0:00:00" in lines[-1]
    assert "d_loss 0.69 d_acc 0.5 reward_std 0.1 kl 0.01 len_mean 12" in lines[1]
    assert "\x1b" not in out.getvalue()  # no terminal escapes in a log file


def test_rate_and_eta_start_after_step_zero_rows(tmp_path, monkeypatch):
    """D's pretraining logs step-0 rows for minutes: they stay out of the s/step and ETA of the steps."""
    import time
    from types import SimpleNamespace

    import gad_megatron.trainer.metrics as metrics

    clock = iter([0.0, 600.0, 610.0, 620.0])  # logger created; pretraining done; steps 1 and 2 done
    monkeypatch.setattr(metrics, "time", SimpleNamespace(monotonic=lambda: next(clock), time=time.time))
    out = io.StringIO()
    with MetricsLogger.open(tmp_path, "warmup", 5, [], 0, log_every=1, stream=out) as log:
        log.log(0, {"disc_pretrain/val_acc": 0.8})
        log.log(1, {"d_acc": 0.5})
        log.log(2, {"d_acc": 0.5})
    lines = out.getvalue().splitlines()
    assert [line.split("|")[:3] for line in lines] == [["[warmup] step 1/5 ", " 10.00 s/step ", " ETA 0:00:40 "],
                                                       ["[warmup] step 2/5 ", " 10.00 s/step ", " ETA 0:00:30 "]]
    assert _steps(log.path) == [0, 1, 2]


def test_only_rank_zero_writes(tmp_path):
    out = io.StringIO()
    with MetricsLogger.open(tmp_path, "gad", 2, ["tensorboard", "wandb"], 1, stream=out) as log:
        log.log(1, {"d_loss": 1.0})
    assert not (tmp_path / "gad").exists() and out.getvalue() == ""


def test_wandb_missing_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="wandb") as err:
        MetricsLogger(tmp_path, "gad", 2, ["wandb"], 0, stream=io.StringIO())
    assert "\n" not in str(err.value)


def test_nan_names_step_and_key():
    check_finite(3, {"d_loss": 0.5, "kl": float("nan")}, ["d_loss"])  # unchecked keys are not looked at
    with pytest.raises(NonFiniteError, match=r"^step 7: kl is nan$"):
        check_finite(7, {"d_loss": 0.5, "kl": float("nan")}, ["d_loss", "kl"])
    with pytest.raises(NonFiniteError, match="step 8: d_loss is inf"):
        check_finite(8, {"d_loss": math.inf}, ["d_loss"])


def test_phase_timer():
    timer = PhaseTimer(cuda_sync=False)
    with timer("rollout"):
        sum(range(10000))
    with timer("disc"):
        pass
    assert timer.tokens_per_second(100, "rollout") > 0 and timer.tokens_per_second(100, "gen") is None
    times = timer.pop()
    assert set(times) == {"time/rollout", "time/disc", "time/step"}
    assert times["time/step"] >= times["time/rollout"] + times["time/disc"]
    assert timer.pop().keys() == {"time/step"}  # pop resets


def test_mfu_hand_example():
    # 6 * 1e9 params * 1000 tokens = 6e12, plus attention 12 * 2 layers * 1000 hidden * 500 seq * 1000 tokens
    # = 1.2e10: 6.012e12 FLOPs in 2 s on 4 GPUs of 1e12 FLOP/s peak.
    mfu = estimate_mfu(params=10**9, tokens=1000, seconds=2.0, layers=2, hidden=1000, seq_len=500,
                       world_size=4, peak_flops_per_gpu=1e12)
    assert mfu == pytest.approx(0.7515)
    assert estimate_mfu(10**9, 1000, 2.0, 2, 1000, 500, 4, None) is None


def test_peak_flops_by_gpu_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert peak_flops() is None  # CPU: MFU is omitted, not faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, bf16, fp8 in [("NVIDIA H100 80GB HBM3", 989e12, 1978e12), ("NVIDIA H200", 989e12, 1978e12),
                            ("NVIDIA A100-SXM4-80GB", 312e12, 312e12), ("NVIDIA H100 PCIe", 756e12, 1512e12),
                            ("Tesla T4", None, None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert (peak_flops(), peak_flops(fp8=True)) == (bf16, fp8)


def test_live_bar_on_a_terminal(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with MetricsLogger.open(tmp_path, "gad", 4, [], 0, log_every=2, stream=out) as log:
        for step in range(1, 5):
            log.log(step, {"d_loss": 0.5})
    text = out.getvalue()
    assert "4/4" in text and "s/step" in text and "[gad] step 2/4" in text  # the bar, and summaries above it
