"""``gad plan``: the parallel layout and a per-GPU memory estimate, before any GPU is asked for.

    gad plan --config examples/qwen2.5-7b/gad.yaml --nodes 1 --gpus-per-node 8

The generator G is ``student``; the discriminator D is ``train.discriminator`` or the student
again. Shapes come from the HF config (a local directory, the HF cache, a built-in table of
the preset models, then the hub), so the planner works offline for the presets.

Memory model, per GPU, for the pipeline stage that needs the most (every stage is costed):

* model states (Megatron-LM ``docs/.../distrib_optimizer.md``, "bytes per parameter"): weights
  in the training precision, fp32 main gradients (Megatron DDP accumulates in fp32), Adam as
  fp32 master + 2 fp32 moments (the master is the weight itself in fp32), the optimizer part
  divided by DP with the distributed optimizer: bf16 = 18 bytes/param, or 6 + 12/DP.
* activations (flash attention, no sequence parallelism: D refuses it), after
  Korthikanti et al. 2022 "Reducing Activation Recomputation", section 4, for SwiGLU + GQA
  without dropout, bytes per token per layer in bf16:
  ``8h`` replicated (both norms' inputs and outputs) + ``(4 q_dim + 4 kv_dim + 6 ffn) / TP``
  (Q, K, V, attention output, gate+up, SwiGLU output; q_dim = heads x head_dim, which is h
  except in Qwen3), and with q/k norms their inputs, ``2 (q_dim + kv_dim) / TP``. With the 1F1B schedule the first stage
  keeps PP micro-batches in flight, so every stage holds about all L layers' worth of one
  micro-batch (Korthikanti et al., 4.2). ``parallel.recompute_activations: full`` keeps only
  each layer's bf16 input (``2h``) plus one layer's activations, rebuilt in its backward;
  ``selective`` frees the attention scores, which flash attention never keeps: costed as none.
* G's logits: bf16 [tokens, vocab/TP] and their gradient (loss.py works in fp32 on chunks only).
* mixture of experts (Qwen3-MoE): each GPU holds ``experts / EP`` of every layer's experts
  (cut over TP as well) and the whole replicated router; expert gradients are reduced over
  expert-data-parallel ranks (DP / EP), so the distributed optimizer shards expert states over
  DP / EP only. Activations per token: the top-k experts' SwiGLU (``6 k moe_ffn``) and the
  dispatched copies of the token into and out of them (``4 k h``), instead of a dense FFN.
* the colocated vLLM engine (while awake; it sleeps during training): G in bf16 over the
  rollout TP, the rest of ``rollout_gpu_memory_utilization`` x GPU memory is KV cache.
* a fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation.

Peak = model states + max(training: activations + logits, rollout: the engine) + allowance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gad_megatron.config import ConfigError, ParallelConfig, RunConfig
from gad_megatron.models.families import FAMILIES

GIB = 1024**3
OVERHEAD_BYTES = 3 * GIB  # CUDA context ~0.5, NCCL communicators ~1, allocator fragmentation ~1.5 GiB
VOCAB_DIVISIBLE_BY = 128  # Megatron pads the vocabulary to a multiple of 128 x TP (never refused)

# HF config values of the preset models (their config.json on the hub), for offline planning.
_QWEN = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True)
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-3b": {**_QWEN, "num_hidden_layers": 36, "hidden_size": 2048, "num_attention_heads": 16,
                   "num_key_value_heads": 2, "intermediate_size": 11008},
    "qwen2.5-7b": {**_QWEN, "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "tie_word_embeddings": False},
    "qwen2.5-14b": {**_QWEN, "num_hidden_layers": 48, "hidden_size": 5120, "num_attention_heads": 40,
                    "num_key_value_heads": 8, "intermediate_size": 13824, "vocab_size": 152064,
                    "tie_word_embeddings": False},
    "llama-3.2-3b": {"model_type": "llama", "num_hidden_layers": 28, "hidden_size": 3072, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "llama-3.1-8b": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                     "tie_word_embeddings": False},
    # Qwen3 dense: head_dim 128 is not hidden / heads (4B: 2560 / 32 = 80).
    "qwen3-4b": {"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 2560, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936,
                 "tie_word_embeddings": True},
    "qwen3-8b": {"model_type": "qwen3", "num_hidden_layers": 36, "hidden_size": 4096, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
                 "tie_word_embeddings": False},
    # Qwen3-MoE: 128 experts of FFN 768, top-8 (30.5B parameters, 3.3B active).
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                      "vocab_size": 151936, "tie_word_embeddings": False},
    "smollm2-135m": {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                     "tie_word_embeddings": True},
}  # fmt: skip


class PlanError(ConfigError):
    """The layout does not divide or does not fit (one line; the CLI exits 2)."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs from an HF config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool = False  # a [head_dim] RMSNorm weight each for queries and keys, per layer
    experts: int = 0  # MoE: experts per layer (0: dense FFN of size ``ffn``)
    top_k: int = 0
    moe_ffn: int = 0

    @classmethod
    def from_hf(cls, config: Any) -> "ModelShape":
        if isinstance(config, dict):
            config = SimpleNamespace(**config)
        heads = config.num_attention_heads
        family = next((f for f in FAMILIES if getattr(config, "model_type", None) in f.model_types), None)
        return cls(
            layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            ffn=config.intermediate_size, vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(family and family.qkv_bias), qk_norm=bool(family and family.qk_norm),
            experts=getattr(config, "num_experts", 0) if family and family.moe else 0,
            top_k=getattr(config, "num_experts_per_tok", 0), moe_ffn=getattr(config, "moe_intermediate_size", 0),
        )  # fmt: skip


