"""The vLLM inference engine: rollouts on GPUs, colocated with the trainer in its torchrun/srun ranks.

Every rank builds one ``VLLMEngine``. vLLM runs inside the rank's own process
(``distributed_executor_backend="external_launcher"``), so its worker, model and weights share the
trainer's CUDA context. Consecutive groups of ``tensor_parallel_size`` ranks form one vLLM replica
(its TP may differ from the trainer's): every rank of a replica must call ``generate`` with the same
prompts and sampling, and ``replica`` says which share of the prompts a rank's replica takes.

Weights: the model is built with ``load_format="dummy"``; real weights only arrive through
``update_weights``, which runs vLLM's own ``model.load_weights`` inside the worker through
``LLM.collective_rpc``. With the external launcher that call is a plain in-process function call
(no pickling, no host copy), and vLLM's loaders shard the full HF tensors over its TP ranks and
fuse q/k/v and gate/up themselves.

Memory: ``sleep`` frees the weights and KV cache (vLLM sleep mode); ``update_weights`` wakes the
weights only, and ``generate`` then wakes the KV cache, so the cache is not allocated while the
trainer's weight stream is still alive.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, vLLM's log-softmax of the
logits after temperature and top-k/top-p (raw logits when greedy). With top_p = 1 and no top-k that
is exactly ``Completion.logprobs``; vLLM has no mode for "after temperature, before top-p", so
``generate`` refuses top_p < 1 rather than return a different quantity.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from typing import Any

import torch

from gad_megatron.config import ConfigError
from gad_megatron.rollout.engine import Completion, SamplingParams

__all__ = ["VLLMEngine", "VLLM_MISSING"]

VLLM_MISSING = 'vLLM is needed for `rollout.engine: vllm`: install the `gpu` extra (pip install -e ".[gpu]")'
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


def _load_weights(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Run inside vLLM's worker: load the stream through the model's own loaders; return the names of
    the parameters it never reached (a partial stream would otherwise leave dummy weights behind)."""
    model = worker.model_runner.get_model()
    with torch.no_grad():
        loaded = model.load_weights((name, tensor.detach()) for name, tensor in weights)
    return sorted({name for name, _ in model.named_parameters()} - loaded)


def _check(prompt_token_ids: list[list[int]], sampling: SamplingParams) -> None:
    if sampling.max_tokens < 1 or sampling.n < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
        raise ValueError(f"invalid sampling parameters: {sampling}")
    if sampling.top_p < 1 and sampling.temperature > 0:
        raise ValueError(
            f"top_p={sampling.top_p}: the vLLM engine returns log-probs before top-p truncation only at top_p=1"
        )
    for i, ids in enumerate(prompt_token_ids):
        if not ids:
            raise ValueError(f"generate: prompt {i} is empty")


class VLLMEngine:
    """``InferenceEngine`` over an in-process vLLM ``LLM`` (GPU only).

    ``model`` is a spec ``resolve_model_path`` accepts (only its config is read: weights come from
    ``update_weights``); ``tokenizer`` decodes completions, loaded from ``model`` when not given.
    ``sleep_level`` 1 keeps a host copy of the weights while asleep; 2 drops them, cheaper when every
    wake is followed by a full ``update_weights`` (the trainer's loop).
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
        enforce_eager: bool = False,
        sleep_level: int = 1,
    ) -> None:
        from gad_megatron.models.sources import load_tokenizer, resolve_model_path

        vllm = _import_vllm()
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, not {sleep_level}")
        rank, world = _export_launch_env()
        if world % tensor_parallel_size:
            raise ConfigError(f"vLLM tensor parallel size {tensor_parallel_size} does not divide the {world} ranks")
        # (index, count) of this rank's vLLM replica: the trainer shards the prompts by it.
        self.replica = (rank // tensor_parallel_size, world // tensor_parallel_size)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        self._vllm = vllm
        self._sleep_level = sleep_level
        self._asleep: set[str] = set()
        self._weights_loaded = False
        self._llm = vllm.LLM(
            model=resolve_model_path(model),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            skip_tokenizer_init=True,  # token ids in and out; text is decoded with our tokenizer
            max_model_len=max_model_len,
            load_format="dummy",
            distributed_executor_backend="external_launcher",
            enable_sleep_mode=True,
            logprobs_mode=LOGPROBS_MODE,
        )

    # ------------------------------------------------------------------ weights

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors (any device and dtype) into vLLM's model, in place.

        An unknown name raises from vLLM's loader; a parameter never received raises ``ValueError``.
        Either way ``generate`` refuses to run until an update succeeds.
        """
        self.wake_weights()
        self._weights_loaded = False
        missing = self._llm.collective_rpc(_load_weights, args=(weights,))[0]
        if missing:
            raise ValueError(f"update_weights: {len(missing)} parameter(s) never received: {', '.join(missing[:8])}")
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
            raise RuntimeError("generate: the engine's weights are not loaded (no successful update_weights yet)")
        self.wake()
        # vLLM refuses n > 1 with greedy decoding: send each prompt n times instead.
        per_request = 1 if sampling.temperature == 0 else sampling.n
        repeats = sampling.n // per_request
        params = self._vllm.SamplingParams(
            n=per_request,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=True,
            seed=sampling.seed,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,
        )
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

    def sleep(self) -> None:
        """Free the weights and the KV cache for the trainer (a host copy of the weights at level 1)."""
        if "weights" not in self._asleep:
            self._llm.sleep(level=self._sleep_level)
            self._asleep = {"weights", "kv_cache"}

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
