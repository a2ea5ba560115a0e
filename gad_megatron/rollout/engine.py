"""The inference-engine interface every rollout engine implements.

An engine generates completions for chat prompts already rendered to token ids, and takes new
weights as a stream of ``(hf_name, full tensor)`` pairs from the resharding layer. Colocated
engines free their memory with ``sleep()`` while the trainer runs and get it back with
``wake()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy decoding.

    ``stop_token_ids`` end a completion (the chat template's end-of-turn, the tokenizer's eos);
    the stop token is kept in ``token_ids``. ``seed`` makes sampling reproducible: the same
    prompts, weights and seed give the same completions. ``prompt_seeds`` (one per prompt, in
    place of ``seed``) make each prompt's completions depend on its own seed alone, not on the
    other prompts of the call: any split of a batch over engine replicas samples the same.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    prompt_seeds: tuple[int, ...] | None = None

    def check(self, prompt_token_ids: list[list[int]]) -> None:
        """Refuse parameters no engine honours, an empty prompt, or ``prompt_seeds`` of another length."""
        if self.max_tokens < 1 or self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling parameters: {self}")
        if self.prompt_seeds is not None and len(self.prompt_seeds) != len(prompt_token_ids):
            raise ValueError(f"generate: {len(self.prompt_seeds)} prompt seeds for {len(prompt_token_ids)} prompts")
        for i, ids in enumerate(prompt_token_ids):
            if not ids:
                raise ValueError(f"generate: prompt {i} is empty")

    def seed_of(self, prompt: int) -> int | None:
        """The seed of prompt ``prompt``'s completions: its own, else one derived from the call's
        seed and the prompt's position (None: unseeded)."""
        if self.prompt_seeds is not None:
            return self.prompt_seeds[prompt]
        return None if self.seed is None else mixed_seed(self.seed, prompt)


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes; different parts give unrelated seeds."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class Completion:
    """One sampled response to one prompt.

    ``token_ids`` are the sampled tokens (the stop token included when one was hit);
    ``logprobs[i]`` is the engine's log-probability of ``token_ids[i]`` under its logits
    divided by the temperature (raw logits when greedy), before top-p truncation: the quantity
    the trainer recomputes for the policy loss, so the two can be compared (TIS).
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@runtime_checkable
class InferenceEngine(Protocol):
    """What the trainer needs from an inference engine."""

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """``sampling.n`` completions per prompt, grouped by prompt in prompt order."""
        ...

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors; every parameter of the model must come exactly once."""
        ...

    def sleep(self, keep_weights: bool = True) -> None:
        """Release weights and caches' memory while the trainer runs (no-op where not needed).
        ``keep_weights=False`` may drop the weights outright: the caller promises an
        ``update_weights`` before the next ``generate``."""
        ...

    def wake(self) -> None:
        """Take the memory back before ``update_weights`` / ``generate``."""
        ...
