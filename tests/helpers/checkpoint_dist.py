"""A tiny G (Llama, tied) + D (Qwen2) run saved at one TP x PP, loaded at TP=1 x PP=1.

    torchrun --nproc_per_node 2 tests/helpers/checkpoint_dist.py save WORK 2x1 1x2
    python tests/helpers/checkpoint_dist.py load WORK 2x1 1x2

``save`` (per layout, in turn): one optimizer step of G and D (Megatron DDP, distributed
optimizer, OptimizerParamScheduler), a checkpoint, random draws after it, the full state
gathered to HF tensors and the logits/scores (``WORK/<layout>/reference.pt``), one more step
(the uninterrupted run); then a resume at the same layout into fresh objects, its draws and
its next step. ``load`` (one process, TP=1 x PP=1): the newest complete checkpoint's models alone
into other weights, their state and logits against the reference; then models, optimizers and
schedulers together, a re-save (``WORK/<layout>/resaved``) and the next step.
Rank 0 writes ``WORK/report-<mode>.json``: ``{layout: {check: value}}``.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gad_megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gad_megatron.models.convert import EXTRA_STATE, megatron_to_hf
from gad_megatron.models.discriminator import build_discriminator, scores, stage_forward
from gad_megatron.models.policy import MegatronLM, build_gpt, full_logits, load_hf_weights
from gad_megatron.parallel.launch import init_distributed
from tests.helpers.tiny_hf import tiny_model

TOKENS = torch.randint(1, 300, (4, 12), generator=torch.Generator().manual_seed(3))
MICRO = 2


@dataclass
class Trained:
    """One model of the tiny run with its Megatron DDP wrapper, optimizer and scheduler."""

    lm: MegatronLM
    ddp: Any
    optimizer: Any
    scheduler: Any


def build(role: str, hf_weights: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Trained:
    """G (``policy``, tiny Llama) or D (``discriminator``, tiny Qwen2) with its optimizer; ``seed``
    picks other initial weights (a resumed run's fresh objects must not start equal to the saved)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    hf = tiny_model("llama" if role == "policy" else "qwen2", role, seed=seed + (0 if role == "policy" else 1))
    # gloo has no CUDA stream to synchronise the pipeline's batched p2p on
    lm = (build_gpt if role == "policy" else build_discriminator)(hf.config, batch_p2p_sync=False)
    load_hf_weights(lm, hf_weights or hf.state_dict())
    lm.model.config.finalize_model_grads_func = finalize_model_grads  # DP and tied-embedding grad sums
    ddp = DistributedDataParallel(lm.model.config, DistributedDataParallelConfig(use_distributed_optimizer=True),
                                  lm.model)  # fmt: skip
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, bf16=False, params_dtype=torch.float32,
                        clip_grad=1.0, use_distributed_optimizer=True), [ddp])  # fmt: skip
    # init_lr > 0: the first step (the one the checkpoint follows) really moves the weights; the
    # warmup makes the second step's lr depend on the restored scheduler.
    scheduler = OptimizerParamScheduler(optimizer, init_lr=2e-4, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2,
                                        lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                                        wd_incr_steps=10, wd_incr_style="constant")  # fmt: skip
    return Trained(lm, ddp, optimizer, scheduler)


