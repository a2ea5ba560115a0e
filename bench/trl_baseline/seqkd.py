"""SeqKD baseline: supervised fine-tuning of the student on the teacher's text (TRL ``SFTTrainer``).

    gad train --config my.yaml --stage seqkd
    accelerate launch --num_processes 8 -m gad_megatron.cli train --config my.yaml --stage seqkd

The loss covers response tokens only, end-of-turn token included (prompt-completion data).
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from gad_megatron.config import RunConfig, save_resolved_config
from gad_megatron.models.sources import load_tokenizer, resolve_model_path
from trl_baseline.common import (
    CompleteCheckpointMixin,
    MetricsJsonl,
    check_enough_prompts,
    resolve_resume,
    stage_dir,
    trainer_args,
    training_records,
)
from trl_baseline.settings import TrlSettings


class SeqKDTrainer(CompleteCheckpointMixin, SFTTrainer):
    """``SFTTrainer`` whose checkpoints carry a completion marker."""


def sft_dataset(records: list[dict]) -> Dataset:
    """Conversational prompt-completion rows, so TRL masks the prompt out of the loss."""
    return Dataset.from_list(
        [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["teacher_response"].strip()}]} for r in records]
    )


def run_seqkd(cfg: RunConfig, resume: str | None = None, trl: TrlSettings = TrlSettings()) -> Path:
    """Train and export ``<run_dir>/seqkd/final``; returns that directory."""
    out_dir = stage_dir(cfg, "seqkd")
    student = resolve_model_path(cfg.train.init_from or cfg.student)
    tokenizer = load_tokenizer(student, cfg.trust_remote_code)
    records = training_records(cfg, tokenizer)
    check_enough_prompts(len(records), cfg.train.batch_prompts)
    save_resolved_config(cfg, out_dir)
    args = SFTConfig(
        **trainer_args(cfg, trl, "seqkd", sequences_per_step=cfg.train.batch_prompts),
        max_length=cfg.data.max_prompt_length + cfg.train.max_response_length,
        completion_only_loss=True,
        padding_free=trl.padding_free,
    )
    trainer = SeqKDTrainer(
        model=student,
        args=args,
        train_dataset=sft_dataset(records),
        processing_class=tokenizer,
        callbacks=[MetricsJsonl(out_dir / "metrics.jsonl", "seqkd")],
    )
    trainer.keep_resume_states = cfg.train.keep_resume_states
    trainer.train(resume_from_checkpoint=resolve_resume(out_dir, resume))
    return trainer.export_final(out_dir / "final", tokenizer)
