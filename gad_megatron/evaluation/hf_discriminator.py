"""A transformers discriminator for evaluation: a causal-LM backbone with a scalar head.

Weights live in an ``AutoModelForSequenceClassification(num_labels=1)``, so any causal-LM
checkpoint loads with a new random head. Its built-in pooling finds the last token through
``pad_token_id``, which is wrong when pad == eos (SmolLM2, Qwen...), so :func:`score_sequences`
pools itself: the head is applied at the last position whose attention mask is 1. The trained
D of ``gad train`` is the Megatron model in :mod:`gad_megatron.models.discriminator`.
"""

from __future__ import annotations

import torch
from torch import nn

from gad_megatron.text_encoding import last_real_index


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


def load_hf_discriminator(spec: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A sequence scorer from any causal-LM checkpoint (new random head) or a saved HF discriminator."""
    from transformers import AutoModelForSequenceClassification

    from gad_megatron.models.sources import load_tokenizer, resolve_model_path

    path = resolve_model_path(spec)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(spec, trust_remote_code).pad_token_id
    return model
