"""gad_megatron.loss against plain references: full-vocab log_softmax, token loops, hand values.

TP=1 in this process; TP=2 in a torchrun launch of ``tests/helpers/loss_tp.py`` (the same
cases, logits split along a padded vocabulary over 2 processes).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gad_megatron.loss import (
    bradley_terry_loss,
    ce_gan_loss,
    disc_score_grads,
    group_advantages,
    pair_accuracy,
    policy_loss,
    vocab_parallel_logprobs,
)
from tests.helpers.loss_tp import CASES, reference_policy_loss, response_mask, run_case

HELPER = Path(__file__).parent / "helpers" / "loss_tp.py"
ROOT = Path(__file__).parent.parent
TOL = 1e-5


def assert_close(report: dict[str, float]) -> None:
    assert all(v < TOL for v in report.values()), report


@pytest.mark.parametrize("case", CASES)
def test_tp1_logprobs_entropy_loss_and_grads_match_reference(case: str) -> None:
    assert_close(run_case(case, None, 0, 1))


def test_tp2_on_two_processes_matches_single_process_reference(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "tp2.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(HELPER), str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert len(report) == 5 * len(CASES)
    assert_close(report)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_bf16_logits_and_leading_dims(chunk: int) -> None:
    """bf16 in, fp32 log-probs out (computed from the upcast values), bf16 gradient."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 130, generator=gen) * 3).to(torch.bfloat16)
    target = torch.randint(0, 120, (2, 5), generator=gen)
    leaf = logits.clone().requires_grad_()
    lp, entropy = vocab_parallel_logprobs(leaf.clone(), target, chunk_tokens=chunk, real_vocab_size=120)
    assert lp.dtype == torch.float32 and lp.shape == (2, 5) and entropy is None
    lp.sum().backward()
    reference = logits[..., :120].float().requires_grad_()
    ref_lp = torch.log_softmax(reference, -1).gather(-1, target[..., None]).squeeze(-1)
    ref_lp.sum().backward()
    assert (lp - ref_lp).abs().max() < TOL
    assert leaf.grad.dtype == torch.bfloat16 and not leaf.grad[..., 120:].any()
    # The gradient is computed in fp32 and rounded to bf16 once: within one bf16 step (8 bits) of fp32's.
    torch.testing.assert_close(leaf.grad[..., :120].float(), reference.grad, atol=1e-30, rtol=2**-8)


def test_logits_are_consumed_loudly() -> None:
    """A leaf would be overwritten by its own gradient: refused. An op whose backward needs the
    logits (here exp) finds them modified: autograd raises instead of using wrong values."""
    x = torch.randn(4, 8, requires_grad=True)
    target = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="leaf"):
        vocab_parallel_logprobs(x, target, real_vocab_size=8)
    lp, _ = vocab_parallel_logprobs(x.exp(), target, real_vocab_size=8)
    with pytest.raises(RuntimeError, match="inplace"):
        lp.sum().backward()
    with torch.no_grad():  # scoring without a graph (old / reference log-probs) leaves the logits intact
        y = x.detach().clone()
        vocab_parallel_logprobs(y, target, real_vocab_size=8)
        assert torch.equal(y, x.detach())


def loss_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """A [4, 9] batch (truncated, padded, all-masked and middle rows) with NaN / -inf in masked slots."""
    gen = torch.Generator().manual_seed(seed)
    mask = response_mask()
    garbage = torch.full(mask.shape, float("nan"))
    lp = -torch.rand(mask.shape, generator=gen) * 4
    rnd = lambda: torch.randn(mask.shape, generator=gen)  # noqa: E731
    return {
        "logprobs_T": torch.where(mask, lp, float("-inf")),
        "old_logprobs_T": torch.where(mask, lp + 0.3 * rnd(), garbage),
        "advantages_T": torch.where(mask, torch.randn(4, 1, generator=gen).expand(4, 9), garbage),
        "mask_T": mask,
        "ref_logprobs_T": torch.where(mask, lp + 0.5 * rnd(), garbage),
        "engine_logprobs_T": torch.where(mask, lp + 0.5 * rnd(), garbage),
    }


