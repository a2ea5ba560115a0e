"""HF <-> Megatron mapping tables, one per model family, and the Megatron config built from an HF one.

A family is data: which HF ``model_type`` it covers, which config values it cannot map (a
refusal names them), whether QKV has a bias. Every tensor is one :class:`TensorRule`: its
Megatron name under the local layer spec and under the Transformer Engine spec (TE fuses the
pre-attention / pre-MLP RMSNorm into ``linear_qkv`` / ``linear_fc1``, so only those names
differ), the HF tensors it is made of, how they are fused, and how it is cut across
tensor-parallel ranks.

The per-tensor API works on FULL tensors (all TP shards gathered, vocabulary padded) with
GLOBAL layer numbers, so a streaming consumer (the resharding layer feeding vLLM) handles one
tensor at a time:

* :meth:`ModelLayout.hf_to_megatron` / :meth:`ModelLayout.megatron_to_hf`: fuse/split and
  rename one tensor (QKV interleaved per query group ``[q..., k, v]``; ``linear_fc1`` =
  ``[gate; up]``; vocabulary padding added / removed);
* :func:`shard` / :func:`gather`: one TP rank's piece of a full tensor and back;
* :meth:`ModelLayout.to_local` / :meth:`ModelLayout.to_global`: which pipeline stage holds a
  tensor and its name there (Megatron numbers the layers of each stage from 0).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any, Literal

import torch

Role = Literal["policy", "discriminator"]
SpecNames = Literal["local", "te"]

# Megatron pads the vocabulary to a multiple of this times TP (``--make-vocab-size-divisible-by``).
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128


class Split(str, Enum):
    """How a full tensor is cut across the tensor-parallel ranks."""

    REPLICATED = "replicated"  # every rank holds it whole (norms, D's 1-output head)
    COLUMN = "column"  # dim 0 in equal chunks (ColumnParallelLinear; QKV: whole query groups)
    COLUMN_GLU = "column_glu"  # dim 0, gate and up halves chunked apart: rank r holds [gate_r; up_r]
    ROW = "row"  # dim 1 in equal chunks (RowParallelLinear)
    VOCAB = "vocab"  # dim 0 of the padded vocabulary (VocabParallelEmbedding, output layer)


class Fuse(str, Enum):
    """How the HF tensors of a rule make the Megatron tensor."""

    COPY = "copy"  # one HF tensor, same values
    QKV = "qkv"  # (q, k, v) interleaved per query group: [q_g0..., k_g0, v_g0, q_g1..., ...]
    GATE_UP = "gate_up"  # (gate, up) concatenated on dim 0


@dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor. ``{layer}`` in a name stands for the decoder layer number."""

    megatron: str
    hf: tuple[str, ...]
    split: Split
    fuse: Fuse = Fuse.COPY
    te: str | None = None  # the name under the TE spec, where it differs

    def name(self, spec: SpecNames) -> str:
        return self.te if spec == "te" and self.te else self.megatron


_M, _H = "decoder.layers.{layer}.", "model.layers.{layer}."

# Llama layout, shared by every family here (Qwen2 adds the QKV bias, Qwen3 the q/k norms).
DECODER_RULES: tuple[TensorRule, ...] = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Split.VOCAB),
    TensorRule(_M + "input_layernorm.weight", (_H + "input_layernorm.weight",), Split.REPLICATED,
               te=_M + "self_attention.linear_qkv.layer_norm_weight"),
    TensorRule(_M + "self_attention.linear_qkv.weight",
               (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
               Split.COLUMN, Fuse.QKV),
    TensorRule(_M + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), Split.ROW),
    TensorRule(_M + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), Split.REPLICATED,
               te=_M + "mlp.linear_fc1.layer_norm_weight"),
    TensorRule(_M + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
               Split.COLUMN_GLU, Fuse.GATE_UP),
    TensorRule(_M + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), Split.ROW),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), Split.REPLICATED),
)  # fmt: skip
QKV_BIAS_RULE = TensorRule(
    _M + "self_attention.linear_qkv.bias",
    (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
    Split.COLUMN, Fuse.QKV,
)  # fmt: skip
# Qwen3's per-head RMSNorm of queries and keys ([head_dim], applied before RoPE): every TP rank
# holds it whole although each normalises only its own heads (megatron-core all-reduces their
# gradients over TP when ``qk_layernorm`` is set). Same names under both layer specs.
QK_NORM_RULES = (
    TensorRule(_M + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), Split.REPLICATED),
    TensorRule(_M + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), Split.REPLICATED),
)  # fmt: skip
LM_HEAD_RULE = TensorRule("output_layer.weight", ("lm_head.weight",), Split.VOCAB)
# Tied embeddings with PP > 1: the last stage keeps its own copy of the embedding as output
# layer (megatron-core all-reduces the two copies' gradients); the embedding is canonical.
TIED_HEAD_RULE = TensorRule("output_layer.weight", ("model.embed_tokens.weight",), Split.VOCAB)
# The discriminator's scalar head replaces the output layer: HF ``*ForSequenceClassification``.
SCORE_RULE = TensorRule("output_layer.weight", ("score.weight",), Split.REPLICATED)


