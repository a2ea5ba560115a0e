"""Every config shipped in configs/ validates (run from the repo root, as the README does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gad_megatron.config import load_config
from tests.helpers.shared_data import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_is_valid(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the configs name ../shared/data as seen from the repo root: give a clone elsewhere that layout
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared").symlink_to(shared_data_dir().parent)
    monkeypatch.chdir(tmp_path / "repo")
    cfg = load_config(path)
    assert cfg.trust_remote_code is False
    assert cfg.teacher is None or cfg.teacher.api_key_env in (None, "OPENAI_API_KEY")
