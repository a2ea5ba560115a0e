"""A trainable Megatron model: GPTModel + Megatron DDP + optimizer, and one call that runs
micro-batches through megatron-core's pipeline schedule.

Losses are returned to the schedule as ``(sum over this micro-batch, count, metrics)`` with
``calculate_per_token_loss`` on: megatron-core then sums the gradients over micro-batches and
data-parallel ranks and divides them once by the global count (``finalize_model_grads``). So
a token-mean (G) or a pair-mean (D) over the whole global batch is exact whatever the
micro-batching or the data-parallel size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gad_megatron.models.policy import MegatronLM

# (stage output, micro-batch) -> (loss sum, count, metrics); called on the last pipeline stage.
LossFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
# (model chunk, micro-batch) -> this stage's output
ForwardFn = Callable[[torch.nn.Module, Any], torch.Tensor]

TRAINING_OVERRIDES = {"calculate_per_token_loss": True}


@dataclass
class Actor:
    """One trained model (G or D) of this rank: its stage of the pipeline and its TP shard."""

    lm: MegatronLM
    ddp: torch.nn.Module  # megatron.core DistributedDataParallel around lm.model
    optimizer: Any  # megatron.core MegatronOptimizer
    lr: float

    @property
    def module(self) -> torch.nn.Module:
        return self.lm.model


def build_actor(lm: MegatronLM, lr: float, clip_grad: float, distributed_optimizer: bool = True,
                weight_decay: float = 0.0, adam_betas: tuple[float, float] = (0.9, 0.999)) -> Actor:
    """Wrap a model built with :data:`TRAINING_OVERRIDES` in Megatron DDP and an Adam optimizer.

    Constant learning rate and no weight decay (the paper gives peak rates only; verl's actor
    default is constant): megatron-core's optimizer would otherwise decay norm weights too.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = lm.model.config
    if not config.calculate_per_token_loss:
        raise ValueError("build the model with trainer.actor.TRAINING_OVERRIDES (calculate_per_token_loss=True)")
    separate_expert_parameters(lm.model)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer,
                                              grad_reduce_in_fp32=True), lm.model,
    )  # fmt: skip
    config.finalize_model_grads_func = finalize_model_grads  # DP all-reduce, tied-embedding grads, / count
    bf16 = config.bf16
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=lr, min_lr=lr, weight_decay=weight_decay, adam_beta1=adam_betas[0],
            adam_beta2=adam_betas[1], clip_grad=clip_grad, bf16=bf16, params_dtype=config.params_dtype,
            use_distributed_optimizer=distributed_optimizer,
        ),
        [ddp],
    )  # fmt: skip
    use_fused_torch_adam(optimizer)
    return Actor(lm, ddp, optimizer, lr)


def separate_expert_parameters(model: torch.nn.Module) -> int:
    """Give MoE experts their own gradient buffers and optimizer at every EP size, as megatron-core
    does only at EP > 1 (it marks expert weights ``allreduce = False`` there). At EP = 1 the expert
    data-parallel group is the data-parallel group, so the update is the same; what changes is
    that a checkpoint's optimizer has the same two parts (dense, experts) at any EP and resumes
    across EP sizes. -> the number of expert parameters marked."""
    experts = [p for name, p in model.named_parameters() if ".mlp.experts." in name]
    for param in experts:
        param.allreduce = False
    return len(experts)


def use_fused_torch_adam(optimizer: Any) -> int:
    """Switch megatron-core's torch Adam fallback (no Apex, no TE) to torch's fused kernel on CPUs.

    megatron-core builds ``torch.optim.AdamW`` without ``fused``, which on a CPU steps one tensor
    at a time (about 8 passes over memory per parameter); the fused kernel makes one, with the
    same update to float rounding. On GPUs torch already picks its multi-tensor path, and a TE
    or Apex FusedAdam is left alone. -> the number of torch optimizers switched.
    """
    switched = 0
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        on_cpu = all(p.device.type == "cpu" for group in getattr(inner, "param_groups", []) for p in group["params"])
        if isinstance(inner, torch.optim.Adam) and not inner.state and on_cpu:  # AdamW is an Adam
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
            switched += 1
    return switched


def run_micro_batches(
    model: torch.nn.Module, micro: Sequence[Any], forward: ForwardFn, loss_fn: LossFn, train: bool,
) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Every micro-batch through every pipeline stage (forward, and backward when ``train``).

    Every rank of the model-parallel group must pass the same micro-batches. Returns the
    metrics of each micro-batch on the last stage, [] elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rows, width = micro[0].input_ids_BT.shape
    data: Iterator[Any] = iter(micro)

    def forward_step(data_iterator: Iterator[Any], chunk: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        batch = next(data_iterator)
        return forward(chunk, batch), lambda output: loss_fn(output, batch)

    with torch.enable_grad() if train else torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=[model], num_microbatches=len(micro),
            seq_length=width, micro_batch_size=rows, forward_only=not train,
        )  # fmt: skip


def optimizer_step(actor: Actor) -> float:
    """Apply the accumulated gradients (clipped); returns the gradient norm before clipping."""
    ok, grad_norm, _ = actor.optimizer.step()
    if not ok:
        raise FloatingPointError("the optimizer skipped its step (non-finite gradients)")
    return float(grad_norm) if grad_norm is not None else 0.0


def zero_grad(actor: Actor) -> None:
    actor.ddp.zero_grad_buffer()
    actor.optimizer.zero_grad()


def sum_metrics(per_micro: list[dict[str, torch.Tensor]], group: Any = None) -> dict[str, float]:
    """Sum each metric over micro-batches (shares of a global mean add up), then over ``group``
    (the data-parallel ranks); keys ending in ``_max`` are reduced with max instead."""
    keys = sorted({k for m in per_micro for k in m})
    totals = torch.zeros(len(keys), dtype=torch.float64)
    maxima = torch.full((len(keys),), float("-inf"), dtype=torch.float64)
    for metrics in per_micro:
        for i, key in enumerate(keys):
            if key in metrics:
                value = metrics[key].detach().double().cpu()
                totals[i] += value
                maxima[i] = max(maxima[i], value)
    is_max = torch.tensor([k.endswith("_max") for k in keys])
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(totals, group=group)
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX, group=group)
    return {k: float(maxima[i] if is_max[i] else totals[i]) for i, k in enumerate(keys)}