@dataclass(frozen=True)
class Family:
    """An HF architecture family the tables cover."""

    name: str
    model_types: tuple[str, ...]
    class_prefix: str  # HF classes are f"{class_prefix}ForCausalLM" / f"...ForSequenceClassification"
    qkv_bias: bool
    required: tuple[tuple[str, Any], ...]  # HF config values the mapping depends on
    qk_norm: bool = False  # RMSNorm over head_dim of each query and key head (megatron ``qk_layernorm``)
    moe: bool = False  # every layer's MLP is a mixture of experts (:mod:`gad_megatron.models.moe`)


FAMILIES: tuple[Family, ...] = (
    # SmolLM2 and Llama 2/3.x are model_type "llama".
    Family("llama", ("llama",), "Llama", qkv_bias=False,
           required=(("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False))),
    # Qwen2 and Qwen2.5: biases on q, k, v only; 0.5B-3B tie their embeddings, 7B+ do not.
    Family("qwen2", ("qwen2",), "Qwen2", qkv_bias=True,
           required=(("hidden_act", "silu"), ("use_sliding_window", False))),
    # Qwen3 dense: q/k norms, head_dim apart from hidden / heads (4B: 128, not 2560 / 32), no biases.
    # attention_bias=True would put one on o_proj too, which megatron-core only has
    # together with biases on every linear layer (add_bias_linear): refused.
    Family("qwen3", ("qwen3",), "Qwen3", qkv_bias=False, qk_norm=True,
           required=(("hidden_act", "silu"), ("attention_bias", False), ("use_sliding_window", False))),
    # Qwen3-MoE: Qwen3's attention, an MoE block in every layer (no dense layers in between).
    Family("qwen3_moe", ("qwen3_moe",), "Qwen3Moe", qkv_bias=False, qk_norm=True, moe=True,
           required=(("hidden_act", "silu"), ("attention_bias", False), ("use_sliding_window", False),
                     ("decoder_sparse_step", 1), ("mlp_only_layers", []))),
)  # fmt: skip


def family_of(hf_config: Any) -> Family:
    model_type = getattr(hf_config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unsupported architecture model_type={model_type!r} (supported: {supported})")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def rope_settings(hf_config: Any) -> dict[str, Any]:
    """GPTModel's RoPE kwargs. megatron-core implements plain RoPE and Llama-3.x scaling with its
    low and high frequency factors fixed at 1 and 4 and original context 8192; others are refused."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:  # transformers < 5 spelling
        scaling = getattr(hf_config, "rope_scaling", None) or {}
        params = {"rope_theta": getattr(hf_config, "rope_theta", 10000.0), **scaling}
    rope_type = params.get("rope_type", params.get("type", "default"))
    settings: dict[str, Any] = {"rotary_base": params.get("rope_theta", 10000.0)}
    if rope_type == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if any(float(params.get(k, -1)) != v for k, v in fixed.items()):
            raise ValueError(f"llama3 RoPE scaling other than {fixed} is not supported by megatron-core: {params}")
        settings.update(rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    elif rope_type != "default":
        raise ValueError(f"unsupported RoPE scaling type {rope_type!r} (supported: default, llama3)")
    if float(getattr(hf_config, "partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    return settings


@dataclass(frozen=True)
class ModelLayout:
    """One model's shapes and parallel layout; maps its tensors between HF and Megatron."""

    family: Family
    role: Role
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tied: bool  # policy with tied embeddings (never D: its head is separate)
    tp: int = 1
    pp: int = 1
    spec: SpecNames = "local"

    @cached_property
    def rules(self) -> tuple[TensorRule, ...]:
        rules = list(DECODER_RULES) + ([QKV_BIAS_RULE] if self.family.qkv_bias else [])
        rules += QK_NORM_RULES if self.family.qk_norm else ()
        if self.role == "discriminator":
            rules.append(SCORE_RULE)
        elif not self.tied:
            rules.append(LM_HEAD_RULE)
        elif self.pp > 1:
            rules.append(TIED_HEAD_RULE)
        return tuple(rules)

    @cached_property
    def _by_template(self) -> dict[str, TensorRule]:
        return {rule.name(self.spec): rule for rule in self.rules}

    def megatron_names(self) -> list[str]:
        """Every Megatron tensor of the model in pipeline order, with global layer numbers."""
        templates = [rule.name(self.spec) for rule in self.rules]
        per_layer = [t for t in templates if "{layer}" in t]
        outside = [t for t in templates if "{layer}" not in t]  # the embedding comes first
        return outside[:1] + [t.format(layer=i) for i in range(self.num_layers) for t in per_layer] + outside[1:]

    def rule_of(self, name: str) -> tuple[TensorRule, int | None]:
        """The rule of a (global) Megatron tensor name and its layer number (None outside layers)."""
        match = re.search(r"(?<=\.layers\.)\d+(?=\.)", name)
        template = name if match is None else name[: match.start()] + "{layer}" + name[match.end() :]
        if template not in self._by_template:
            raise KeyError(f"no {self.family.name} mapping for Megatron tensor {name!r} ({self.spec} spec)")
        return self._by_template[template], None if match is None else int(match.group())

    def hf_names(self, name: str) -> tuple[str, ...]:
        """HF tensors that make the Megatron tensor ``name``."""
        rule, layer = self.rule_of(name)
        return tuple(h.format(layer=layer) for h in rule.hf)

    def split_of(self, name: str) -> Split:
        return self.rule_of(name)[0].split

    # --- pipeline stages --------------------------------------------------------------------

    @property
    def layers_per_stage(self) -> int:
        return self.num_layers // self.pp

    def stage_of_layer(self, layer: int) -> int:
        """Megatron splits layers evenly in order: stage p holds [p * L/pp, (p+1) * L/pp)."""
        return layer // self.layers_per_stage

    def to_local(self, name: str) -> tuple[int, str]:
        """(pipeline stage holding a global tensor name, its name in that stage's model)."""
        rule, layer = self.rule_of(name)
        if layer is not None:
            return self.stage_of_layer(layer), rule.name(self.spec).format(layer=layer % self.layers_per_stage)
        return (0 if name.startswith("embedding.") else self.pp - 1), name

    def to_global(self, local_name: str, pp_rank: int) -> str:
        """Inverse of :meth:`to_local`, e.g. for a stage's ``named_parameters()``."""
        return re.sub(r"(?<=\.layers\.)\d+(?=\.)", lambda m: str(int(m.group()) + pp_rank * self.layers_per_stage),
                      local_name, count=1)

    def names_of_stage(self, pp_rank: int) -> list[str]:
        return [n for n in self.megatron_names() if self.to_local(n)[0] == pp_rank]

    # --- tensors --------------------------------------------------------------------------

    def hf_to_megatron(self, name: str, hf: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Full Megatron tensor ``name`` from the HF tensors it is made of (``hf`` may hold more)."""
        rule, _ = self.rule_of(name)
        parts = [hf[h] for h in self.hf_names(name)]
        if rule.fuse == Fuse.QKV:
            q, k, v = (p.reshape(self.num_query_groups, -1, *p.shape[1:]) for p in parts)
            return torch.cat([q, k, v], dim=1).reshape(-1, *parts[0].shape[1:])
        if rule.fuse == Fuse.GATE_UP:
            return torch.cat(parts, dim=0)
        full = parts[0]
        if rule.split == Split.VOCAB:
            full = torch.cat([full, full.new_zeros(self.padded_vocab_size - full.shape[0], *full.shape[1:])])
        return full

    def megatron_to_hf(self, name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """HF (name, tensor) pairs of a full Megatron tensor; empty for the tied output-layer
        replica (the embedding carries those values)."""
        rule, _ = self.rule_of(name)
        if rule is TIED_HEAD_RULE:
            return []
        names = self.hf_names(name)
        if rule.fuse == Fuse.QKV:
            per_group = full.reshape(self.num_query_groups, -1, *full.shape[1:])
            q_rows = self.num_heads // self.num_query_groups * self.head_dim
            q, k, v = per_group.split([q_rows, self.head_dim, self.head_dim], dim=1)
            return [(n, t.reshape(-1, *full.shape[1:])) for n, t in zip(names, (q, k, v))]
        if rule.fuse == Fuse.GATE_UP:
            return list(zip(names, full.chunk(2, dim=0)))
        if rule.split == Split.VOCAB:
            full = full[: self.vocab_size]
        return [(names[0], full)]


def shard(full: torch.Tensor, split: Split, tp_rank: int, tp: int) -> torch.Tensor:
    """Tensor-parallel rank ``tp_rank``'s piece of a full tensor (contiguous)."""
    if split == Split.REPLICATED:
        return full
    if split == Split.COLUMN_GLU:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
    return full.chunk(tp, dim=1 if split == Split.ROW else 0)[tp_rank].contiguous()


def gather(shards: Sequence[torch.Tensor], split: Split) -> torch.Tensor:
    """The full tensor from every TP rank's piece, in rank order (inverse of :func:`shard`)."""
    if split == Split.REPLICATED:
        return shards[0]
    if split == Split.COLUMN_GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(list(shards), dim=1 if split == Split.ROW else 0)


def layout_from_hf(
    hf_config: Any, tp: int = 1, pp: int = 1, role: Role = "policy", spec: SpecNames = "local"
) -> ModelLayout:
    """The layout of an HF model at TP x PP; a one-line ValueError for what cannot be mapped."""
    family = family_of(hf_config)
    for key, value in family.required:
        if getattr(hf_config, key, value) != value:
            raise ValueError(f"{family.name}: {key}={getattr(hf_config, key)!r} is not supported (needs {value!r})")
    rope_settings(hf_config)
    heads, layers = hf_config.num_attention_heads, hf_config.num_hidden_layers
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor and pipeline parallel sizes must be >= 1 (got TP={tp}, PP={pp})")
    for what, count in (("attention heads", heads), ("query groups (KV heads)", groups),
                        ("FFN size", hf_config.intermediate_size)):  # fmt: skip
        if count % tp:
            raise ValueError(f"TP={tp} does not divide the {count} {what}")
    if layers % pp:
        raise ValueError(f"PP={pp} does not divide the {layers} layers")
    layout = ModelLayout(
        family=family,
        role=role,
        num_layers=layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_heads=heads,
        num_query_groups=groups,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=padded_vocab_size(hf_config.vocab_size, tp),
        tied=role == "policy" and bool(getattr(hf_config, "tie_word_embeddings", False)),
        tp=tp,
        pp=pp,
        spec=spec,
    )
    if family.moe:
        from gad_megatron.models.moe import moe_layout

        return moe_layout(layout, hf_config)
    return layout


def transformer_config_from_hf(hf_config: Any, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32,
                               **overrides: Any) -> Any:
    """megatron-core ``TransformerConfig`` equivalent to an HF Llama/Qwen2/Qwen3 config.

    RMSNorm, SwiGLU (``gated_linear_unit`` + silu), grouped-query attention with ``kv_channels``
    = head_dim, QKV biases and q/k RMSNorm where the family has them (the layer spec then needs
    q/k norm modules: ``policy.layer_spec``), no dropout (RL fine-tuning; HF's configs say 0 too).
    ``overrides`` go to TransformerConfig last (e.g. ``recompute_granularity``).
    """
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    layout = layout_from_hf(hf_config, tp, pp)
    kwargs: dict[str, Any] = dict(
        num_layers=layout.num_layers,
        hidden_size=layout.hidden_size,
        ffn_hidden_size=layout.ffn_hidden_size,
        num_attention_heads=layout.num_heads,
        num_query_groups=layout.num_query_groups,
        kv_channels=layout.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=layout.family.qkv_bias,
        qk_layernorm=layout.family.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        # Micro-batches have their own [rows, width] (trainer.batching): stages exchange shapes.
        variable_seq_lengths=pp > 1,
        # No MoE here; megatron-core refuses variable_seq_lengths with its default "allgather" MoE dispatcher.
        moe_token_dispatcher_type="alltoall",
        # Without CUDA, parameters are created (and initialised) on the CPU directly.
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    if layout.family.moe:
        from gad_megatron.models.moe import moe_config_kwargs

        kwargs.update(moe_config_kwargs(hf_config))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def gpt_model_kwargs(hf_config: Any, tp: int = 1, role: Role = "policy") -> dict[str, Any]:
    """GPTModel constructor kwargs other than config, layer spec and pre/post_process."""
    layout = layout_from_hf(hf_config, tp, role=role)
    return dict(
        vocab_size=layout.padded_vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=layout.tied,
        **rope_settings(hf_config),
    )
