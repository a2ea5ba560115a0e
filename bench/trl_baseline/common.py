"""What the three stages share: data, TRL arguments, metrics.jsonl, complete checkpoints, export."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from gad_megatron import preemption
from gad_megatron.config import ConfigError, RunConfig
from gad_megatron.trainer.setup import (  # noqa: F401 (shared with the Megatron stages)
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DISCRIMINATOR_DIR,
    check_enough_prompts,
    stage_dir,
    training_records,
)
from trl_baseline.settings import TrlSettings

log = logging.getLogger(__name__)

# Paper values: SeqKD lr 5e-6, G and D 1e-6; warmup 1 epoch, GAD 2 epochs. SeqKD gets 3 epochs, the
# same number of passes over the teacher data as warmup + GAD (see docs/decisions.md).
COMPLETE_MARKER = "COMPLETE"
D_OPTIMIZER_FILE = "discriminator_optimizer.pt"
# What only --resume needs: twice a model's size per optimizer. Weights stay in every checkpoint.
RESUME_STATE_FILES = ("optimizer.pt", "scheduler.pt", D_OPTIMIZER_FILE)

# TRL / Trainer log keys -> the names this project documents (both are kept in metrics.jsonl).
METRIC_ALIASES = {
    "reward": "reward_mean",
    "loss": "policy_loss",
    "grad_norm": "grad_norm_g",
    "completions/mean_length": "len_mean",
    "completions/max_length": "len_max",
    "completions/clipped_ratio": "truncated_frac",
}






def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation(sequences_per_step: int, micro_batch_size: int) -> int:
    """Micro-batches each process runs per optimizer step; the global batch must split evenly."""
    per_pass = micro_batch_size * world_size()
    if sequences_per_step % per_pass:
        raise ConfigError(
            f"train: {sequences_per_step} sequences per step do not split into micro batches of "
            f"{micro_batch_size} x {world_size()} processes"
        )
    return sequences_per_step // per_pass




def trainer_args(cfg: RunConfig, trl: TrlSettings, stage: str, sequences_per_step: int) -> dict[str, Any]:
    """Arguments every stage passes to its TRL config."""
    t = cfg.train
    cuda = torch.cuda.is_available()
    bf16 = trl.bf16 if trl.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    args = dict(
        output_dir=str(stage_dir(cfg, stage)),
        seed=cfg.seed,
        learning_rate=t.learning_rate or DEFAULT_LR[stage],
        num_train_epochs=t.epochs or DEFAULT_EPOCHS[stage],
        max_steps=t.max_steps,
        per_device_train_batch_size=trl.micro_batch_size,
        gradient_accumulation_steps=gradient_accumulation(sequences_per_step, trl.micro_batch_size),
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=t.save_steps,
        logging_steps=trl.logging_steps,
        report_to=t.report_to,
        bf16=bf16,
        use_cpu=not cuda,
        gradient_checkpointing=trl.gradient_checkpointing,
        trust_remote_code=cfg.trust_remote_code,
        # fp32 master weights; bf16 runs as autocast. bf16 weights would round away 1e-6 updates.
        model_init_kwargs={"dtype": torch.float32},
        disable_tqdm=False,
    )
    args.update(trl.trl_args)
    return args


class MetricsJsonl(TrainerCallback):
    """Append every log event to ``metrics.jsonl`` (main process), with the project's metric names."""

    def __init__(self, path: Path, stage: str) -> None:
        self.path = path
        self.stage = stage

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"stage": self.stage, "step": state.global_step, **logs}
        for src, dst in METRIC_ALIASES.items():
            if src in logs:
                row[dst] = logs[src]
        for key in [k for k in row if k.startswith("rewards/")]:
            row.pop(key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


class PreemptionCallback(TrainerCallback):
    """On SIGUSR1 (``gad_megatron.preemption``): end training after this step, with a checkpoint."""

    def __init__(self) -> None:
        self.stopped = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if preemption.should_stop():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True


class CompleteCheckpointMixin:
    """A checkpoint counts only once its ``COMPLETE`` marker exists, written after everything else.

    transformers writes ``checkpoint-N`` in place; a run killed mid-save leaves a partial
    folder without the marker, which resume ignores, so the last good checkpoint stays usable.
    Only the newest ``keep_resume_states`` checkpoints keep their optimizer states; older ones
    keep their weights (for ``gad generate --sweep``). Subclasses add files in :meth:`save_extra_state`.
    A SIGUSR1 ends training after the current step with a checkpoint, and the process exits with
    ``preemption.PREEMPTED_EXIT_CODE`` instead of exporting ``final/`` (slurm/ requeues the job).
    """

    keep_resume_states: int = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        preemption.install()  # before the models load, which takes the longest
        super().__init__(*args, **kwargs)
        self.preemption = PreemptionCallback()
        self.add_callback(self.preemption)  # type: ignore[attr-defined]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        output = super().train(*args, **kwargs)  # type: ignore[misc]
        if self.preemption.stopped:
            log.warning("preempted: checkpoint-%d written; exiting %d (resume with --resume)",
                        self.state.global_step, preemption.PREEMPTED_EXIT_CODE)  # type: ignore[attr-defined]
            raise SystemExit(preemption.PREEMPTED_EXIT_CODE)
        return output

    def save_extra_state(self, checkpoint_dir: Path, with_optimizer: bool = True) -> None:
        """Hook for more state in each checkpoint (runs before the marker)."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        out_dir = Path(self._get_output_dir(trial=trial))  # type: ignore[attr-defined]
        ckpt = out_dir / f"checkpoint-{self.state.global_step}"  # type: ignore[attr-defined]
        self.save_extra_state(ckpt)
        if self.args.should_save:  # type: ignore[attr-defined]
            mark_complete(ckpt)
            prune_resume_states(out_dir, self.keep_resume_states)

    def export_final(self, final: Path, tokenizer: Any) -> Path:
        """Write ``final/`` (weights, tokenizer, extra weights; no optimizer), then tidy the stage dir.

        The trainer's end-of-training checkpoint is the same weights as ``final/``, so it is
        removed; a finished stage has nothing left to resume, so no optimizer state is kept.
        """
        self.save_model(str(final))  # type: ignore[attr-defined]
        if self.args.should_save:  # type: ignore[attr-defined]
            tokenizer.save_pretrained(final)
            self.save_extra_state(final, with_optimizer=False)
            mark_complete(final)
            shutil.rmtree(final.parent / f"checkpoint-{self.state.global_step}", ignore_errors=True)  # type: ignore[attr-defined]
            prune_resume_states(final.parent, keep=0)
        return final


def mark_complete(directory: Path) -> None:
    with (directory / COMPLETE_MARKER).open("w") as fh:
        fh.write("ok\n")
        fh.flush()
        os.fsync(fh.fileno())


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def checkpoints(out_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders of a stage, by step."""
    return sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))


