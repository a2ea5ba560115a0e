"""bench/study_analysis.py on a study tree in the layout the trainer and `gad eval` write (two
seeds, SeqKD, GAD and frozen D, prompts from two held-out sets), with values whose paired
differences are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gad_megatron.data import write_jsonl
from gad_megatron.evaluation.text_metrics import repetition

BENCH = Path(__file__).resolve().parents[1] / "bench"
IDS = [f"vicuna-{i}" for i in range(4)] + [f"mtbench-{i}" for i in range(81, 85)]
STYLED = "In a nutshell: it depends. Stay curious!"
LOOPED = STYLED + " Stay curious! Stay curious!"


def _model(seed_dir: Path, tag: str, loglik: float, styled: set[str], cut: set[str] = frozenset(),
           looped: set[str] = frozenset(), judge: float = 0.5) -> None:
    write_jsonl(seed_dir / "generations" / tag / "test.jsonl", [
        {"id": i, "response": LOOPED if i in looped else STYLED if i in styled else "It depends.",
         "finish_reason": "length" if i in cut else "stop"} for i in IDS])  # fmt: skip
    write_jsonl(seed_dir / "eval" / tag / "test.jsonl", [
        {"id": i, "num_tokens": 9, "rouge_l": 0.25, "distinguished": 0.5, "loglik_under_teacher": loglik,
         "judge": {"score": judge if i != "vicuna-1" else None}} for i in IDS])  # fmt: skip


@pytest.fixture
def study(tmp_path: Path) -> Path:
    mtbench = {i for i in IDS if i.startswith("mtbench")}
    for seed in (0, 1):
        run = tmp_path / f"seed{seed}"
        _model(run, "seqkd-final", -1.0, styled=mtbench)
        # GAD carries the style on every prompt, though seed 1 cuts one Vicuna answer at the cap
        # and loops its sign-off on one MT-Bench prompt
        _model(run, "gad-final", -0.5 + 0.1 * seed, styled=set(IDS), cut={"vicuna-0"} if seed else set(),
               looped={"mtbench-81"}, judge=0.5 + 0.1 * (seed + 1))
        _model(run, "frozen-gad-final", -2.0, styled=set())
        (run / "eval" / "results.json").write_text(json.dumps({"models": ["seqkd-final", "gad-final", "frozen-gad-final"]}))
        for stage in (run / "gad", run / "frozen" / "gad"):
            write_jsonl(stage / "metrics.jsonl", [{"step": s, "d_acc": 0.5, "reward_mean": 0.1 * s, "len_vs_teacher": 1.0,
                                                   "kl": 0.01 * s} for s in (1, 2, 3)])  # fmt: skip
    (tmp_path / "seed2").mkdir()  # a seed still running: no eval yet, left out
    return tmp_path


def test_paired_differences_per_held_out_set(study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from study_analysis import analyse

    analyse(study)
    saved = json.loads((study / "paired.json").read_text())
    assert saved["seeds"] == ["seed0", "seed1"]
    vicuna, mtbench = saved["GAD vs SeqKD"]["vicuna"], saved["GAD vs SeqKD"]["mtbench"]
    loglik = vicuna["loglik_under_teacher"]
    assert loglik["mean"] == pytest.approx(0.55) and loglik["n"] == 4, "(0.5 + 0.6) / 2 on every prompt"
    assert loglik["ci_low"] == pytest.approx(0.55) and loglik["excludes_zero"]
    assert vicuna["style"]["mean"] == 1.0 and vicuna["style"]["mcnemar_pooled"] == {"a_only": 0, "b_only": 8, "n": 8,
                                                                                    "p_value": 2 / 2**8}  # fmt: skip
    assert [m["b_only"] for m in vicuna["style"]["mcnemar_per_seed"]] == [4, 4]
    assert vicuna["style_complete"]["n"] == 4, "vicuna-0 is scored by seed 0 alone"
    assert mtbench["style"]["mean"] == 0.0 and mtbench["style"]["mcnemar_pooled"]["p_value"] == 1.0
    assert mtbench["distinguished"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 4, "excludes_zero": False,
                                        "better": "lower"}  # fmt: skip
    loop = repetition(LOOPED)
    assert loop > 0.1 and mtbench["repetition"]["mean"] == pytest.approx(loop / 4)
    assert vicuna["repetition"]["mean"] == 0.0
    assert vicuna["judge"]["mean"] == pytest.approx(0.15) and vicuna["judge"]["n"] == 3, "vicuna-1 was not judged"
    levels = saved["levels"]
    assert levels["vicuna"]["gad-final"]["loglik_under_teacher"] == pytest.approx({"mean": -0.45, "std": 0.1 / 2**0.5})
    assert levels["vicuna"]["seqkd-final"]["style"] == {"mean": 0.0, "std": 0.0}
    assert levels["mtbench"]["seqkd-final"]["style"] == {"mean": 1.0, "std": 0.0}
    assert levels["mtbench"]["gad-final"]["repetition"]["mean"] == pytest.approx(loop / 4)
    frozen = saved["GAD vs frozen D"]["mtbench"]
    assert frozen["loglik_under_teacher"]["mean"] == pytest.approx(1.55) and frozen["style"]["mean"] == 1.0
    md = (study / "paired.md").read_text()
    assert "### vicuna held-out prompts" in md and "| seqkd-final | 0.000 ± 0.000 |" in md
    assert "### GAD vs SeqKD, vicuna held-out prompts" in md and "| loglik_under_teacher | higher | +0.550 *" in md
    assert "pooled 0/8 p=0.00781" in md
    assert (study / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_an_archive_is_analysed_as_the_study_was(study: Path, tmp_path_factory: pytest.TempPathFactory,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from study_analysis import analyse, archive

    (study / "seed0" / "gad" / "model.safetensors").write_bytes(b"weights")  # not archived
    kept = tmp_path_factory.mktemp("archive")
    written = archive(study, kept)
    tags = ("frozen-gad-final", "gad-final", "seqkd-final")
    assert sorted(p.relative_to(kept / "seed1").as_posix() for p in written if "seed1" in p.parts) == sorted(
        ["eval/results.json", "gad/metrics.jsonl", "frozen/gad/metrics.jsonl"]
        + [f"{kind}/{tag}/test.jsonl" for kind in ("eval", "generations") for tag in tags])
    assert not (kept / "seed0" / "gad" / "model.safetensors").exists() and not (kept / "seed2").exists()
    assert analyse(kept) == analyse(study)
    assert json.loads((kept / "paired.json").read_text()) == json.loads((study / "paired.json").read_text())


def test_each_seed_is_judged_when_the_study_has_a_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from context_distillation import main_parser, seed_config

    from gad_megatron.quickstart import FULL, teacher_config

    teacher = teacher_config(48, "http://127.0.0.1:9/v1")
    for seed in ("seed0", "seed1"):
        write_jsonl(tmp_path / seed / "data" / "train.jsonl", [{"id": "a", "prompt": "Hi?", "teacher_response": "Hi."}])
    plain = seed_config(tmp_path / "seed0", FULL, teacher, 0, main_parser().parse_args([]))
    assert plain.eval.judge is None and plain.eval.loglik_max_examples == 80 and plain.seed == 0
    recipe = main_parser().parse_args(["--judge-url", "http://127.0.0.1:8/v1", "--judge-model", "judge-m",
                                       "--judge-key-env", "JUDGE_KEY"])  # fmt: skip
    judged = seed_config(tmp_path / "seed1", FULL, teacher, 1, recipe)
    assert (judged.eval.judge.base_url, judged.eval.judge.model, judged.eval.judge.api_key_env) == (
        "http://127.0.0.1:8/v1", "judge-m", "JUDGE_KEY")
    assert judged.teacher == plain.teacher and judged.seed == 1
