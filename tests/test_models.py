"""Model resolution: the offline alias is converted once and reused; the tiny-model factory works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gad_megatron.models import sources as models
from gad_megatron.config import ConfigError
from tests.conftest import SESSION_DIRS
from tests.helpers.torchrun import ENV


def test_alias_converts_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAD_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []
    real = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda g, o: calls.append(o) or real(g, o))
    first = models.resolve_model_path("smollm2-135m-instruct")
    second = models.resolve_model_path("smollm2-135m-instruct")
    assert first == second and len(calls) == 1
    assert (Path(first) / "model.safetensors").is_file()
    assert not list((tmp_path / "cache" / "models").glob(".*")), "no temp dir left behind"
    tok = models.load_tokenizer(first)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_caches_and_temporary_files_stay_in_pytests_directory(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Not the user's ~/.cache/gad (the converted GGUF is 0.5 GB) nor /tmp, also in a subprocess."""
    probe = ("import tempfile; from gad_megatron.models.sources import cache_root; "
             "print(cache_root()); print(tempfile.gettempdir())")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, check=True).stdout
    base = tmp_path_factory.getbasetemp()
    assert [Path(p) for p in out.split()] == [base / SESSION_DIRS["GAD_CACHE"], base / SESSION_DIRS["TMPDIR"]]
    assert Path(ENV["XDG_CACHE_HOME"]) == base / SESSION_DIRS["XDG_CACHE_HOME"]


def test_bad_specs() -> None:
    with pytest.raises(ConfigError, match="GGUF file not found"):
        models.resolve_model_path("/nope/model.gguf")
    with pytest.raises(ConfigError, match="model path not found"):
        models.resolve_model_path("./no-such-dir")
    assert models.resolve_model_path("org/name") == "org/name"


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        models.resolve_model_path(str(tmp_path))


def test_tokenizer_from_a_tokenizer_only_directory(tiny_tokenizer, tmp_path: Path) -> None:
    """What GAD_TEST_TOKENIZER points at on a bare GPU box: a saved tokenizer, no model."""
    tiny_tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    assert models.load_tokenizer(str(tmp_path)).encode("Hello there") == tiny_tokenizer.encode("Hello there")


def test_tiny_model_factory(tiny_model_dir: Path, tiny_tokenizer) -> None:
    model = models.load_causal_lm(str(tiny_model_dir))
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.config.num_hidden_layers == 2
    ids = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    out = model(**ids)
    assert out.logits.shape[-1] == len(tiny_tokenizer)
    assert torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_smollm2_alias_answers_paris() -> None:
    tok = models.load_tokenizer("smollm2-135m-instruct")
    model = models.load_causal_lm("smollm2-135m-instruct")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text
