"""What a stage reads before it trains: its directory, its models, its data, its step plan."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gad_megatron.config import ConfigError, RunConfig
from gad_megatron.data import filter_long_prompts, load_collected

# Paper values: SeqKD lr 5e-6, G and D 1e-6; warmup 1 epoch, GAD 2 epochs. SeqKD gets 3 epochs,
# the same number of passes over the teacher data as warmup + GAD (docs/decisions.md).
DEFAULT_LR = {"seqkd": 5e-6, "warmup": 1e-6, "gad": 1e-6}
DEFAULT_EPOCHS = {"seqkd": 3.0, "warmup": 1.0, "gad": 2.0}
DISCRIMINATOR_DIR = "discriminator"


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    return Path(cfg.run_dir) / stage


def stage_models(cfg: RunConfig, stage: str) -> tuple[str, str]:
    """(generator, discriminator) specs. gad starts from warmup's output (generator + its D)."""
    if stage == "gad":
        generator = cfg.train.init_from or str(stage_dir(cfg, "warmup") / "final")
        saved_d = Path(generator) / DISCRIMINATOR_DIR
        return generator, cfg.train.discriminator or (str(saved_d) if saved_d.is_dir() else generator)
    generator = cfg.train.init_from or cfg.student
    return generator, cfg.train.discriminator or generator


def training_records(cfg: RunConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """Prompts with a usable teacher response (``gad collect``'s output, else ``data.path``), short enough."""
    rows, _ = filter_long_prompts(load_collected(cfg), tokenizer, cfg.data.max_prompt_length)
    return [{"id": r["id"], "prompt": r["prompt"], "teacher_response": r["teacher_response"]} for r in rows]


def check_enough_prompts(n_prompts: int, batch_prompts: int) -> None:
    if n_prompts < batch_prompts:
        raise ConfigError(
            f"train.batch_prompts={batch_prompts} but only {n_prompts} prompts have a teacher response: "
            "lower batch_prompts or add data"
        )


@dataclass(frozen=True)
class StepPlan:
    """Which prompts each optimizer step takes: a seeded shuffle per epoch, ``batch_prompts`` per
    step, the last partial batch of an epoch dropped (every step has the same size)."""

    n_prompts: int
    batch_prompts: int
    total_steps: int
    seed: int

    @classmethod
    def of(cls, n_prompts: int, batch_prompts: int, epochs: float, max_steps: int, seed: int) -> StepPlan:
        check_enough_prompts(n_prompts, batch_prompts)
        per_epoch = n_prompts // batch_prompts
        total = max_steps if max_steps > 0 else max(1, math.ceil(per_epoch * epochs))
        return cls(n_prompts, batch_prompts, total, seed)

    def prompts_of(self, step: int) -> list[int]:
        """Indices of step ``step``'s prompts (steps count from 1); a pure function, so a resumed
        run takes exactly the prompts the original would have."""
        per_epoch = self.n_prompts // self.batch_prompts
        epoch, within = divmod(step - 1, per_epoch)
        order = list(range(self.n_prompts))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[within * self.batch_prompts : (within + 1) * self.batch_prompts]


def data_parallel_share(n_prompts: int, dp_rank: int, dp_size: int) -> range:
    """This data-parallel rank's contiguous share of a step's ``n_prompts`` (they must split evenly)."""
    if n_prompts % dp_size:
        raise ConfigError(f"train.batch_prompts={n_prompts} must be a multiple of the data-parallel size {dp_size}")
    share = n_prompts // dp_size
    return range(dp_rank * share, (dp_rank + 1) * share)


def check_same_tokenizer(generator_tokenizer: Any, d_spec: str, trust_remote_code: bool = False) -> None:
    """D reads the generator's token ids: refuse a D whose vocabulary differs (one line)."""
    from gad_megatron.models.sources import load_tokenizer

    d_vocab = load_tokenizer(d_spec, trust_remote_code).get_vocab()
    g_vocab = generator_tokenizer.get_vocab()
    if d_vocab != g_vocab:
        differ = len(set(d_vocab.items()) ^ set(g_vocab.items())) // 2
        raise ConfigError(f"train.discriminator: {d_spec} has another tokenizer than the generator ({len(d_vocab)} vs "
                          f"{len(g_vocab)} tokens, about {differ} ids differ): D scores the generator's token ids, "
                          "so it must come from the same model family")  # fmt: skip
