"""What a stage builds from its config, in this process on a tiny model (no step runs): the KL
reference computes exactly as G does, and the transformers engine sits on the model's device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gad_megatron.config import load_config
from tests.helpers.tiny_run import write_tiny_setup


@pytest.fixture
def megatron_tp1() -> Iterator[None]:
    from gad_megatron.parallel.launch import destroy_distributed, init_distributed

    init_distributed(1, 1, 0)
    yield
    destroy_distributed()


def test_kl_reference_has_the_generators_precision(megatron_tp1: None, tmp_path: Path, tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Built without the precision settings, the reference would compute in another precision
    than G: under fp8, a bf16 reference, and a KL between G and its own copy. The fp8 settings
    build on a CPU (the local layers ignore them; only a forward needs Transformer Engine)."""
    from gad_megatron.models.precision import precision_overrides
    from gad_megatron.trainer import run
    from gad_megatron.trainer.actor import TRAINING_OVERRIDES

    cfg = load_config(write_tiny_setup(tmp_path, tiny_model_dir), [f"train.init_from={tiny_model_dir}"])
    fp8 = precision_overrides("fp8", "blockwise")
    monkeypatch.setattr(run, "_precision", lambda cfg: "bf16")
    monkeypatch.setattr(run, "_model_overrides", lambda cfg: {**TRAINING_OVERRIDES, **fp8})
    ctx, *_ = run.build_context(cfg, "gad")
    assert ctx.ref is not None and ctx.g.lm.config.fp8 == "e4m3"
    for key in fp8:
        assert getattr(ctx.ref.config, key) == getattr(ctx.g.lm.config, key), key
    assert {p.dtype for p in ctx.ref.model.parameters()} == {torch.bfloat16}


def test_transformers_engine_sits_on_the_models_device(megatron_tp1: None, tmp_path: Path, tiny_model_dir: Path,
                                                       tiny_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """On a GPU job the engine must generate on the GPU, not silently on the host: it follows
    ``model_device()`` (here stubbed to the meta device, which this CPU machine can build on)."""
    from gad_megatron.models import policy
    from gad_megatron.trainer import run

    cfg = load_config(write_tiny_setup(tmp_path, tiny_model_dir))
    monkeypatch.setattr(policy, "model_device", lambda: torch.device("meta"))
    engine, replicas = run._engine(cfg, str(tiny_model_dir), tiny_tokenizer, torch.float32)
    assert engine.device == torch.device("meta") and replicas.groups == ((0,),)
