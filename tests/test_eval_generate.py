"""Generation: rows and finish reasons, checkpoint discovery, model tags, `gad generate` files and sweeps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gad_megatron.config import ConfigError, parse_config
from gad_megatron.data import read_jsonl
from gad_megatron.evaluation.generate import (
    _generate_hf,
    find_checkpoints,
    final_model,
    generate_responses,
    model_tag,
    run_generate,
)
from gad_megatron.evaluation.suites import BUILTIN_SUITES, load_suite
from tests.helpers.shared_data import shared_data_dir

DATA = shared_data_dir()
VICUNA = DATA / "vicuna80.jsonl"


class _ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM: returns fixed continuations, to test stop/length bookkeeping."""

    def __init__(self, continuations, eos_id):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations
        self.generation_config = type("GC", (), {"eos_token_id": eos_id})()

    def generate(self, input_ids, attention_mask, generation_config):
        rows = [list(r) + self.continuations[i] for i, r in enumerate(input_ids.tolist())]
        width = max(len(r) for r in rows)
        return torch.tensor([r + [generation_config.pad_token_id] * (width - len(r)) for r in rows])


def test_finish_reasons_and_token_counts(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    word = tiny_tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    lm = _ScriptedLM([[word, word, eos], [word] * 4], eos)
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    out = _generate_hf(lm, tiny_tokenizer, prompts, max_new_tokens=4, temperature=0.0, batch_size=2, desc="t")
    assert out[0] == ("hellohello", 2, "stop")  # end-of-turn excluded from the count
    assert out[1][1:] == (4, "length")


def test_generate_responses_tiny_model(tiny_model_dir):
    records = load_suite(str(VICUNA), limit=3).records
    rows = generate_responses(str(tiny_model_dir), records, max_new_tokens=5, temperature=0.0, batch_size=2, tag="tiny")
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # input order, although batched by length
    for row in rows:
        assert set(row) == {"id", "prompt", "response", "num_tokens", "finish_reason", "model"}
        assert 0 <= row["num_tokens"] <= 5
        assert row["finish_reason"] in {"stop", "length"}
        assert row["finish_reason"] == "stop" or row["num_tokens"] == 5
    again = generate_responses(str(tiny_model_dir), records, max_new_tokens=5, batch_size=2, tag="tiny")
    assert [r["response"] for r in again] == [r["response"] for r in rows]  # greedy is deterministic


def test_find_checkpoints_and_tags(tmp_path):
    run = tmp_path / "run"
    for d in ("warmup/final", "gad/checkpoint-10", "gad/checkpoint-2", "gad/final", "gad/checkpoint-5"):
        (run / d).mkdir(parents=True)
        (run / d / "config.json").write_text("{}")
    (run / "gad" / "checkpoint-7").mkdir()  # no model inside: ignored
    found = find_checkpoints(run)
    assert [t for t, _ in found] == ["warmup-final", "gad-step2", "gad-step5", "gad-step10", "gad-final"]
    for d in ("gad/checkpoint-2", "gad/checkpoint-5", "gad/final"):  # the trainer marks finished ones
        (run / d / "COMPLETE").touch()
    assert [t for t, _ in find_checkpoints(run)] == ["warmup-final", "gad-step2", "gad-step5", "gad-final"]
    assert final_model(run) == run / "gad" / "final"
    assert model_tag(str(run / "gad" / "checkpoint-10"), run) == "gad-step10"
    assert model_tag(str(run / "gad" / "final"), run) == "gad-final"
    assert model_tag("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert model_tag("Qwen/Qwen2.5-7B-Instruct") == "Qwen2.5-7B-Instruct"


def test_suites_local_and_builtin_names(monkeypatch):
    suite = load_suite(str(DATA / "seed_tasks175.jsonl"), limit=4)
    assert suite.name == "seed_tasks175" and len(suite.records) == 4
    assert suite.records[0]["reference"] and suite.records[0]["prompt"][0]["role"] == "user"
    assert set(BUILTIN_SUITES) == {"lmsys", "dolly", "selfinst", "vicuna"}
    assert [BUILTIN_SUITES[k].size for k in ("lmsys", "dolly", "selfinst", "vicuna")] == [500, 500, 252, 80]
    with pytest.raises(ConfigError, match="not a built-in suite"):
        load_suite("no_such_suite")

    def offline():
        raise ConnectionError("hub unreachable")

    from gad_megatron.evaluation import suites as suites_mod

    monkeypatch.setitem(suites_mod.BUILTIN_SUITES, "vicuna", suites_mod._HubSuite(offline, 80, "x"))
    with pytest.raises(ConfigError, match="local JSONL"):
        load_suite("vicuna")


def _cfg(tmp_path, tiny_model_dir, **generate):
    return parse_config({
        "run_dir": str(tmp_path / "run"),
        "student": str(tiny_model_dir),
        "data": {"path": str(VICUNA)},
        "generate": {"prompt_sets": [str(VICUNA)], "limit": 2, "max_new_tokens": 4, "batch_size": 2, **generate},
    })


def test_run_generate_writes_and_reuses(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="no trained model"):
        run_generate(cfg)
    assert run_generate(cfg, model=str(tiny_model_dir)) == 0
    out = Path(cfg.run_dir) / "generations" / "model" / "vicuna80.jsonl"
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["vicuna-1", "vicuna-2"]
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["max_new_tokens"] == 4 and meta["temperature"] == 0.0
    stamp = out.stat().st_mtime_ns
    assert run_generate(cfg, model=str(tiny_model_dir)) == 0
    assert out.stat().st_mtime_ns == stamp  # up to date: not regenerated


def test_sweep_every_checkpoint(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, limit=1)
    run = Path(cfg.run_dir)
    for d in ("gad/checkpoint-3", "gad/final"):
        shutil.copytree(tiny_model_dir, run / d)
    (run / "gad" / "checkpoint-3" / "tokenizer.json").unlink()  # a bare checkpoint: student tokenizer is used
    (run / "gad" / "checkpoint-3" / "tokenizer_config.json").unlink()
    assert run_generate(cfg, sweep=str(run)) == 0
    for tag in ("gad-step3", "gad-final"):
        rows = read_jsonl(run / "generations" / tag / "vicuna80.jsonl")
        assert len(rows) == 1 and rows[0]["model"] == tag
    # Default model: the run's final generator.
    cfg2 = _cfg(tmp_path, tiny_model_dir, limit=1, max_new_tokens=3)
    assert run_generate(cfg2) == 0
    assert (run / "generations" / "gad-final" / "vicuna80.jsonl").is_file()


def test_models_with_one_base_name_get_their_own_tags(tmp_path, tiny_model_dir):
    """``final`` names every stage of every run: a model outside the run dir keeps its run and stage in its
    tag; a tag that still collides is refused, not overwritten; the same model again reuses its tag."""
    cfg = _cfg(tmp_path, tiny_model_dir, limit=1)
    run = Path(cfg.run_dir)
    seqkd, gad, twin = (tmp_path / d for d in ("other/seqkd/final", "other/gad/final", "copy/other/gad/final"))
    for d in (seqkd, gad, twin):
        shutil.copytree(tiny_model_dir, d)
    (tmp_path / "other" / "gad" / "checkpoint-4").mkdir()
    assert model_tag(str(seqkd), run) == "other-seqkd-final" and model_tag(str(gad), run) == "other-gad-final"
    assert model_tag(str(tmp_path / "other" / "gad" / "checkpoint-4"), run) == "other-gad-step4"
    assert run_generate(cfg, model=str(seqkd)) == 0 and run_generate(cfg, model=str(gad)) == 0
    for tag, path in (("other-seqkd-final", seqkd), ("other-gad-final", gad)):
        assert json.loads((run / "generations" / tag / "vicuna80.meta.json").read_text())["model"] == str(path)
    out = run / "generations" / "other-gad-final" / "vicuna80.jsonl"
    stamp = out.stat().st_mtime_ns
    assert run_generate(cfg, model=str(gad)) == 0  # the same model again: its own tag, nothing regenerated
    assert run_generate(cfg, sweep=str(tmp_path / "other")) == 0  # a sweep of that run tags its models alike
    assert out.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="model tag 'other-gad-final' is taken"):
        run_generate(cfg, model=str(twin))  # another run also named `other`: same tag, refused
    assert out.stat().st_mtime_ns == stamp and read_jsonl(out)[0]["model"] == "other-gad-final"


def test_cli_generate(tmp_path, tiny_model_dir):
    import yaml

    from gad_megatron import cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "student": str(tiny_model_dir),
                                   "data": {"path": str(VICUNA)}}))
    args = ["--config", str(cfg), "--set", f"generate.prompt_sets=[{VICUNA}]", "--set", "generate.limit=1",
            "--set", "generate.max_new_tokens=2"]
    assert cli.main(["generate", *args, "--model", str(tiny_model_dir)]) == 0
    assert len(read_jsonl(tmp_path / "run" / "generations" / "model" / "vicuna80.jsonl")) == 1
    assert cli.main(["generate", *args[:2]]) == 2  # no prompt sets: a clear config error, exit 2


