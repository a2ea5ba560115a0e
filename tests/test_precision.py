"""Precision settings on the CPU: the fp8 pre-flight errors, and our TransformerConfig kwargs
pinned to megatron-core 0.16.1's real field names and enum values.

Transformer Engine names relied on (2.20, ``transformer_engine.common.recipe``): DelayedScaling,
Float8CurrentScaling, Float8BlockScaling, MXFP8BlockScaling; megatron-core's ``get_fp8_recipe``
builds exactly these (checked below against its source).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from gad_megatron.config import ConfigError, load_config
from gad_megatron.models import precision
from gad_megatron.models.precision import RECIPE_NEEDS, check_precision_supported, precision_overrides

RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
SETTINGS = [("fp32", "blockwise"), ("bf16", "blockwise")] + [("fp8", r) for r in RECIPES]


def fp8_config(tmp_path: Path, recipe: str = "blockwise") -> tuple[str, str]:
    """(precision, fp8_recipe) as a stage reads them: from a YAML run config."""
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"id": "a", "prompt": "hi"}\n')
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"path": str(data)},
                                    "parallel": {"precision": "fp8", "fp8_recipe": recipe}}))  # fmt: skip
    cfg = load_config(path)
    return cfg.parallel.precision, cfg.parallel.fp8_recipe


def raised(tmp_path: Path, recipe: str = "blockwise") -> str:
    with pytest.raises(ConfigError) as err:
        check_precision_supported(*fp8_config(tmp_path, recipe))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """CUDA 12.9 and an importable fake TE offering every recipe class (drop some to test)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    te = types.ModuleType("transformer_engine")
    te.__version__ = "2.20.0"
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    for name, _, _ in RECIPE_NEEDS.values():
        setattr(recipe, name, type(name, (), {}))
    te.common, common.recipe = common, recipe
    for name, module in (("transformer_engine", te), ("transformer_engine.common", common),
                         ("transformer_engine.common.recipe", recipe)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    yield recipe


def test_fp8_without_cuda_is_one_line_before_any_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # A stage calls the check right after loading its config: nothing of TE or a model is touched.
    monkeypatch.setitem(sys.modules, "transformer_engine", None)
    message = raised(tmp_path)
    assert message == ("parallel.precision: fp8 needs Transformer Engine on a CUDA GPU (pip install -e '.[gpu]' "
                       "on a CUDA machine); this machine has no CUDA: use precision: bf16")  # fmt: skip


def test_fp8_without_transformer_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ImportError
    message = raised(tmp_path)
    assert message.startswith("parallel.precision: fp8 needs Transformer Engine, which does not import")
    assert message.endswith("pip install -e '.[gpu]' on a CUDA machine")


@pytest.mark.parametrize(("recipe", "capability", "needs", "fix"), [
    ("delayed", (8, 0), "8.9", "use precision: bf16"),
    ("tensorwise", (8, 6), "8.9", "use precision: bf16"),
    ("blockwise", (8, 9), "9.0", "use fp8_recipe: tensorwise"),  # Ada: fp8 yes, block-scaled GEMM no
    ("mxfp8", (9, 0), "10.0", "use fp8_recipe: tensorwise"),
])  # fmt: skip
def test_fp8_compute_capability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu: types.ModuleType,
                                recipe: str, capability: tuple[int, int], needs: str, fix: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    message = raised(tmp_path, recipe)
    assert f"fp8_recipe: {recipe} needs a GPU of compute capability >= {needs}" in message
    assert f"NVIDIA H100 is {capability[0]}.{capability[1]}" in message and message.endswith(fix)


def test_blockwise_needs_cuda_12_9(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu: types.ModuleType) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert "blockwise needs CUDA >= 12.9; torch is built with CUDA 12.4" in raised(tmp_path, "blockwise")
    check_precision_supported("fp8", "tensorwise")


def test_fp8_recipe_missing_from_transformer_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    fake_gpu: types.ModuleType) -> None:
    monkeypatch.delattr(fake_gpu, "Float8BlockScaling")
    message = raised(tmp_path, "blockwise")
    assert "needs transformer_engine.common.recipe.Float8BlockScaling, missing in Transformer Engine 2.20.0" in message


