"""The log-likelihood diagnostic equals a direct, unbatched computation on a tiny model."""

from __future__ import annotations

import pytest
import torch

from gad_megatron.evaluation.loglik import (candidate_loglik, encode_pair, mean_loglik, response_logprobs,
                                            shared_prefix_length, teacher_loglik, token_logprobs)

PROMPTS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write one sentence about the sea, please, and keep it short."}],
    [{"role": "user", "content": "2+2?"}],
]
RESPONSES = ["Blue.", "  The sea is wide and calm tonight.\n", "4"]
CONTEXT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, friend!"}]


def _direct(model, tok, prompt, response, finished=True, context=(), temperature=1.0):
    """One sequence, no padding, no batching: sum of log p(response token | prefix)."""
    messages = list(context) + prompt
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    resp_ids = tok(response.strip(), add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if finished else [])
    ids = torch.tensor([list(prompt_ids) + resp_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, dim=-1)
    total = sum(logp[len(prompt_ids) + j - 1, t].item() for j, t in enumerate(resp_ids))
    return total, len(resp_ids)


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from gad_megatron.models.sources import load_causal_lm

    return load_causal_lm(str(tiny_model_dir)).eval()


def test_batched_equals_direct(tiny_lm, tiny_tokenizer):
    direct = [_direct(tiny_lm, tiny_tokenizer, p, r) for p, r in zip(PROMPTS, RESPONSES)]
    res = mean_loglik(tiny_lm, tiny_tokenizer, PROMPTS, RESPONSES, batch_size=2)  # padding inside a batch
    tokens = sum(n for _, n in direct)
    assert res["tokens"] == tokens and res["count"] == 3
    assert res["mean_token_loglik"] == pytest.approx(sum(s for s, _ in direct) / tokens, abs=1e-4)
    assert res["mean_response_loglik"] == pytest.approx(sum(s / n for s, n in direct) / 3, abs=1e-4)
    assert res["mean_token_loglik"] < 0
    assert res["per_response"] == pytest.approx([s / n for s, n in direct], abs=1e-4), "aligned with the responses"


def test_teacher_context_and_truncation(tiny_lm, tiny_tokenizer):
    finished = [True, False, True]  # a truncated response gets no end-of-turn token
    direct = [_direct(tiny_lm, tiny_tokenizer, p, r, f, CONTEXT) for p, r, f in zip(PROMPTS, RESPONSES, finished)]
    res = teacher_loglik(tiny_lm, tiny_tokenizer, PROMPTS, RESPONSES, CONTEXT, finished=finished, batch_size=3)
    assert res["tokens"] == sum(n for _, n in direct)
    assert res["mean_token_loglik"] == pytest.approx(sum(s for s, _ in direct) / res["tokens"], abs=1e-4)
    # The context changes the value: it is really there.
    plain = candidate_loglik(tiny_lm, tiny_tokenizer, PROMPTS, RESPONSES, finished=finished)
    assert plain["tokens"] == res["tokens"]
    assert plain["mean_token_loglik"] != pytest.approx(res["mean_token_loglik"], abs=1e-6)


LONG_CONTEXT = [{"role": "user", "content": "Answer briefly and end with a friendly sign-off, like this."},
                {"role": "assistant", "content": "In short: water boils at 100 degrees at sea level. Take care!"}] * 3


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], limit=10) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]], limit=2) == 2
    assert shared_prefix_length([[7, 2], [1, 2]], limit=5) == 0
    assert shared_prefix_length([[1, 2, 3]], limit=5) == 3


def test_shared_context_forwarded_once_gives_the_same_values(tiny_lm, tiny_tokenizer):
    """The teacher's hidden context as one cached prefix: equal to the direct, unbatched values."""
    finished = [True, False, True]
    prompt_ids = [encode_pair(tiny_tokenizer, p, r, f, LONG_CONTEXT)[0] for p, r, f in zip(PROMPTS, RESPONSES, finished)]
    assert shared_prefix_length(prompt_ids, 10**6) >= 32  # the cached path is the one under test
    calls = []
    hook = tiny_lm.register_forward_pre_hook(lambda _m, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    try:
        cached = response_logprobs(tiny_lm, tiny_tokenizer, PROMPTS, RESPONSES, finished, LONG_CONTEXT, batch_size=2)
    finally:
        hook.remove()
    assert calls[0][0] == 1 and len(calls) == 3  # the prefix once, then two batches of suffixes
    assert all(shape[1] < calls[0][1] for shape in calls[1:])
    plain = response_logprobs(tiny_lm, tiny_tokenizer, PROMPTS, RESPONSES, finished, LONG_CONTEXT, batch_size=2,
                              min_shared_prefix=10**6)
    for p, r, f, (s_c, n_c), (s_p, n_p) in zip(PROMPTS, RESPONSES, finished, cached, plain):
        direct, n = _direct(tiny_lm, tiny_tokenizer, p, r, f, LONG_CONTEXT)
        assert n_c == n_p == n
        assert s_c == pytest.approx(direct, abs=1e-4) and s_p == pytest.approx(direct, abs=1e-4)


def test_token_logprobs_at_a_sampling_temperature(tiny_lm, tiny_tokenizer):
    """Token-id pairs scored under softmax(logits / T): the density of a sampler at temperature T."""
    finished = [True, False, True]
    pairs = [encode_pair(tiny_tokenizer, p, r, f, LONG_CONTEXT) for p, r, f in zip(PROMPTS, RESPONSES, finished)]
    at_t = token_logprobs(tiny_lm, pairs, tiny_tokenizer.pad_token_id or 0, batch_size=2, temperature=0.7)
    at_1 = token_logprobs(tiny_lm, pairs, tiny_tokenizer.pad_token_id or 0, batch_size=2)
    for p, r, f, (s_t, n), (s_1, _) in zip(PROMPTS, RESPONSES, finished, at_t, at_1):
        assert s_t == pytest.approx(_direct(tiny_lm, tiny_tokenizer, p, r, f, LONG_CONTEXT, 0.7)[0], abs=1e-4)
        assert s_1 == pytest.approx(_direct(tiny_lm, tiny_tokenizer, p, r, f, LONG_CONTEXT)[0], abs=1e-4)
        assert n == len(encode_pair(tiny_tokenizer, p, r, f, LONG_CONTEXT)[1])
    assert [s for s, _ in at_t] != pytest.approx([s for s, _ in at_1], abs=1e-3)
