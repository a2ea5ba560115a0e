"""Shared fixtures: a tiny random model with SmolLM2's real tokenizer, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from gad.models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from gad.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))
