"""Tiny random HF Llama / Qwen2 / Qwen3 / Qwen3-MoE models (policy and discriminator) for the Megatron model tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gad_megatron.models.moe import per_expert_views

FAMILIES = ("llama", "qwen2", "qwen3")  # dense
MOE_FAMILIES = ("qwen3_moe",)
# vocab 300 is not a multiple of 128 x TP, so every test also exercises the vocabulary padding.
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)  # fmt: skip


# Qwen3-MoE: 4 experts of FFN size 32, top-2 with renormalised weights, 2 layers, untied (like Qwen3-30B-A3B).
MOE_SHAPE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                 num_hidden_layers=2)  # fmt: skip


def tiny_config(family: str, tied: bool | None = None, **changes: Any) -> Any:
    """Llama ties its embeddings by default here (like SmolLM2), Qwen2 does not (like Qwen2.5-7B),
    Qwen3 does (like Qwen3-4B), with head_dim 32, not hidden / heads = 16; Qwen3-MoE: Qwen3's
    attention with :data:`MOE_SHAPE` experts."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    qwen_rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    cls, default_tied, extra = {
        "llama": (LlamaConfig, True, {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
        "qwen2": (Qwen2Config, False, qwen_rope),
        "qwen3": (Qwen3Config, True, {**qwen_rope, "head_dim": 32}),
        "qwen3_moe": (Qwen3MoeConfig, False, {**qwen_rope, "head_dim": 32, **MOE_SHAPE}),
    }[family]
    tie = default_tied if tied is None else tied
    return cls(**{**SHAPE, **extra, "tie_word_embeddings": tie, "pad_token_id": 0, **changes})


def tiny_model(family: str, role: str = "policy", seed: int = 0, **changes: Any) -> torch.nn.Module:
    """A random fp32 HF model; every tensor (norms and biases too) random so mapping mistakes show."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = tiny_config(family, **changes)
    torch.manual_seed(seed)
    if role == "discriminator":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def save_tiny_model(out_dir: str | Path, family: str, role: str = "policy", seed: int = 0, **changes: Any) -> Path:
    model = tiny_model(family, role, seed, **changes)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def disk_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as HF checkpoints hold them: transformers >= 5 stacks MoE experts in
    memory but saves them one by one (not ``save_pretrained``: under torch.distributed it
    writes on rank 0 only)."""
    return per_expert_views(model.state_dict())
