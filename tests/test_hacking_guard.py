"""The reward-hacking guard: its bounds over synthetic metric rows, its baseline after a resume,
the stop and its checkpoint; then real tiny gad stages, one made to hack (frozen D, high G lr)
and one healthy, under the same bounds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from gad_megatron.config import HackingGuardConfig
from gad_megatron.trainer.hacking_guard import ALARMS, HackingGuard, last_good_checkpoint
from gad_megatron.trainer.metrics import logged_rows

HEALTHY = {"len_vs_teacher": 1.0, "truncated_frac": 0.1, "d_acc": 0.7, "reward_mean": 0.0, "repetition": 0.05}


def rows(n: int, start: int = 1, **changed: float) -> list[dict]:
    """``n`` metric rows from step ``start``: healthy values, ``changed`` overriding them."""
    return [{"step": s, **HEALTHY, **changed} for s in range(start, start + n)]


def run(guard: HackingGuard, steps: list[dict]) -> list[dict[str, float]]:
    return [guard.observe(r["step"], r) for r in steps]


def test_the_config_section_is_strict_with_the_documented_defaults() -> None:
    from gad_megatron.config import ConfigError, RunConfig, parse_config

    assert RunConfig(run_dir="r", data={"path": "hub/set"}).train.hacking_guard == HackingGuardConfig(
        window=5, max_length_growth=1.5, max_truncation_rise=0.25, min_d_acc=0.15, max_reward_rise=None,
        max_repetition_rise=None, stop=False)
    with pytest.raises(ConfigError, match=r"train.hacking_guard.max_length: unknown key"):
        parse_config({"run_dir": "r", "data": {"path": "hub/set"}, "train": {"hacking_guard": {"max_length": 2}}})
    with pytest.raises(ConfigError, match=r"train.hacking_guard.window"):
        parse_config({"run_dir": "r", "data": {"path": "hub/set"}, "train": {"hacking_guard": {"window": 0}}})


def test_silent_on_flat_healthy_rows_and_nothing_checked_before_a_full_window(caplog) -> None:
    out = run(HackingGuard(HackingGuardConfig(max_reward_rise=0.5, max_repetition_rise=0.1)), rows(30))
    assert all(o[ALARMS] == 0 for o in out)
    assert set(out[3]) == {ALARMS}, "step 4: fewer than window=5 steps, no signal yet"
    assert out[4] == pytest.approx({"guard/length_vs_teacher": 1.0, "guard/truncation_rise": 0.0, "guard/d_acc": 0.7,
                                    "guard/reward_rise": 0.0, "guard/repetition_rise": 0.0, ALARMS: 0.0})  # fmt: skip
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("changed", "key", "cfg"), [
    ({"len_vs_teacher": 1.8}, "max_length_growth", {}),
    ({"truncated_frac": 0.5}, "max_truncation_rise", {}),
    ({"d_acc": 0.05}, "min_d_acc", {}),
    ({"reward_mean": 2.0}, "max_reward_rise", {"max_reward_rise": 1.0}),
    ({"repetition": 0.4}, "max_repetition_rise", {"max_repetition_rise": 0.2}),
])  # fmt: skip
def test_each_bound_fires_alone(changed: dict, key: str, cfg: dict, caplog) -> None:
    guard = HackingGuard(HackingGuardConfig(**cfg))
    healthy, hacked = run(guard, rows(5)), run(guard, rows(10, start=6, **changed))
    assert all(o[ALARMS] == 0 for o in healthy)
    assert hacked[-1][ALARMS] == 1, "a full window of hacked steps crosses this bound and no other"
    fired = [o for o in hacked if o[ALARMS]]
    assert guard.first_alarm == 5 + len(hacked) - len(fired) + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(fired) and all(f"train.hacking_guard.{key}" in w for w in warnings)
    assert f"step {guard.first_alarm}:" in warnings[0]


def test_reward_and_repetition_rises_are_reported_but_not_checked_by_default() -> None:
    guard = HackingGuard(HackingGuardConfig())
    out = run(guard, rows(5) + rows(5, start=6, reward_mean=9.0, repetition=0.85))
    assert out[-1]["guard/reward_rise"] == pytest.approx(9.0) and out[-1][ALARMS] == 0
    assert out[-1]["guard/repetition_rise"] == pytest.approx(0.8)


def test_a_resumed_run_keeps_its_baseline_from_the_logged_rows(tmp_path: Path) -> None:
    """Truncation creeps up by 0.04 a step: at step 12 the rise over steps 1-5 is 0.28 > 0.25,
    while a baseline taken from the steps after the resume would see no rise."""
    history = [{"step": s, **HEALTHY, "truncated_frac": 0.04 * s} for s in range(1, 13)]
    whole = HackingGuard(HackingGuardConfig())
    expected = run(whole, history)[-1]
    assert expected[ALARMS] == 1 and expected["guard/truncation_rise"] == pytest.approx(0.28)
    log = tmp_path / "metrics.jsonl"  # as MetricsLogger writes it, steps 1-11 logged, with a torn last line
    log.write_text("".join(json.dumps(r) + "\n" for r in history[:11]) + '{"step": 12, "d_a')
    resumed = HackingGuard(HackingGuardConfig(), logged_rows(log, before_step=9))  # resumed from step 8
    assert run(resumed, history[8:])[-1] == pytest.approx(expected)


def test_the_first_alarm_is_restored_from_the_logged_rows(tmp_path: Path) -> None:
    logged = rows(3) + [{"step": 4, **HEALTHY, ALARMS: 2.0}, {"step": 5, **HEALTHY, ALARMS: 0.0}]
    guard = HackingGuard(HackingGuardConfig(), logged)
    assert guard.first_alarm == 4
    guard.observe(6, {"step": 6, **HEALTHY})
    assert guard.first_alarm == 4 and not guard.should_stop


def test_stop_only_when_set_and_only_on_an_alarm() -> None:
    for stop in (False, True):
        guard = HackingGuard(HackingGuardConfig(stop=stop))
        run(guard, rows(5))
        assert not guard.should_stop
        run(guard, rows(5, start=6, d_acc=0.0))
        assert guard.should_stop is stop


def test_the_last_good_checkpoint_precedes_the_first_alarm() -> None:
    saved = [(8, Path("megatron/iter_0000008")), (4, Path("checkpoint-4")), (6, Path("checkpoint-6")),
             (8, Path("checkpoint-8"))]  # fmt: skip
    assert last_good_checkpoint(saved, first_alarm=7) == (6, Path("checkpoint-6"))
    assert last_good_checkpoint(saved, first_alarm=9) == (8, Path("megatron/iter_0000008")), "resumable first"
    assert last_good_checkpoint(saved, first_alarm=8) == (6, Path("checkpoint-6")), "not the alarm step's own"
    assert last_good_checkpoint(saved, first_alarm=4) is None
    guard = HackingGuard(HackingGuardConfig(stop=True), rows(6) + [{"step": 7, **HEALTHY, ALARMS: 1.0}])
    message = guard.stop_message(9, saved)
    assert "after step 9" in message and "first alarm: step 7" in message and "checkpoint-6 (step 6)" in message


def test_stop_raises_on_every_rank_only_when_set(tmp_path: Path) -> None:
    """The trainer's stop: one process group of one rank (gloo), the broadcast included."""
    import torch

    from gad_megatron.trainer.hacking_guard import RewardHackingError
    from gad_megatron.trainer.run import _stop_if_hacked

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "COMPLETE").write_text("complete\n")
    (tmp_path / "checkpoint-4").mkdir()  # an unfinished export: never named
    # The in-process stage runs of other tests keep their one-rank group alive: use it when it is there.
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                             world_size=1)
    assert torch.distributed.get_world_size() == 1
    try:
        for stop in (False, True):
            guard = HackingGuard(HackingGuardConfig(stop=stop))
            run(guard, rows(5) + rows(5, start=6, d_acc=0.0))
            if not stop:
                _stop_if_hacked(guard, 10, tmp_path / "megatron", tmp_path)
                continue
            with pytest.raises(RewardHackingError, match=r"checkpoint-2 \(step 2\)"):
                _stop_if_hacked(guard, 10, tmp_path / "megatron", tmp_path)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


