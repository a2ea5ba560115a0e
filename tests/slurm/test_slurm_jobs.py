"""slurm/'s real batch scripts on a real (private, local) Slurm: a stage, preemption + requeue, two nodes.

The jobs train the tiny CPU setup of tests/helpers/tiny_run.py: ``GPUS_PER_NODE`` processes per
node (gloo), ``--gpus-per-node=0`` overriding the scripts' GPU request.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from gad_megatron.data import read_jsonl
from tests.helpers.tiny_run import write_tiny_setup
from tests.slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[2]
GAD_SBATCH = str(REPO / "slurm" / "gad.sbatch")
EVAL_SBATCH = str(REPO / "slurm" / "eval.sbatch")


def job_env(procs_per_node: int) -> dict[str, str]:
    """What the submitting shell would have: the venv on PATH, the repo as GAD_HOME (and first on
    PYTHONPATH: the jobs run this checkout, whichever one the venv has installed)."""
    return {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "GAD_HOME": str(REPO),
        "GPUS_PER_NODE": str(procs_per_node),
        "OMP_NUM_THREADS": "1",
    }


def job_logs(tmp_path: Path, job: int) -> str:
    """The batch log, then every per-node log."""
    paths = [*tmp_path.glob(f"slurm-*-{job}.out"), *sorted((tmp_path / "run" / "logs").glob(f"*-{job}-*.log"))]
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in paths)


def metrics_steps(run: Path, stage: str) -> list[int]:
    return [r["step"] for r in read_jsonl(run / stage / "metrics.jsonl")]


def test_gad_sbatch_trains_the_stage(slurm: SlurmCluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = write_tiny_setup(tmp_path, tiny_model_dir, max_steps=2, init_from=str(tiny_model_dir))
    job = slurm.sbatch("--gpus-per-node=0", GAD_SBATCH, str(cfg), env=job_env(2), cwd=tmp_path)
    info = slurm.wait_job(job, timeout=900)
    report = job_logs(tmp_path, job)[-8000:]
    assert info["JobState"] == "COMPLETED", report
    run = tmp_path / "run"
    assert (run / "gad" / "final" / "COMPLETE").is_file(), report
    assert (run / "gad" / "final" / "discriminator" / "model.safetensors").is_file()
    assert metrics_steps(run, "gad") == [1, 2]
    node_log = run / "logs" / f"gad-{job}-gadn1.log"
    assert [p.name for p in (run / "logs").iterdir()] == [node_log.name]
    assert node_log.read_text().count("INFO gad_megatron.trainer.run: gad finished") == 2, report  # both ranks


@pytest.mark.slow  # 58-95 s here: two trainer starts and a requeue
def test_preempted_job_checkpoints_requeues_and_resumes(slurm: SlurmCluster, tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    """USR1 mid-run: the step in flight ends with a checkpoint, the job requeues itself, resumes, finishes."""
    total = 6
    # No periodic checkpoint: the only one the resumed run can start from is the preemption's.
    cfg = write_tiny_setup(tmp_path, tiny_model_dir, max_steps=total, save_steps=1000, init_from=str(tiny_model_dir))
    job = slurm.sbatch("--gpus-per-node=0", GAD_SBATCH, str(cfg), env=job_env(2), cwd=tmp_path)
    metrics = tmp_path / "run" / "gad" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics_steps(tmp_path / "run", "gad")):  # a step done: mid-run
        running = slurm.job(job)["JobState"] in ("PENDING", "RUNNING")
        assert running and time.monotonic() < deadline, job_logs(tmp_path, job)[-8000:]
        time.sleep(0.5)
    slurm.client("scancel", "--signal=USR1", "--batch", str(job))

    info = slurm.wait_job(job, timeout=900)
    logs = job_logs(tmp_path, job)
    report = logs[-8000:]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, report)
    stopped_at = [int(s) for s in re.findall(r"preempted after step (\d+): checkpoint written, exiting 75", logs)]
    assert len(stopped_at) == 2 and stopped_at[0] == stopped_at[1] and 1 <= stopped_at[0] < total, report  # both ranks
    assert f"requeueing job {job}" in logs and "--stage gad --resume" in logs, report
    # The requeued run started from the preemption's checkpoint (the record no run truncates) ...
    stage, k = tmp_path / "run" / "gad", stopped_at[0]
    first, second = read_jsonl(stage / "starts.jsonl")
    assert (first["resume"], first["step"], first["slurm_job_id"]) == (None, 0, str(job)), first
    checkpoint = str(stage / "megatron" / f"iter_{k:07d}")
    assert (second["resume"], second["checkpoint"], second["step"]) == ("latest", checkpoint, k), second
    assert (second["slurm_job_id"], second["slurm_restart_count"]) == (str(job), 1), second
    # ... and logged every step exactly once: those up to the checkpoint before the requeue, the rest after it.
    rows = read_jsonl(stage / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, total + 1)), report
    assert [r["time"] < second["time"] for r in rows] == [s <= k for s in range(1, total + 1)], report
    assert (stage / "final" / "COMPLETE").is_file()


@pytest.mark.slow  # 27-76 s here, with the CPU shared
def test_gad_sbatch_on_two_nodes(slurm_two_nodes: SlurmCluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    """``sbatch --nodes 2``: one torchrun per node, their workers meet in one rendezvous and train together."""
    cfg = write_tiny_setup(tmp_path, tiny_model_dir, max_steps=2, init_from=str(tiny_model_dir))
    # Gloo finds its address from the host name, which both "nodes" share: name the interface.
    env = {**job_env(1), "GLOO_SOCKET_IFNAME": "gadnet0"}
    job = slurm_two_nodes.sbatch("--nodes=2", "--gpus-per-node=0", GAD_SBATCH, str(cfg), env=env, cwd=tmp_path)
    info = slurm_two_nodes.wait_job(job, timeout=900)
    report = job_logs(tmp_path, job)[-8000:]
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "gadn[1-2]", (info, report)
    assert (tmp_path / "run" / "gad" / "final" / "COMPLETE").is_file(), report
    assert metrics_steps(tmp_path / "run", "gad") == [1, 2]
    for node in ("gadn1", "gadn2"):  # one worker per node, each in the 2-process job
        log = (tmp_path / "run" / "logs" / f"gad-{job}-{node}.log").read_text()
        assert "INFO gad_megatron.trainer.run: gad finished" in log, report


def test_eval_sbatch_sweeps_checkpoints_as_an_array(slurm: SlurmCluster, tmp_path: Path, tiny_model_dir: Path) -> None:
    """An array task per model generates; a dependent plain job generates with final/ and evaluates every model."""
    cfg = write_tiny_setup(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    for model in ("checkpoint-1", "checkpoint-2", "final"):  # a trained run's models, as the trainer marks them
        shutil.copytree(tiny_model_dir, run / "gad" / model)
        (run / "gad" / model / "COMPLETE").write_text("ok\n")
    sets = ["--set", f"generate.prompt_sets=[{tmp_path / 'data.jsonl'}]", "--set", "generate.limit=2",
            "--set", "generate.max_new_tokens=4", "--set", "eval.distinguishability=false"]
    env = job_env(1)
    array = slurm.sbatch("--array=0-1", "--gpus-per-node=0", EVAL_SBATCH, str(cfg), *sets, env=env, cwd=tmp_path)
    final = slurm.sbatch(f"--dependency=afterok:{array}", "--gpus-per-node=0", EVAL_SBATCH, str(cfg), *sets, env=env,
                         cwd=tmp_path)
    info = slurm.wait_job(final, timeout=600)
    paths = sorted([*tmp_path.glob("slurm-*.out"), *(run / "logs").glob("*")])
    logs = "\n".join(p.read_text(errors="replace") for p in paths)
    assert info["JobState"] == "COMPLETED", logs[-8000:]
    models = ["gad-step1", "gad-step2", "gad-final"]
    assert all((run / "generations" / m / "data.jsonl").is_file() for m in models), logs[-8000:]
    assert json.loads((run / "eval" / "results.json").read_text())["models"] == [*models, "teacher"]