def has_resume_state(checkpoint: Path) -> bool:
    return is_complete(checkpoint) and (checkpoint / "optimizer.pt").is_file()


def prune_resume_states(out_dir: Path, keep: int) -> None:
    """Delete the optimizer states of all but the newest ``keep`` complete checkpoints."""
    complete = [p for p in checkpoints(out_dir) if is_complete(p)]
    for ckpt in complete[: max(len(complete) - keep, 0)]:
        for name in RESUME_STATE_FILES:
            (ckpt / name).unlink(missing_ok=True)


def resolve_resume(out_dir: Path, resume: str | None) -> str | None:
    """``latest`` -> newest complete ``checkpoint-N`` with optimizer states (partial ones are removed)."""
    if resume is None:
        return None
    if resume != "latest":
        if not has_resume_state(Path(resume)):
            raise ConfigError(
                f"--resume {resume}: not a resumable checkpoint (no {COMPLETE_MARKER} marker or no optimizer "
                "state; only the newest train.keep_resume_states checkpoints keep it)"
            )
        return resume
    found = checkpoints(out_dir)
    for partial in (p for p in found if not is_complete(p)):
        log.warning("removing partial checkpoint %s (killed while saving)", partial)
        shutil.rmtree(partial, ignore_errors=True)
    resumable = [p for p in found if has_resume_state(p)]
    if not resumable:
        log.warning("--resume: no resumable checkpoint in %s, starting from scratch", out_dir)
        return None
    return str(resumable[-1])
