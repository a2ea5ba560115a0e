"""The discriminator's text path and pooling: the pitfalls DESIGN.md lists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gad_megatron.discriminator import TextEncoder, last_real_index, load_discriminator, right_pad, score_sequences
from gad_megatron.trainers.discriminator_update import DiscriminatorUpdater, NonFiniteError

PROMPT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def disc(tiny_model_dir: Path):
    torch.manual_seed(0)
    return load_discriminator(str(tiny_model_dir))


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer) -> TextEncoder:
    return TextEncoder(tiny_tokenizer, max_prompt_length=64, max_response_length=12)


def updater(disc, tokenizer, encoder, lr: float = 0.0) -> DiscriminatorUpdater:
    opt = torch.optim.AdamW(disc.parameters(), lr=lr)
    return DiscriminatorUpdater(disc, tokenizer, encoder, opt, None, micro_batch_size=3)


def test_same_text_same_score_bit_for_bit(disc, tiny_tokenizer, encoder) -> None:
    """A student rollout identical to the teacher's text gets exactly the teacher's score."""
    # One sequence per forward, so both sides run the same kernels on the same shapes: batched
    # kernels may round differently by row position (seen on a 16-core CPU and on a GPU).
    up = DiscriminatorUpdater(disc, tiny_tokenizer, encoder, None, None, micro_batch_size=1)
    text = "Blue, like the sky."
    # the rollout arrives with different surrounding whitespace, as decoded text often does
    rollouts = [text, "  " + text + "\n", "Red."]
    assert encoder.encode(PROMPT, rollouts[1]) == encoder.encode(PROMPT, text)  # the same tokens reach D
    result = up.step([PROMPT] * 3, [text] * 3, rollouts, update=False, step=0)
    student, teacher = result.student_scores_B.tolist(), result.teacher_scores_B.tolist()
    assert student[0] == teacher[0] and student[1] == teacher[1]
    assert student[2] != teacher[2]


def test_end_of_turn_and_truncation_rule(tiny_tokenizer, encoder) -> None:
    eot = encoder.end_of_turn_ids()
    assert tiny_tokenizer.convert_ids_to_tokens(eot) == ["<|im_end|>"]
    short = encoder.response_ids("Hi there.", eot)
    assert short[-len(eot):] == eot
    long = encoder.response_ids("word " * 50, eot)
    assert len(long) == 12 and long[-1] not in eot  # cut, and no end-of-turn on either side
    seq = encoder.encode(PROMPT, "Hi there.")
    assert seq == encoder.prompt_ids(PROMPT) + short


def test_pooling_uses_attention_mask_not_pad_id(disc, tiny_tokenizer, encoder) -> None:
    """pad == eos == <|im_end|>: pooling by pad id would stop before the end-of-turn token."""
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    a = encoder.encode(PROMPT, "Green.")
    b = encoder.encode(PROMPT, "A much longer answer about green.")
    ids, mask = right_pad([a, b], tiny_tokenizer.pad_token_id)
    assert last_real_index(mask).tolist() == [len(a) - 1, len(b) - 1]
    with torch.no_grad():
        batched = score_sequences(disc, ids, mask)
        alone = score_sequences(disc, *right_pad([a], tiny_tokenizer.pad_token_id))
        left_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, len(a), dtype=torch.long)], dim=1)
        assert last_real_index(left_mask).item() == len(a) + 2
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


def test_teacher_forwarded_once_per_prompt(disc, tiny_tokenizer, encoder, monkeypatch) -> None:
    up = updater(disc, tiny_tokenizer, encoder)
    seen: list[int] = []
    real = up._scores
    monkeypatch.setattr(up, "_scores", lambda seqs: seen.append(len(seqs)) or real(seqs))
    prompts = [PROMPT] * 4 + [[{"role": "user", "content": "Other."}]] * 4
    teachers = ["Blue."] * 4 + ["Fine."] * 4
    up.step(prompts, teachers, ["x", "y", "z", "w"] * 2, update=False, step=0)
    assert seen == [2, 8]  # 2 distinct teacher responses, 8 rollouts


def test_update_moves_scores_toward_teacher(disc, tiny_tokenizer, encoder) -> None:
    import copy

    d = copy.deepcopy(disc)
    up = updater(d, tiny_tokenizer, encoder, lr=1e-2)
    args = ([PROMPT] * 2, ["Blue, like the sky."] * 2, ["Red.", "I like trains."])
    first = up.step(*args, update=True, step=0)
    second = up.step(*args, update=False, step=1)
    assert second.loss < first.loss
    assert (second.teacher_scores_B - second.student_scores_B).mean() > (first.teacher_scores_B - first.student_scores_B).mean()


def test_nan_scores_stop_the_step(disc, tiny_tokenizer, encoder) -> None:
    import copy

    d = copy.deepcopy(disc)
    with torch.no_grad():
        d.score.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="step 7: non-finite discriminator teacher score"):
        updater(d, tiny_tokenizer, encoder).step([PROMPT], ["a"], ["b"], update=True, step=7)


def test_recompute_update_equals_single_pass(disc, tiny_tokenizer, encoder) -> None:
    """Bounded-memory update (score, then re-run per micro-batch) = keeping the whole graph."""
    import copy

    prompts = [PROMPT] * 4 + [[{"role": "user", "content": "Other."}]] * 4
    args = (prompts, ["Blue."] * 4 + ["Fine, thanks."] * 4, ["x", "Red!", "z z z", "Blue"] * 2)
    results, weights = [], []
    for single_pass in (True, False):
        for loss in ("bt", "ce"):
            d = copy.deepcopy(disc)
            opt = torch.optim.SGD(d.parameters(), lr=0.5)  # linear in the gradient
            up = DiscriminatorUpdater(d, tiny_tokenizer, encoder, opt, None, loss=loss, micro_batch_size=3,
                                      max_grad_norm=1e9, single_pass=single_pass)
            results.append(up.step(*args, update=True, step=0))
            weights.append(torch.cat([p.detach().reshape(-1) for p in d.parameters()]))
    before = torch.cat([p.detach().reshape(-1) for p in disc.parameters()])
    for i in (0, 1):  # bt, ce
        single, recompute = results[i], results[i + 2]
        assert torch.equal(single.student_scores_B, recompute.student_scores_B), "rewards are the pre-update scores"
        assert single.loss == recompute.loss
        assert abs(single.grad_norm - recompute.grad_norm) < 1e-5 * single.grad_norm
        assert not torch.equal(weights[i], before)
        assert torch.allclose(weights[i], weights[i + 2], atol=1e-6), (weights[i] - weights[i + 2]).abs().max()
