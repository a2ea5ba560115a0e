"""``train.disc_score: likelihood_ratio``: D scores ``beta * (log pi_D(y|x) - log pi_ref(y|x))``.

In one process (CPU, fp32): the trainer's scores equal that formula computed by transformers
on the same two models, whether D scores and learns in one pass or in two; the teacher answers'
reference log-likelihoods are computed once. Refusals of a D of the wrong kind. Through the
CLI: warmup -> gad chains (gad's D is warmup's, scored against the model warmup's D started
from), and TP=2 and PP=2 runs give the losses of one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gad_megatron.config import ConfigError
from tests.test_disc_updates import ANSWERS, PROMPTS
from tests.test_megatron_stages import gad, metrics, ok

BETA = 0.5


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """(D's start, its reference): same shape, other weights, so that every score differs from 0."""
    from gad_megatron.models.sources import make_tiny_model

    root = tmp_path_factory.mktemp("ratio")
    return make_tiny_model(root / "d", tokenizer_spec=str(tiny_model_dir), seed=7), tiny_model_dir


def _context(d_dir: Path, ref_dir: Path, tokenizer: Any, token_budget: int, trains: bool, reduce: str = "sum") -> Any:
    from gad_megatron.models.policy import build_policy
    from gad_megatron.models.ratio_discriminator import RatioScore
    from gad_megatron.rollout.replicas import Replicas
    from gad_megatron.rollout.step import RolloutSettings
    from gad_megatron.text_encoding import TextEncoder
    from gad_megatron.trainer.actor import TRAINING_OVERRIDES, build_actor
    from gad_megatron.trainer.steps import StepContext

    d_lm = build_policy(d_dir, torch.float32, **TRAINING_OVERRIDES)
    d = build_actor(d_lm, 1e-3, 1e9, distributed_optimizer=False) if trains else None
    ratio = RatioScore(build_policy(ref_dir, torch.float32, **TRAINING_OVERRIDES), str(ref_dir), BETA, reduce)
    return StepContext(g=None, d_lm=d_lm, d=d, ref=None, engine=None, replicas=Replicas(()),  # type: ignore[arg-type]
                       encoder=TextEncoder(tokenizer, 64, 32), rollout=RolloutSettings(n=4, max_tokens=32),
                       token_budget=token_budget, disc_loss="bt", clip=0.2, kl_beta=0.0, tis_cap=None, seed=0,
                       d_ratio=ratio)  # fmt: skip


def _discriminate(ctx: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], dict[str, float]]:
    from gad_megatron.rollout.step import Rollout
    from gad_megatron.trainer.metrics import PhaseTimer
    from gad_megatron.trainer.steps import discriminate

    rollouts = [Rollout(prompt_index=p, token_ids=(1,), logprobs=(0.0,), text=text, truncated=False,
                        d_input_ids=tuple(ctx.encoder.encode(PROMPTS[p]["prompt"], text)))
                for p, texts in enumerate(ANSWERS) for text in texts]  # fmt: skip
    timer = PhaseTimer(cuda_sync=False)
    teacher_P, student_PN, m = discriminate(ctx, PROMPTS, rollouts, timer)
    return teacher_P, student_PN, m, timer.pop()