def test_vllm_backend_bookkeeping(tmp_path, tiny_model_dir, monkeypatch):
    """No GPU here: a stand-in `vllm` module checks the calls, the EOS convention and the split per suite."""
    import types

    calls = []

    class Out:
        def __init__(self, text, ids, reason):
            self.outputs = [types.SimpleNamespace(text=text, token_ids=ids, finish_reason=reason)]

    class FakeLLM:
        def __init__(self, model, seed, trust_remote_code):
            calls.append(("init", model))

        def get_tokenizer(self):
            return types.SimpleNamespace(eos_token_id=2)

        def chat(self, conversations, params, use_tqdm):
            calls.append(("chat", len(conversations), params.max_tokens))
            return [Out(" hi ", [5, 2], "stop") if i % 2 == 0 else Out("long", [5, 6, 7], "length")
                    for i in range(len(conversations))]

    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    monkeypatch.setitem(__import__("sys").modules, "vllm", fake)
    cfg = parse_config({
        "run_dir": str(tmp_path / "run"), "student": str(tiny_model_dir), "data": {"path": str(VICUNA)},
        "generate": {"prompt_sets": [str(VICUNA), str(DATA / "mtbench80_turn1.jsonl")], "limit": 3,
                     "max_new_tokens": 3, "backend": "vllm"},
    })
    assert run_generate(cfg, model=str(tiny_model_dir)) == 0
    assert calls == [("init", str(tiny_model_dir)), ("chat", 6, 3)]  # one engine, both suites in one call
    stop, length = ("hi", 1, "stop"), ("long", 3, "length")  # the end-of-turn token is not counted
    expected = {"vicuna80": [stop, length, stop], "mtbench80_turn1": [length, stop, length]}  # split of one call
    for name, want in expected.items():
        rows = read_jsonl(tmp_path / "run" / "generations" / "model" / f"{name}.jsonl")
        assert [r["id"] for r in rows] == [r["id"] for r in load_suite(str(DATA / f"{name}.jsonl"), limit=3).records]
        assert [(r["response"], r["num_tokens"], r["finish_reason"]) for r in rows] == want
