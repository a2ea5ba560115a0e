"""Run a stage on megatron-core: build the parts from the run config, loop, checkpoint, export.

    gad train --config my.yaml --stage warmup                               # one process (CPU or GPU)
    torchrun --nproc_per_node 2 -m gad_megatron.cli train --config my.yaml --stage gad --set parallel.tensor_parallel=2
    sbatch --nodes 2 slurm/gad.sbatch my.yaml                               # Slurm (srun -> torchrun)

The config is read here and only here: the parts (models, optimizers, engine, data plan) are
built from it and handed to :mod:`gad_megatron.trainer.steps` as plain values.
Outputs in ``<run_dir>/<stage>/``: ``megatron/iter_*`` (dist checkpoints with optimizer states,
resumable at any TP x PP; the newest ``train.keep_resume_states`` kept), ``checkpoint-<step>/``
every ``save_steps`` and ``final/`` (HF generator, ``discriminator/`` an HF sequence classifier or,
under ``train.disc_score: likelihood_ratio``, a causal LM with its reference's marker; a ``COMPLETE`` marker: what ``gad generate --sweep`` / ``eval`` read), ``metrics.jsonl`` (+ ``tb/``),
``starts.jsonl`` (one line per start, never truncated: where each run began, see :func:`_record_start`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gad_megatron import checkpoint, preemption
from gad_megatron.config import ConfigError, RunConfig, save_resolved_config
from gad_megatron.rollout.replicas import Replicas
from gad_megatron.rollout.step import RolloutSettings
from gad_megatron.text_encoding import TextEncoder
from gad_megatron.trainer.actor import TRAINING_OVERRIDES, build_actor
from gad_megatron.trainer.disc_pretrain import PRETRAIN_DIR, run_disc_pretrain
from gad_megatron.trainer.hacking_guard import HackingGuard, RewardHackingError
from gad_megatron.trainer.metrics import (
    MetricsLogger,
    NonFiniteError,
    check_finite,
    estimate_mfu,
    logged_rows,
    peak_flops,
)
from gad_megatron.trainer.setup import (
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DISCRIMINATOR_DIR,
    StepPlan,
    check_same_tokenizer,
    stage_dir,
    stage_models,
    training_records,
)
from gad_megatron.trainer.steps import STEPS, StepContext

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STARTS = "starts.jsonl"
WATCHED = ("d_loss", "sft_loss", "policy_loss", "kl", "grad_norm_g", "grad_norm_d", "teacher_score", "student_score")


def _precision(cfg: RunConfig) -> str:
    """The configured precision on GPUs; fp32 on CPUs (bf16 matmuls there are slow or emulated)."""
    return cfg.parallel.precision if torch.cuda.is_available() else "fp32"


def _dtype(cfg: RunConfig) -> torch.dtype:
    return torch.float32 if _precision(cfg) == "fp32" else torch.bfloat16


def _model_overrides(cfg: RunConfig) -> dict[str, Any]:
    from gad_megatron.models.precision import precision_overrides

    return {**TRAINING_OVERRIDES, **precision_overrides(_precision(cfg), cfg.parallel.fp8_recipe)}


def _trained_overrides(cfg: RunConfig) -> dict[str, Any]:
    """:func:`_model_overrides` plus activation recompute: for the models that run a backward (G, D)."""
    from gad_megatron.models.recompute import recompute_overrides

    return {**_model_overrides(cfg), **recompute_overrides(cfg.parallel.recompute_activations)}


def _tis_cap(cfg: RunConfig) -> float | None:
    return cfg.train.tis_cap if cfg.train.tis_cap is not None or _precision(cfg) != "fp8" else 2.0


def _width_multiple(cfg: RunConfig) -> int:
    """Micro-batch widths are rounded up to this: FP8 GEMMs need multiples of 16 (MXFP8: 32)."""
    from gad_megatron.models.precision import fp8_multiple

    p = cfg.parallel
    if p.precision != "fp8":
        return p.sequence_pad_multiple or 1
    need = fp8_multiple(p.fp8_recipe)
    if p.sequence_pad_multiple is not None and p.sequence_pad_multiple % need:
        raise ConfigError(f"parallel.sequence_pad_multiple={p.sequence_pad_multiple}: fp8 ({p.fp8_recipe}) needs a "
                          f"multiple of {need}")  # fmt: skip
    return p.sequence_pad_multiple or need


def _check_before_models(cfg: RunConfig, world_size: int) -> None:
    """What the config and the models' HF configs can refuse before any weight loads."""
    from transformers import AutoConfig

    from gad_megatron.models.moe import check_moe_training_layout
    from gad_megatron.models.precision import check_fp8_shapes
    from gad_megatron.models.sources import resolve_model_path
    from gad_megatron.rollout.replicas import check_rollout_layout

    check_rollout_layout(world_size, cfg.parallel.rollout_tensor_parallel, cfg.train.use_vllm)
    _width_multiple(cfg)
    p = cfg.parallel
    if _precision(cfg) == "fp8" or p.tensor_parallel > 1 or p.expert_parallel > 1:
        generator, d_spec = stage_models(cfg, cfg.train.stage)
        for what, spec in (("the generator", generator), ("the discriminator", d_spec)):
            if Path(spec).is_dir() or not spec.startswith((".", "/", "~")):
                hf = AutoConfig.from_pretrained(resolve_model_path(spec), trust_remote_code=cfg.trust_remote_code)
                check_moe_training_layout(hf, p.tensor_parallel, p.expert_parallel, what)
                if _precision(cfg) == "fp8":
                    check_fp8_shapes(hf, p.tensor_parallel, p.fp8_recipe, what)