def _known_key(spec: str) -> str:
    name = spec.rstrip("/").split("/")[-1].lower().removeprefix("meta-")
    return name.removesuffix("-instruct")


def load_shape(spec: str, trust_remote_code: bool = False) -> ModelShape:
    """A model's shape: local HF dir, else the HF cache, else the built-in table, else the hub."""
    from transformers import AutoConfig

    if Path(spec).expanduser().is_dir():
        return ModelShape.from_hf(AutoConfig.from_pretrained(Path(spec).expanduser(), trust_remote_code=trust_remote_code))
    try:  # the HF cache first: exact for any model downloaded before, and no network
        return ModelShape.from_hf(AutoConfig.from_pretrained(spec, local_files_only=True, trust_remote_code=trust_remote_code))
    except (OSError, ValueError):
        pass
    if _known_key(spec) in KNOWN_MODELS:
        return ModelShape.from_hf(KNOWN_MODELS[_known_key(spec)])
    try:
        return ModelShape.from_hf(AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code))
    except (OSError, ValueError) as err:
        known = ", ".join(KNOWN_MODELS)
        raise PlanError(f"cannot read the HF config of {spec!r} ({type(err).__name__}); "
                        f"offline, the planner knows: {known}") from None


def padded_vocab(vocab: int, tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return -(-vocab // multiple) * multiple


def expert_params(shape: ModelShape, tp: int, pp: int, ep: int) -> int:
    """Expert weights on one GPU of any stage (MoE; 0 for a dense model)."""
    return shape.layers // pp * shape.experts // ep * 3 * shape.hidden * shape.moe_ffn // tp


def stage_params(shape: ModelShape, role: str, tp: int, pp: int, stage: int, ep: int = 1) -> tuple[int, int]:
    """Parameters on one GPU of pipeline stage ``stage``: (linear weights of the layers, experts
    included, the rest). The split would matter for fp8 with fp8 weights (``fp8_param``), which
    we do not use.
    """
    h, q_dim, kv_dim = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    layers = shape.layers // pp
    mlp = 0 if shape.experts else 3 * h * shape.ffn
    linear = layers * (h * (q_dim + 2 * kv_dim) + q_dim * h + mlp) // tp + expert_params(shape, tp, pp, ep)
    norms = 2 * h + (2 * shape.head_dim if shape.qk_norm else 0) + shape.experts * h  # replicated (router too)
    other = layers * (norms + ((q_dim + 2 * kv_dim) // tp if shape.qkv_bias else 0))  # bias split
    embedding = padded_vocab(shape.vocab, tp) * h // tp
    if stage == 0:
        other += embedding
    if stage == pp - 1:
        other += h  # final norm
        if role == "discriminator":
            other += h  # scalar head [1, h], replicated
        elif not shape.tied or pp > 1:  # tied with PP > 1: the last stage keeps its own copy
            other += embedding
    return linear, other


def state_bytes(shape: ModelShape, role: str, parallel: ParallelConfig, dp: int, stage: int,
                trained: bool = True) -> dict[str, int]:
    """Weights, fp32 main gradients and Adam states of one model on one GPU of ``stage``."""
    tp, pp, ep = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.expert_parallel
    ep = ep if shape.experts else 1  # a dense model's EP ranks are data-parallel ranks
    linear, other = stage_params(shape, role, tp, pp, stage, ep)
    # fp8 computes in fp8 but keeps bf16 weights (models/precision.py: fp8_param=False), so the
    # optimizer, checkpoints and the hand-off to vLLM see plain tensors.
    linear_bytes = {"fp32": 4, "bf16": 2, "fp8": 2}[parallel.precision]
    other_bytes = 4 if parallel.precision == "fp32" else 2  # embeddings, norms, heads never go fp8
    out = {"weights": linear * linear_bytes + other * other_bytes}
    if trained:
        params, experts = linear + other, expert_params(shape, tp, pp, ep)
        # fp32 training: the parameter is its own master copy, only the two moments are extra.
        per_param = 8 if parallel.precision == "fp32" else 12
        out["grads"] = params * 4
        if parallel.distributed_optimizer:  # expert states shard over the expert-data-parallel ranks
            out["optimizer"] = (params - experts) * per_param // dp + experts * per_param // (dp // ep)
        else:
            out["optimizer"] = params * per_param
    return out


def activation_bytes(shape: ModelShape, parallel: ParallelConfig, with_logits: bool) -> dict[str, int]:
    """Activations of one micro-batch of ``micro_batch_tokens`` (see the module docstring)."""
    h, tp, tokens = shape.hidden, parallel.tensor_parallel, parallel.micro_batch_tokens
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    ffn = 6 * shape.top_k * shape.moe_ffn if shape.experts else 6 * shape.ffn
    split = 4 * q_dim + 4 * kv_dim + ffn + (2 * (q_dim + kv_dim) if shape.qk_norm else 0)
    per_token_layer = 8 * h + split // tp + (4 * shape.top_k * h if shape.experts else 0)
    if parallel.recompute_activations == "full":
        per_token = 2 * h * shape.layers + per_token_layer
    else:
        per_token = per_token_layer * shape.layers
    scale = 2 if parallel.precision == "fp32" else 1
    out = {"activations": tokens * per_token * scale}
    if with_logits:
        out["logits"] = tokens * padded_vocab(shape.vocab, tp) // tp * 4 * scale
    return out


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    rollout_tp: int
    rollout_replicas: int
    ep: int = 1


def make_layout(parallel: ParallelConfig, nodes: int, gpus_per_node: int, shapes: list[ModelShape]) -> Layout:
    """Check that the layout divides; PlanError names the first thing that does not."""
    tp, pp, rtp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.rollout_tensor_parallel
    ep, world = parallel.expert_parallel, nodes * gpus_per_node
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"need at least one node and one GPU per node (got {nodes} x {gpus_per_node})")
    if world % (tp * pp):
        raise PlanError(f"world size {world} is not a multiple of TP x PP = {tp} x {pp}")
    if world % (tp * ep * pp):
        raise PlanError(f"world size {world} is not a multiple of TP x EP x PP = {tp} x {ep} x {pp}")
    if gpus_per_node % rtp:
        raise PlanError(f"rollout_tensor_parallel={rtp} does not divide the {gpus_per_node} GPUs of a node")
    for shape in shapes:
        for what, count, size in (("attention heads", shape.heads, tp), ("KV heads", shape.kv_heads, tp),
                                  ("FFN size", shape.ffn, tp), ("layers", shape.layers, pp)):  # fmt: skip
            if count % size:
                raise PlanError(f"{'PP' if what == 'layers' else 'TP'}={size} does not divide the {count} {what}")
        if shape.experts and shape.experts % ep:
            raise PlanError(f"EP={ep} does not divide the {shape.experts} experts")
        if shape.experts and tp > 1:
            raise PlanError(f"TP={tp} with a mixture-of-experts model needs sequence parallelism, which the trainer "
                            "does not use: split its experts with parallel.expert_parallel instead")  # fmt: skip
        if shape.heads % rtp or shape.kv_heads % rtp:
            raise PlanError(f"rollout_tensor_parallel={rtp} does not divide the {shape.heads} heads "
                            f"/ {shape.kv_heads} KV heads")
    return Layout(nodes, gpus_per_node, tp, pp, world // (tp * pp), rtp, world // rtp, ep)


@dataclass
class Plan:
    layout: Layout
    stage: str
    worst_stage: int
    rows: list[tuple[str, int]]  # per GPU, the pipeline stage that needs the most
    training_peak: int
    rollout_peak: int
    gpu_bytes: int
    kv_cache_tokens: int | None

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.rollout_peak)


Rows = list[tuple[str, int]]


def _stage_rows(cfg: RunConfig, g: ModelShape, d: ModelShape, layout: Layout, stage: int) -> tuple[Rows, Rows]:
    """(model states, training working memory) of one GPU of ``stage``."""
    par, train = cfg.parallel, cfg.train
    models = [("G", g, "policy", True)]
    if train.stage != "seqkd":
        models.append(("D", d, "discriminator", not train.freeze_discriminator))
    if train.stage == "gad" and train.beta > 0:
        models.append(("reference G", g, "policy", False))  # the KL term's frozen copy
    states = [(f"{name} {kind}", size) for name, shape, role, trained in models
              for kind, size in state_bytes(shape, role, par, layout.dp, stage, trained).items()]  # fmt: skip
    g_act = activation_bytes(g, par, with_logits=True)
    d_act = activation_bytes(d, par, with_logits=False)["activations"] if train.stage != "seqkd" else 0
    # G and D never run forward/backward at the same time: the larger of the two counts.
    work = [("activations (max of G, D)", max(g_act["activations"], d_act)), ("G logits + grad (bf16)", g_act["logits"])]
    return states, work


def plan(cfg: RunConfig, nodes: int, gpus_per_node: int, gpu_memory_gib: float = 80.0) -> Plan:
    """The layout and the per-GPU estimate; PlanError when it does not divide (see :func:`refusal` for fit)."""
    g = load_shape(cfg.student, cfg.trust_remote_code)
    d = load_shape(cfg.train.discriminator, cfg.trust_remote_code) if cfg.train.discriminator else g
    layout = make_layout(cfg.parallel, nodes, gpus_per_node, [g, d])
    gpu_bytes = int(gpu_memory_gib * GIB)
    uses_engine = cfg.train.stage != "seqkd" and cfg.train.use_vllm
    engine: Rows = []
    kv_tokens = None
    if uses_engine:
        engine_weights = 2 * sum(stage_params(g, "policy", 1, 1, 0)) // layout.rollout_tp
        kv_cache = int(cfg.parallel.rollout_gpu_memory_utilization * gpu_bytes) - engine_weights
        kv_tokens = max(kv_cache, 0) // (2 * 2 * g.layers * g.kv_heads * g.head_dim // layout.rollout_tp)
        engine = [("vLLM weights (bf16, awake)", engine_weights), ("vLLM KV cache (awake)", max(kv_cache, 0))]
    overhead = [("CUDA context, NCCL, fragmentation", OVERHEAD_BYTES)]
    plans = []
    for stage in range(layout.pp):
        states, work = _stage_rows(cfg, g, d, layout, stage)
        base = sum(size for _, size in states + overhead)
        training, rollout = base + sum(size for _, size in work), base + sum(size for _, size in engine)
        plans.append(Plan(layout, cfg.train.stage, stage, states + work + engine + overhead,
                          training, rollout, gpu_bytes, kv_tokens))  # fmt: skip
    return max(plans, key=lambda p: p.peak)


def refusal(plan_: Plan, cfg: RunConfig) -> str | None:
    """Why the plan cannot run, or None."""
    longest = cfg.data.max_prompt_length + cfg.train.max_response_length
    if plan_.kv_cache_tokens is not None and plan_.kv_cache_tokens < longest:
        return (f"rollout_gpu_memory_utilization={cfg.parallel.rollout_gpu_memory_utilization} leaves KV cache for "
                f"{plan_.kv_cache_tokens} tokens, less than one {longest}-token sequence: raise it or rollout_tensor_parallel")
    if plan_.peak > plan_.gpu_bytes:
        phase = "training" if plan_.training_peak >= plan_.rollout_peak else "rollout"
        return (f"needs {plan_.peak / GIB:.1f} GiB per GPU at {phase} peak (stage {plan_.worst_stage}), more than "
                f"{plan_.gpu_bytes / GIB:.0f} GiB: raise TP/PP, add nodes (DP shards the optimizer), "
                "lower micro_batch_tokens or rollout_gpu_memory_utilization")
    return None


def format_plan(plan_: Plan, cfg: RunConfig) -> str:
    lay = plan_.layout
    lines = [
        f"stage {plan_.stage}: {lay.nodes} node(s) x {lay.gpus_per_node} GPUs = {lay.nodes * lay.gpus_per_node}",
        f"layout: TP={lay.tp} PP={lay.pp} DP={lay.dp}" + (f" (EP={lay.ep} of it)" if lay.ep > 1 else "")
        + f"; vLLM TP={lay.rollout_tp} x {lay.rollout_replicas} replicas",
        f"precision {cfg.parallel.precision}"
        + (f" ({cfg.parallel.fp8_recipe})" if cfg.parallel.precision == "fp8" else "")
        + f", distributed optimizer {'on' if cfg.parallel.distributed_optimizer else 'off'}, "
        f"{cfg.parallel.micro_batch_tokens} tokens per micro-batch",
        f"per-GPU memory, pipeline stage {plan_.worst_stage} (the largest):",
    ]
    lines += [f"  {name:<36} {size / GIB:8.2f} GiB" for name, size in plan_.rows]
    lines.append(f"  {'training peak':<36} {plan_.training_peak / GIB:8.2f} GiB")
    if plan_.kv_cache_tokens is not None:
        kv = f"(KV cache: {plan_.kv_cache_tokens} tokens per engine)"
        lines.append(f"  {'rollout peak':<36} {plan_.rollout_peak / GIB:8.2f} GiB  {kv}")
    lines.append(f"  {'GPU memory':<36} {plan_.gpu_bytes / GIB:8.2f} GiB")
    return "\n".join(lines)


def run_plan(cfg: RunConfig, nodes: int, gpus_per_node: int, gpu_memory_gib: float = 80.0) -> int:
    """Print the plan; PlanError (exit 2) with one line when it cannot run."""
    result = plan(cfg, nodes, gpus_per_node, gpu_memory_gib)
    print(format_plan(result, cfg))
    reason = refusal(result, cfg)
    if reason:
        raise PlanError(reason)
    print("fits")
    return 0
