"""The canonical text path into D: ``(prompt messages, response text)`` -> token ids, and padding.

Teacher text and student rollouts reach D through one function, :meth:`TextEncoder.encode`:
same chat template, same whitespace strip, same truncation, same end-of-turn tokens. A rollout
is decoded to text by the trainer and re-encoded here exactly like teacher text, so D's score
is a function of ``(prompt, response text)`` only. Used by the trainer, the rollout step and
evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gad_megatron.data import Messages

_SENTINEL = "\u2063GAD_RESPONSE\u2063"


@dataclass(frozen=True)
class TextEncoder:
    """Canonical tokenization of ``(prompt messages, response text)`` for one tokenizer."""

    tokenizer: Any
    max_prompt_length: int
    max_response_length: int

    def end_of_turn_ids(self) -> list[int]:
        """Tokens the chat template puts right after an assistant message (e.g. ``<|im_end|>``)."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return [tok.eos_token_id]
        text = tok.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}], tokenize=False
        )
        suffix = text.split(_SENTINEL, 1)[1].rstrip()
        return tok(suffix, add_special_tokens=False)["input_ids"] if suffix else [tok.eos_token_id]

    def prompt_ids(self, prompt: Messages) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tok("\n".join(m["content"] for m in prompt), add_special_tokens=True)["input_ids"]
        return list(ids)[-self.max_prompt_length :]

    def response_ids(self, response: str, eot: list[int]) -> list[int]:
        """Stripped response tokens; a response over the limit is cut and gets no end-of-turn."""
        ids = self.tokenizer(response.strip(), add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_response_length:
            return ids[: self.max_response_length]
        return ids + eot

    def encode(self, prompt: Messages, response: str, eot: list[int] | None = None) -> list[int]:
        """``prompt template + response text + end-of-turn`` as token ids (same path for both sides)."""
        return self.prompt_ids(prompt) + self.response_ids(response, self.end_of_turn_ids() if eot is None else eot)


def right_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and attention mask, right-padded."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def last_real_index(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row (works for left or right padding). -> (B,)"""
    positions = torch.arange(attention_mask_BT.shape[1], device=attention_mask_BT.device)
    return (positions * attention_mask_BT).argmax(dim=1)
