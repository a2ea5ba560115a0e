"""The discriminator's text path and HF pooling (used by evaluation): the pitfalls DESIGN.md lists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gad_megatron.evaluation.hf_discriminator import load_hf_discriminator, score_sequences
from gad_megatron.text_encoding import TextEncoder, last_real_index, right_pad

PROMPT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def disc(tiny_model_dir: Path):
    torch.manual_seed(0)
    return load_hf_discriminator(str(tiny_model_dir))


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer) -> TextEncoder:
    return TextEncoder(tiny_tokenizer, max_prompt_length=64, max_response_length=12)


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
