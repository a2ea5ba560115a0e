"""Knobs only the TRL baseline has; the product's ``RunConfig`` does not carry them (issue 20)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrlSettings:
    """TRL-side settings, passed beside the run config to :func:`trl_baseline.train_stage` and friends."""

    micro_batch_size: int = 8  # sequences per forward pass (G and D)
    disc_single_pass: bool = False  # keep the graph of D's scoring pass for its update (one D forward)
    gradient_checkpointing: bool = False  # recompute activations in backward (G and D)
    padding_free: bool = False  # pack SeqKD batches without padding (SFTTrainer); GRPO stays padded
    bf16: bool | None = None  # None: on when a GPU with bf16 is present
    logging_steps: int = 1
    trl_args: dict[str, Any] = field(default_factory=dict)  # passed as-is to the TRL config (advanced)

    def __post_init__(self) -> None:
        if self.micro_batch_size <= 0 or self.logging_steps <= 0:
            raise ValueError(f"micro_batch_size and logging_steps must be positive: {self}")
