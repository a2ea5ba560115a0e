"""slurm/'s scripts: syntax and shellcheck clean; run_info.py answers as the CLI reads configs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.requires import require
from tests.helpers.tiny_run import write_tiny_setup

SLURM = Path(__file__).resolve().parents[2] / "slurm"
SCRIPTS = sorted([*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch"), *SLURM.glob("dev/*.sh")])


def test_every_stage_has_a_batch_script() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"launch.sh", "common.sh", "collect.sbatch", "seqkd.sbatch", "warmup.sbatch", "gad.sbatch",
            "eval.sbatch", "install_local_slurm.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(SLURM)))
def test_script_parses_and_is_shellcheck_clean(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    require(None if shutil.which("shellcheck") else "shellcheck is not installed (slurm/dev/install_local_slurm.sh)")
    # -x and source-path: check the sbatch scripts together with the common.sh they source.
    proc = subprocess.run(["shellcheck", "-x", "--source-path=SCRIPTDIR", "--severity=style", str(script)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("ci", ["true", ""])
def test_install_script_fails_under_ci_only_where_it_cannot_install(tmp_path: Path, ci: str) -> None:
    """An empty PATH: no Slurm to find, no apt-get to install it with."""
    proc = subprocess.run([shutil.which("bash") or "bash", str(SLURM / "dev" / "install_local_slurm.sh")],
                          env={"PATH": str(tmp_path), "CI": ci}, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == (1 if ci else 0), proc.stderr
    assert "cannot install slurm-wlm munge shellcheck iproute2 util-linux here" in proc.stderr


def test_run_info_reads_the_run_dir_with_overrides(tmp_path: Path) -> None:
    cfg = write_tiny_setup(tmp_path, tmp_path / "model")  # the model is not loaded
    run_info = [sys.executable, str(SLURM / "run_info.py"), "run-dir", "train", "--config", str(cfg)]
    plain = subprocess.run(run_info, capture_output=True, text=True, check=True).stdout.strip()
    moved = subprocess.run([*run_info, "--set", f"run_dir={tmp_path / 'elsewhere'}"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert (plain, moved) == (str(tmp_path / "run"), str(tmp_path / "elsewhere"))
