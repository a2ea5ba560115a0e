"""Config validation: unknown keys, wrong types, missing paths, overrides, CLI exit codes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gad_megatron.config import (
    REMOVED_FIELDS,
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    save_resolved_config,
)


def write_config(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def base(tmp_path: Path) -> dict:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n')
    return {"run_dir": str(tmp_path / "run"), "data": {"path": str(data)}}


def test_minimal_config_gets_paper_defaults(tmp_path: Path, base: dict) -> None:
    cfg = load_config(write_config(tmp_path, base))
    assert isinstance(cfg, RunConfig)
    assert cfg.train.num_generations == 8
    assert cfg.train.beta == 0.001
    assert cfg.train.max_grad_norm == 0.2
    assert cfg.train.disc_only_steps == 10
    assert cfg.student == "smollm2-135m-instruct"
    assert cfg.trust_remote_code is False


def test_unknown_key_is_named(tmp_path: Path, base: dict) -> None:
    base["train"] = {"learning_rat": 1e-6}
    with pytest.raises(ConfigError, match=r"train\.learning_rat: unknown key"):
        load_config(write_config(tmp_path, base))


@pytest.mark.parametrize("dotted", sorted(REMOVED_FIELDS))
def test_a_removed_field_names_its_replacement(tmp_path: Path, base: dict, dotted: str) -> None:
    """A knob that would silently do nothing is refused, with what to do instead, in one line,
    whether the YAML sets it or ``--set`` does; a replacement it names is a live field."""
    section, key = dotted.split(".")
    assert key not in RunConfig.model_fields[section].annotation.model_fields
    expected = f"{tmp_path / 'run.yaml'}: {dotted} was removed: {REMOVED_FIELDS[dotted]}"
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, {**base, section: {key: True}}))
    assert str(err.value) == expected
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, base), [f"{dotted}=true"])
    assert str(err.value) == expected
    for named_section, field in re.findall(r"\b(train|parallel)\.(\w+)", REMOVED_FIELDS[dotted]):
        assert field in RunConfig.model_fields[named_section].annotation.model_fields, (dotted, field)


def test_removed_fields_name_their_replacements() -> None:
    assert REMOVED_FIELDS["train.micro_batch_size"].startswith("parallel.micro_batch_tokens")
    assert REMOVED_FIELDS["train.gradient_checkpointing"].startswith("parallel.recompute_activations")
    assert REMOVED_FIELDS["train.bf16"].startswith("parallel.precision")
    for trl_only in ("disc_single_pass", "padding_free", "trl_args"):
        assert REMOVED_FIELDS[f"train.{trl_only}"].endswith("(bench/trl_baseline) only; delete the key")


def test_cli_refuses_a_removed_field_set_on_the_command_line_before_any_model_loads(tmp_path: Path,
                                                                                     base: dict) -> None:
    """``gad train --set train.gradient_checkpointing=true``: exit 2, one line, nothing loaded or
    written (the student does not even exist)."""
    path = write_config(tmp_path, {**base, "student": str(tmp_path / "no-such-model")})
    proc = subprocess.run([sys.executable, "-m", "gad_megatron.cli", "train", "--config", str(path), "--stage", "gad",
                           "--set", "train.gradient_checkpointing=true"], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.strip().endswith("train.gradient_checkpointing was removed: parallel.recompute_activations "
                                        "(none, selective or full)")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_wrong_type_is_named(tmp_path: Path, base: dict) -> None:
    base["train"] = {"num_generations": "eight"}
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.num_generations"):
        load_config(write_config(tmp_path, base))


def test_missing_data_file(tmp_path: Path, base: dict) -> None:
    base["data"]["path"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="data.path: file not found"):
        load_config(write_config(tmp_path, base))


def test_missing_required_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data: Field required"):
        load_config(write_config(tmp_path, {"run_dir": "x"}))


def test_parallel_section_defaults_and_checks(tmp_path: Path, base: dict) -> None:
    par = load_config(write_config(tmp_path, base)).parallel
    assert (par.tensor_parallel, par.pipeline_parallel, par.rollout_tensor_parallel) == (1, 1, 1)
    assert par.micro_batch_tokens == 12288 and par.precision == "bf16" and par.fp8_recipe == "blockwise"
    assert par.distributed_optimizer is True and par.rollout_gpu_memory_utilization == 0.35
    assert par.recompute_activations == "none"
    for override, message in (("parallel.tensor_parallel=0", r"parallel\.tensor_parallel"),
                              ("parallel.precision=fp16", r"parallel\.precision"),
                              ("parallel.fp8_recipe=hybrid", r"parallel\.fp8_recipe"),
                              ("parallel.rollout_gpu_memory_utilization=1.0", r"rollout_gpu_memory_utilization"),
                              ("parallel.zero_stage=3", r"parallel\.zero_stage: unknown key"),
                              ("parallel.recompute_activations=partial", r"parallel\.recompute_activations"),
                              ("parallel.micro_batch_tokens=3000", r"must hold the longest sequence.*3584")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, base), [override])


def test_disc_updates_per_step_defaults_to_the_paper_and_must_be_positive(tmp_path: Path, base: dict) -> None:
    assert load_config(write_config(tmp_path, base)).train.disc_updates_per_step == 1
    assert load_config(write_config(tmp_path, base), ["train.disc_updates_per_step=4"]).train.disc_updates_per_step == 4
    for value in ("0", "-1", "1.5"):
        with pytest.raises(ConfigError, match=r"train\.disc_updates_per_step"):
            load_config(write_config(tmp_path, base), [f"train.disc_updates_per_step={value}"])


def test_overrides_parse_yaml_values(tmp_path: Path, base: dict) -> None:
    cfg = load_config(write_config(tmp_path, base), ["train.learning_rate=2e-6", "train.report_to=[]", "seed=7"])
    assert cfg.train.learning_rate == 2e-6 and cfg.train.report_to == [] and cfg.seed == 7


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_resolved_config_roundtrip(tmp_path: Path, base: dict) -> None:
    cfg = load_config(write_config(tmp_path, base))
    out = save_resolved_config(cfg, tmp_path / "out")
    again = load_config(out)
    assert again == cfg


def test_cli_bad_config_one_line_exit_2(tmp_path: Path, base: dict) -> None:
    base["bogus"] = 1
    path = write_config(tmp_path, base)
    proc = subprocess.run([sys.executable, "-m", "gad_megatron.cli", "collect", "--config", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "bogus: unknown key" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_help_lists_subcommands() -> None:
    proc = subprocess.run([sys.executable, "-m", "gad_megatron.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for name in ("collect", "train", "generate", "eval", "report", "plan", "quickstart"):
        assert name in proc.stdout
    version = subprocess.run([sys.executable, "-m", "gad_megatron.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("gad ")