def test_mxfp8_is_refused_on_compute_capability_12(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fake_gpu: types.ModuleType) -> None:  # fmt: skip
    """A config error before any model, not a failure at the first forward: TE 2.20 has MXFP8
    GEMMs for 10.x only."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX PRO 6000")
    message = raised(tmp_path, "mxfp8")
    assert "mxfp8 runs on compute capability 10.x only; NVIDIA RTX PRO 6000 is 12.0" in message
    check_precision_supported("fp8", "blockwise")


def test_fp8_shapes_per_tp_rank() -> None:
    """Every GEMM dimension of one TP rank a multiple of 16 (MXFP8: 32), named when it is not."""
    from transformers import LlamaConfig

    from gad_megatron.models.precision import check_fp8_shapes, fp8_shape_problems

    def llama(hidden: int, heads: int, kv: int, ffn: int) -> LlamaConfig:
        return LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn)

    qwen7b = llama(3584, 28, 4, 18944)
    assert fp8_shape_problems(qwen7b, 1, "blockwise") == fp8_shape_problems(qwen7b, 4, "blockwise") == []
    assert fp8_shape_problems(qwen7b, 8, "mxfp8") == []
    assert fp8_shape_problems(llama(512, 8, 2, 1000), 2, "blockwise") == ["intermediate_size / TP = 500"]
    smol = llama(576, 9, 3, 1536)  # SmolLM2-135M: head_dim 64
    assert fp8_shape_problems(smol, 1, "blockwise") == fp8_shape_problems(smol, 1, "mxfp8") == []
    odd = llama(528, 6, 2, 1024)  # head_dim 88: multiples of 16, not of 32
    assert fp8_shape_problems(odd, 1, "blockwise") == []
    assert fp8_shape_problems(odd, 1, "mxfp8") == [
        "hidden_size = 528", "query/key/value rows per TP rank ((heads + 2 kv_heads) x head_dim / TP) = 880",
        "attention output columns per TP rank (heads x head_dim / TP) = 528"]  # fmt: skip
    with pytest.raises(ConfigError) as err:
        check_fp8_shapes(llama(104, 4, 2, 256), 1, "blockwise", "the generator")
    assert str(err.value) == (
        "parallel.precision: fp8 needs every GEMM dimension of the generator to be a multiple of 16 (blockwise "
        "recipe, TP=1); not: hidden_size = 104; attention output columns per TP rank (heads x head_dim / TP) = 104: "
        "use precision: bf16 or another tensor_parallel")  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES)
def test_supported_fp8_passes(monkeypatch: pytest.MonkeyPatch, fake_gpu: types.ModuleType, recipe: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    check_precision_supported("fp8", recipe)


def test_bf16_without_native_support_only_warns(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(precision, "_bf16_native", lambda: False)
    check_precision_supported("bf16", "blockwise")
    assert "bf16 is not natively supported" in caplog.text
    check_precision_supported("fp32", "blockwise")


def test_megatron_builds_the_te_recipe_classes_we_check() -> None:
    from megatron.core import fp8_utils

    source = inspect.getsource(fp8_utils)
    for recipe, (name, _, _) in RECIPE_NEEDS.items():
        # megatron wraps DelayedScaling in its own TEDelayedScaling subclass
        assert f"recipe.{name}(" in source or (recipe == "delayed" and "TEDelayedScaling(" in source)


@pytest.mark.parametrize(("prec", "recipe"), SETTINGS)
def test_overrides_are_real_transformer_config_fields(prec: str, recipe: str) -> None:
    from megatron.core.enums import Fp8Recipe
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    kwargs = precision_overrides(prec, recipe)  # type: ignore[arg-type]
    assert set(kwargs) <= fields, set(kwargs) - fields
    hints = typing.get_type_hints(TransformerConfig)
    for name in ("fp8", "fp8_amax_compute_algo"):
        if name in kwargs:
            allowed = {a for arg in typing.get_args(hints[name]) for a in (typing.get_args(arg) or (arg,))}
            assert kwargs[name] in allowed
    if prec == "fp8":
        assert Fp8Recipe(kwargs["fp8_recipe"]).value == recipe
        assert kwargs["params_dtype"] == torch.bfloat16 and kwargs["bf16"] and not kwargs["fp8_param"]
        # megatron refuses first/last bf16 layers with delayed scaling
        assert kwargs.get("first_last_layers_bf16", False) == (recipe != "delayed")
    else:
        assert "fp8" not in kwargs
        assert kwargs["params_dtype"] == {"fp32": torch.float32, "bf16": torch.bfloat16}[prec]


def tiny_hf_config(layers: int = 4) -> typing.Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip


@pytest.mark.parametrize(("prec", "recipe"), SETTINGS)
def test_transformer_config_accepts_overrides_on_cpu(prec: str, recipe: str) -> None:
    from gad_megatron.models.families import transformer_config_from_hf

    config = transformer_config_from_hf(tiny_hf_config(), **precision_overrides(prec, recipe))  # type: ignore[arg-type]
    assert config.params_dtype == (torch.float32 if prec == "fp32" else torch.bfloat16)
    assert config.bf16 == (prec != "fp32") and (config.fp8 is not None) == (prec == "fp8")


def test_bf16_model_keeps_embedding_and_head_bf16_and_d_scores_fp32(megatron_tp1: None) -> None:
    from gad_megatron.models.discriminator import build_discriminator
    from gad_megatron.models.policy import build_gpt

    overrides = precision_overrides("bf16")
    policy = build_gpt(tiny_hf_config(2), "policy", **overrides).model
    assert policy.embedding.word_embeddings.weight.dtype == torch.bfloat16
    assert policy.output_layer.weight.dtype == torch.bfloat16
    d = build_discriminator(tiny_hf_config(2), **overrides).model
    assert d.decoder.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    # D's head is stored in the params dtype (one dtype per model: see build_gpt) and scores in fp32
    assert d.output_layer.weight.dtype == torch.bfloat16
    assert d.output_layer(torch.randn(3, 2, 64, dtype=torch.bfloat16))[0].dtype == torch.float32
