"""GAD's two stages on TRL's ``GRPOTrainer`` (pinned: trl 1.16).

    gad train --config my.yaml --stage warmup
    gad train --config my.yaml --stage gad
    accelerate launch --num_processes 8 -m gad_megatron.cli train --config my.yaml --stage gad
    torchrun --nproc_per_node 2 -m gad_megatron.cli train --config my.yaml --stage gad      (CPU, gloo)

Objective (arXiv 2511.10643). Per step, for P prompts with N rollouts each:
  D:  minimise  mean_pairs -log sigmoid(D(x, y_teacher) - D(x, y_i))        (Bradley-Terry)
  G:  GRPO with reward r_i = D(x, y_i) scored by D *before* this step's D update,
      advantage (r_i - mean_group) / (std_group + 1e-4), token-level clipped policy
      gradient (clip 0.2, TRL's ``dapo`` aggregation = token mean over the batch),
      k3 KL to the warmup generator at beta 0.001, no entropy bonus, one update per batch.
Warmup: G is fine-tuned on the teacher text (SFT) while D learns on fresh rollouts with the
same BT loss; during the first ``disc_only_steps`` only D moves.

Departures from plain GRPO / the paper's verl code, all deliberate:
  * D is trained inside the reward function, which TRL calls once per rollout batch after its
    no-grad block, on every rank in lockstep. The scores that give the rewards also give the
    D loss; D's update then re-runs one micro-batch at a time (bounded memory) or, with
    ``TrlSettings.disc_single_pass``, reuses the scoring pass's graph. Each teacher response is
    forwarded once per prompt. D's gradients are all-reduced by hand (see ``discriminator_update``).
  * Rollouts are decoded to text and re-encoded for D exactly like teacher text.
  * In warmup the teacher-text SFT loss uses one row per prompt (over all processes), not one
    per rollout.

TRL methods wrapped (each calls ``super()``): ``_generate_and_score_completions`` (timing,
warmup's teacher tokens), ``training_step`` (timing), ``compute_loss`` (finite check; warmup
SFT), ``_save_checkpoint`` / ``_load_optimizer_and_scheduler`` (discriminator state).
tests/test_trl_contract.py fails when the pinned TRL changes their signatures.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import get_constant_schedule, set_seed
from trl import GRPOConfig, GRPOTrainer

from gad_megatron.config import RunConfig, save_resolved_config
from gad_megatron.evaluation.hf_discriminator import load_hf_discriminator
from gad_megatron.models.sources import load_tokenizer, resolve_model_path
from gad_megatron.text_encoding import TextEncoder
from gad_megatron.trainer.setup import stage_models
from trl_baseline.common import (
    D_OPTIMIZER_FILE,
    DISCRIMINATOR_DIR,
    CompleteCheckpointMixin,
    MetricsJsonl,
    check_enough_prompts,
    resolve_resume,
    stage_dir,
    trainer_args,
    training_records,
)
from trl_baseline.discriminator_update import DiscriminatorStep, DiscriminatorUpdater, check_finite
from trl_baseline.settings import TrlSettings

log = logging.getLogger(__name__)


class DiscriminatorReward:
    """GRPO reward function: D's pre-update score of each rollout; trains D on the same batch."""

    __name__ = "discriminator"

    def __init__(self, updater: DiscriminatorUpdater, update: bool) -> None:
        self.updater = updater
        self.update = update
        self.trainer: GRPOTrainer | None = None
        self.last: DiscriminatorStep | None = None

    def __call__(self, prompts: list, completions: list, teacher_response: list[str], trainer_state: Any,
                 log_metric: Any, **_: Any) -> list[float]:
        assert self.trainer is not None, "bind the reward to its trainer first"
        training = self.trainer.model.training  # TRL also scores eval batches: never update D then
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        result = self.updater.step(prompts, teacher_response, texts, update=self.update and training,
                                   step=trainer_state.global_step)
        self.last = result
        log_metric("d_loss", result.loss)
        log_metric("d_acc", result.accuracy)
        log_metric("teacher_score", result.teacher_scores_B.mean().item())
        log_metric("student_score", result.student_scores_B.mean().item())
        log_metric("time_scoring", result.time_scoring)
        if self.update and training:
            log_metric("grad_norm_d", result.grad_norm)
            log_metric("time_d_update", result.time_update)
        return result.student_scores_B.tolist()