def _hf_scores(d_dir: Path, ref_dir: Path, encoder: Any, reduce: str) -> torch.Tensor:
    """beta * (log pi_D - log pi_ref) of each response by transformers, summed over its tokens or
    their mean (``reduce``): [P, 1 + N], the teacher first."""
    from transformers import AutoModelForCausalLM

    from gad_megatron.evaluation.loglik import token_logprobs

    eot = encoder.end_of_turn_ids()
    pairs = [(encoder.prompt_ids(p["prompt"]), encoder.response_ids(text, eot))
             for p, texts in zip(PROMPTS, ANSWERS) for text in (p["teacher_response"], *texts)]  # fmt: skip

    def sums_and_counts(model_dir: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        return torch.tensor(token_logprobs(model, pairs, encoder.tokenizer.pad_token_id))  # [rows, 2]

    d, ref = sums_and_counts(d_dir), sums_and_counts(ref_dir)
    assert torch.equal(d[:, 1], ref[:, 1]) and len(set(d[:, 1].tolist())) > 1  # responses of several lengths
    ratio = d[:, 0] - ref[:, 0]
    return (BETA * (ratio / d[:, 1] if reduce == "mean" else ratio)).view(len(PROMPTS), -1)


@pytest.mark.parametrize(("token_budget", "reduce"), [(512, "sum"), (48, "sum"), (48, "mean")],
                         ids=["one_pass", "score_then_update", "mean_per_token"])  # fmt: skip
def test_scores_are_the_beta_scaled_log_likelihood_ratio(megatron_tp1: None, two_models: tuple[Path, Path],
                                                         tiny_tokenizer: Any, token_budget: int,
                                                         reduce: str) -> None:  # fmt: skip
    """Scores before the update = transformers' beta (log pi_D - log pi_ref) over the response tokens
    (end-of-turn included, the prompt never), summed or averaged per token, whether D scores and
    learns in one pass or scores first; the update then moves them. The teacher answers' reference
    sums are remembered: the next step computes the rollouts' only."""
    d_dir, ref_dir = two_models
    ctx = _context(d_dir, ref_dir, tiny_tokenizer, token_budget, trains=True, reduce=reduce)
    teacher_P, student_PN, m, seconds = _discriminate(ctx)
    want = _hf_scores(d_dir, ref_dir, ctx.encoder, reduce)
    assert torch.cat([teacher_P[:, None], student_PN], dim=1) == pytest.approx(want, abs=2e-4)
    assert want.abs().mean() > (0.05 if reduce == "sum" else 0.005)  # not a comparison of zeros
    assert ("time/scoring" in seconds) == (token_budget == 48) and m["grad_norm_d"] > 0
    assert len(ctx.d_ratio.known) == len(PROMPTS)
    # A second pass scores with the updated D, against the same remembered teacher reference.
    calls: list[int] = []
    real = __import__("gad_megatron.trainer.ops", fromlist=["ops"]).response_logprob_sums

    def counting(lm: Any, micro: Any, total_rows: int) -> torch.Tensor:
        calls.append(total_rows)
        return real(lm, micro, total_rows)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gad_megatron.trainer.ops.response_logprob_sums", counting)
        teacher2, _, _, _ = _discriminate(ctx)
    assert calls == [sum(len(a) for a in ANSWERS)]
    assert not torch.allclose(teacher2, teacher_P, atol=1e-3)


def test_a_fresh_ratio_d_scores_every_response_zero(megatron_tp1: None, tiny_model_dir: Path,
                                                    tiny_tokenizer: Any) -> None:  # fmt: skip
    """D = its reference at the start: every score is 0 (the same computation on both sides)."""
    ctx = _context(tiny_model_dir, tiny_model_dir, tiny_tokenizer, 512, trains=False)
    teacher_P, student_PN, m, _ = _discriminate(ctx)
    assert m == {} and float(teacher_P.abs().max()) == 0.0 and float(student_PN.abs().max()) == 0.0


def test_a_discriminator_of_the_wrong_kind_is_refused(tmp_path: Path, tiny_model_dir: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    from safetensors.torch import save_file

    from gad_megatron.models.ratio_discriminator import ratio_reference, read_marker, write_marker

    assert ratio_reference(tiny_model_dir, "head", 0.1, "sum") is None
    assert ratio_reference(tiny_model_dir, "likelihood_ratio", 0.1, "sum") == str(tiny_model_dir)
    head_d = tmp_path / "head_d"
    head_d.mkdir()
    (head_d / "config.json").write_text("{}")
    save_file({"score.weight": torch.zeros(1, 4)}, head_d / "model.safetensors")
    with pytest.raises(ConfigError, match="scalar-head discriminator"):
        ratio_reference(head_d, "likelihood_ratio", 0.1, "sum")
    ratio_d = tmp_path / "ratio_d"
    ratio_d.mkdir()
    save_file({"lm_head.weight": torch.zeros(8, 4)}, ratio_d / "model.safetensors")
    write_marker(ratio_d, tiny_model_dir, 0.1, "sum")
    with pytest.raises(ConfigError, match="set train.disc_score=likelihood_ratio"):
        ratio_reference(ratio_d, "head", 0.1, "sum")
    assert ratio_reference(ratio_d, "likelihood_ratio", 0.1, "sum") == str(tiny_model_dir.resolve())
    assert not caplog.records
    ratio_reference(ratio_d, "likelihood_ratio", 0.1, "mean")  # learnt to rank sums: a warning, not a refusal
    assert "disc_ratio_reduce=mean" in caplog.text and "learnt with sum" in caplog.text
    marker = ratio_d / "gad_discriminator.json"  # written before train.disc_ratio_reduce: a sum
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "reduce"}))
    assert read_marker(ratio_d)["reduce"] == "sum"
    write_marker(ratio_d, tmp_path / "gone", 0.1, "sum")
    with pytest.raises(ConfigError, match="is gone"):
        ratio_reference(ratio_d, "likelihood_ratio", 0.1, "sum")


