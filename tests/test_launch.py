"""Rank layout from torchrun's or SLURM's variables, and a real rendezvous from SLURM's alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gad_megatron.parallel.launch import Launch, detect_launch, first_host, init_distributed
from tests.helpers.torchrun import ENV, ROOT, free_port

RANK_SCRIPT = """
import json, sys, torch
from gad_megatron.parallel.launch import init_distributed
from megatron.core import parallel_state as ps
launch = init_distributed(tp=2, pp=1, seed=0)
total = torch.tensor([float(launch.rank + 1)])
torch.distributed.all_reduce(total)
json.dump({"rank": launch.rank, "source": launch.source, "tp_rank": ps.get_tensor_model_parallel_rank(),
           "sum": total.item()}, open(sys.argv[1] + f".{launch.rank}", "w"))
"""


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("gpu[003-005,9],cpu1", "gpu003"), ("node7", "node7"), ("a-b[12]", "a-b12"), ("x[1,3-4]", "x1")],
)
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_torchrun_variables_win_over_slurm() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}  # fmt: skip
    assert detect_launch(env) == Launch(3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_variables_give_rank_world_and_master() -> None:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "41",
           "SLURM_JOB_NODELIST": "gpu[003-004]"}  # fmt: skip
    launch = detect_launch(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr) == (5, 16, 5, "gpu003")
    assert launch.master_port == 20041 and launch.source == "slurm"


def test_no_launcher_is_a_world_of_one() -> None:
    launch = detect_launch({})
    assert (launch.rank, launch.world_size, launch.source) == (0, 1, "single")


def test_layout_that_does_not_divide_the_world_is_refused() -> None:
    with pytest.raises(ValueError, match="world size 3 is not a multiple of tensor x pipeline parallel = 2 x 1"):
        init_distributed(tp=2, pp=1, launch=Launch(0, 3, 0, "127.0.0.1", free_port(), "single"))


def test_two_tasks_rendezvous_from_slurm_variables_alone(tmp_path: Path) -> None:
    """What srun gives each task (no torchrun): both join one gloo world, TP=2 groups form."""
    out = tmp_path / "rank.json"
    port = str(free_port())
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(out)], cwd=ROOT,
            env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
                 "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port},
        )  # fmt: skip
        for rank in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
    assert [r["tp_rank"] for r in results] == [0, 1]
    assert {r["source"] for r in results} == {"slurm"} and {r["sum"] for r in results} == {3.0}