class GADTrainer(CompleteCheckpointMixin, GRPOTrainer):
    """GRPO generator rewarded by a discriminator that is trained every step on the same rollouts."""

    def __init__(self, *, discriminator: DiscriminatorUpdater, freeze_discriminator: bool = False, **kwargs: Any) -> None:
        self.reward = DiscriminatorReward(discriminator, update=not freeze_discriminator)
        super().__init__(reward_funcs=[self.reward], **kwargs)
        self.reward.trainer = self
        self.discriminator = discriminator
        self._generation_time = 0.0
        self._g_update_time = 0.0

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        start = time.perf_counter()
        output = super()._generate_and_score_completions(inputs)
        self._generation_time = time.perf_counter() - start
        mode = "train" if self.model.training else "eval"
        d = self.reward.last
        d_time = d.time_scoring + d.time_update if d else 0.0
        self._metrics[mode]["time_rollout"].append(self._generation_time - d_time)
        self._metrics[mode]["adv_std"].append(self.accelerator.gather(output["advantages"]).std().item())
        return output

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any) -> torch.Tensor:
        self._generation_time = 0.0
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)  # TRL increments self._step
        self._g_update_time += time.perf_counter() - start - self._generation_time
        if self._step % self.current_gradient_accumulation_steps == 0:  # summed over the micro-batches of a step
            self._metrics["train"]["time_g_update"].append(self._g_update_time)
            self._g_update_time = 0.0
        return loss

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        check_finite(loss.detach(), "generator loss", self.state.global_step)
        return loss

    def save_extra_state(self, checkpoint_dir: Path, with_optimizer: bool = True) -> None:
        if not self.args.should_save:
            return
        self.discriminator.model.save_pretrained(checkpoint_dir / DISCRIMINATOR_DIR, safe_serialization=True)
        self.discriminator.tokenizer.save_pretrained(checkpoint_dir / DISCRIMINATOR_DIR)
        if with_optimizer and self.discriminator.optimizer is not None:
            torch.save(
                {"optimizer": self.discriminator.optimizer.state_dict(),
                 "scheduler": self.discriminator.scheduler.state_dict() if self.discriminator.scheduler else None},
                checkpoint_dir / D_OPTIMIZER_FILE,
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        d_dir = Path(checkpoint) / DISCRIMINATOR_DIR
        self.discriminator.model.load_state_dict(load_file(d_dir / "model.safetensors", device=str(self.discriminator.device)))
        state_file = Path(checkpoint) / D_OPTIMIZER_FILE
        if self.discriminator.optimizer is not None and state_file.exists():
            state = torch.load(state_file, map_location=self.discriminator.device, weights_only=True)
            self.discriminator.optimizer.load_state_dict(state["optimizer"])
            if self.discriminator.scheduler is not None and state["scheduler"] is not None:
                self.discriminator.scheduler.load_state_dict(state["scheduler"])


class WarmupTrainer(GADTrainer):
    """Warmup: G learns the teacher text by SFT; D learns to rank teacher above fresh rollouts."""

    def __init__(self, *, disc_only_steps: int, student_encoder: TextEncoder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.disc_only_steps = disc_only_steps
        self.student_encoder = student_encoder

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        eot = self.student_encoder.end_of_turn_ids()
        targets = [self.student_encoder.response_ids(x["teacher_response"], eot) for x in inputs]
        width = max(len(t) for t in targets)
        ids = torch.full((len(targets), width), self.processing_class.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(targets):
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        # One SFT row per prompt over all processes, even when a prompt's rollouts span two of
        # them: TRL lays a prompt's N rollouts out consecutively and gives each process a
        # contiguous chunk of the generation batch (its own ``process_slice``).
        n = self.num_generations if self.model.training else self.num_generations_eval
        offset = self.accelerator.process_index * len(inputs)
        sft_row = torch.tensor([(offset + i) % n == 0 for i in range(len(inputs))])
        device = self.accelerator.device
        output["teacher_ids"], output["teacher_mask"] = ids.to(device), mask.to(device)
        output["sft_row"] = sft_row.to(device)
        output["sft_tokens"] = self.accelerator.gather((mask.to(device) * output["sft_row"].unsqueeze(1)).sum()).sum()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["sft_prompts"].append(self.accelerator.gather(output["sft_row"].sum()).sum().item())
        return output

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> torch.Tensor:
        if self.state.global_step < self.disc_only_steps:  # the same on every process: no gradient reaches G
            return torch.zeros((), device=self.accelerator.device, requires_grad=True)
        rows = inputs["sft_row"]
        weight = 1.0
        if not rows.any():  # run one row at weight 0, so this process joins DDP's gradient all-reduce too
            rows, weight = torch.arange(len(rows), device=rows.device) == 0, 0.0
        target, target_mask = inputs["teacher_ids"][rows], inputs["teacher_mask"][rows]
        ids = torch.cat([inputs["prompt_ids"][rows], target], dim=1)
        mask = torch.cat([inputs["prompt_mask"][rows], target_mask], dim=1)
        k = target.size(1)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=k + 1).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        nll = -(logps * target_mask).sum()
        # Same normalisation as TRL's dapo loss: tokens of the whole generation batch, all ranks.
        normalizer = inputs["sft_tokens"].clamp(min=1) / self.accelerator.num_processes
        normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        loss = weight * nll / normalizer
        check_finite(loss.detach(), "warmup SFT loss", self.state.global_step)
        if weight:
            self._metrics["train"]["sft_loss"].append((nll / target_mask.sum().clamp(min=1)).item())
        return loss


def build_discriminator(cfg: RunConfig, trl: TrlSettings, spec: str, frozen: bool, device: torch.device) -> DiscriminatorUpdater:
    """Load D from ``spec`` (a causal LM or a saved D) with its tokenizer, optimizer and text encoder."""
    model = load_hf_discriminator(spec, cfg.trust_remote_code).to(device)
    tokenizer = load_tokenizer(spec, cfg.trust_remote_code)
    if trl.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = scheduler = None
    if not frozen:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.disc_learning_rate)
        scheduler = get_constant_schedule(optimizer)
    else:
        model.requires_grad_(False)
    on_gpu_bf16 = device.type == "cuda" and trl.bf16 is not False and torch.cuda.is_bf16_supported()
    bf16 = on_gpu_bf16 or bool(trl.bf16)  # on CPU only when asked (fast on AVX512-BF16 / AMX)
    return DiscriminatorUpdater(
        model=model,
        tokenizer=tokenizer,
        encoder=TextEncoder(tokenizer, cfg.data.max_prompt_length, cfg.train.max_response_length),
        optimizer=optimizer,
        scheduler=scheduler,
        loss=cfg.train.disc_loss,
        micro_batch_size=trl.micro_batch_size,
        max_grad_norm=cfg.train.max_grad_norm,
        autocast_dtype=torch.bfloat16 if bf16 else None,
        single_pass=trl.disc_single_pass,
    )


def _grpo_config(cfg: RunConfig, trl: TrlSettings, stage: str) -> GRPOConfig:
    t = cfg.train
    return GRPOConfig(
        **trainer_args(cfg, trl, stage, sequences_per_step=t.batch_prompts * t.num_generations),
        num_generations=t.num_generations,
        temperature=t.temperature,
        max_completion_length=t.max_response_length,
        beta=t.beta if stage == "gad" else 0.0,  # warmup has no policy loss, hence no reference model
        epsilon=t.epsilon,
        num_iterations=1,
        loss_type="dapo",
        scale_rewards="group",
        entropy_coef=0.0,
        use_vllm=t.use_vllm,
        vllm_mode="colocate",
        log_completions=False,
        shuffle_dataset=True,
    )




def run_gad_stage(cfg: RunConfig, stage: str, resume: str | None = None, trl: TrlSettings = TrlSettings()) -> Path:
    """Train ``warmup`` or ``gad``; export ``<run_dir>/<stage>/final`` (generator + discriminator/)."""
    assert stage in ("warmup", "gad")
    set_seed(cfg.seed)  # before D's new head is initialised, so runs (and resumes) are reproducible
    out_dir = stage_dir(cfg, stage)
    generator_spec, d_spec = stage_models(cfg, stage)
    generator = resolve_model_path(generator_spec)
    tokenizer = load_tokenizer(generator, cfg.trust_remote_code)
    records = training_records(cfg, tokenizer)
    check_enough_prompts(len(records), cfg.train.batch_prompts)
    save_resolved_config(cfg, out_dir)
    args = _grpo_config(cfg, trl, stage)
    frozen = stage == "gad" and cfg.train.freeze_discriminator
    common: dict[str, Any] = dict(
        model=generator,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[MetricsJsonl(out_dir / "metrics.jsonl", stage)],
        discriminator=build_discriminator(cfg, trl, d_spec, frozen, args.device),
        freeze_discriminator=frozen,
    )
    if stage == "warmup":
        encoder = TextEncoder(tokenizer, cfg.data.max_prompt_length, cfg.train.max_response_length)
        trainer: GADTrainer = WarmupTrainer(disc_only_steps=cfg.train.disc_only_steps, student_encoder=encoder, **common)
    else:
        trainer = GADTrainer(**common)
    log.info("%s: generator %s, discriminator %s%s", stage, generator_spec, d_spec, " (frozen)" if frozen else "")
    trainer.keep_resume_states = cfg.train.keep_resume_states
    trainer.train(resume_from_checkpoint=resolve_resume(out_dir, resume))
    return trainer.export_final(out_dir / "final", tokenizer)
