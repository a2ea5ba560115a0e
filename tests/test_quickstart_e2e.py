"""The whole pipeline, tiny: real llama.cpp teacher -> SeqKD -> warmup -> GAD -> generate -> eval -> report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gad_megatron.data import read_jsonl
from gad_megatron.evaluation.distinguish import wilson_interval
from gad_megatron.style import load_teacher_style, style_match


def quickstart(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gad_megatron.cli", "quickstart", "--tiny", "--run-dir", str(run_dir),
                           *args], capture_output=True, text=True, timeout=1500)  # fmt: skip


@pytest.mark.slow
@pytest.mark.server
def test_quickstart_tiny_end_to_end_and_rerun(tmp_path: Path) -> None:
    run = tmp_path / "qs"
    first = quickstart(run)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "gad quickstart: held-out prompts" in first.stdout and "Report:" in first.stdout

    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["models"] == ["smollm2-135m-instruct", "seqkd-final", "gad-final", "teacher"]
    style = load_teacher_style()
    for tag in results["models"]:
        m = results["results"][tag]["test"]
        # Recomputed from the files the numbers come from: the generations and the per-prompt details.
        responses = [r["response"] for r in read_jsonl(run / "generations" / tag / "test.jsonl")]
        assert len(responses) == m["n"]
        assert m["style_rate"] == sum(style_match(t, style) for t in responses) / len(responses)
        lengths = [d["num_tokens"] for d in read_jsonl(run / "eval" / tag / "test.jsonl")]
        assert len(lengths) == m["n"] and m["len_mean"] == pytest.approx(sum(lengths) / len(lengths)) and m["len_mean"] > 0
        assert m["loglik"]["under_teacher"]["mean_token_loglik"] < 0
    for tag in ("smollm2-135m-instruct", "seqkd-final", "gad-final"):
        d = results["results"][tag]["test"]["distinguishability"]
        correct = round(d["accuracy"] * d["n_test"])
        assert d["accuracy"] == correct / d["n_test"] and d["n_test"] == 2 * d["n_prompts"]
        assert (d["ci_low"], d["ci_high"]) == pytest.approx(wilson_interval(correct, d["n_test"]))
    gad_rows = [json.loads(l) for l in (run / "gad" / "metrics.jsonl").read_text().splitlines()]
    assert any("d_acc" in r and "reward_mean" in r for r in gad_rows)
    # finished stages keep final/ weights only: no resumable checkpoints (optimizer states), no duplicate
    assert not list(run.glob("*/megatron")) and not list(run.glob("*/checkpoint-*"))
    html = (run / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2

    second = quickstart(run)
    assert second.returncode == 0, second.stderr[-4000:]
    # One line per token budget (train, eval); every answer comes from the cache: zero new teacher requests.
    budgets = re.findall(r"teacher, (\d+) tokens: (\d+) answered \((\d+) cached\), (\d+) failed", second.stderr)
    assert len(budgets) == 2, second.stderr[-4000:]
    assert all(ok == cached and failed == "0" for _, ok, cached, failed in budgets), budgets
    assert sum(int(ok) for _, ok, _, _ in budgets) == 12
    for stage in ("seqkd", "warmup", "gad"):
        assert f"{stage}: reusing" in second.stderr

    # The likelihood-ratio D: SeqKD is reused, warmup (with D's pretraining) and GAD train again with it.
    third = quickstart(run, "--discriminator", "likelihood-ratio")
    assert third.returncode == 0, third.stderr[-4000:]
    assert "seqkd: reusing" in third.stderr and "warmup: training again" in third.stderr
    marker = json.loads((run / "gad" / "final" / "discriminator" / "gad_discriminator.json").read_text())
    assert marker["score"] == "likelihood_ratio" and marker["reference"] == str((run / "seqkd" / "final").resolve())
    warmup_rows = [json.loads(l) for l in (run / "warmup" / "metrics.jsonl").read_text().splitlines()]
    val = [r["disc_pretrain/val_acc"] for r in warmup_rows if "disc_pretrain/val_acc" in r]
    assert len(val) == 2 and val[0] == 0.0  # before any update every score is 0: ties count wrong
    gad_rows = [json.loads(l) for l in (run / "gad" / "metrics.jsonl").read_text().splitlines()]
    assert any("d_acc" in r and "time/d_reference" in r for r in gad_rows)
