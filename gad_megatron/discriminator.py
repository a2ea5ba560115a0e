"""The discriminator D: a causal-LM backbone with a scalar head, scoring ``[prompt, response]``.

* Weights live in an ``AutoModelForSequenceClassification(num_labels=1)``, so a saved D loads
  with transformers alone. Its built-in pooling finds the last token through ``pad_token_id``,
  which is wrong when pad == eos (SmolLM2, Qwen...), so :func:`score_sequences` pools itself:
  the head is applied at the last position whose attention mask is 1.
* Teacher text and student rollouts reach D through one function, :meth:`TextEncoder.encode`:
  same chat template, same whitespace strip, same truncation, same end-of-turn tokens. A
  rollout is decoded to text by the trainer and re-encoded here exactly like teacher text, so
  the score is a function of ``(prompt, response text)`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def _head(model: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no scalar head named 'score' or 'classifier'")


def score_sequences(model: nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Head output at the last real token of each sequence. -> (B,) float32."""
    hidden_BTH = model.base_model(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
    rows = torch.arange(hidden_BTH.shape[0], device=hidden_BTH.device)
    last_BH = hidden_BTH[rows, last_real_index(attention_mask_BT)]
    return _head(model)(last_BH).squeeze(-1).float()


def load_discriminator(spec: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A sequence scorer from any causal-LM checkpoint (new random head) or a saved discriminator."""
    from transformers import AutoModelForSequenceClassification

    from gad_megatron.models.sources import load_tokenizer, resolve_model_path

    path = resolve_model_path(spec)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(spec, trust_remote_code).pad_token_id
    return model


def save_discriminator(model: nn.Module, tokenizer: Any, directory: str | Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