@pytest.mark.parametrize(("use_ref", "tis_cap", "kl_beta"), [(True, 2.0, 0.001), (True, None, 0.5), (False, 1.5, 0.0)])
def test_policy_loss_matches_token_loop(use_ref: bool, tis_cap: float | None, kl_beta: float) -> None:
    inputs = loss_inputs()
    n = int(inputs["mask_T"].sum())
    lp = inputs["logprobs_T"].clone().requires_grad_()
    ref = inputs["ref_logprobs_T"] if use_ref else None
    loss, metrics = policy_loss(lp, inputs["old_logprobs_T"], inputs["advantages_T"], inputs["mask_T"], n, ref,
                                inputs["engine_logprobs_T"], kl_beta=kl_beta, tis_cap=tis_cap)  # fmt: skip
    loss.backward()
    lp_ref = inputs["logprobs_T"].clone().requires_grad_()
    expected = reference_policy_loss(lp_ref, inputs["old_logprobs_T"], inputs["advantages_T"], inputs["mask_T"], n,
                                     ref, inputs["engine_logprobs_T"], 0.2, kl_beta, tis_cap)  # fmt: skip
    expected.backward()
    assert abs(loss.item() - expected.item()) < TOL
    assert (lp.grad - lp_ref.grad).abs().max() < TOL
    assert torch.isfinite(lp.grad).all() and not lp.grad[~inputs["mask_T"]].any()
    assert 0 < metrics["clip_frac"] < 1 and metrics["ratio_max_dev"] > 0.2
    assert (metrics["kl"] > 0) == use_ref
    if tis_cap is None:
        assert metrics["tis_weight"].item() == pytest.approx(1.0)


def test_policy_loss_micro_batches_sum_to_the_global_token_mean() -> None:
    """Shares of two micro-batches (or DP ranks) with the global token count add up to the full batch."""
    inputs = loss_inputs(seed=1)
    n = int(inputs["mask_T"].sum())
    full, full_metrics = policy_loss(**inputs, num_tokens_global=n, tis_cap=2.0)
    parts = [policy_loss(**{k: v[rows] for k, v in inputs.items()}, num_tokens_global=n, tis_cap=2.0)
             for rows in (slice(0, 1), slice(1, 4))]  # fmt: skip
    assert abs(sum(p[0] for p in parts).item() - full.item()) < TOL
    for key in ("pg_loss", "kl", "clip_frac", "ratio_mean", "tis_weight"):
        assert abs(sum(p[1][key] for p in parts).item() - full_metrics[key].item()) < TOL
    assert max(p[1]["ratio_max_dev"] for p in parts) == full_metrics["ratio_max_dev"]


def test_policy_loss_on_policy_values_and_empty_batch() -> None:
    """old == logprobs: the ratio is 1, nothing clips, the gradient is -A w / n per valid token. A
    batch with no valid token (or a zero global count) gives 0 and zero gradient, never NaN."""
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    adv = torch.full((1, 3), 2.0)
    engine = torch.tensor([[-1.0, -1.5, 0.0]])  # TIS weights min(e^0, 2) = 1, min(e^-0.5, 2)
    loss, metrics = policy_loss(lp, lp.detach(), adv, mask, 2, engine_logprobs_T=engine, tis_cap=2.0)
    loss.backward()
    w = math.exp(-0.5)
    assert loss.item() == pytest.approx(-2.0 * (1 + w) / 2)
    assert lp.grad[0].tolist() == pytest.approx([-1.0, -w, 0.0])
    assert metrics["clip_frac"] == 0 and metrics["ratio_mean"] == 1 and metrics["ratio_max_dev"] == 0
    assert metrics["tis_weight"].item() == pytest.approx((1 + w) / 2)
    empty = torch.zeros(1, 3, dtype=torch.bool)
    nan = torch.full((1, 3), float("nan"))
    lp2 = nan.clone().requires_grad_()
    loss, metrics = policy_loss(lp2, nan, nan, empty, 0, nan, nan, tis_cap=2.0)
    loss.backward()
    assert loss.item() == 0 and not lp2.grad.any()
    assert all(math.isfinite(v.item()) for v in metrics.values())
    with pytest.raises(ValueError, match="engine_logprobs_T"):
        policy_loss(lp, lp, adv, mask, 2, tis_cap=2.0)


