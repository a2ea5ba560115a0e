"""The log-likelihood diagnostic equals a direct, unbatched computation on a tiny model."""

from __future__ import annotations

import pytest
import torch

from gad_megatron.evaluation.loglik import candidate_loglik, mean_loglik, teacher_loglik

PROMPTS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write one sentence about the sea, please, and keep it short."}],
    [{"role": "user", "content": "2+2?"}],
]
RESPONSES = ["Blue.", "  The sea is wide and calm tonight.\n", "4"]
CONTEXT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, friend!"}]


def _direct(model, tok, prompt, response, finished=True, context=()):
    """One sequence, no padding, no batching: sum of log p(response token | prefix)."""
    messages = list(context) + prompt
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    resp_ids = tok(response.strip(), add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if finished else [])
    ids = torch.tensor([list(prompt_ids) + resp_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
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
