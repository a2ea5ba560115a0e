"""Training precision: megatron-core TransformerConfig kwargs for fp32 / bf16 / fp8, and a
pre-flight check that the machine can run the configured precision.

What stays out of fp8 (megatron-core 0.16.1):

* the embedding is ``LanguageModelEmbedding`` (megatron's own ``VocabParallelEmbedding``) and
  the lm_head ``GPTModel.output_layer`` a ``tensor_parallel.ColumnParallelLinear``: neither is
  a TE module, so both compute in the model dtype (bf16) whatever ``config.fp8`` says;
* ``TransformerBlock.forward`` enters TE's fp8 autocast itself (``get_fp8_context``) around
  its layers only: per layer for the scaling recipes without history (so
  ``first_last_layers_bf16`` can leave layers out), around the whole block for ``delayed``;
  callers need no fp8 context of their own;
* D's :class:`~gad_megatron.models.discriminator.ScalarHead` is a plain fp32 parameter and
  casts its input to fp32.

Optimizer: with bf16 params megatron keeps fp32 main params (``Float16OptimizerWithFloat16Params``
or ``DistributedOptimizer``; ``OptimizerConfig.main_params_dtype`` is fp32 unless the
precision-aware optimizer is enabled), so small updates are not rounded away. Pass
``OptimizerConfig(bf16=True)`` for bf16 and fp8 runs.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch

from gad_megatron.config import ConfigError

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp8"]
Fp8RecipeName = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]

GPU_EXTRA = "pip install -e '.[gpu]' on a CUDA machine"

# Per recipe: the transformer_engine.common.recipe class megatron builds, the least compute
# capability TE runs it on, and the least CUDA (TE's Float8BlockScaling GEMM needs 12.9).
RECIPE_NEEDS: dict[str, tuple[str, tuple[int, int], tuple[int, int]]] = {
    "delayed": ("DelayedScaling", (8, 9), (0, 0)),
    "tensorwise": ("Float8CurrentScaling", (8, 9), (0, 0)),
    "blockwise": ("Float8BlockScaling", (9, 0), (12, 9)),
    "mxfp8": ("MXFP8BlockScaling", (10, 0), (0, 0)),
}


# Transformer Engine 2.20 runs MXFP8 GEMMs on Blackwell datacenter GPUs (10.x) only.
MXFP8_MAX_CC = (12, 0)


def fp8_multiple(fp8_recipe: Fp8RecipeName) -> int:
    """What every FP8 GEMM dimension must be a multiple of: TE needs the token count divisible
    by 8 and the last dimension by 16 for the per-tensor and blockwise recipes, 32 and 32 for
    MXFP8. One number for both keeps the rule simple (16 covers 8)."""
    return 32 if fp8_recipe == "mxfp8" else 16


def fp8_shape_problems(hf_config: Any, tensor_parallel: int, fp8_recipe: Fp8RecipeName) -> list[str]:
    """Dimensions of this model's FP8 GEMMs (one TP rank's linear layers) that Transformer Engine
    would refuse at the first forward: ``"name = value"`` for each that is not a multiple of
    :func:`fp8_multiple`. Empty when the model can run in FP8 at this TP size."""
    m = fp8_multiple(fp8_recipe)
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    dims = {
        "hidden_size": hf_config.hidden_size,
        "query/key/value rows per TP rank ((heads + 2 kv_heads) x head_dim / TP)":
            (heads + 2 * kv_heads) * head_dim // tensor_parallel,
        "attention output columns per TP rank (heads x head_dim / TP)": heads * head_dim // tensor_parallel,
        "intermediate_size / TP": hf_config.intermediate_size // tensor_parallel,
    }  # fmt: skip
    return [f"{name} = {value}" for name, value in dims.items() if value % m]


def check_fp8_shapes(hf_config: Any, tensor_parallel: int, fp8_recipe: Fp8RecipeName, what: str) -> None:
    """:class:`ConfigError` (one line) when ``what``'s GEMMs cannot run in FP8 at this TP size."""
    problems = fp8_shape_problems(hf_config, tensor_parallel, fp8_recipe)
    if problems:
        raise ConfigError(f"parallel.precision: fp8 needs every GEMM dimension of {what} to be a multiple of "
                          f"{fp8_multiple(fp8_recipe)} ({fp8_recipe} recipe, TP={tensor_parallel}); not: "
                          f"{'; '.join(problems)}: use precision: bf16 or another tensor_parallel")  # fmt: skip


