"""Token batches and dynamically sized micro-batches (trainer.batching)."""

from __future__ import annotations

import random

import pytest
import torch

from gad_megatron.trainer.batching import build_batch, build_score_batch, group_micro_batches, micro_batches

PAD = 0


def _random_rows(n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[rng.randint(1, 99) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    responses = [[rng.randint(1, 99) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    return prompts, responses


def test_build_batch_aligns_targets_mask_and_advantages() -> None:
    batch = build_batch([[5, 6], [7]], [[8, 9, 10], [11]], PAD, advantages=[0.5, -1.0],
                        engine_logprobs=[[-0.1, -0.2, -0.3], [-0.4]])  # fmt: skip
    assert batch.input_ids_BT.tolist() == [[5, 6, 8, 9, 10], [7, 11, 0, 0, 0]]
    assert batch.target_ids_BT.tolist() == [[6, 8, 9, 10, 0], [11, 0, 0, 0, 0]]
    assert batch.loss_mask_BT.tolist() == [[0, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    assert batch.lengths_B.tolist() == [5, 2]
    assert batch.response_start_B.tolist() == [1, 0]
    assert batch.advantages_BT.tolist() == [[0, 0.5, 0.5, 0.5, 0], [-1.0, 0, 0, 0, 0]]
    assert torch.allclose(batch.engine_logprobs_BT[0, 1:4], torch.tensor([-0.1, -0.2, -0.3]))


@pytest.mark.parametrize("budget", [1, 40, 64, 200, 10_000])
def test_micro_batches_cover_every_row_once_within_the_budget(budget: int) -> None:
    prompts, responses = _random_rows(23, seed=budget)
    batch = build_batch(prompts, responses, PAD, advantages=[float(i) for i in range(23)])
    micro = micro_batches(batch, budget)
    seen = torch.cat([m.row_ids_B for m in micro])
    assert sorted(seen.tolist()) == list(range(23))
    for m in micro:
        rows, width = m.input_ids_BT.shape
        assert width == int(m.lengths_B.max())  # as wide as its longest row, no wider
        assert rows == 1 or rows * width <= budget
        for j, row in enumerate(m.row_ids_B.tolist()):  # each row's content is unchanged
            n = int(batch.lengths_B[row])
            assert torch.equal(m.input_ids_BT[j, :n], batch.input_ids_BT[row, :n])
            assert torch.equal(m.loss_mask_BT[j], batch.loss_mask_BT[row, :width])
            assert torch.equal(m.advantages_BT[j], batch.advantages_BT[row, :width])
    # per-token sums over micro-batches equal the whole batch's (no token lost or duplicated)
    assert sum(float(m.loss_mask_BT.sum()) for m in micro) == float(batch.loss_mask_BT.sum())


def test_micro_batches_pad_less_than_one_width_for_all() -> None:
    """Mixed lengths (short rollouts, one long teacher answer): sorted micro-batches pad less."""
    prompts = [[1] * 10] * 16 + [[1] * 10]
    responses = [[2] * 20] * 16 + [[2] * 290]
    batch = build_batch(prompts, responses, PAD)
    micro = micro_batches(batch, 320)
    padded = sum(m.input_ids_BT.numel() for m in micro)
    assert [m.input_ids_BT.shape[1] for m in micro] == [300, 30, 30]
    assert padded == 300 + 10 * 30 + 6 * 30
    assert padded < 0.5 * 17 * 300  # one width for all rows would pad to 5100 tokens


def test_score_micro_batches_keep_last_index_and_row_ids() -> None:
    seqs = [[3] * 7, [4] * 2, [5] * 12, [6] * 5]
    micro = micro_batches(build_score_batch(seqs, PAD), 14)
    assert [m.row_ids_B.tolist() for m in micro] == [[2], [0, 3], [1]]
    for m in micro:
        for j, row in enumerate(m.row_ids_B.tolist()):
            assert int(m.last_B[j]) == len(seqs[row]) - 1
            assert int(m.input_ids_BT[j, m.last_B[j]]) == seqs[row][0]


@pytest.mark.parametrize("budget", [64, 10_000])
def test_response_window_holds_every_masked_target(budget: int) -> None:
    """The output layer sees only the response window: per-token sums there equal the full rows'."""
    prompts, responses = _random_rows(17, seed=budget)
    batch = build_batch(prompts, responses, PAD, advantages=[float(i) for i in range(17)],
                        engine_logprobs=[[-0.01 * j for j in range(len(r))] for r in responses])  # fmt: skip
    for m in micro_batches(batch, budget):
        window_BR = m.response_window_BR()
        assert window_BR.shape[1] == int((m.lengths_B - m.response_start_B - 1).max())
        inside = m.in_window(window_BR)
        for name in ("loss_mask_BT", "advantages_BT", "engine_logprobs_BT"):
            assert float(getattr(inside, name).sum()) == pytest.approx(float(getattr(m, name).sum())), name
        # every target in the window is the row's response, in order
        for j, response in enumerate(responses[r] for r in m.row_ids_B.tolist()):
            assert inside.target_ids_BT[j, : len(response)].tolist() == response
            assert inside.loss_mask_BT[j].sum() == len(response)


def test_group_micro_batches_keep_each_group_whole_and_in_order() -> None:
    """A teacher row and its rollouts stay together (teacher first), so D's pair loss is local."""
    teachers = [[1] * 30, [2] * 8, [3] * 15]
    rollouts = [[10 + p] * (4 + i) for p in range(3) for i in range(2)]
    batch = build_score_batch(teachers + rollouts, PAD)
    groups_GK = torch.tensor([[0, 3, 4], [1, 5, 6], [2, 7, 8]])
    micro = group_micro_batches(batch, groups_GK, 100)
    assert [m.row_ids_B.tolist() for m in micro] == [[0, 3, 4], [2, 7, 8, 1, 5, 6]]
    assert [m.input_ids_BT.shape for m in micro] == [(3, 30), (6, 15)]
    assert all(m.input_ids_BT.numel() <= 100 for m in micro)
    assert group_micro_batches(batch, groups_GK, 89) is None, "the 30-token group needs 90 tokens"


@pytest.mark.parametrize("multiple", [16, 32])
def test_fp8_width_multiple_pads_every_micro_batch(multiple: int) -> None:
    """Widths rounded up to the FP8 GEMM multiple (token counts follow), padding masked; every row,
    its mask and its window unchanged; D's groups too."""
    prompts, responses = _random_rows(23, seed=5)
    plain = build_batch(prompts, responses, PAD, advantages=[float(i) for i in range(23)])
    batch = build_batch(prompts, responses, PAD, advantages=[float(i) for i in range(23)], width_multiple=multiple)
    assert batch.input_ids_BT.shape[1] % multiple == 0 and batch.num_tokens == plain.num_tokens
    for budget in (1, 200, 10_000):
        micro = micro_batches(batch, budget, multiple)
        assert sorted(torch.cat([m.row_ids_B for m in micro]).tolist()) == list(range(23))
        for m in micro:
            rows, width = m.input_ids_BT.shape
            assert width % multiple == 0 and (rows * width) % multiple == 0
            assert width - multiple < int(m.lengths_B.max()) <= width  # no wider than needed
            assert rows == 1 or rows * width <= budget
            for j, row in enumerate(m.row_ids_B.tolist()):
                n = int(plain.lengths_B[row])
                assert torch.equal(m.input_ids_BT[j, :n], plain.input_ids_BT[row, :n])
                assert torch.equal(m.loss_mask_BT[j, :n], plain.loss_mask_BT[row, :n]) and not m.loss_mask_BT[j, n:].any()
            assert torch.equal(m.response_window_BR(), m.response_window_BR().clamp(max=width - 1))
    with pytest.raises(ValueError, match="width_multiple=16"):
        micro_batches(plain, 10_000, 16)
    scores = build_score_batch([[1] * 5, [2] * 17, [3] * 9], PAD, multiple)
    grouped = group_micro_batches(scores, torch.tensor([[0, 1, 2]]), 1000, multiple)
    assert grouped is not None and grouped[0].input_ids_BT.shape == (3, multiple * -(-17 // multiple))
    assert grouped[0].last_B.tolist() == [4, 16, 8]
