"""Every config field does something: each field of the ``RunConfig`` model tree is read by the
product, and every key a shipped YAML sets is such a live field.

"Read by the product" (the criterion of :mod:`tests.helpers.config_fields`): some module of
``gad_megatron/`` other than ``config.py`` (whose validators only check values) loads the field
off an expression known to hold its section: ``cfg.train.beta``; ``t = cfg.train; t.beta``;
``def f(teacher: TeacherConfig): teacher.model``; ``for m in cfg.teacher.context_messages: m.role``.
The list of fields comes from the pydantic model, never from a hand-kept list. The bench/ and
tests/ trees do not count: a field only a benchmark reads belongs to that benchmark.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import Field, create_model

from gad_megatron.config import ParallelConfig, RunConfig, TrainConfig, load_config
from tests.helpers.config_fields import config_fields, config_reads, keys_set, unread_fields
from tests.helpers.shared_data import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gad_megatron"
SHIPPED = sorted([*(ROOT / "examples").glob("**/*.yaml"), *(ROOT / "configs").glob("*.yaml")])


def product_files(package: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if p != package / "config.py")


def test_every_config_field_is_read_by_the_product() -> None:
    fields = [dotted for dotted, _owner, _name in config_fields(RunConfig)]
    assert len(fields) > 90 and "parallel.recompute_activations" in fields and "eval.judge.model" in fields
    assert unread_fields(RunConfig, product_files()) == []


def test_the_checker_reports_a_field_nobody_reads() -> None:
    """A section with one extra field that no code reads: the checker names exactly that field."""
    parallel = create_model("ParallelWithKnob", __base__=ParallelConfig, never_read_knob=(int, 0))
    run = create_model("RunWithKnob", __base__=RunConfig, parallel=(parallel, Field(default_factory=parallel)))
    assert unread_fields(run, product_files()) == ["parallel.never_read_knob"]


def test_the_checker_reports_a_field_whose_reads_were_removed(tmp_path: Path) -> None:
    """The product with every read of ``train.disc_only_steps`` renamed away: the checker names it,
    and it was the only one lost (the field of that name on the step context does not count)."""
    copy = tmp_path / "gad_megatron"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    edited = 0
    for path in product_files(copy):
        text = path.read_text(encoding="utf-8")
        if "t.disc_only_steps" in text:
            path.write_text(text.replace("t.disc_only_steps", "t.disc_only_stepz"), encoding="utf-8")
            edited += 1
    assert edited >= 1
    assert unread_fields(RunConfig, product_files(copy)) == ["train.disc_only_steps"]


def test_a_same_named_attribute_elsewhere_is_not_a_read(tmp_path: Path) -> None:
    """``config.bf16`` of megatron's TransformerConfig read the old ``train.bf16``'s name: not a read."""
    module = tmp_path / "m.py"
    module.write_text("def f(config, cfg: RunConfig):\n    return config.bf16, cfg.train.beta\n")
    train = create_model("TrainWithBf16", __base__=TrainConfig, bf16=(bool, False))
    run = create_model("RunWithBf16", __base__=RunConfig, train=(train, Field(default_factory=train)))
    reads = config_reads(run, [module])
    assert ("TrainWithBf16", "beta") in reads and ("TrainWithBf16", "bf16") not in reads


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_yaml_sets_only_live_fields(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the configs name ../shared/data as seen from the repo root: give a clone elsewhere that layout
    (tmp_path / "repo").mkdir()
    (tmp_path / "shared").symlink_to(shared_data_dir().parent)
    monkeypatch.chdir(tmp_path / "repo")
    load_config(path)  # the product loader validates it
    keys = list(keys_set(yaml.safe_load(path.read_text(encoding="utf-8")), RunConfig))
    assert keys and not set(keys) & set(unread_fields(RunConfig, product_files()))
