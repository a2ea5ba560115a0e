"""Resharding layer (Megatron policy -> engine weights, HF export) and the rollout step.

Weight sync at TP=2, PP=2, EP=2 (Qwen3-MoE; the MoE policy also at PP=2 and DP=2) (with DP=2 at
TP=PP=1 in the same launch) and TP=2 x PP=2 runs in
torchrun launches of ``tests/helpers/reshard_check.py``; the rollout step runs in this process
on a tiny random Llama with SmolLM2's tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gad_megatron.rollout.engine import Completion
from gad_megatron.rollout.hf_engine import TransformersEngine
from gad_megatron.rollout.step import RolloutSettings, rollout_metrics, rollout_seed, rollout_step, to_rollout
from gad_megatron.text_encoding import TextEncoder
from tests.helpers.tiny_hf import FAMILIES, MOE_FAMILIES
from tests.helpers.torchrun import run_torchrun

HELPER = Path(__file__).parent / "helpers" / "reshard_check.py"
TOLERANCE = 1e-4
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Hi"}]]


def run_reshard(tmp_path: Path, nproc: int, *args: str) -> dict[str, dict[str, float]]:
    run_torchrun(HELPER, nproc, str(tmp_path), *args, timeout=1200)
    return json.loads((tmp_path / "report.json").read_text())


def assert_sync(report: dict[str, float], models: tuple[str, ...] = FAMILIES) -> None:
    for model in models:
        checks = {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith(model + "/")}
        assert checks["logits"] < TOLERANCE, checks
        assert checks["logits_after_step"] < TOLERANCE, checks
        assert checks["export_logits"] < TOLERANCE, checks
        assert checks["stale_before_resync"] < -1e-2, checks  # the step moved the policy...
        assert checks["old_vs_resynced"] < -1e-2, checks  # ...and the second sync reached the engine
        assert checks["greedy_mismatches"] == 0, checks
        assert checks["dst0_stream_wrong"] == 0 and checks["export_single_file"] == 0, checks
        assert checks["export_overwrote"] == 0, checks
        over = {k: v for k, v in checks.items() if k.startswith("peak_over_bound_")}
        assert len(over) == 2 and all(v <= 0 for v in over.values()), checks  # the bound holds exactly
        assert all(v > 0 for k, v in checks.items() if k.startswith("peak_bytes_")), checks  # it does see allocations


def test_sync_tp2_pp2_dp2_and_ep2_on_two_processes(tmp_path: Path) -> None:
    report = run_reshard(tmp_path, 2, "2x1", "1x2", "1x1", "1x1x2")
    assert_sync(report["2x1"])  # MoE trains at TP = 1 only
    for layout in ("1x2", "1x1"):
        assert_sync(report[layout], FAMILIES + MOE_FAMILIES)
    assert_sync(report["1x1x2"], MOE_FAMILIES)


def test_sync_tp2_x_pp2_on_four_processes(tmp_path: Path) -> None:
    assert_sync(run_reshard(tmp_path, 4, "2x2")["2x2"])


@pytest.mark.slow
def test_sync_smollm2_tp1(tmp_path: Path) -> None:
    from gad_megatron.models.sources import resolve_model_path

    report = run_reshard(tmp_path, 1, "--hf-dir", resolve_model_path("smollm2-135m-instruct"), "1x1")
    assert_sync(report["1x1"], ("real",))


# --- rollout step -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer) -> TextEncoder:
    return TextEncoder(tiny_tokenizer, max_prompt_length=64, max_response_length=6)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TransformersEngine:
    return TransformersEngine.from_pretrained(str(tiny_model_dir))


def test_rollouts_are_reencoded_like_teacher_text(encoder: TextEncoder) -> None:
    prompt = PROMPTS[0]
    done = to_rollout(Completion(0, [1, 2, 2], "  Paris.\n", [-0.1] * 3, "stop"), prompt, encoder)
    cut = to_rollout(Completion(0, [1] * 6, "Paris is the", [-0.1] * 6, "length"), prompt, encoder)
    eot = encoder.end_of_turn_ids()
    # A finished rollout is exactly the teacher's encoding of the same text (stripped, end-of-turn).
    assert list(done.d_input_ids) == encoder.encode(prompt, "Paris.") and list(done.d_input_ids[-len(eot):]) == eot
    # A truncated one has no end-of-turn even though its re-encoded text is under the budget.
    assert list(cut.d_input_ids) == encoder.prompt_ids(prompt) + encoder.tokenizer("Paris is the")["input_ids"]
    assert (done.truncated, cut.truncated, done.length, cut.length) == (False, True, 3, 6)
    metrics = rollout_metrics([done, cut])
    assert metrics == {"rollout/length_mean": 4.5, "rollout/length_max": 6.0, "rollout/truncated": 0.5,
                       "rollout/repetition": 0.0}  # fmt: skip
    looped = to_rollout(Completion(0, [1] * 6, "Paris! Paris! Paris! Paris! Paris!", [-0.1] * 6, "length"), prompt, encoder)
    assert rollout_metrics([done, looped])["rollout/repetition"] == pytest.approx(0.5 / 2), "2 word 4-grams, 1 distinct"


def test_rollout_seed_is_a_stable_function_of_seed_step_prompt() -> None:
    assert rollout_seed(7, 3, 0) == 8325274931591043551  # pinned: a resumed run must sample the same
    assert len({rollout_seed(7, s, r) for s in range(4) for r in range(4)} | {rollout_seed(8, 0, 0)}) == 17


def test_rollout_step_reproducible_across_resume(engine: TransformersEngine, encoder: TextEncoder,
                                                 tiny_model_dir: Path) -> None:  # fmt: skip
    settings = RolloutSettings(n=3, max_tokens=6, temperature=1.0)
    first = rollout_step(engine, PROMPTS, encoder, encoder, settings, run_seed=7, step=3, first_prompt=0)
    resumed_engine = TransformersEngine.from_pretrained(str(tiny_model_dir))  # a fresh process, same weights
    resumed = rollout_step(resumed_engine, PROMPTS, encoder, encoder, settings, run_seed=7, step=3, first_prompt=0)
    next_step = rollout_step(engine, PROMPTS, encoder, encoder, settings, run_seed=7, step=4, first_prompt=0)
    assert resumed == first and next_step != first
    assert [r.prompt_index for r in first] == [0, 0, 0, 1, 1, 1]
    for r in first:
        assert r.length <= 6 and r.truncated == (r.length == 6 and r.token_ids[-1] != encoder.tokenizer.eos_token_id)
        assert list(r.d_input_ids) == encoder.encode(PROMPTS[r.prompt_index], r.text, [] if r.truncated else None)


def test_rollout_step_refuses_a_budget_other_than_the_discriminators(engine: TransformersEngine,
                                                                     encoder: TextEncoder) -> None:  # fmt: skip
    with pytest.raises(ValueError, match="max_response_length=6"):
        rollout_step(engine, PROMPTS, encoder, encoder, RolloutSettings(n=1, max_tokens=8), 0, 0, 0)
