"""Start torch.distributed and megatron-core's process groups, under torchrun, srun or neither.

Single node, debugging on a CPU:   torchrun --nproc_per_node 2 -m gad_megatron.cli train ...
SLURM, one task per GPU:           srun --ntasks-per-node 8 python -m gad_megatron.cli train ...
One process:                       python -m gad_megatron.cli train ...

The rank layout comes from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) when present, else from SLURM's (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST`` as master), else
it is a world of one. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None or not head.group(1):
        raise ValueError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = head.group(1), head.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def detect_launch(env: dict[str, str] | None = None) -> Launch:
    """Read the rank layout from torchrun's or SLURM's variables; a world of one otherwise."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return Launch(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # Same port on every task of the job, different for jobs sharing a node.
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            source="slurm",
        )
    return Launch(0, 1, 0, "127.0.0.1", _free_port(), "single")


def init_distributed(
    tp: int = 1, pp: int = 1, seed: int = 0, timeout_minutes: int = 30, launch: Launch | None = None, ep: int = 1
) -> Launch:
    """Initialise torch.distributed, megatron-core's TP/PP/DP/EP groups and the model-parallel RNG.

    Data parallel size is ``world_size / (tp * pp)``. Expert parallelism (MoE models) spreads
    each layer's experts over ``ep`` ranks carved out of those data-parallel ranks (experts keep
    the attention's TP), so ``tp * ep * pp`` must divide the world too. A layout that does not
    divide the world raises before any group is made. Idempotent with the same layout.
    """
    from megatron.core import parallel_state, tensor_parallel

    from gad_megatron.parallel.cpu import enable_cpu_support
    from gad_megatron.parallel.mcore_fixes import apply_moe_router_fix, apply_torch_adam_fixes

    launch = launch or detect_launch()
    if launch.world_size % (tp * pp):
        raise ValueError(
            f"world size {launch.world_size} is not a multiple of tensor x pipeline parallel = {tp} x {pp}"
        )
    if launch.world_size % (tp * ep * pp):
        raise ValueError(f"world size {launch.world_size} is not a multiple of tensor x expert x pipeline "
                         f"parallel = {tp} x {ep} x {pp}")  # fmt: skip
    on_gpu = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        if on_gpu:
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        # On GPUs, NCCL for CUDA tensors and gloo for CPU ones (step metrics, flags, object
        # broadcasts); megatron-core's groups inherit both.
        torch.distributed.init_process_group(
            backend="cpu:gloo,cuda:nccl" if on_gpu else "gloo",
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size()) != (tp, pp, ep):
            raise RuntimeError("megatron-core is already initialised with another TP x PP x EP layout")
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 expert_model_parallel_size=ep)
    enable_cpu_support()
    apply_torch_adam_fixes()
    apply_moe_router_fix()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return launch


def destroy_distributed() -> None:
    """Tear down megatron-core's groups and the default process group (tests, re-launches)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
