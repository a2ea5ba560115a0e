"""What the Megatron stages log every step: ``metrics.jsonl``, TensorBoard, W&B and the console.

Only rank 0 writes; on other ranks :class:`MetricsLogger` is silent. Alongside it: the
non-finite check that stops a diverged run (:func:`check_finite`), per-phase wall times
(:class:`PhaseTimer`) and model FLOPs utilisation (:func:`estimate_mfu`, :func:`peak_flops`).
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch

from gad_megatron.config import ConfigError
from gad_megatron.telemetry import gpu_metrics

__all__ = [
    "SUMMARY_KEYS", "MetricsLogger", "NonFiniteError", "PhaseTimer", "check_finite", "estimate_mfu", "logged_rows",
    "peak_flops",
]

# The console summary: what tells at a glance whether adversarial training is healthy.
SUMMARY_KEYS = ("d_loss", "d_acc", "d_acc_after", "reward_std", "kl", "len_mean", "len_max", "sft_loss")

# Dense (no sparsity) bf16 tensor-core peak per GPU, by a substring of the CUDA device name; first match
# wins, so the PCIe H100 (fewer SMs, lower clocks) precedes the SXM part that its name would also match.
_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)
_FP8_NAMES = ("H100", "H200")  # Hopper: FP8 tensor cores run at twice the bf16 rate


class NonFiniteError(RuntimeError):
    """A logged training quantity became NaN or infinite: the run has diverged."""


def check_finite(step: int, metrics: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Raise :class:`NonFiniteError` naming the step and the first of ``keys`` whose value is NaN/inf."""
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise NonFiniteError(f"step {step}: {key} is {value}")


class PhaseTimer:
    """Wall time of named phases within a step: ``with timer("rollout"): ...``.

    ``cuda_sync`` waits for queued GPU work at each phase boundary, so a phase is charged for
    the kernels it launched rather than for those of the phase before it.
    """

    def __init__(self, cuda_sync: bool | None = None) -> None:
        self.cuda_sync = torch.cuda.is_available() if cuda_sync is None else cuda_sync
        self.reset()

    def reset(self) -> None:
        """Forget every phase and restart the step clock."""
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.cuda_sync:
            torch.cuda.synchronize()

    def elapsed(self) -> float:
        """Seconds since the last :meth:`reset`."""
        return time.perf_counter() - self._start

    def tokens_per_second(self, tokens: int, phase: str | None = None) -> float | None:
        """Throughput over one phase, or over the whole step when ``phase`` is None; None if untimed."""
        seconds = self.elapsed() if phase is None else self.seconds.get(phase, 0.0)
        return tokens / seconds if seconds > 0 else None

    def pop(self) -> dict[str, float]:
        """``time/<phase>`` and ``time/step`` seconds; then reset for the next step."""
        out = {f"time/{phase}": s for phase, s in self.seconds.items()}
        out["time/step"] = self.elapsed()
        self.reset()
        return out


