"""A real short training run (warmup + gad on a tiny model) -> checkpoint sweep -> eval -> report.

The report's images are checked three ways: the PNG files decode (PIL), every ``<img>`` in the
HTML is an embedded base64 PNG that decodes, and, where Debian's ``chromium`` is installed, a
headless browser loads them all (bench/eval_report_browser.py).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from gad_megatron import cli
from gad_megatron.config import parse_config
from gad_megatron.data import read_jsonl, write_jsonl
from gad_megatron.evaluation.evaluate import evaluate_run
from gad_megatron.evaluation.generate import run_generate
from gad_megatron.evaluation.text_metrics import rouge_l_f1
from gad_megatron.evaluation.report import plot_training_curves, write_report
from tests.helpers.requires import require
from tests.helpers.shared_data import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
VICUNA = shared_data_dir() / "vicuna80.jsonl"
TOPICS = ["rain", "tea", "bikes", "maps"]


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for key in ("href", "src"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(a[key])


def _decode_png(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()  # full decode, not only the header
    return img.size


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """warmup (3 steps) then gad (3 steps) with the real trainers; checkpoint-2 + final (step 3)."""
    from gad_megatron.trainer.run import train_stage

    root = tmp_path_factory.mktemp("report")
    data = root / "train.jsonl"
    write_jsonl(data, [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"One fact about {t}?"}],
                        "teacher_response": f"In short: {t} is interesting."} for i, t in enumerate(TOPICS)])
    raw = {
        "run_dir": str(root / "run"), "seed": 1, "student": str(tiny_model_dir),
        "data": {"path": str(data), "max_prompt_length": 128},
        "train": {"batch_prompts": 2, "num_generations": 2, "max_response_length": 8,
                  "max_steps": 3, "save_steps": 2, "disc_only_steps": 1, "report_to": [],
                  "learning_rate": 1e-4, "disc_learning_rate": 1e-4},
        "parallel": {"precision": "fp32", "micro_batch_tokens": 272},
        # Sampled: a tiny random model's greedy output is whitespace only, which would leave nothing to score.
        "generate": {"prompt_sets": [str(VICUNA)], "limit": 4, "max_new_tokens": 6, "batch_size": 4, "temperature": 1.0},
        "eval": {"teacher_model": str(tiny_model_dir), "loglik_max_examples": 4},
    }
    for stage in ("warmup", "gad"):
        train_stage(parse_config({**raw, "train": {**raw["train"], "stage": stage}}))
    return parse_config(raw)


@pytest.fixture(scope="module")
def reported_run(trained_run):
    """The trained run after `gad generate --sweep`, `gad eval` (teacher answers written as the endpoint
    would have fetched them) and `gad report`: (config, the value evaluate_run returned)."""
    run = Path(trained_run.run_dir)
    assert run_generate(trained_run, sweep=str(run)) == 0
    prompts = read_jsonl(run / "generations" / "gad-final" / "vicuna80.jsonl")
    write_jsonl(run / "generations" / "teacher" / "vicuna80.jsonl",
                [{"id": r["id"], "prompt": r["prompt"], "response": f"In short: answer {i} to the question, café 你好.",
                  "num_tokens": 9, "finish_reason": "stop", "model": "teacher"} for i, r in enumerate(prompts)])
    res = evaluate_run(trained_run)
    assert cli.main(["report", str(run)]) == 0
    return trained_run, res


def test_sweep_eval_report(reported_run):
    cfg, res = reported_run
    run = Path(cfg.run_dir)
    assert (run / "warmup" / "metrics.jsonl").is_file() and (run / "gad" / "metrics.jsonl").is_file()
    tags = sorted(p.name for p in (run / "generations").iterdir())
    assert tags == ["gad-final", "gad-step2", "teacher", "warmup-final", "warmup-step2"]

    saved = json.loads((run / "eval" / "results.json").read_text())
    assert saved["models"] == ["warmup-step2", "warmup-final", "gad-step2", "gad-final", "teacher"]
    assert saved["suites"] == ["vicuna80"]
    m = saved["results"]["gad-final"]["vicuna80"]
    # Recomputed from the generations the numbers come from.
    gen = read_jsonl(run / "generations" / "gad-final" / "vicuna80.jsonl")
    teacher = {r["id"]: r["response"] for r in read_jsonl(run / "generations" / "teacher" / "vicuna80.jsonl")}
    assert m["n"] == len(gen) == 4 and set(m["ngram_f1"]) == {"1", "2", "3", "4", "5", "6"}
    assert m["rouge_l"] == pytest.approx(sum(rouge_l_f1(r["response"], teacher[r["id"]]) for r in gen) / 4, abs=1e-12)
    assert m["length"]["count"] == 4
    assert m["truncated_frac"] == sum(r["finish_reason"] == "length" for r in gen) / 4
    # Every teacher answer starts "In short:" and no sampled answer of a random tiny model does:
    # the held-out n-gram classifier separates them all.
    assert m["distinguishability"]["n_test"] == 8 and m["distinguishability"]["accuracy"] == 1.0
    assert m["loglik"]["under_teacher"]["mean_token_loglik"] < 0 and m["loglik"]["under_teacher"]["tokens"] > 0
    assert m["loglik"]["teacher_under_model"]["mean_token_loglik"] < 0
    assert "rouge_l" not in saved["results"]["teacher"]["vicuna80"]  # not scored against itself
    details = read_jsonl(run / "eval" / "gad-final" / "vicuna80.jsonl")
    assert len(details) == 4 and all(d["distinguished"] == 1.0 for d in details), "per prompt, for paired statistics"
    under_teacher = [d["loglik_under_teacher"] for d in details]
    assert all(v < 0 for v in under_teacher) and all(d["loglik_teacher_under_model"] < 0 for d in details)
    assert "per_prompt" not in m["loglik"]["under_teacher"] and "per_prompt" not in m["distinguishability"]
    assert res["results"].keys() == saved["results"].keys()

    out = run / "report"
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| model |" in md and "gad-final" in md and "ROUGE-L" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["curves_run.png", "lengths_vicuna80.png", "sweep_run.png"]
    for name in pngs:
        assert f"]({name})" in md
        w, h = _decode_png((out / name).read_bytes())
        assert w > 200 and h > 100

    html_text = (out / "report.html").read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(html_text)
    assert len(parser.srcs) == 3 and parser.scripts == 0 and parser.external == []  # self-contained
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        assert _decode_png(base64.b64decode(src.split(",", 1)[1], validate=True))[0] > 200
    assert "café 你好" in html_text  # examples, escaped, UTF-8
    assert "<h2>Examples</h2>" in html_text


def test_headless_browser_loads_images(reported_run):
    require(None if shutil.which("chromium") else "chromium is not installed (apt-get install chromium)")
    out = Path(reported_run[0].run_dir) / "report"
    script = ROOT / "bench" / "eval_report_browser.py"
    proc = subprocess.run([sys.executable, str(script), str(out / "report.html")], capture_output=True, text=True, timeout=180)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, result
    assert result["images"] == result["loaded"] == 3
    assert all(int(w) > 200 and int(h) > 100 for w, h in (s.split("x") for s in result["sizes"]))


def test_curves_tolerate_missing_keys_and_bad_lines(tmp_path):
    from gad_megatron.evaluation.report import load_run

    run = tmp_path / "run"
    (run / "seqkd").mkdir(parents=True)
    (run / "seqkd" / "metrics.jsonl").write_text(
        '{"step": 1, "sft_loss": 2.0}\n{"step": 2}\nnot json\n{"step": 3, "sft_loss": NaN, "len_mean": 5}\n')
    loaded = load_run(run)
    assert [r["step"] for r in loaded["metrics"]["seqkd"]] == [1, 2, 3]
    assert plot_training_curves(loaded["metrics"], tmp_path / "c.png").is_file()
    assert plot_training_curves({"seqkd": [{"step": 1}]}, tmp_path / "none.png") is None
    paths = write_report([run], tmp_path / "rep")  # no eval results, no generations: still a report
    assert "no eval/results.json" in paths["markdown"].read_text()
    assert len(paths["images"]) == 1


def test_style_rate_in_tables_and_sweep(tmp_path):
    """The quickstart's headline (results.json's style_rate, from add_style_rates) reaches the report."""
    run = tmp_path / "quickstart"
    tags = ["smollm2-135m-instruct", "seqkd-final", "gad-final", "teacher"]
    rates = {"smollm2-135m-instruct": 0.05, "seqkd-final": 0.4, "gad-final": 0.625, "teacher": 0.95}
    results = {"models": tags, "suites": ["quickstart"],
               "results": {t: {"quickstart": {"n": 8, "len_mean": 20.0, "style_rate": rates[t]}} for t in tags}}
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text(json.dumps(results))
    paths = write_report([run], tmp_path / "rep")
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "| model | teacher style | length |" in md
    assert "| gad-final | 62% | 20.0 |" in md and "| teacher | 95% | 20.0 |" in md
    assert "<th>teacher style</th>" in paths["html"].read_text(encoding="utf-8")
    (sweep,) = paths["images"]
    # One 4.5-inch panel per plotted metric at 90 dpi: style rate and length, not length alone.
    assert _decode_png(sweep.read_bytes())[0] == round(2 * 4.5 * 90)


def test_complete_answer_style_rate_and_lc_judge_columns(tmp_path):
    """style_rate_complete (with its n_complete) and judge_score_lc appear as columns next to the raw ones."""
    run = tmp_path / "quickstart"
    metrics = {"n": 40, "len_mean": 25.0, "style_rate": 0.6, "style_rate_complete": 0.8, "n_complete": 30,
               "judge_score": 61.23, "judge_score_lc": 52.46}
    results = {"models": ["gad-final"], "suites": ["quickstart"], "results": {"gad-final": {"quickstart": metrics}}}
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.json").write_text(json.dumps(results))
    md = write_report([run], tmp_path / "rep")["markdown"].read_text(encoding="utf-8")
    assert ("| model | teacher style, complete answers | teacher style | judge (50 = parity) | judge, length-controlled "
            "| length |") in md
    assert "| gad-final | 80% of 30 | 60% | 61.2 | 52.5 | 25.0 |" in md


def test_loglik_examples_are_spread_over_the_suite():
    from gad_megatron.evaluation.evaluate import spread

    ids = [f"vicuna-{i}" for i in range(4)] + [f"mtbench-{i}" for i in range(4)]
    assert spread(ids, 4) == ["vicuna-0", "vicuna-2", "mtbench-0", "mtbench-2"], "both sets, not the first four"
    assert spread(ids, 3) == [ids[0], ids[2], ids[5]]
    assert spread(ids, None) == ids and spread(ids, 8) == ids and spread(ids, 20) == ids
