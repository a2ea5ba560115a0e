"""The transformers inference engine: rollouts on CPU, and a fallback wherever vLLM is missing.

It runs its own sampling loop over the model's KV cache instead of ``model.generate`` so that
the returned log-probs are exactly the distribution each token was drawn from, and so that the
randomness comes from local ``torch.Generator``s, one per completion: a seed reproduces the
completions whatever else used the global RNG in the process or shares the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from gad_megatron.models.moe import per_expert_views
from gad_megatron.rollout.engine import Completion, FinishReason, SamplingParams, mixed_seed

__all__ = ["TransformersEngine", "cache_keyword"]


def cache_keyword(model: Any) -> str:
    """The forward's KV-cache keyword: transformers 5.2x renamed ``past_key_values`` to ``cache``.
    An unknown keyword would vanish into ``**kwargs`` and silently disable the cache, so ask the signature."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TransformersEngine:
    """``InferenceEngine`` over a transformers causal LM, on whatever device the model sits on.

    ``max_batch_size`` bounds the rows (prompts x ``n``) decoded together, hence the KV cache.
    """

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 64) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self._cache_kwarg = cache_keyword(model)
        # Set while weights are half-loaded (a failed update) or never loaded (from_config).
        self._weights_invalid = False

    @classmethod
    def from_pretrained(
        cls, spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        trust_remote_code: bool = False, max_batch_size: int = 64,
    ) -> TransformersEngine:
        """Model and tokenizer from a spec ``load_causal_lm`` accepts (HF dir, hub id, .gguf, alias)."""
        from gad_megatron.models.sources import load_causal_lm, load_tokenizer

        model = load_causal_lm(spec, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
        return cls(model, load_tokenizer(spec, trust_remote_code=trust_remote_code), max_batch_size)

    @classmethod
    def from_config(
        cls, config: Any, tokenizer: Any, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
        trust_remote_code: bool = False, max_batch_size: int = 64,
    ) -> TransformersEngine:
        """An engine whose weights must come from ``update_weights`` before the first ``generate``."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        engine = cls(model.to(device), tokenizer, max_batch_size)
        engine._weights_invalid = True
        return engine

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named full tensors into the existing parameters, in place, one tensor at a time.

        Dtype and device are converted on copy (e.g. fp32 trainer -> bf16 engine). Tied parameters
        (``lm_head.weight`` is ``model.embed_tokens.weight``) are one parameter under several names:
        any one name loads it, and a second name must carry the same values. An unknown name, a
        wrong shape, a name sent twice, or (after the stream ends) a parameter never received
        raises ``ValueError`` naming the tensor; ``generate`` then refuses to run on the
        half-loaded weights until an update succeeds.
        """
        # MoE experts arrive one by one (checkpoint names): views into transformers' stacked tensors.
        by_name = per_expert_views(dict(self.model.named_parameters(remove_duplicate=False)))
        aliases: dict[int, list[str]] = {}
        for name, param in by_name.items():
            aliases.setdefault(id(param), []).append(name)
        received: set[str] = set()
        loaded: set[int] = set()
        self._weights_invalid = True
        for name, tensor in weights:
            param = by_name.get(name)
            if param is None:
                raise ValueError(f"update_weights: unknown tensor '{name}': not a parameter of {type(self.model).__name__}")
            if tensor.shape != param.shape:
                raise ValueError(
                    f"update_weights: tensor '{name}' has shape {tuple(tensor.shape)}, the engine expects {tuple(param.shape)}"
                )
            if name in received:
                raise ValueError(f"update_weights: tensor '{name}' received twice")
            received.add(name)
            if id(param) in loaded:
                if not torch.equal(param, tensor.to(param.device, param.dtype)):
                    raise ValueError(
                        f"update_weights: tensor '{name}' is tied to {aliases[id(param)]} in the engine but its values differ"
                    )
                continue
            param.copy_(tensor)
            loaded.add(id(param))
        missing = [" = ".join(names) for pid, names in aliases.items() if pid not in loaded]
        if missing:
            raise ValueError(f"update_weights: {len(missing)} parameter(s) never received: {', '.join(missing[:8])}")
        self._weights_invalid = False

    # --------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """``sampling.n`` completions per prompt, grouped by prompt in prompt order."""
        sampling.check(prompt_token_ids)
        if self._weights_invalid:
            raise RuntimeError("generate: the engine holds no valid weights (none loaded yet, a failed update_weights, "
                               "or sleep(keep_weights=False) since the last update)")  # fmt: skip
        rows = [ids for ids in prompt_token_ids for _ in range(sampling.n)]
        generators = [_row_generator(self.device, sampling.seed_of(i // sampling.n), i % sampling.n)
                      for i in range(len(rows))]  # fmt: skip
        results: list[tuple[list[int], list[float], FinishReason]] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = slice(start, start + self.max_batch_size)
            results += self._decode(rows[chunk], sampling, generators[chunk])
        return [
            Completion(
                prompt_index=i // sampling.n,
                token_ids=ids,
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                logprobs=logprobs,
                finish_reason=reason,
            )
            for i, (ids, logprobs, reason) in enumerate(results)
        ]

    def _decode(
        self, prompts: list[list[int]], sampling: SamplingParams, generators: list[torch.Generator]
    ) -> list[tuple[list[int], list[float], FinishReason]]:
        """Sample one completion per prompt, ``generators[i]`` drawing prompt i's tokens: prefill
        the left-padded batch, then one token per step."""
        from transformers import DynamicCache

        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id or 0  # masked out, so any id does
        input_ids_BT = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask_BT = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        # Positions count real tokens only, so a left-padded prompt sees the same RoPE angles as alone.
        positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        reasons: list[FinishReason] = ["length"] * len(prompts)
        rows_B = torch.arange(len(prompts), device=self.device)  # prompt row of each live batch row
        for step in range(sampling.max_tokens):
            out = self.model(
                input_ids=input_ids_BT, attention_mask=mask_BT, position_ids=positions_BT,
                use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache},
            )
            token_B, logprob_B = _sample(out.logits[:, -1].float(), sampling, [generators[r] for r in rows_B.tolist()])
            stopped_B = torch.isin(token_B, stop_ids)
            for row, token, logprob, stopped in zip(rows_B.tolist(), token_B.tolist(), logprob_B.tolist(), stopped_B.tolist()):
                tokens[row].append(token)
                logprobs[row].append(logprob)
                if stopped:
                    reasons[row] = "stop"
            if stopped_B.all() or step == sampling.max_tokens - 1:
                break
            if stopped_B.any():  # finished rows leave the batch instead of decoding padding
                live_B = (~stopped_B).nonzero().squeeze(1)
                cache.batch_select_indices(live_B)
                rows_B, token_B, mask_BT, positions_BT = rows_B[live_B], token_B[live_B], mask_BT[live_B], positions_BT[live_B]
            input_ids_BT = token_B[:, None]
            mask_BT = torch.cat([mask_BT, mask_BT.new_ones(len(rows_B), 1)], dim=1)
            positions_BT = positions_BT[:, -1:] + 1
        return list(zip(tokens, logprobs, reasons))

    # ---------------------------------------------------------------- memory

    def sleep(self, keep_weights: bool = True) -> None:
        """The KV cache only lives inside ``generate``, and the weights stay in memory (a model
        small enough for this engine does not need it back). ``keep_weights=False`` still holds
        the caller to its promise, as vLLM's level-2 sleep does: ``generate`` refuses until the
        next ``update_weights``."""
        if not keep_weights:
            self._weights_invalid = True

    def wake(self) -> None:
        """No-op, see ``sleep``."""


def _row_generator(device: torch.device | str, seed: int | None, sample: int) -> torch.Generator:
    """The generator of one completion: sample ``sample`` of a prompt whose completions are
    seeded by ``seed`` (None: a random seed)."""
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(mixed_seed(seed, sample))
    return generator


def _sample(
    logits_BV: torch.Tensor, sampling: SamplingParams, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token ``token_B`` and its log-prob ``logprob_B`` under ``log_softmax(logits / T)``
    (T = 1 when greedy), taken before top-p truncation as the trainer recomputes it. Row b draws
    from ``generators[b]`` alone, so a completion does not depend on the rest of the batch."""
    if sampling.temperature == 0:
        logp_BV = logits_BV.log_softmax(-1)
        token_B = logits_BV.argmax(-1)
    else:
        logp_BV = (logits_BV / sampling.temperature).log_softmax(-1)
        probs_BV = logp_BV.exp()
        if sampling.top_p < 1:
            probs_BV = _top_p(probs_BV, sampling.top_p)
        token_B = _draw(probs_BV, generators)
    return token_B, logp_BV.gather(-1, token_B[:, None]).squeeze(1)


def _draw(probs_BV: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Inverse-CDF draw of ``token_B`` from unnormalised ``probs_BV``: one uniform per row from
    that row's generator, then one ``searchsorted`` over the batch's cumulative masses."""
    cdf_BV = probs_BV.cumsum(-1)
    u_B = torch.cat([torch.rand(1, generator=g, device=probs_BV.device, dtype=cdf_BV.dtype) for g in generators])
    token_B = torch.searchsorted(cdf_BV, (u_B * cdf_BV[:, -1])[:, None], right=True).squeeze(1)
    # u * total can round up to total: fall back to the row's last token with mass
    last_B = probs_BV.shape[-1] - 1 - (probs_BV > 0).flip(-1).int().argmax(-1)
    return torch.minimum(token_B, last_B)


def _top_p(probs_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches ``top_p``
    (the most likely token always stays); ``_draw`` renormalises."""
    sorted_BV, order_BV = probs_BV.sort(-1, descending=True)
    outside_BV = sorted_BV.cumsum(-1) - sorted_BV >= top_p
    return torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV.masked_fill(outside_BV, 0.0))