# The tiny gad runs: warmup (SFT at a high lr, so that G learns to end its answers near the
# teacher's 12 tokens) then gad from it, both runs with stop: true and the default bounds.
# The hacked run freezes a D that learned a length bias (a D-only warmup whose teacher says its
# answer four times, past the 24-token limit) and trains G at lr 2e-2. Measured over seeds 1, 2
# and 4 (len_vs_teacher by step): G either grows to the limit (0.52, 1.96, 2.0, 1.96, 1.88: the
# length bound fires at step 5) or finds 1-2 token answers that the frozen D scores above the
# teacher's (D's accuracy 1.0 -> 0.0: the D-accuracy bound fires at step 6-7). With the warmup's
# own D frozen, G at the same lr neither grows nor fools D within 10 steps on seeds 1 and 2.
# The healthy run (D learning, G lr 1e-4) stays near 0.5-0.9 of the teacher's length.
RUN = {"max_response_length": 24, "batch_prompts": 4, "num_generations": 4, "save_steps": 4}
WARMUP = ("train.max_steps=16", "train.learning_rate=2e-2", "parallel.micro_batch_tokens=304")


@pytest.fixture(scope="module")
def warmed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    from tests.helpers.tiny_run import write_tiny_setup
    from tests.test_megatron_stages import gad, ok

    config = write_tiny_setup(tmp_path_factory.mktemp("guard"), tiny_model_dir, **RUN)
    ok(gad(config, "warmup", *WARMUP))
    return config, config.parent / "run" / "warmup" / "final"


