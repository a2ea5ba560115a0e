"""The Megatron policy: a megatron-core GPTModel built from an HF config, loaded from HF weights.

Also the pieces the discriminator shares: choosing the layer spec, building the GPTModel of
this rank's pipeline stage, loading this rank's weights, and a forward-only pass through the
pipeline with megatron-core's schedule.

Requires :func:`gad_megatron.parallel.launch.init_distributed` first (process groups, RNG, and
the CPU bridge on machines without CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gad_megatron.models.convert import HFWeights, load_rank_state, stage_state_dicts
from gad_megatron.models.families import (
    ModelLayout,
    Role,
    SpecNames,
    Split,
    family_of,
    gpt_model_kwargs,
    layout_from_hf,
    transformer_config_from_hf,
)
from gad_megatron.models.moe import check_expert_parallel


def use_transformer_engine() -> bool:
    """TE layers need CUDA and an importable ``transformer_engine``; the local spec otherwise."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(qk_layernorm: bool = False, num_experts: int | None = None) -> tuple[Any, SpecNames]:
    """The transformer layer spec for this machine and the tensor naming scheme it implies;
    ``qk_layernorm``: with q/k norm modules (Qwen3); ``num_experts``: MoE MLPs of that many
    ``SequentialMLP`` experts (no grouped GEMM)."""
    from megatron.core.models.gpt import gpt_layer_specs

    moe = dict(num_experts=num_experts, moe_grouped_gemm=False)
    if use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm, **moe), "te"
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm, **moe), "local"


def model_device() -> torch.device:
    """Where this rank's model lives: its GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class MegatronLM:
    """This rank's piece of a model: the GPTModel of its pipeline stage and how it maps to HF."""

    model: torch.nn.Module  # megatron.core GPTModel
    layout: ModelLayout
    hf_config: Any

    @property
    def config(self) -> Any:
        return self.model.config


def build_gpt(hf_config: Any, role: Role = "policy", dtype: torch.dtype = torch.float32,
              initialize: bool = False, **config_overrides: Any) -> MegatronLM:
    """This rank's GPTModel (its pipeline stage, its TP shard) for an HF config.

    ``initialize=False`` leaves parameters uninitialised (they are loaded next): random init of
    billions of parameters is the slowest part of building on a CPU.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    from gad_megatron.parallel.cpu import enable_cpu_support

    enable_cpu_support()  # megatron modules imported just now see the CPU bridge too
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    family = family_of(hf_config)
    layout = layout_from_hf(hf_config, tp, pp, role, layer_spec()[1])
    spec, _ = layer_spec(family.qk_norm, getattr(layout, "num_experts", None))
    if family.moe:  # a dense model treats the expert-parallel ranks as the data-parallel ranks they are
        ep = parallel_state.get_expert_model_parallel_world_size()
        check_expert_parallel(layout.num_experts, ep)
        config_overrides = {"expert_model_parallel_size": ep, **config_overrides}
    config = transformer_config_from_hf(hf_config, tp, pp, dtype, perform_initialization=initialize,
                                        **config_overrides)  # fmt: skip
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        **gpt_model_kwargs(hf_config, tp, role),
    )
    mark_tensor_parallel(model, layout, parallel_state.get_pipeline_model_parallel_rank())
    # megatron-core creates linear weights on the GPU itself but not every module (norms of the
    # local spec, buffers): Megatron-LM moves the model afterwards, so do we.
    model.to(model_device())
    # Every parameter in the params dtype, as Megatron-LM's Float16Module leaves them: the local
    # spec creates its norms in fp32, and megatron-core's distributed optimizer indexes a param
    # group as if its params shared one dtype (mixed, its checkpoints break; seen on an H200).
    for param in model.parameters():
        param.data = param.data.to(config.params_dtype)
    return MegatronLM(model, layout, hf_config)


def mark_tensor_parallel(model: torch.nn.Module, layout: ModelLayout, pp_rank: int) -> None:
    """Mark each TP-split parameter as megatron-core would (``tensor_model_parallel``, its dim).

    megatron-core 0.16.1 sets these attributes on a linear's or embedding's weight only while it
    initialises it, so a model built without initialisation (weights loaded next, as here) has
    none: the optimizer's gradient norm then counts every split weight as a copy of TP rank 0's
    shard and leaves the other shards out (seen: a TP=2 norm a quarter low, so gradient clipping
    at TP=2 differed from TP=1). Parameters it already marked (column biases) are left alone.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    dims = {Split.COLUMN: 0, Split.COLUMN_GLU: 0, Split.VOCAB: 0, Split.ROW: 1}
    for name, param in model.named_parameters():
        dim = dims.get(layout.split_of(layout.to_global(name, pp_rank)))
        if dim is not None and not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, True, dim, 1)


def load_hf_weights(lm: MegatronLM, hf: Mapping[str, torch.Tensor]) -> None:
    """Load this rank's shard of HF weights (reads only this pipeline stage's HF tensors)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep = (parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size())
    state = stage_state_dicts(lm.layout, hf, parallel_state.get_pipeline_model_parallel_rank(), [tp_rank], ep)[tp_rank]
    load_rank_state(lm.model, state)


def build_policy(model_dir: str | Path, dtype: torch.dtype = torch.float32, **config_overrides: Any) -> MegatronLM:
    """The policy from an HF causal-LM directory (safetensors), this rank's shard loaded."""
    from transformers import AutoConfig

    lm = build_gpt(AutoConfig.from_pretrained(model_dir), "policy", dtype, **config_overrides)
    load_hf_weights(lm, HFWeights(model_dir))
    return lm


def forward_only(lm: MegatronLM, batch_size: int, seq_len: int,
                 run: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor | None:
    """One micro-batch through every pipeline stage, without autograd.

    ``run(model)`` calls the stage's GPTModel (inputs in the closure); the schedule passes the
    [seq_len, batch_size, hidden] activations between stages. Returns ``run``'s output on the
    last stage, None on the others.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(_data: Any, model: torch.nn.Module) -> tuple[torch.Tensor, None]:
        return run(model), None  # no loss function: the schedule collects the raw output

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([None]), model=[lm.model], num_microbatches=1,
            seq_length=seq_len, micro_batch_size=batch_size, forward_only=True,
        )  # fmt: skip
    return outputs[0] if parallel_state.is_pipeline_last_stage() else None


def full_logits(lm: MegatronLM, input_ids_BT: torch.Tensor) -> torch.Tensor | None:
    """Logits over the real vocabulary, gathered over TP, on the last stage. -> [B, T, vocab]

    Causal attention without a padding mask: rows must be right-padded (or unpadded); outputs
    at pad positions are meaningless. The padded vocabulary columns are cut here: their logits
    are not -inf (0 right after import), so a softmax over the sharded logits must mask them.
    """
    logits = forward_only(
        lm, *input_ids_BT.shape,
        lambda model: model(input_ids=input_ids_BT, position_ids=None, attention_mask=None, runtime_gather_output=True),
    )  # fmt: skip
    return None if logits is None else logits[..., : lm.layout.vocab_size]


def broadcast_from_last_stage(tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The last pipeline stage's ``tensor`` on every stage of this rank's pipeline."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        assert tensor is not None
        return tensor
    out = tensor.contiguous() if tensor is not None else torch.empty(shape, dtype=dtype, device=model_device())
    torch.distributed.broadcast(out, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())  # fmt: skip
    return out
