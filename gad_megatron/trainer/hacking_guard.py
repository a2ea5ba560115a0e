"""The reward-hacking guard of the ``gad`` stage: alarms when G exploits D instead of imitating the teacher.

GAD (arXiv 2511.10643) reports that a frozen discriminator is hacked within a few hundred
steps: responses grow far past the teacher's while D's scores rise. Each step the guard reads
five logged signals, averages each over the last ``window`` steps and checks it against a bound:

    guard/length_vs_teacher  mean len_vs_teacher (rollout / teacher token length)   > max_length_growth
    guard/truncation_rise    mean truncated_frac - its mean over the first window   > max_truncation_rise
    guard/d_acc              mean d_acc (D's pair accuracy, frozen D included)      < min_d_acc
    guard/reward_rise        mean reward_mean - its mean over the first window      > max_reward_rise (off: None)
    guard/repetition_rise    mean repetition (rollouts' seq-rep-4) - its first mean > max_repetition_rise (off: None)

No bound is checked before the stage has logged ``window`` steps. The baseline is the stage's
first ``window`` logged steps, so a resumed run rebuilds it from ``metrics.jsonl`` (the rows
given to :class:`HackingGuard`). Pure logic: the trainer broadcasts the stop decision.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gad_megatron.config import HackingGuardConfig

log = logging.getLogger(__name__)

# guard metric -> the logged step metric it averages
SIGNALS = {"guard/length_vs_teacher": "len_vs_teacher", "guard/truncation_rise": "truncated_frac",
           "guard/d_acc": "d_acc", "guard/reward_rise": "reward_mean", "guard/repetition_rise": "repetition"}  # fmt: skip
ALARMS = "guard/alarms"


class RewardHackingError(RuntimeError):
    """The guard fired with ``train.hacking_guard.stop`` set: the stage stopped (CLI exit code 1)."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class HackingGuard:
    """Per-step alarms from ``cfg``'s bounds; ``rows`` are the stage's logged metric rows before
    the first step to observe (a resumed run's history), oldest first."""

    def __init__(self, cfg: HackingGuardConfig, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        self.cfg = cfg
        self.history: dict[str, list[float]] = {key: [] for key in SIGNALS.values()}
        self.first_alarm: int | None = None  # the step of the first alarm, restored from logged rows too
        self.alarming = False  # the last observed step raised an alarm
        for row in rows:
            self._record(row)
            if row.get(ALARMS) and self.first_alarm is None:
                self.first_alarm = int(row["step"])

    def _record(self, metrics: Mapping[str, Any]) -> None:
        for key, values in self.history.items():
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.append(float(value))

    def _recent(self, key: str) -> float | None:
        values = self.history[key]
        return _mean(values[-self.cfg.window :]) if len(values) >= self.cfg.window else None

    def _rise(self, key: str) -> float | None:
        recent = self._recent(key)
        return None if recent is None else recent - _mean(self.history[key][: self.cfg.window])

    def _bounds(self) -> dict[str, tuple[float | None, float | None, str]]:
        """guard metric -> (its value, the bound or None when off, the config key); "d_acc" is a floor."""
        c = self.cfg
        return {
            "guard/length_vs_teacher": (self._recent("len_vs_teacher"), c.max_length_growth, "max_length_growth"),
            "guard/truncation_rise": (self._rise("truncated_frac"), c.max_truncation_rise, "max_truncation_rise"),
            "guard/d_acc": (self._recent("d_acc"), c.min_d_acc, "min_d_acc"),
            "guard/reward_rise": (self._rise("reward_mean"), c.max_reward_rise, "max_reward_rise"),
            "guard/repetition_rise": (self._rise("repetition"), c.max_repetition_rise, "max_repetition_rise"),
        }

    def observe(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Add ``step``'s metrics; -> the guard metrics to log with them (a signal is left out until
        ``window`` steps carry it). Warns once per bound crossed, naming the config key to change."""
        self._record(metrics)
        out: dict[str, float] = {}
        alarms = 0
        for name, (value, bound, key) in self._bounds().items():
            if value is None:
                continue
            out[name] = value
            floor = name == "guard/d_acc"
            if bound is not None and (value < bound if floor else value > bound):
                alarms += 1
                side = "below" if floor else "above"
                log.warning("reward-hacking guard: step %d: %s = %.4g is %s the bound %.4g (train.hacking_guard.%s)",
                            step, name, value, side, bound, key)  # fmt: skip
        out[ALARMS] = float(alarms)
        self.alarming = alarms > 0
        if self.alarming and self.first_alarm is None:
            self.first_alarm = step
        return out

    @property
    def should_stop(self) -> bool:
        """Stop now: the last observed step raised an alarm and ``stop`` is set."""
        return self.cfg.stop and self.alarming

    def stop_message(self, step: int, checkpoints: Iterable[tuple[int, Path]]) -> str:
        """Why the stage stops at ``step``, naming the last good checkpoint among ``checkpoints``
        ((step, path) pairs that exist now; at equal steps the first listed wins)."""
        first = self.first_alarm if self.first_alarm is not None else step
        good = last_good_checkpoint(checkpoints, first)
        where = f"the last good checkpoint is {good[1]} (step {good[0]})" if good else "no checkpoint precedes it"
        return (f"reward-hacking guard stopped the stage after step {step} (first alarm: step {first}); {where}. "
                "Lower the generator's lr or let D learn, or loosen train.hacking_guard")  # fmt: skip


def last_good_checkpoint(checkpoints: Iterable[tuple[int, Path]], first_alarm: int) -> tuple[int, Path] | None:
    """The newest of ``checkpoints`` saved before step ``first_alarm`` (the first listed of equal steps)."""
    good = [(s, p) for s, p in checkpoints if s < first_alarm]
    return max(good, key=lambda c: c[0]) if good else None
