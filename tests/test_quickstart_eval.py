"""The quickstart's evaluation settings and style rates, without running the pipeline."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from gad_megatron.data import write_jsonl
from gad_megatron.quickstart import FULL, TINY, add_style_rates, build_config, teacher_config


@pytest.mark.parametrize("budget", [FULL, TINY])
def test_eval_budget_is_wider_than_training_and_shared(tmp_path: Path, budget) -> None:
    """Students generate with eval_max_tokens; the training response length stays max_tokens."""
    assert budget.eval_max_tokens > budget.max_tokens
    for name in ("train", "test"):  # build_config checks that the data it points at exists
        write_jsonl(tmp_path / "data" / f"{name}.jsonl", [])
    cfg = build_config(tmp_path, budget, teacher_config(budget.max_tokens, "http://127.0.0.1:1/v1"))
    assert cfg.generate.max_new_tokens == budget.eval_max_tokens
    assert cfg.train.max_response_length == budget.max_tokens


def test_add_style_rates_stores_complete_answer_rate(tmp_path: Path) -> None:
    """Two complete answers (one styled) and one cut at the cap: complete rate 1/2, plain rate 1/3."""
    styled = "In a nutshell: water boils at 100 C. Stay curious!"
    rows = [{"id": "a", "response": styled, "finish_reason": "stop"},
            {"id": "b", "response": "Water boils at 100 C.", "finish_reason": "stop"},
            {"id": "c", "response": "In a nutshell: water boils when its vapour", "finish_reason": "length"}]
    write_jsonl(tmp_path / "generations" / "gad-final" / "test.jsonl", rows)
    (tmp_path / "eval").mkdir()
    results = {"models": ["gad-final"], "suites": ["test"], "results": {"gad-final": {"test": {"n": 3}}}}
    (tmp_path / "eval" / "results.json").write_text(json.dumps(results))

    rates = add_style_rates(SimpleNamespace(run_dir=str(tmp_path)))

    m = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]["gad-final"]["test"]
    assert m["n_complete"] == 2
    assert m["style_rate_complete"] == pytest.approx(1 / 2) and rates == {"gad-final": pytest.approx(1 / 2)}
    assert m["style_rate"] == pytest.approx(1 / 3)


class _FakeServer:
    base_url = "http://127.0.0.1:1/v1"

    def __init__(self, **_: object) -> None:
        pass

    def __enter__(self) -> "_FakeServer":
        return self

    def __exit__(self, *_: object) -> None:
        pass


def test_teacher_answers_test_prompts_with_the_eval_budget(tmp_path: Path, monkeypatch) -> None:
    """Train prompts get the training length, held-out prompts the students' eval budget."""
    import gad_megatron.llama_server
    import gad_megatron.quickstart as qs

    asked: dict[str, int] = {}

    def fake_collect(records, teacher_cfg, cache_path):
        asked.update((r["id"], teacher_cfg.max_tokens) for r in records)
        rows = [{**r, "teacher_response": "In a nutshell: ok. Stay curious!",
                 "teacher_meta": {"finish_reason": "stop", "flags": [], "error": None}} for r in records]
        return rows, SimpleNamespace(ok=len(rows), cached=0, failed=0)

    monkeypatch.setattr(gad_megatron.llama_server, "LlamaServer", _FakeServer)
    monkeypatch.setattr(qs, "collect", fake_collect)
    train, test = qs.split_prompts(TINY.n_train, TINY.n_test)
    teacher = qs.collect_teacher(tmp_path, TINY, train, test)
    assert teacher.max_tokens == TINY.max_tokens
    assert {asked[r["id"]] for r in train} == {TINY.max_tokens}
    assert {asked[r["id"]] for r in test} == {TINY.eval_max_tokens}
    assert (tmp_path / "data" / "test.jsonl").is_file()


def test_finished_stages_are_reused_only_with_the_same_settings(tmp_path: Path, monkeypatch) -> None:
    """A rerun reuses every stage; switching D's kind trains warmup and GAD again (with that D), not SeqKD."""
    import gad_megatron.quickstart as qs
    import gad_megatron.trainer.run as run
    from gad_megatron.config import load_config, save_resolved_config

    trained: list[str] = []

    def fake_train_stage(cfg):  # what train_stage leaves behind: its resolved config and final/COMPLETE
        trained.append(cfg.train.stage)
        out = Path(cfg.run_dir) / cfg.train.stage
        (out / "final").mkdir(parents=True, exist_ok=True)
        (out / "final" / run.COMPLETE_MARKER).write_text("complete\n")
        save_resolved_config(cfg, out)
        return out / "final"

    monkeypatch.setattr(run, "train_stage", fake_train_stage)
    for name in ("train", "test"):
        write_jsonl(tmp_path / "data" / f"{name}.jsonl", [])
    cfg = build_config(tmp_path, TINY, teacher_config(TINY.max_tokens, "http://127.0.0.1:1/v1"))

    qs.train_all(cfg, TINY, fresh=False)
    assert trained == ["seqkd", "warmup", "gad"]
    qs.train_all(cfg, TINY, fresh=False)
    assert trained == ["seqkd", "warmup", "gad"]
    qs.train_all(cfg, TINY, fresh=False, discriminator="likelihood-ratio")
    assert trained[3:] == ["warmup", "gad"]
    warmup, gad = (load_config(tmp_path / s / "config.resolved.yaml").train for s in ("warmup", "gad"))
    assert warmup.disc_score == gad.disc_score == "likelihood_ratio"
    assert warmup.disc_pretrain.epochs == 1 and gad.disc_pretrain.epochs == 0
    assert warmup.disc_pretrain.val_prompts == TINY.d_pretrain_val < TINY.n_train
    qs.train_all(cfg, TINY, fresh=False, discriminator="likelihood-ratio")
    assert len(trained) == 5
    # GAD's own settings are the same, but it starts from the warmup stage, which changed
    qs.train_all(cfg, replace(TINY, warmup_steps=3), fresh=False, discriminator="likelihood-ratio")
    assert trained[5:] == ["warmup", "gad"]
    qs.train_all(cfg, TINY, fresh=True, discriminator="likelihood-ratio")
    assert trained[7:] == ["seqkd", "warmup", "gad"]
    saved = tmp_path / "gad" / "config.resolved.yaml"  # as an older version wrote it: a field since removed
    saved.write_text(saved.read_text().replace("train:\n", "train:\n  a_removed_field: 1\n", 1))
    qs.train_all(cfg, TINY, fresh=False, discriminator="likelihood-ratio")
    assert trained[10:] == ["gad"]
