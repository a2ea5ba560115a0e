"""``train.disc_updates_per_step`` = k: one step's :func:`discriminate` updates D k times on its
rollout batch, exactly as k consecutive steps on the same rollouts would, and returns the scores
of D before the first update (CPU, fp32, one process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gad_megatron.loss import pair_accuracy

PROMPTS = [
    {"prompt": [{"role": "user", "content": "Name a colour."}], "teacher_response": "Blue, like the sky at noon."},
    {"prompt": [{"role": "user", "content": "Say hello."}], "teacher_response": "Hello there, friend!"},
]
ANSWERS = [["Red.", "green maybe", "I like colours a lot", "no"], ["hi", "Hello.", "hey hey", "Greetings, human"]]


def _context(model_dir: Path, tokenizer: Any, disc_updates: int, token_budget: int) -> Any:
    """A step context with a fresh D (the same weights every call) and nothing else of a stage."""
    from gad_megatron.models.discriminator import load_discriminator
    from gad_megatron.rollout.replicas import Replicas
    from gad_megatron.rollout.step import RolloutSettings
    from gad_megatron.text_encoding import TextEncoder
    from gad_megatron.trainer.actor import TRAINING_OVERRIDES, build_actor
    from gad_megatron.trainer.steps import StepContext

    d_lm = load_discriminator(model_dir, torch.float32, seed=5, **TRAINING_OVERRIDES)
    d = build_actor(d_lm, 1e-3, 1e9, distributed_optimizer=False)  # a large lr: the two updates differ visibly
    return StepContext(g=None, d_lm=d_lm, d=d, ref=None, engine=None, replicas=Replicas(()),  # type: ignore[arg-type]
                       encoder=TextEncoder(tokenizer, 64, 32), rollout=RolloutSettings(n=4, max_tokens=32),
                       token_budget=token_budget, disc_loss="bt", clip=0.2, kl_beta=0.0, tis_cap=None, seed=0,
                       disc_updates=disc_updates)  # fmt: skip


def _rollouts(ctx: Any) -> list:
    from gad_megatron.rollout.step import Rollout

    return [Rollout(prompt_index=p, token_ids=(1,), logprobs=(0.0,), text=text, truncated=False,
                    d_input_ids=tuple(ctx.encoder.encode(PROMPTS[p]["prompt"], text)))
            for p, texts in enumerate(ANSWERS) for text in texts]  # fmt: skip


def _discriminate(ctx: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, float], set[str]]:
    from gad_megatron.trainer.metrics import PhaseTimer
    from gad_megatron.trainer.steps import discriminate

    timer = PhaseTimer(cuda_sync=False)
    teacher_P, student_PN, metrics = discriminate(ctx, PROMPTS, _rollouts(ctx), timer)
    return teacher_P, student_PN, metrics, set(timer.seconds)


def _weights(ctx: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in ctx.d.ddp.module.named_parameters()}


@pytest.mark.parametrize("token_budget", [512, 48], ids=["one_pass", "score_then_update"])
def test_k_updates_in_one_step_equal_k_steps_on_the_same_rollouts(megatron_tp1: None, tiny_model_dir: Path,
                                                                  tiny_tokenizer: Any, token_budget: int) -> None:  # fmt: skip
    """k = 2 in one step: D's weights equal those of two k = 1 steps on the same batch (the
    second scoring with the weights the first left); the scores returned, d_loss and grad_norm_d
    are the first step's, d_acc_after the second step's pair accuracy. 48 tokens cannot hold a
    prompt's 5 rows, so that case scores first and re-runs each update one micro-batch at a time."""
    once = _context(tiny_model_dir, tiny_tokenizer, 1, token_budget)
    start = _weights(once)
    first = _discriminate(once)
    second = _discriminate(once)
    twice = _context(tiny_model_dir, tiny_tokenizer, 2, token_budget)
    assert all(torch.equal(w, start[name]) for name, w in _weights(twice).items()), "both start from the same D"
    teacher_P, student_PN, metrics, phases = _discriminate(twice)

    want, got = _weights(once), _weights(twice)
    assert got.keys() == want.keys()
    moved = sum(float((want[k] - start[k]).abs().max()) for k in want)
    assert moved > 0
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-6, atol=1e-7, msg=name)
    assert phases == first[3] == ({"d_update"} if token_budget == 512 else {"scoring", "d_update"})
    torch.testing.assert_close(teacher_P, first[0], rtol=0, atol=0)
    torch.testing.assert_close(student_PN, first[1], rtol=0, atol=0)
    assert metrics["d_loss"] == first[2]["d_loss"] and metrics["grad_norm_d"] == first[2]["grad_norm_d"]
    assert "d_acc_after" not in first[2]
    assert metrics["d_acc_after"] == pytest.approx(float(pair_accuracy(second[0], second[1])))
    assert not torch.allclose(second[1], first[1]), "the second pass scores with the updated D"
