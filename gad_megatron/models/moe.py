"""Mixture-of-experts decoders (Qwen3-MoE): tensor rules, MoE settings and expert-parallel ranks.

Every decoder layer's MLP is a sparse MoE block: a router ``mlp.gate.weight`` [E, H] and E
SwiGLU experts ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (the names of HF checkpoints on
disk; transformers >= 5 stacks them in memory and splits them again on save). In megatron-core
(local spec, ``SequentialMLP``) they are ``mlp.router.weight`` and
``mlp.experts.local_experts.{e}.linear_fc1.weight`` ([gate; up], as in the dense MLP) /
``linear_fc2.weight``. The router is replicated over TP; each expert is cut over TP like a
dense MLP (megatron-core's expert-TP size defaults to the attention's TP).

Names with GLOBAL expert numbers ``{expert}`` are the full-model names (:class:`MoELayout`
maps them like any tensor, stage by stage). Expert parallelism (EP) gives rank ``r`` of the EP
group the experts ``[r * E/ep, (r+1) * E/ep)``, numbered from 0 in its model:
:func:`localize_experts` / :func:`globalize_experts` move a state dict between the two numberings.

Routing (``norm_topk_prob``): HF takes the softmax over all E logits, keeps the top k and,
when set, divides them by their sum, which equals a softmax over the top-k logits:
megatron-core's ``moe_router_pre_softmax=False``. Without it the top-k probabilities stay as
they are: ``moe_router_pre_softmax=True``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, TypeVar

import torch

from gad_megatron.models.families import Fuse, ModelLayout, Split, TensorRule, family_of

T = TypeVar("T")

_M, _H = "decoder.layers.{layer}.", "model.layers.{layer}."
# The dense MLP's rules that an MoE layer replaces.
DENSE_MLP = {_M + "pre_mlp_layernorm.weight", _M + "mlp.linear_fc1.weight", _M + "mlp.linear_fc2.weight"}
MOE_RULES: tuple[TensorRule, ...] = (
    # Not fused into linear_fc1 under the TE spec: the MoE layer keeps its own pre-MLP norm.
    TensorRule(_M + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), Split.REPLICATED),
    TensorRule(_M + "mlp.router.weight", (_H + "mlp.gate.weight",), Split.REPLICATED),
    TensorRule(_M + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
               (_H + "mlp.experts.{expert}.gate_proj.weight", _H + "mlp.experts.{expert}.up_proj.weight"),
               Split.COLUMN_GLU, Fuse.GATE_UP),
    TensorRule(_M + "mlp.experts.local_experts.{expert}.linear_fc2.weight",
               (_H + "mlp.experts.{expert}.down_proj.weight",), Split.ROW),
)  # fmt: skip
_LAYER = re.compile(r"(?<=\.layers\.)\d+(?=\.)")
_EXPERT = re.compile(r"(?<=\.local_experts\.)\d+(?=\.)")


def _expert_template(name: str) -> tuple[str, int | None]:
    """(name with its expert number replaced by ``{expert}``, that number or None)."""
    match = _EXPERT.search(name)
    if match is None:
        return name, None
    return name[: match.start()] + "{expert}" + name[match.end() :], int(match.group())


@dataclass(frozen=True)
class MoELayout(ModelLayout):
    """A :class:`ModelLayout` whose every layer has ``num_experts`` experts (global numbers)."""

    num_experts: int = 0

    @cached_property
    def rules(self) -> tuple[TensorRule, ...]:
        dense = [rule for rule in ModelLayout.rules.func(self) if rule.megatron not in DENSE_MLP]
        layers_end = next(i for i, rule in enumerate(dense) if rule.megatron == "decoder.final_layernorm.weight")
        return tuple(dense[:layers_end]) + MOE_RULES + tuple(dense[layers_end:])

    def megatron_names(self) -> list[str]:
        """Every Megatron tensor in pipeline order: global layer and expert numbers."""
        templates = [rule.name(self.spec) for rule in self.rules]
        per_layer = [t for t in templates if "{layer}" in t]
        outside = [t for t in templates if "{layer}" not in t]  # the embedding comes first
        experts = [str(e) for e in range(self.num_experts)]
        layers = [t.replace("{layer}", str(i)).replace("{expert}", e) for i in range(self.num_layers)
                  for t in per_layer for e in (experts if "{expert}" in t else [""])]  # fmt: skip
        return outside[:1] + layers + outside[1:]

    def rule_of(self, name: str) -> tuple[TensorRule, int | None]:
        template, expert = _expert_template(name)
        if expert is not None and not 0 <= expert < self.num_experts:
            raise KeyError(f"expert {expert} of {name!r} is outside the model's {self.num_experts} experts")
        return super().rule_of(template)

    def hf_names(self, name: str) -> tuple[str, ...]:
        rule, layer = self.rule_of(name)
        expert = _expert_template(name)[1]
        return tuple(h.format(layer=layer, expert=expert) for h in rule.hf)

    def to_local(self, name: str) -> tuple[int, str]:
        """(pipeline stage, name there): layers numbered per stage, experts still GLOBAL."""
        layer = self.rule_of(name)[1]
        if layer is None:
            return super().to_local(name)
        return self.stage_of_layer(layer), _LAYER.sub(str(layer % self.layers_per_stage), name, count=1)


def moe_layout(dense: ModelLayout, hf_config: Any) -> MoELayout:
    """The MoE layout of an HF MoE config whose attention and embeddings ``dense`` maps."""
    experts, top_k = hf_config.num_experts, hf_config.num_experts_per_tok
    if not 1 <= top_k <= experts:
        raise ValueError(f"num_experts_per_tok={top_k} must be between 1 and num_experts={experts}")
    if hf_config.moe_intermediate_size % dense.tp:
        raise ValueError(f"TP={dense.tp} does not divide the {hf_config.moe_intermediate_size} expert FFN size")
    return MoELayout(**{f.name: getattr(dense, f.name) for f in fields(dense)}, num_experts=experts)


def moe_config_kwargs(hf_config: Any) -> dict[str, Any]:
    """megatron-core TransformerConfig MoE settings equivalent to the HF config's routing.

    Local ``SequentialMLP`` experts (no grouped GEMM: it needs TE or the grouped_gemm package),
    the ``alltoall`` dispatcher (megatron-core refuses ``allgather`` with variable sequence
    lengths, which pipeline parallelism uses here), no load-balancing or z loss (RL fine-tuning
    of a trained router; ``moe_aux_loss_coeff`` / ``moe_z_loss_coeff`` overrides turn them on).
    """
    return dict(
        num_moe_experts=hf_config.num_experts,
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_ffn_hidden_size=hf_config.moe_intermediate_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not hf_config.norm_topk_prob,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
    )


def check_expert_parallel(num_experts: int, ep: int) -> None:
    """A one-line ValueError unless ``ep`` ranks can share the experts evenly."""
    if ep < 1 or num_experts % ep:
        raise ValueError(f"EP={ep} does not divide the {num_experts} experts")


def check_moe_training_layout(hf_config: Any, tp: int, ep: int, what: str) -> None:
    """A one-line ConfigError for an MoE model the trainer cannot train at TP x EP (dense: none).

    megatron-core refuses MoE layers at TP > 1 in training without sequence parallelism (the
    experts would see each token once per TP rank), and this trainer does not use sequence
    parallelism (the policy's logits and D's scores need whole sequences on every rank).
    """
    from gad_megatron.config import ConfigError

    if not family_of(hf_config).moe:
        return
    if tp > 1:
        raise ConfigError(f"{what} is a mixture of experts: parallel.tensor_parallel={tp} needs sequence parallelism "
                          "in megatron-core's MoE layers, which this trainer does not use; split it with "
                          "parallel.expert_parallel (and pipeline_parallel) instead")  # fmt: skip
    if hf_config.num_experts % ep:
        raise ConfigError(f"parallel.expert_parallel={ep} does not divide the {hf_config.num_experts} experts "
                          f"of {what}")  # fmt: skip


def local_expert_name(name: str, num_experts: int, ep: int, ep_rank: int) -> str | None:
    """The name on EP rank ``ep_rank`` of a tensor named with a global expert number (other
    tensors keep their name); None when another EP rank holds that expert."""
    check_expert_parallel(num_experts, ep)
    template, expert = _expert_template(name)
    if expert is None:
        return name
    per_rank = num_experts // ep
    return template.replace("{expert}", str(expert % per_rank)) if expert // per_rank == ep_rank else None


def localize_experts(state: Mapping[str, T], num_experts: int, ep: int, ep_rank: int) -> dict[str, T]:
    """EP rank ``ep_rank``'s part of a state dict with global expert numbers: its experts
    (numbered from 0) and every tensor that is not an expert's."""
    return {new: value for name, value in state.items()
            if (new := local_expert_name(name, num_experts, ep, ep_rank)) is not None}  # fmt: skip