@pytest.fixture(scope="module")
def length_biased_discriminator(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, warmed) -> Path:
    """D after 8 D-only steps on teacher answers twice as long as the limit against the warmed G's."""
    from tests.helpers.tiny_run import write_tiny_setup
    from tests.test_megatron_stages import gad, ok

    config = write_tiny_setup(tmp_path_factory.mktemp("long"), tiny_model_dir, teacher_repeats=4, **RUN)
    ok(gad(config, "warmup", f"train.init_from={warmed[1]}", "train.max_steps=8", "train.disc_only_steps=8",
           "train.disc_learning_rate=1e-3", "parallel.micro_batch_tokens=304"))  # fmt: skip
    return config.parent / "run" / "warmup" / "final" / "discriminator"


def _gad(warmed: tuple[Path, Path], run_dir: Path, *sets: str):
    from tests.test_megatron_stages import gad, metrics

    config, warm = warmed
    proc = gad(config, "gad", f"run_dir={run_dir}", f"train.init_from={warm}", "parallel.micro_batch_tokens=304",
               "train.hacking_guard.stop=true", *sets)  # fmt: skip
    rows = metrics(run_dir / "gad")
    print("\n".join(f"step {r['step']}: len_vs_teacher {r['len_vs_teacher']:.3f} truncated {r['truncated_frac']:.3f} "
                    f"d_acc {r['d_acc']:.3f} reward {r['reward_mean']:.3f} alarms {r['guard/alarms']:.0f}" for r in rows))
    return proc, rows


@pytest.mark.slow  # with the healthy run below: four trainer starts, about 4-5 min on 2 shared cores
def test_a_hacked_gad_run_fires_and_stops_naming_the_last_good_checkpoint(
    warmed, length_biased_discriminator: Path, tmp_path: Path
) -> None:
    proc, rows = _gad(warmed, tmp_path, f"train.discriminator={length_biased_discriminator}",
                      "train.freeze_discriminator=true", "train.learning_rate=2e-2", "train.max_steps=10")  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    alarm = rows[-1]["step"]
    assert 5 <= alarm < 10 and [r["step"] for r in rows] == list(range(1, alarm + 1)), "stops after the first alarm"
    assert rows[-1]["guard/alarms"] >= 1 and all(r["guard/alarms"] == 0 for r in rows[:-1])
    hacked = {"max_length_growth": rows[-1]["guard/length_vs_teacher"] > 1.5, "min_d_acc": rows[-1]["guard/d_acc"] < 0.15}
    assert any(hacked.values()), "G grew its answers or fooled the frozen D"
    warnings = [line for line in proc.stderr.splitlines() if f"reward-hacking guard: step {alarm}:" in line]
    fired = [k for k, crossed in hacked.items() if crossed]
    assert len(warnings) == rows[-1]["guard/alarms"] and all(any(f".{k})" in w for w in warnings) for k in fired)
    good = tmp_path / "gad" / "megatron" / "iter_0000004"
    assert good.is_dir() and f"the last good checkpoint is {good} (step 4)" in proc.stderr
    assert not (tmp_path / "gad" / "final").exists()


@pytest.mark.slow
def test_a_healthy_gad_run_stays_silent_under_the_same_bounds(warmed, tmp_path: Path) -> None:
    proc, rows = _gad(warmed, tmp_path, "train.learning_rate=1e-4", "train.max_steps=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(rows) == 10 and all(r["guard/alarms"] == 0 for r in rows)
    assert max(r["guard/length_vs_teacher"] for r in rows[4:]) < 1.3, "a margin under the 1.5 bound"
    assert "reward-hacking guard" not in proc.stderr


@pytest.mark.slow  # one torchrun start of two processes, 35-60 s here
def test_every_rank_stops_together_under_torchrun(tiny_model_dir: Path, tmp_path: Path) -> None:
    """G straight from the random tiny model never ends an answer: 24 tokens against the
    teacher's 12, so the default length bound fires at step 5, decided on rank 0 alone."""
    from tests.helpers.tiny_run import write_tiny_setup
    from tests.test_megatron_stages import gad, metrics

    config = write_tiny_setup(tmp_path, tiny_model_dir, **RUN)
    proc = gad(config, "gad", f"train.init_from={tiny_model_dir}", "parallel.micro_batch_tokens=304",
               "train.hacking_guard.stop=true", "train.max_steps=8", nproc=2)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [r["guard/alarms"] for r in metrics(tmp_path / "run" / "gad")] == [0, 0, 0, 0, 1]
    stopped = [line for line in proc.stderr.splitlines() if "reward-hacking guard stopped the stage after step 5" in line]
    assert len(stopped) == 2, "each rank raises and logs the stop"
    assert all(str(tmp_path / "run" / "gad" / "megatron" / "iter_0000004") in line for line in stopped)
