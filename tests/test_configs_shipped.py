"""Every config shipped in configs/ validates (run from the repo root, as the README does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gad_megatron.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    assert cfg.trust_remote_code is False
    assert cfg.teacher is None or cfg.teacher.api_key_env in (None, "OPENAI_API_KEY")
