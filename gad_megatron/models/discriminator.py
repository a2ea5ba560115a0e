"""The Megatron discriminator D: the policy's GPT backbone with a 1-output head.

* The head replaces ``GPTModel.output_layer`` (so GPTModel's own post-processing runs it on
  the last pipeline stage): a [1, hidden] weight kept in fp32 whatever the model dtype (the
  score feeds a sigmoid loss and becomes the policy's reward), replicated on every TP rank:
  its input, the final-norm hidden state, is the same on every TP rank, so each computes the
  whole gradient and no TP reduction is needed. Sequence parallelism (which splits that
  hidden state over TP ranks) is refused.
* The score of a sequence is the head's output at its last real token, located from the
  attention mask (never from ``pad_token_id``: pad == eos for SmolLM2 and Qwen). Rows are
  first rotated so that every sequence starts at position 0: a causal mask alone is then
  exact for every real token, whatever the padding side, under both layer specs (TE's
  flash/fused attention takes no arbitrary mask), and positions match an unpadded run.
* D may have another size than G: it is built from its own HF config.
* Exported as HF ``*ForSequenceClassification`` (``num_labels=1``, ``score.weight``).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gad_megatron.models.convert import HFWeights
from gad_megatron.models.policy import (
    MegatronLM,
    broadcast_from_last_stage,
    build_gpt,
    forward_only,
    load_hf_weights,
    model_device,
)
from gad_megatron.text_encoding import last_real_index


class ScalarHead(nn.Module):
    """Stands in for GPTModel's ``output_layer``: hidden [S, B, H] -> scores [S, B, 1], computed in fp32.

    The weight [1, H] has the model's parameter dtype: megatron-core's distributed optimizer
    orders a parameter group's fp32 params before its bf16 ones but indexes them in model
    order, so one fp32 param in a bf16 model breaks its checkpoints (the optimizer still keeps
    an fp32 main copy of a bf16 weight).
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size, dtype=dtype))

    def forward(self, hidden_SBH: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        # (weight, runtime_gather_output): the output-layer call signature GPTModel uses.
        return nn.functional.linear(hidden_SBH.float(), self.weight.float()), None


def new_head_weight(hidden_size: int, std: float, seed: int) -> torch.Tensor:
    """A fresh head for a D made from a causal LM, drawn like HF's ``score`` init. -> [1, H]

    Its own generator: the same weight on every rank whatever the global RNG state.
    """
    return torch.randn(1, hidden_size, generator=torch.Generator().manual_seed(seed)) * std


def build_discriminator(hf_config: Any, dtype: torch.dtype = torch.float32, **config_overrides: Any) -> MegatronLM:
    """This rank's D (weights not loaded): GPTModel with :class:`ScalarHead` as output layer.

    GPTModel first builds its vocabulary output layer, dropped right away; it is never
    initialised (``build_gpt`` skips init), so this costs one transient allocation.
    """
    if config_overrides.get("sequence_parallel"):
        raise ValueError("the discriminator does not support sequence parallelism (its head needs whole sequences)")
    lm = build_gpt(hf_config, "discriminator", dtype, **config_overrides)
    if lm.model.post_process:
        lm.model.output_layer = ScalarHead(hf_config.hidden_size, lm.model.config.params_dtype).to(model_device())
    return lm


def load_discriminator(model_dir: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0,
                       **config_overrides: Any) -> MegatronLM:
    """D from an HF directory: a saved discriminator (has ``score.weight``) or a causal LM (its
    ``lm_head`` is dropped, a new head drawn from ``seed``)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    lm = build_discriminator(hf_config, dtype, **config_overrides)
    weights: Mapping[str, torch.Tensor] = HFWeights(model_dir)
    if "score.weight" not in weights:
        std = getattr(hf_config, "initializer_range", 0.02)
        weights = ChainMap({"score.weight": new_head_weight(hf_config.hidden_size, std, seed)}, weights)
    load_hf_weights(lm, weights)
    return lm


def align_left(input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each row so that its real tokens start at position 0.

    -> (input ids [B, T] with the padding moved to the end, index of the last real token [B]).
    Each mask row must be one non-empty contiguous span of ones (left, right or no padding).
    """
    width = input_ids_BT.shape[1]
    positions = torch.arange(width, device=input_ids_BT.device)
    lengths = attention_mask_BT.sum(dim=1)
    start = last_real_index(attention_mask_BT) - lengths + 1
    index = (start[:, None] + positions) % width
    rotated_mask = attention_mask_BT.gather(1, index).bool()
    if not torch.equal(rotated_mask, positions < lengths[:, None]) or bool((lengths == 0).any()):
        raise ValueError("each attention mask row must be one non-empty contiguous span of real tokens")
    return input_ids_BT.gather(1, index), lengths - 1


def stage_forward(model: nn.Module, input_ids_BT: torch.Tensor, last_B: torch.Tensor) -> torch.Tensor:
    """One pipeline stage of D on left-aligned rows (see :func:`align_left`), with autograd.

    -> the scores [B] (fp32) on the last stage; the stage's activations [T, B, H] elsewhere.
    Also the body of a trainer's forward-step function for D's update.
    """
    out = model(input_ids=input_ids_BT, position_ids=None, attention_mask=None)
    if not getattr(model, "module", model).post_process:  # model may be megatron's DDP wrapper
        return out
    return out[torch.arange(out.shape[0], device=out.device), last_B, 0]  # out: [B, T, 1]


def scores(lm: MegatronLM, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """D's score of each row, without autograd, on every rank of the pipeline. -> [B] fp32"""
    device = model_device()
    input_ids_BT, last_B = align_left(input_ids_BT.to(device), attention_mask_BT.to(device))
    out = forward_only(lm, *input_ids_BT.shape, lambda model: stage_forward(model, input_ids_BT, last_B))
    return broadcast_from_last_stage(out, (input_ids_BT.shape[0],), torch.float32)