def precision_overrides(precision: Precision, fp8_recipe: Fp8RecipeName = "blockwise") -> dict[str, Any]:
    """TransformerConfig kwargs for ``precision`` (pass them as ``build_gpt(**config_overrides)``).

    fp8 keeps bf16 weights (``fp8_param=False``): TE quantizes them on the fly each step, so the
    optimizer, checkpoints and the weight hand-off to vLLM all see plain bf16 tensors.
    """
    if precision == "fp32":
        return dict(bf16=False, fp16=False, params_dtype=torch.float32, pipeline_dtype=torch.float32)
    bf16 = dict(bf16=True, fp16=False, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    if precision == "bf16":
        return bf16
    from megatron.core.enums import Fp8Recipe

    fp8: dict[str, Any] = dict(fp8_recipe=Fp8Recipe(fp8_recipe), fp8_param=False)
    if fp8_recipe == "delayed":
        # One scale per tensor from past amaxes: e5m2 gradients for their range, a long
        # "max" history against spikes (Megatron-LM's recommended delayed settings). Megatron
        # refuses first_last_layers_bf16 with this recipe.
        fp8.update(fp8="hybrid", fp8_margin=0, fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    else:
        # Scales from the current tensor: one per tensor (tensorwise) keeps e5m2 gradients for
        # their range (hybrid); per-block scales (blockwise, mxfp8) give e4m3 enough range
        # everywhere (NeMo-RL's setting).
        fp8["fp8"] = "hybrid" if fp8_recipe == "tensorwise" else "e4m3"
        # The first and last layers are the most sensitive to quantization error (RL recipes
        # keep them bf16); one each.
        fp8.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)
    return bf16 | fp8


def check_precision_supported(precision: Precision, fp8_recipe: Fp8RecipeName = "blockwise") -> None:
    """Raise :class:`ConfigError` (one line: what is missing, the fix) when this machine cannot run
    ``precision``; call it before any model is built. bf16 without native support only warns."""
    if precision == "bf16":
        if not _bf16_native():
            log.warning("parallel.precision: bf16 is not natively supported on this %s: it runs emulated (slow)",
                        "GPU" if torch.cuda.is_available() else "CPU")  # fmt: skip
        return
    if precision != "fp8":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"parallel.precision: fp8 needs Transformer Engine on a CUDA GPU ({GPU_EXTRA}); "
                          "this machine has no CUDA: use precision: bf16")  # fmt: skip
    try:
        import transformer_engine
        import transformer_engine.common.recipe as te_recipe
    except ImportError as err:
        raise ConfigError(f"parallel.precision: fp8 needs Transformer Engine, which does not import ({err}): "
                          f"{GPU_EXTRA}") from None  # fmt: skip
    recipe_class, min_cc, min_cuda = RECIPE_NEEDS[fp8_recipe]
    cc = torch.cuda.get_device_capability()
    if fp8_recipe == "mxfp8" and cc >= MXFP8_MAX_CC:
        raise ConfigError(f"parallel.fp8_recipe: mxfp8 runs on compute capability 10.x only; "
                          f"{torch.cuda.get_device_name()} is {cc[0]}.{cc[1]} (Transformer Engine 2.20 has no "
                          "MXFP8 GEMM for it): use fp8_recipe: blockwise or tensorwise")  # fmt: skip
    if cc < min_cc:
        raise ConfigError(f"parallel.fp8_recipe: {fp8_recipe} needs a GPU of compute capability >= "
                          f"{min_cc[0]}.{min_cc[1]}; {torch.cuda.get_device_name()} is {cc[0]}.{cc[1]}: "
                          + ("use fp8_recipe: tensorwise" if cc >= (8, 9) else "use precision: bf16"))  # fmt: skip
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    if cuda < min_cuda:
        raise ConfigError(f"parallel.fp8_recipe: {fp8_recipe} needs CUDA >= {min_cuda[0]}.{min_cuda[1]}; torch "
                          f"is built with CUDA {torch.version.cuda}: install a newer torch or use fp8_recipe: "
                          "tensorwise")  # fmt: skip
    if not hasattr(te_recipe, recipe_class):
        version = getattr(transformer_engine, "__version__", "?")
        raise ConfigError(f"parallel.fp8_recipe: {fp8_recipe} needs transformer_engine.common.recipe."
                          f"{recipe_class}, missing in Transformer Engine {version}: {GPU_EXTRA} "
                          "(pins transformer-engine~=2.20.0)")  # fmt: skip


def _bf16_native() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # oneDNN's check for AVX512-BF16 / AMX; without them CPU bf16 GEMMs are emulated.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