def _engine(cfg: RunConfig, hf_dir: str, tokenizer: Any, dtype: torch.dtype) -> tuple[Any | None, Replicas]:
    """The rollout engine of this rank (None where it hosts none) and the job's engine replicas.

    vLLM: an engine on every rank, replicas of ``rollout_tensor_parallel`` consecutive ranks.
    transformers: one engine on the first rank of each model-parallel group, on its device.
    """
    from megatron.core import parallel_state
    from transformers import AutoConfig

    from gad_megatron.models.policy import model_device

    hf_config = AutoConfig.from_pretrained(hf_dir)
    world = torch.distributed.get_world_size()
    if cfg.train.use_vllm:
        from gad_megatron.rollout.vllm_engine import VLLMEngine, kv_cache_bytes

        size = cfg.parallel.rollout_tensor_parallel
        max_len = min(cfg.data.max_prompt_length + cfg.train.max_response_length, hf_config.max_position_embeddings)
        t = cfg.train  # CPU: a cache for one replica's share of a step's rollouts at full length
        rows = -(-t.batch_prompts // (world // size)) * t.num_generations
        kv_bytes = None if torch.cuda.is_available() else kv_cache_bytes(hf_config, rows, max_len, dtype)
        engine = VLLMEngine(hf_dir, tokenizer, tensor_parallel_size=size, seed=cfg.seed,
                            gpu_memory_utilization=cfg.parallel.rollout_gpu_memory_utilization,
                            dtype=str(dtype).removeprefix("torch."), max_model_len=max_len, kv_cache_bytes=kv_bytes)  # fmt: skip
        return engine, Replicas.of(range(world), size)
    from gad_megatron.rollout.hf_engine import TransformersEngine

    leader = torch.distributed.get_process_group_ranks(parallel_state.get_model_parallel_group())[0]
    hosting = torch.distributed.get_rank() == leader
    hosts: list[Any] = [None] * world
    torch.distributed.all_gather_object(hosts, hosting)
    engine = TransformersEngine.from_config(hf_config, tokenizer, dtype=dtype, device=model_device()) if hosting else None
    return engine, Replicas.of([r for r, hosting in enumerate(hosts) if hosting], 1)


def build_context(cfg: RunConfig, stage: str) -> tuple[StepContext, StepPlan, list[dict[str, Any]], Any]:
    """Models, optimizers, engine and data of ``stage``; the policy's weights synced to the engine."""
    from megatron.core import parallel_state

    from gad_megatron.models.discriminator import load_discriminator
    from gad_megatron.models.policy import build_policy
    from gad_megatron.models.ratio_discriminator import RatioScore, ratio_reference
    from gad_megatron.models.sources import load_tokenizer, resolve_model_path
    from gad_megatron.rollout.reshard import sync_weights

    t, dtype = cfg.train, _dtype(cfg)
    generator_spec, d_spec = stage_models(cfg, stage)
    if stage == "gad" and not Path(resolve_model_path(generator_spec)).is_dir():
        raise ConfigError(f"gad starts from the warmup stage's output: {generator_spec} not found (run --stage warmup)")
    generator = resolve_model_path(generator_spec)
    tokenizer = load_tokenizer(generator, cfg.trust_remote_code)
    if stage != "seqkd":
        check_same_tokenizer(tokenizer, resolve_model_path(d_spec), cfg.trust_remote_code)
    records = training_records(cfg, tokenizer)
    plan = StepPlan.of(len(records), t.batch_prompts, t.epochs or DEFAULT_EPOCHS[stage], t.max_steps, cfg.seed)
    overrides, trained = _model_overrides(cfg), _trained_overrides(cfg)
    g = build_actor(build_policy(generator, dtype, **trained), t.learning_rate or DEFAULT_LR[stage],
                    t.max_grad_norm, cfg.parallel.distributed_optimizer)  # fmt: skip
    d_lm, d, d_ratio = None, None, None  # D scores (d_lm) and, unless frozen, learns (d: its optimizer side)
    if stage != "seqkd":
        d_frozen = stage == "gad" and t.freeze_discriminator
        d_dir = resolve_model_path(d_spec)
        reference = ratio_reference(d_dir, t.disc_score, t.disc_ratio_beta, t.disc_ratio_reduce)
        if reference is None:
            d_lm = load_discriminator(d_dir, dtype, seed=cfg.seed, **(overrides if d_frozen else trained))
        else:  # the likelihood-ratio D: an LM, scored against its frozen start
            d_lm = build_policy(d_dir, dtype, **(overrides if d_frozen else trained))
            d_ratio = RatioScore(build_policy(reference, dtype, **overrides), reference, t.disc_ratio_beta,
                                 t.disc_ratio_reduce)
        if not d_frozen:
            d = build_actor(d_lm, t.disc_learning_rate, t.max_grad_norm, cfg.parallel.distributed_optimizer)
    # The KL reference computes exactly as G does (same precision: under fp8, a bf16 reference
    # would put a KL between G and its own copy).
    ref = build_policy(generator, dtype, **overrides) if stage == "gad" and t.beta > 0 else None
    engine, replicas = _engine(cfg, generator, tokenizer, dtype) if stage != "seqkd" else (None, Replicas(()))
    if stage != "seqkd":
        sync_weights(g.lm, None, engine)
    ctx = StepContext(
        g=g, d_lm=d_lm, d=d, ref=ref, engine=engine, replicas=replicas, width_multiple=_width_multiple(cfg),
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
        encoder=TextEncoder(tokenizer, cfg.data.max_prompt_length, t.max_response_length),
        rollout=RolloutSettings(n=t.num_generations, max_tokens=t.max_response_length, temperature=t.temperature),
        token_budget=cfg.parallel.micro_batch_tokens, disc_loss=t.disc_loss, clip=t.epsilon, kl_beta=t.beta,
        tis_cap=_tis_cap(cfg), seed=cfg.seed, disc_only_steps=t.disc_only_steps if stage == "warmup" else 0,
        disc_updates=t.disc_updates_per_step, d_ratio=d_ratio,
    )  # fmt: skip
    return ctx, plan, records, tokenizer


def _models(ctx: StepContext) -> dict[str, Any]:
    return {"generator": ctx.g.lm} | ({"discriminator": ctx.d_lm} if ctx.d_lm is not None else {})


def _optimizers(ctx: StepContext) -> dict[str, Any]:
    return {"generator": ctx.g.optimizer} | ({"discriminator": ctx.d.optimizer} if ctx.d is not None else {})


def _throughput(metrics: dict[str, float], params: int, hf_config: Any, world_size: int, fp8: bool) -> dict[str, float]:
    """Tokens per second of G's update and, on GPUs of known peak, its model FLOPs utilisation."""
    tokens, seconds = metrics.get("tokens/g_update"), metrics.get("time/g_update")
    if not tokens or not seconds:
        return {}
    out = {"tokens_per_s/g_update": tokens / seconds}
    mfu = estimate_mfu(params, int(tokens), seconds, hf_config.num_hidden_layers, hf_config.hidden_size,
                       int(tokens // max(metrics.get("seqs/g_update", 1), 1)), world_size, peak_flops(fp8))  # fmt: skip
    if mfu is not None:
        out["mfu/g_update"] = mfu
    return out


def _parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model: this rank's shard summed over the model-parallel group."""
    from megatron.core import parallel_state

    count = torch.tensor([sum(p.numel() for p in model.parameters())], dtype=torch.float64)
    torch.distributed.all_reduce(count, group=parallel_state.get_model_parallel_group())
    return int(count.item())


D_ACC_WINDOW = 3


def d_accuracy_reached(history: list[float], target: float | None) -> bool:
    """Warmup's early stop: D's pair accuracy averaged over the last :data:`D_ACC_WINDOW` steps
    is at least ``target`` (never when ``target`` is None)."""
    window = history[-D_ACC_WINDOW:]
    return target is not None and len(window) == D_ACC_WINDOW and sum(window) / D_ACC_WINDOW >= target


def _resume(ctx: StepContext, ckpt_dir: Path, resume: str | None) -> tuple[int, list[float], Path | None]:
    """Load the newest complete checkpoint (or the one named). -> (the step it finished, 0 when
    fresh; D's pair accuracy of the steps before it, for warmup's early stop; the checkpoint loaded)."""
    from gad_megatron.rollout.reshard import sync_weights

    if resume is None:
        return 0, [], None
    path = checkpoint.latest_checkpoint(ckpt_dir, clean=True) if resume == "latest" else Path(resume)
    if path is None:
        log.info("no complete checkpoint in %s: starting from step 1", ckpt_dir)
        return 0, [], None
    checkpoint.load_checkpoint(path, _models(ctx), _optimizers(ctx))
    meta = checkpoint.read_meta(path)
    if ctx.d_lm is not None:  # the stages with rollouts
        sync_weights(ctx.g.lm, None, ctx.engine)
    log.info("resumed from %s (step %d)", path, meta["step"])
    return int(meta["step"]), list(meta["extra_state"].get("d_acc_recent", [])), path


def _record_start(out_dir: Path, resume: str | None, loaded: Path | None, step: int) -> None:
    """Append this start to ``<stage>/starts.jsonl``, which no run truncates: the time, ``--resume``
    as asked (null, "latest" or a path), the checkpoint loaded and its step (null and 0: from scratch),
    the Slurm job and its restart count (null outside Slurm)."""
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    row = {"time": time.time(), "resume": resume, "checkpoint": str(loaded) if loaded else None, "step": step,
           "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
           "slurm_restart_count": int(restarts) if restarts else None}  # fmt: skip
    with (out_dir / STARTS).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _saved_checkpoints(ckpt_dir: Path, out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints on disk: resumable ``megatron/iter_*`` first, then
    the HF exports ``checkpoint-<step>/``."""
    resumable = [(int(p.name.removeprefix(checkpoint.PREFIX)), p) for p in checkpoint.complete_checkpoints(ckpt_dir)]
    exports = [(int(p.name.removeprefix("checkpoint-")), p) for p in out_dir.glob("checkpoint-*")
               if (p / COMPLETE_MARKER).is_file()]  # fmt: skip
    return resumable + sorted(exports)


def _stop_if_hacked(guard: HackingGuard | None, step: int, ckpt_dir: Path, out_dir: Path) -> None:
    """Every rank raises :class:`RewardHackingError` when rank 0's guard (the only one) asks to stop."""
    stop = guard is not None and guard.should_stop
    box = [guard.stop_message(step, _saved_checkpoints(ckpt_dir, out_dir)) if stop else None]
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RewardHackingError(box[0])


def _export_hf(ctx: StepContext, out: Path, tokenizer: Any) -> Path:
    """G as an HF causal LM in ``out``, D in ``out/discriminator`` (an HF sequence classifier; the
    likelihood-ratio D: a causal LM and the marker naming its reference), then the ``COMPLETE``
    marker that ``gad generate --sweep`` and ``--resume`` look for."""
    from gad_megatron.models.ratio_discriminator import write_marker
    from gad_megatron.rollout.hf_export import export_hf

    export_hf(ctx.g.lm, None, out, tokenizer)
    if ctx.d_lm is not None:
        export_hf(ctx.d_lm, None, out / DISCRIMINATOR_DIR, tokenizer)
    if torch.distributed.get_rank() == 0 and ctx.d_ratio is not None:
        write_marker(out / DISCRIMINATOR_DIR, ctx.d_ratio.reference_dir, ctx.d_ratio.beta, ctx.d_ratio.reduce)
    if torch.distributed.get_rank() == 0:
        (out / COMPLETE_MARKER).write_text("complete\n")
    torch.distributed.barrier()
    return out


def train_stage(cfg: RunConfig, resume: str | None = None) -> Path:
    """Run ``cfg.train.stage``; return its exported ``final/`` directory."""
    from gad_megatron.models.precision import check_precision_supported
    from gad_megatron.parallel.launch import init_distributed

    stage, t = cfg.train.stage, cfg.train
    out_dir = stage_dir(cfg, stage)
    final = out_dir / "final"
    if resume is not None and (final / COMPLETE_MARKER).is_file():
        log.info("%s already finished: %s (delete it to train again)", stage, final)
        return final
    # fp8 is refused wherever CUDA/TE is missing (a GPU config is checked the same everywhere);
    # bf16 on a CPU is not checked: CPU runs compute in fp32.
    check_precision_supported("fp8" if cfg.parallel.precision == "fp8" else _precision(cfg), cfg.parallel.fp8_recipe)
    preemption.install()  # before the models load, which takes the longest
    launch = init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.seed,
                              ep=cfg.parallel.expert_parallel)  # fmt: skip
    _check_before_models(cfg, launch.world_size)
    ctx, plan, records, tokenizer = build_context(cfg, stage)
    ckpt_dir = out_dir / "megatron"
    if launch.rank == 0:
        if resume is None:  # a fresh run replaces the stage's earlier outputs
            for old in (final, ckpt_dir, out_dir / PRETRAIN_DIR, *out_dir.glob("checkpoint-*")):
                if old.exists():
                    log.warning("%s: removing %s from an earlier run (train with --resume to continue it)", stage, old)
                    shutil.rmtree(old)
        elif final.exists():  # an export that died before its COMPLETE marker
            log.warning("%s: removing the unfinished export %s; it is written again at the end", stage, final)
            shutil.rmtree(final)
        save_resolved_config(cfg, out_dir)
    torch.distributed.barrier()
    start, d_accuracy, loaded = _resume(ctx, ckpt_dir, resume)  # d_accuracy: D's of each step (warmup's early stop)
    if launch.rank == 0:
        _record_start(out_dir, resume, loaded, start)
    step_fn = STEPS[stage]
    g_params = _parameter_count(ctx.g.module)
    guards = stage == "gad" and launch.rank == 0  # the guard reads rank 0's metrics and their log
    guard = HackingGuard(t.hacking_guard, logged_rows(out_dir / "metrics.jsonl", start + 1)) if guards else None
    # resume_step 0 when starting from scratch: the step-0 rows of an earlier D pretraining go too
    with MetricsLogger.open(cfg.run_dir, stage, plan.total_steps, t.report_to, launch.rank,
                            resume_step=start + 1 if start else 0) as logger:  # fmt: skip
        if stage == "warmup" and t.disc_pretrain.epochs and not start:  # resumed: done before step 1
            run_disc_pretrain(ctx, records, t.disc_pretrain, out_dir / PRETRAIN_DIR, launch.rank, launch.world_size,
                              lambda row: logger.log(0, row))  # fmt: skip
        for step in range(start + 1, plan.total_steps + 1):
            metrics = step_fn(ctx, [records[i] for i in plan.prompts_of(step)], step)
            metrics |= _throughput(metrics, g_params, ctx.g.lm.hf_config, launch.world_size,
                                   _precision(cfg) == "fp8")  # fmt: skip
            check_finite(step, metrics, [k for k in WATCHED if k in metrics])
            if guard is not None:
                metrics |= guard.observe(step, metrics)
            logger.log(step, metrics)
            d_accuracy.append(metrics.get("d_acc", 0.0))
            # Never before G's first SFT step: GAD starts from (and is held near) warmup's G. A
            # D-only warmup (G warmed up elsewhere, e.g. by SeqKD) may stop at any step.
            g_waits = step <= t.disc_only_steps < plan.total_steps
            early = stage == "warmup" and not g_waits and d_accuracy_reached(d_accuracy, t.warmup_until_d_acc)
            last = step == plan.total_steps or early
            stop = preemption.should_stop()
            if step % t.save_steps == 0 or stop or (last and t.keep_resume_states):
                checkpoint.save_checkpoint(ckpt_dir, step, _models(ctx), _optimizers(ctx),
                                           extra_state={"stage": stage, "d_acc_recent": d_accuracy[-D_ACC_WINDOW:]},
                                           keep=max(1, t.keep_resume_states))  # fmt: skip
            if step % t.save_steps == 0 and not last:  # the last step's weights are final/
                _export_hf(ctx, out_dir / f"checkpoint-{step}", tokenizer)
            if stage == "gad" and t.hacking_guard.stop:
                _stop_if_hacked(guard, step, ckpt_dir, out_dir)
            if stop and not last:
                log.warning("preempted after step %d: checkpoint written, exiting %d (resume with --resume)",
                            step, preemption.PREEMPTED_EXIT_CODE)  # fmt: skip
                sys.exit(preemption.PREEMPTED_EXIT_CODE)
            if early:
                log.info("warmup: D's pair accuracy over the last %d steps reached %.2f at step %d; stopping",
                         D_ACC_WINDOW, t.warmup_until_d_acc, step)  # fmt: skip
                break
    _export_hf(ctx, final, tokenizer)
    if not t.keep_resume_states and launch.rank == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return final


def run_stage(cfg: RunConfig, resume: str | None = None) -> int:
    """CLI entry: train, say where the model went; NaN/inf or the reward-hacking guard's stop: exit 1."""
    try:
        final = train_stage(cfg, resume)
    except NonFiniteError as err:
        log.error("training stopped: %s; the last complete checkpoint is intact (resume with --resume)", err)
        return 1
    except RewardHackingError as err:
        log.error("%s", err)
        return 1
    log.info("%s finished: %s", cfg.train.stage, final)  # every rank: per-node logs show who got here
    return 0