def peak_flops(fp8: bool = False, device: int | None = None) -> float | None:
    """Dense peak FLOP/s of this GPU from its name; None on CPU or an unknown GPU (MFU is then omitted)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in _PEAK_BF16:
        if key in name:
            return flops * 2 if fp8 and any(n in name for n in _FP8_NAMES) else flops
    return None


def estimate_mfu(params: int, tokens: int, seconds: float, layers: int, hidden: int, seq_len: int,
                 world_size: int, peak_flops_per_gpu: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of ``world_size`` GPUs.

    FLOPs count forward plus backward (3x forward): ``6 * params * tokens`` for the weight matmuls
    and ``12 * layers * hidden * seq_len * tokens`` for attention scores and values, without
    discounting the causal mask (the PaLM convention). Recomputation is not counted, as MFU
    (unlike hardware FLOPs utilisation) intends. None without a known peak: never a made-up number.
    """
    if peak_flops_per_gpu is None or seconds <= 0:
        return None
    flops = 6 * params * tokens + 12 * layers * hidden * seq_len * tokens
    return flops / (seconds * world_size * peak_flops_per_gpu)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class MetricsLogger:
    """Per-step metrics of one stage to ``<run_dir>/<stage>/metrics.jsonl`` and the chosen sinks (rank 0 only).

    Start one with :meth:`open`, which also drops the lines a resumed run will log again.
    ``report_to`` may name ``"tensorboard"`` (``<run_dir>/<stage>/tb``) and ``"wandb"``. The console
    shows a live ``rich`` bar when ``stream`` is a terminal, plain lines otherwise (Slurm logs, CI),
    with a summary of :data:`SUMMARY_KEYS` every ``log_every`` steps.
    """

    def __init__(self, run_dir: str | Path, stage: str, total_steps: int, report_to: list[str], rank: int,
                 wandb_project: str | None = None, *, log_every: int = 10, stream: TextIO | None = None) -> None:
        self.stage = stage
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self.enabled = rank == 0
        self.dir = Path(run_dir) / stage
        self.path = self.dir / "metrics.jsonl"
        self._stream = stream or sys.stdout
        self._tb: Any = None
        self._wandb: Any = None
        self._progress: Any = None
        self._first_step: int | None = None  # the step before this process's first log: the s/step baseline
        self._t0 = time.monotonic()
        if not self.enabled:
            return
        unknown = set(report_to) - {"tensorboard", "wandb", "none"}
        if unknown:
            raise ConfigError(f"train.report_to: unknown {sorted(unknown)} (choose tensorboard, wandb)")
        self.dir.mkdir(parents=True, exist_ok=True)
        if "wandb" in report_to:  # first: a missing wandb fails before any file is opened
            self._wandb = _wandb_run(wandb_project, f"{Path(run_dir).resolve().name}/{stage}", self.dir)
        self._fh = self.path.open("a", encoding="utf-8")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tb"))
        if self._stream.isatty():
            self._progress = _live_bar(stage, total_steps, self._stream)

    @classmethod
    def open(cls, run_dir: str | Path, stage: str, total_steps: int, report_to: list[str], rank: int,
             wandb_project: str | None = None, *, resume_step: int = 0, **options: Any) -> MetricsLogger:
        """A logger for a run whose first step is ``resume_step``: lines with ``step >= resume_step``
        are dropped first, so a resumed run does not log a step twice (0: a fresh run, drop all)."""
        path = Path(run_dir) / stage / "metrics.jsonl"
        if rank == 0 and path.is_file():
            _truncate(path, resume_step)
        return cls(run_dir, stage, total_steps, report_to, rank, wandb_project, **options)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (plus GPU telemetry) for ``step``; no-op off rank 0."""
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step = step - 1
        row = {"step": step, "time": time.time(), **metrics, **gpu_metrics()}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()  # a killed job keeps every finished step
        scalars = {k: float(v) for k, v in row.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if step == 0:  # rows before step 1 (D's pretraining, which logs its own lines): the rate starts after them
            self._t0, self._first_step = time.monotonic(), None
            return
        self._console(step, row)

    def _console(self, step: int, row: Mapping[str, Any]) -> None:
        s_per_step = (time.monotonic() - self._t0) / max(1, step - (self._first_step or 0))
        eta = _eta(s_per_step * max(0, self.total_steps - step))
        if self._progress is not None:
            self._progress.update(self._progress.task_ids[0], completed=step, rate=f"{s_per_step:.2f} s/step", eta=eta)
        if step % self.log_every and step not in (1, self.total_steps):
            return
        summary = " ".join(f"{k} {_fmt(row[k])}" for k in SUMMARY_KEYS if k in row)
        line = f"[{self.stage}] step {step}/{self.total_steps} | {s_per_step:.2f} s/step | ETA {eta}"
        line += f" | {summary}" if summary else ""
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self._stream, flush=True)

    def close(self) -> None:
        """Flush and close every sink."""
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._progress is not None:
            self._progress.stop()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each line with a whole JSON object and an integer ``step``, and that object; a torn line
    (killed mid-write) is skipped."""
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            yield line, row


def logged_rows(path: str | Path, before_step: int) -> list[dict[str, Any]]:
    """The rows a ``metrics.jsonl`` holds for steps before ``before_step``, in file order ([] without the file)."""
    path = Path(path)
    return [row for _, row in _rows(path) if row["step"] < before_step] if path.is_file() else []


def _truncate(path: Path, resume_step: int) -> None:
    """Keep the lines of steps before ``resume_step``; a torn last line (killed mid-write) goes too."""
    kept = [line + "\n" for line, row in _rows(path) if row["step"] < resume_step]
    path.write_text("".join(kept), encoding="utf-8")


def _wandb_run(project: str | None, name: str, directory: Path) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.report_to has wandb but it is not installed: pip install wandb") from None
    return wandb.init(project=project, name=name, dir=str(directory))


def _live_bar(stage: str, total_steps: int, stream: TextIO) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    # Our own rate and ETA, not rich's: rich would read a resumed run's jump to its first step as speed.
    progress = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}"), console=Console(file=stream))
    progress.add_task(stage, total=total_steps, rate="", eta="-")
    progress.start()
    return progress