def is_expert(name: str) -> bool:
    return _expert_template(name)[1] is not None


def global_expert_name(name: str, num_experts: int, ep: int, ep_rank: int) -> str:
    """Inverse of :func:`local_expert_name`: EP rank ``ep_rank``'s local expert name, numbered globally."""
    check_expert_parallel(num_experts, ep)
    template, expert = _expert_template(name)
    return name if expert is None else template.replace("{expert}", str(ep_rank * (num_experts // ep) + expert))


def globalize_experts(states: Sequence[Mapping[str, T]], num_experts: int) -> dict[str, T]:
    """Inverse of :func:`localize_experts`: the EP ranks' state dicts, in EP-rank order, as one
    with global expert numbers (tensors outside the experts are taken from rank 0)."""
    return {global_expert_name(name, num_experts, len(states), ep_rank): value
            for ep_rank, state in enumerate(states) for name, value in state.items()
            if ep_rank == 0 or is_expert(name)}  # fmt: skip


def per_expert_views(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 parameters with each stacked expert tensor replaced by per-expert views
    under the checkpoint names: ``mlp.experts.gate_up_proj`` [E, 2I, H] -> ``mlp.experts.{e}.
    gate_proj.weight`` [I, H] (rows :I) and ``up_proj.weight`` (rows I:), ``mlp.experts.down_proj``
    [E, H, I] -> ``mlp.experts.{e}.down_proj.weight``. Copying into a view writes the stacked
    parameter; other parameters pass through."""
    views: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, fused in enumerate(param):
                gate, up = fused.chunk(2)
                views[f"{prefix}{e}.gate_proj.weight"], views[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            views.update({f"{prefix}{e}.down_proj.weight": down for e, down in enumerate(param)})
        else:
            views[name] = param
    return views