def test_k3_kl_is_bounded_per_token() -> None:
    """k3 = e^d - d - 1 with d = ref - logprobs clamped to [-20, 20], then capped at 10 per token
    (verl's low_var_kl): a token the policy has all but ruled out cannot dominate or overflow."""
    lp = torch.tensor([[-60.0, -1.0, -2.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -60.0, -1.5, -2.0]])  # d = 59 (clamped), -59 (clamped), 0.5, 0
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = policy_loss(lp, lp.detach(), torch.zeros(1, 4), mask, 4, ref, kl_beta=1.0)
    loss.backward()
    k3 = [10.0, math.exp(-20.0) + 20.0 - 1.0, math.exp(0.5) - 1.5, 0.0]  # capped, clamped d, plain, plain
    assert metrics["kl"].item() == pytest.approx(min(k3[1], 10.0) / 4 + (k3[0] + k3[2] + k3[3]) / 4)
    assert torch.isfinite(lp.grad).all()
    # Outside the bounds the KL term has no gradient; inside it is -(e^d - 1) / n.
    assert lp.grad[0, :2].tolist() == [0.0, 0.0]
    assert lp.grad[0, 2].item() == pytest.approx(-(math.exp(0.5) - 1) / 4)


TEACHER_P = torch.tensor([1.0, 0.0])
STUDENT_PN = torch.tensor([[0.0, 1.0, 3.0], [0.0, -2.0, 0.0]])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_and_accuracy_hand_values() -> None:
    # pairs (t - s): 1, 0, -2 | 0, 2, 0 ; loss = mean softplus(s - t)
    expected = (softplus(-1) + softplus(0) + softplus(2) + softplus(0) + softplus(-2) + softplus(0)) / 6
    assert bradley_terry_loss(TEACHER_P, STUDENT_PN).item() == pytest.approx(expected, rel=1e-6)
    assert pair_accuracy(TEACHER_P, STUDENT_PN).item() == pytest.approx(2 / 6)  # ties count wrong


def test_ce_gan_is_the_sum_of_real_and_fake_terms() -> None:
    real = (softplus(-1) + softplus(0)) / 2
    fake = (softplus(0) + softplus(1) + softplus(3) + softplus(0) + softplus(-2) + softplus(0)) / 6
    assert ce_gan_loss(TEACHER_P, STUDENT_PN).item() == pytest.approx(real + fake, rel=1e-6)


def test_group_advantages_hand_values() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-6); group 2: zero std -> 0
    expected = torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) / torch.tensor([[1 + 1e-6], [1.0]])
    assert torch.allclose(group_advantages(rewards), expected, atol=1e-7)
    two = group_advantages(torch.tensor([[0.0, 2.0]]), eps=0.0)  # unbiased std of (0, 2) is sqrt(2)
    assert two[0].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])
    with pytest.raises(ValueError, match="rollouts >= 2"):
        group_advantages(torch.ones(3, 1))


def test_disc_score_grads_closed_forms() -> None:
    p, n = STUDENT_PN.shape
    q = torch.sigmoid(STUDENT_PN - TEACHER_P[:, None])
    loss, g_teacher, g_student = disc_score_grads(TEACHER_P, STUDENT_PN, "bt")
    assert loss.item() == pytest.approx(bradley_terry_loss(TEACHER_P, STUDENT_PN).item())
    assert torch.allclose(g_teacher, -q.sum(1) / (p * n)) and torch.allclose(g_student, q / (p * n))
    _, g_teacher, g_student = disc_score_grads(TEACHER_P, STUDENT_PN, "ce")
    assert torch.allclose(g_teacher, -torch.sigmoid(-TEACHER_P) / p)
    assert torch.allclose(g_student, torch.sigmoid(STUDENT_PN) / (p * n))


@pytest.mark.parametrize("kind", ["bt", "ce"])
def test_disc_micro_batch_rerun_equals_one_backward(kind: str) -> None:
    """Score without a graph, take dL/dscores, re-run micro-batches of 2 with scores.backward(grad):
    D's gradient equals one backward through every score."""
    torch.manual_seed(0)
    d = torch.nn.Linear(5, 1)
    teacher_x, student_x = torch.randn(3, 5), torch.randn(3 * 4, 5)
    score = lambda x: d(x).squeeze(-1)  # noqa: E731
    (bradley_terry_loss if kind == "bt" else ce_gan_loss)(score(teacher_x), score(student_x).view(3, 4)).backward()
    expected = [p.grad.clone() for p in d.parameters()]
    d.zero_grad()
    with torch.no_grad():
        _, g_teacher, g_student = disc_score_grads(score(teacher_x), score(student_x).view(3, 4), kind)
    for x, g in ((teacher_x, g_teacher), (student_x, g_student.reshape(-1))):
        for i in range(0, len(x), 2):
            score(x[i : i + 2]).backward(g[i : i + 2])
    for p, e in zip(d.parameters(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6)