def train_step(t: Trained) -> float:
    """One optimizer step on TOKENS in MICRO micro-batches; -> the mean loss (on every rank)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = iter(TOKENS.split(MICRO))
    last = torch.full((MICRO,), TOKENS.shape[1] - 1)

    def forward(_data: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        ids = next(batches)
        if t.lm.layout.role == "policy":
            out = model(input_ids=ids, position_ids=None, attention_mask=None, runtime_gather_output=True)
        else:
            out = stage_forward(model.module, ids, last)  # DDP's gradient hooks sit on the parameters

        def loss_func(o: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if t.lm.layout.role == "policy":  # next-token CE over the real vocabulary (the padding is TP-dependent)
                vocab = t.lm.layout.vocab_size
                loss = F.cross_entropy(o[..., :vocab].reshape(-1, vocab), ids.roll(-1, dims=1).reshape(-1))
            else:
                loss = -F.logsigmoid(o).mean()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    t.optimizer.zero_grad()
    t.ddp.zero_grad_buffer()
    outputs = get_forward_backward_func()(
        forward_step_func=forward, data_iterator=None, model=[t.ddp], num_microbatches=len(TOKENS) // MICRO,
        seq_length=TOKENS.shape[1], micro_batch_size=MICRO, forward_only=False,
    )  # fmt: skip
    t.optimizer.step()
    t.scheduler.step(increment=1)
    loss = torch.tensor(sum(o["loss"].item() for o in outputs) / len(outputs) if outputs else 0.0, dtype=torch.float64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # only the last stage has it
        dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    return loss.item()


def hf_state(lm: MegatronLM) -> dict[str, torch.Tensor]:
    """The full model as HF tensors, on every rank (all shards gathered)."""
    from megatron.core import parallel_state

    local = {k: v.detach().clone() for k, v in lm.model.state_dict().items() if not k.endswith(EXTRA_STATE)}
    key = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (key, local))
    return megatron_to_hf(dict(everyone), lm.layout)


def outputs(g: MegatronLM, d: MegatronLM) -> dict[str, torch.Tensor]:
    """G's logits and D's scores on TOKENS (on every rank)."""
    from megatron.core import parallel_state

    logits = full_logits(g, TOKENS)
    holder = [logits]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        holder = [None] * dist.get_world_size()
        dist.all_gather_object(holder, logits)
    return {"logits": next(x for x in holder if x is not None), "scores": scores(d, TOKENS, torch.ones_like(TOKENS))}


def draws() -> list[float]:
    """One draw from every RNG a checkpoint restores."""
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(1).item()
    return [random.random(), float(np.random.rand()), torch.rand(1).item(), tracked]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def update_error(resumed: dict[str, torch.Tensor], before: dict[str, torch.Tensor],
                 after: dict[str, torch.Tensor]) -> float:  # fmt: skip
    """|resumed - after| / |after - before| over all tensors: how far the resumed run's step landed
    from the uninterrupted one, relative to the step itself (Adam normalises every gradient, so a
    parameter's rounding can move it by up to a learning rate; the norm puts that in proportion)."""
    num = sum(float((resumed[k] - after[k]).double().pow(2).sum()) for k in after)
    den = sum(float((after[k] - before[k]).double().pow(2).sum()) for k in after)
    return (num / den) ** 0.5 if resumed.keys() == after.keys() else float("inf")


def run_state(g: Trained, d: Trained) -> dict[str, Any]:
    """save_checkpoint / load_checkpoint arguments for the pair."""
    pair = {"policy": g, "discriminator": d}
    return {"models": {k: t.lm for k, t in pair.items()}, "optimizers": {k: t.optimizer for k, t in pair.items()},
            "schedulers": {k: t.scheduler for k, t in pair.items()}}  # fmt: skip


def save_layout(work: Path) -> dict[str, float]:
    g, d = build("policy"), build("discriminator")
    report = {"loss1_g": train_step(g), "loss1_d": train_step(d)}
    save_checkpoint(work / "run", 1, **run_state(g, d), extra_state={"step": 1, "data_position": 8}, keep=2)
    after_save = draws()
    reference = {"policy": hf_state(g.lm), "discriminator": hf_state(d.lm), **outputs(g.lm, d.lm)}
    reference.update(loss2_g=train_step(g), loss2_d=train_step(d), policy2=hf_state(g.lm),
                     discriminator2=hf_state(d.lm))  # fmt: skip
    if dist.get_rank() == 0:
        torch.save(reference, work / "reference.pt")

    g2, d2 = build("policy", seed=10), build("discriminator", seed=10)  # a fresh process's objects, other weights
    report["fresh_vs_saved"] = min(max_diff(hf_state(g2.lm), reference["policy"]),
                                   max_diff(hf_state(d2.lm), reference["discriminator"]))  # fmt: skip
    extra = load_checkpoint(latest_checkpoint(work / "run"), **run_state(g2, d2))
    report["rng_equal"] = float(draws() == after_save)
    report["extra_state_equal"] = float(extra == {"step": 1, "data_position": 8})
    report["resume_loss2_diff"] = max(abs(train_step(g2) - reference["loss2_g"]),
                                      abs(train_step(d2) - reference["loss2_d"]))  # fmt: skip
    report["resume_weights2_diff"] = max(max_diff(hf_state(g2.lm), reference["policy2"]),
                                         max_diff(hf_state(d2.lm), reference["discriminator2"]))  # fmt: skip
    return report


def load_layout(work: Path) -> dict[str, float]:
    reference = torch.load(work / "reference.pt", weights_only=True)
    path = latest_checkpoint(work / "run", clean=True)
    # The models alone (as `gad generate` or an export would load them) into other weights: the
    # optimizer's fp32 copy cannot stand in for a model load that went wrong.
    g, d = build("policy", seed=10), build("discriminator", seed=10)
    load_checkpoint(path, {"policy": g.lm, "discriminator": d.lm})
    report = {"weights_diff": max(max_diff(hf_state(g.lm), reference["policy"]),
                                  max_diff(hf_state(d.lm), reference["discriminator"]))}  # fmt: skip
    # The same weights through the HF mapping at TP=1: the logits must be the very same numbers.
    direct_g, direct_d = (build(role, reference[role]).lm for role in ("policy", "discriminator"))
    mine, direct = outputs(g.lm, d.lm), outputs(direct_g, direct_d)
    report["logits_vs_tp1_reference"] = max_diff(mine, direct)
    report["logits_vs_saving_layout"] = max_diff(mine, {k: reference[k] for k in ("logits", "scores")})
    # Models, optimizers and schedulers together into fresh objects: the run goes on from here.
    g, d = build("policy", seed=10), build("discriminator", seed=10)
    extra = load_checkpoint(path, **run_state(g, d))
    report["loaded_step"] = float(extra["step"])
    save_checkpoint(work / "resaved", 1, **run_state(g, d), extra_state=extra)
    report["loss2_diff"] = max(abs(train_step(g) - reference["loss2_g"]), abs(train_step(d) - reference["loss2_d"]))
    report["weights2_update_error"] = max(update_error(hf_state(g.lm), reference["policy"], reference["policy2"]),
                                          update_error(hf_state(d.lm), reference["discriminator"],
                                                       reference["discriminator2"]))  # fmt: skip
    return report


def main(mode: str, work: Path, layouts: list[str]) -> None:
    from megatron.core import parallel_state

    report = {}
    for layout in layouts:
        tp, pp = (int(x) for x in layout.split("x"))
        init_distributed(*((tp, pp) if mode == "save" else (1, 1)), seed=0)
        report[layout] = (save_layout if mode == "save" else load_layout)(work / layout)
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        (work / f"report-{mode}.json").write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":  # dist checkpoint saves start a multiprocessing Manager (spawn)
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