LAYOUTS = {"tp2": ["parallel.tensor_parallel=2"], "pp2": ["parallel.pipeline_parallel=2"]}
PER_STEP = ("d_loss", "grad_norm_d", "teacher_score", "student_score", "d_acc")


def test_warmup_then_gad_and_layouts_train_as_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    """3 warmup steps then 3 gad steps with the likelihood-ratio D: the warmup starts at scores 0,
    saves D as a causal LM with a marker naming its start; gad carries on from that D (not 0
    again) against the same reference; TP=2 and PP=2 give one process's D losses and scores."""
    from tests.helpers.tiny_run import write_tiny_setup

    config = write_tiny_setup(tmp_path / "setup", tiny_model_dir, disc_score="likelihood_ratio",
                              disc_ratio_beta=BETA, disc_only_steps=0, save_steps=100)  # fmt: skip
    for name, layout in {"one": [], **LAYOUTS}.items():
        for stage in ("warmup", "gad"):
            ok(gad(config, stage, f"run_dir={tmp_path / name}", *layout, nproc=2 if layout else 1))
    warmup, gad_rows = metrics(tmp_path / "one" / "warmup"), metrics(tmp_path / "one" / "gad")
    assert warmup[0]["teacher_score"] == 0.0 and warmup[0]["student_score"] == 0.0
    assert all(r["time/d_reference"] > 0 and r["grad_norm_d"] > 0 for r in warmup + gad_rows)
    assert warmup[-1]["teacher_score"] - warmup[-1]["student_score"] > 0  # D learnt to prefer the teacher
    margin = lambda row: row["teacher_score"] - row["student_score"]  # noqa: E731
    assert margin(gad_rows[0]) > 0.5 * margin(warmup[-1])  # against itself, gad's D would start at 0
    saved = tmp_path / "one" / "warmup" / "final" / "discriminator"
    assert json.loads((saved / "gad_discriminator.json").read_text()) == {
        "score": "likelihood_ratio", "beta": BETA, "reduce": "sum",
        "reference": str(tiny_model_dir.resolve())}  # fmt: skip
    assert json.loads((saved / "config.json").read_text())["architectures"][0].endswith("ForCausalLM")
    for name in LAYOUTS:
        for stage, one in (("warmup", warmup), ("gad", gad_rows)):
            rows = metrics(tmp_path / name / stage)
            for key in PER_STEP:
                assert [r[key] for r in rows] == pytest.approx([r[key] for r in one], rel=1e-4, abs=2e-5), (name, key)
