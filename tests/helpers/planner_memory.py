"""Bytes of weights, fp32 main gradients and optimizer states megatron-core allocates on each rank.

    torchrun --nproc_per_node 2 tests/helpers/planner_memory.py OUT.json PP EP PRECISION DISTRIBUTED MODEL_DIR...

Every rank builds each model as the trainer does (``build_policy`` with the training and
precision overrides, ``build_actor``), takes one SFT step (Adam allocates its moments on the
first step) and measures the storages its tensors live in, each storage once. Rank 0 writes
one row per rank and model: ``{model, stage, dp, weights, grads, optimizer}``.
tests/test_planner.py compares them with ``planner.state_bytes`` (and measures DP = PP = 1
in process with :func:`train_and_measure`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gad_megatron.trainer.actor import Actor
    from gad_megatron.trainer.batching import TokenBatch


def storages(tensors: Iterable[torch.Tensor]) -> dict[int, int]:
    """{storage address: bytes} of the storages ``tensors`` live in (views of one buffer count once)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def allocated_state_bytes(actor: Actor) -> dict[str, int]:
    """{weights, grads, optimizer}: the model's parameters, their ``main_grad`` buffers, and what the
    optimizer holds besides (fp32 main params and their grads where they are copies, Adam's states)."""
    params = list(actor.ddp.parameters())
    weights, grads = storages(params), storages(p.main_grad for p in params)
    inner = [chained.optimizer for chained in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])]
    main = [p for opt in inner for group in opt.param_groups for p in group["params"]]
    states = [t for opt in inner for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    held = storages(main + [p.grad for p in main if p.grad is not None] + states)
    optimizer = sum(size for ptr, size in held.items() if ptr not in weights and ptr not in grads)
    return {"weights": sum(weights.values()), "grads": sum(grads.values()), "optimizer": optimizer}


def sft_batch(vocab: int, rows: int = 2, width: int = 8) -> TokenBatch:
    """Random rows of ``width`` tokens, the last ``width - 3`` targets the response."""
    from gad_megatron.trainer.batching import TokenBatch

    ids = torch.randint(0, vocab, (rows, width), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(rows, width)
    mask[:, 2:-1] = 1.0
    return TokenBatch(input_ids_BT=ids, target_ids_BT=ids.roll(-1, 1), loss_mask_BT=mask,
                      lengths_B=torch.full((rows,), width), response_start_B=torch.full((rows,), 2))  # fmt: skip


def train_and_measure(model_dir: str | Path, precision: str, distributed_optimizer: bool) -> dict[str, int]:
    """This rank's allocated state bytes of the policy at ``model_dir`` after one SFT step."""
    from gad_megatron.models.policy import build_policy
    from gad_megatron.models.precision import precision_overrides
    from gad_megatron.trainer.actor import TRAINING_OVERRIDES, build_actor
    from gad_megatron.trainer.ops import sft_update

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    lm = build_policy(model_dir, dtype, **TRAINING_OVERRIDES, **precision_overrides(precision))
    actor = build_actor(lm, lr=1e-3, clip_grad=1.0, distributed_optimizer=distributed_optimizer)
    sft_update(actor, [sft_batch(lm.hf_config.vocab_size)])
    return allocated_state_bytes(actor)


def main(out: str, pp: str, ep: str, precision: str, distributed: str, *model_dirs: str) -> None:
    from megatron.core import parallel_state

    from gad_megatron.parallel.launch import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=int(pp), seed=0, ep=int(ep))
    where = {"stage": parallel_state.get_pipeline_model_parallel_rank(),
             "dp": parallel_state.get_data_parallel_world_size()}  # fmt: skip
    rows = [{"model": d, **where, **train_and_measure(d, precision, distributed == "1")} for d in model_dirs]
    gathered: list[list[dict]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(gathered, rows)
    if torch.distributed.get_rank() == 0:
        Path(out).write_text(json.dumps([row for rank_rows in gathered for row in rank_rows]))
    destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
