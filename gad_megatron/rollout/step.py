"""One rollout step: this step's prompts -> ``n`` completions each from the inference engine.

Each completion comes back twice over: as sampled (token ids and the engine's log-probs, for
the policy loss and its importance weights) and as the discriminator sees it, the decoded
text re-encoded by :meth:`TextEncoder.encode` exactly like the teacher's text (same chat
template, ``response.strip()``, same end-of-turn; see docs/decisions.md "Text path"). A
completion cut by the token budget gets no end-of-turn, like a teacher response that fills it.

Each prompt's rollouts are seeded from ``(run seed, step, the prompt's index in the step)``: a run
resumed at step ``s`` samples what the original run sampled at ``s`` (given the same weights),
whatever the number of engine replicas the step's prompts are split over, before or after.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gad_megatron.data import Messages
from gad_megatron.evaluation.text_metrics import repetition
from gad_megatron.rollout.engine import Completion, InferenceEngine, SamplingParams
from gad_megatron.text_encoding import TextEncoder


@dataclass(frozen=True)
class RolloutSettings:
    """How rollouts are sampled (paper: n = 8, temperature 0.8, 1536 tokens)."""

    n: int
    max_tokens: int  # the response budget: D's TextEncoder.max_response_length must match
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class Rollout:
    """One completion of one prompt."""

    prompt_index: int  # into the step's prompts
    token_ids: tuple[int, ...]  # as sampled, the stop token included when one was hit
    logprobs: tuple[float, ...]  # the engine's log-prob of each sampled token
    text: str  # decoded, special tokens skipped
    truncated: bool  # cut by the token budget
    d_input_ids: tuple[int, ...]  # D's input: prompt template + text.strip() [+ end-of-turn]

    @property
    def length(self) -> int:
        return len(self.token_ids)


def rollout_seed(run_seed: int, step: int, prompt: int) -> int:
    """A 63-bit sampling seed, a pure function of its arguments (stable across processes and
    Python versions, unlike ``hash``), different for every step and prompt of the step."""
    digest = hashlib.blake2b(f"gad-rollout:{run_seed}:{step}:{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones and every added token marked special."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def stop_token_ids(encoder: TextEncoder) -> tuple[int, ...]:
    """The tokens that end a completion: the chat template's end-of-turn token and eos.

    The end-of-turn token is the first *special* token of the template's assistant suffix: a
    suffix such as ``" <|im_end|>"`` starts with a plain space piece, which would stop a
    completion at its first space.
    """
    special = special_token_ids(encoder.tokenizer)
    end_of_turn = next((t for t in encoder.end_of_turn_ids() if t in special), None)
    candidates = (end_of_turn, encoder.tokenizer.eos_token_id)
    return tuple(dict.fromkeys(t for t in candidates if t is not None))


def sampling_params(settings: RolloutSettings, encoder: TextEncoder, prompt_seeds: tuple[int, ...]) -> SamplingParams:
    return SamplingParams(
        max_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p,
        stop_token_ids=stop_token_ids(encoder), n=settings.n, prompt_seeds=prompt_seeds,
    )  # fmt: skip


def to_rollout(completion: Completion, prompt: Messages, d_encoder: TextEncoder) -> Rollout:
    """A completion with D's canonical encoding of its text (no end-of-turn when truncated)."""
    d_ids = d_encoder.encode(prompt, completion.text, [] if completion.truncated else None)
    return Rollout(
        prompt_index=completion.prompt_index, token_ids=tuple(completion.token_ids),
        logprobs=tuple(completion.logprobs), text=completion.text, truncated=completion.truncated,
        d_input_ids=tuple(d_ids),
    )  # fmt: skip


def rollout_step(
    engine: InferenceEngine, prompts: Sequence[Messages], policy_encoder: TextEncoder, d_encoder: TextEncoder,
    settings: RolloutSettings, run_seed: int, step: int, first_prompt: int,
) -> list[Rollout]:  # fmt: skip
    """``settings.n`` rollouts per prompt, grouped by prompt in prompt order; ``prompts`` are the
    step's prompts from index ``first_prompt`` on (a replica's share), which seeds each one.

    ``policy_encoder`` renders the prompts for the engine (the policy's chat template) and
    gives the stop tokens; ``d_encoder`` re-encodes each completion's text for D.
    """
    if d_encoder.max_response_length != settings.max_tokens:
        raise ValueError(
            f"rollout budget max_tokens={settings.max_tokens} differs from the discriminator's "
            f"max_response_length={d_encoder.max_response_length}: teacher and rollouts would be cut differently"
        )
    prompt_ids = [policy_encoder.prompt_ids(p) for p in prompts]
    seeds = tuple(rollout_seed(run_seed, step, first_prompt + i) for i in range(len(prompts)))
    params = sampling_params(settings, policy_encoder, seeds)
    completions = engine.generate(prompt_ids, params)
    return [to_rollout(c, prompts[c.prompt_index], d_encoder) for c in completions]


def rollout_metrics(rollouts: Sequence[Rollout]) -> dict[str, float]:
    """Mean and max completion length (tokens), the truncated fraction and the mean repetition of
    the text (seq-rep-4, as `gad eval` reports it), for the step's log."""
    lengths = [r.length for r in rollouts]
    return {
        "rollout/length_mean": sum(lengths) / max(len(lengths), 1),
        "rollout/length_max": float(max(lengths, default=0)),
        "rollout/truncated": sum(r.truncated for r in rollouts) / max(len(rollouts), 1),
        "rollout/repetition": sum(repetition(r.text) for r in rollouts) / max(len(rollouts), 1),
    }
