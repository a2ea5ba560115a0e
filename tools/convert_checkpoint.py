"""Convert models between Hugging Face and Megatron dist checkpoints (policy or discriminator).

    # HF -> Megatron: a hub id, a local HF directory, a .gguf file or the built-in alias
    python tools/convert_checkpoint.py import --model smollm2-135m-instruct --role policy --out ckpt/policy
    torchrun --nproc_per_node 4 tools/convert_checkpoint.py import --model Qwen/Qwen2.5-7B-Instruct \\
        --role discriminator --tp 2 --pp 2 --out ckpt/d
    torchrun --nproc_per_node 2 tools/convert_checkpoint.py import --model Qwen/Qwen3-30B-A3B --ep 2 --out ckpt/moe
    # Megatron -> HF: policy as *ForCausalLM, discriminator as *ForSequenceClassification (num_labels=1)
    python tools/convert_checkpoint.py export --checkpoint ckpt/d --out hf/d
    torchrun --nproc_per_node 2 tools/convert_checkpoint.py export --checkpoint runs/gad --model policy \\
        --tp 2 --out hf/policy

Run under torchrun for TP x PP x EP > 1 (the world size is a multiple of TP x EP x PP; EP,
expert parallelism, only for mixture-of-experts models), as one process for TP = PP = EP = 1.
The dist checkpoint reshards on load: one imported at TP=1 loads at TP=2 (or any TP x PP x EP)
in training and in ``export``, so the import layout only decides how many ranks
share the conversion's memory. ``import --role discriminator`` keeps an HF sequence-
classification model's ``score.weight`` or, from a causal LM, draws a fresh 1-output head
from ``--seed``. The HF config, role and tokenizer are stored in the checkpoint (``hf/<name>/``,
``meta.json``), so ``export`` needs nothing else; it accepts a checkpoint or a run directory
(its newest complete checkpoint) and streams tensor by tensor: gathered over TP from the
owning pipeline stage, written by rank 0 in safetensors shards.

Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class UsageError(Exception):
    """A problem with the command's input, reported as one line."""


def _local_model_dir(spec: str) -> Path:
    """A local safetensors directory for a model spec (hub ids are downloaded once)."""
    from gad_megatron.config import ConfigError
    from gad_megatron.models.sources import resolve_model_path

    try:
        resolved = resolve_model_path(spec)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(resolved, allow_patterns=patterns))
    except Exception as err:  # network, unknown repo, gated: all one line for the user
        raise UsageError(f"cannot download {spec!r} from the Hugging Face hub: {type(err).__name__}") from None


def _dtype(name: str, hf_config: Any) -> torch.dtype:
    """``auto``: the HF config's dtype where it is a float type, else float32."""
    if name != "auto":
        return DTYPES[name]
    configured = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    configured = str(configured).removeprefix("torch.") if configured is not None else "float32"
    return DTYPES.get(configured, torch.float32)


def _check_layout(hf_config: Any, tp: int, pp: int, ep: int, role: str) -> None:
    from gad_megatron.models.families import layout_from_hf
    from gad_megatron.models.moe import check_expert_parallel

    try:
        layout = layout_from_hf(hf_config, tp, pp, role)  # type: ignore[arg-type]
        if ep > 1 and not layout.family.moe:
            raise ValueError(f"EP={ep}: {layout.family.name} has no experts (expert parallelism is for MoE models)")
        check_expert_parallel(getattr(layout, "num_experts", 1), ep)
    except ValueError as err:
        raise UsageError(str(err)) from None


def import_model(spec: str, role: str, out: Path, tp: int, pp: int, seed: int, dtype_name: str, ep: int = 1) -> Path:
    """HF model -> model-only dist checkpoint at ``out`` (every rank calls this)."""
    from transformers import AutoConfig, AutoTokenizer

    from gad_megatron.checkpoint import save_models
    from gad_megatron.models.convert import HFWeights
    from gad_megatron.models.discriminator import load_discriminator
    from gad_megatron.models.policy import build_policy
    from gad_megatron.parallel.launch import init_distributed

    model_dir = _local_model_dir(spec)
    hf_config = AutoConfig.from_pretrained(model_dir)
    _check_layout(hf_config, tp, pp, ep, role)  # before any process group: the error names the model
    weights = HFWeights(model_dir)
    if role == "discriminator" and "score.weight" in weights and weights["score.weight"].shape[0] != 1:
        raise UsageError(f"{spec}: score.weight has {weights['score.weight'].shape[0]} outputs, a discriminator has 1")
    dtype = _dtype(dtype_name, hf_config)
    hf_config.dtype = dtype  # the exported config then states the dtype its tensors are in

    init_distributed(tp, pp, seed, ep=ep)
    lm = build_policy(model_dir, dtype) if role == "policy" else load_discriminator(model_dir, dtype, seed=seed)
    tokenizers = {}
    if any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        tokenizers[role] = AutoTokenizer.from_pretrained(model_dir)
    return save_models(out, {role: lm}, tokenizers)


def export_model(checkpoint: Path, name: str | None, out: Path, tp: int, pp: int, max_shard_bytes: int,
                 ep: int = 1) -> Path:
    """Model ``name`` of a dist checkpoint -> HF directory ``out`` (every rank calls this)."""
    from transformers import AutoConfig, AutoTokenizer

    from gad_megatron.checkpoint import hf_dir, is_complete, latest_checkpoint, load_checkpoint, read_meta
    from gad_megatron.models.discriminator import build_discriminator
    from gad_megatron.models.policy import build_gpt
    from gad_megatron.parallel.launch import init_distributed
    from gad_megatron.rollout.hf_export import export_hf

    if not checkpoint.is_dir():
        raise UsageError(f"checkpoint not found: {checkpoint}")
    path = checkpoint if is_complete(checkpoint) else latest_checkpoint(checkpoint)
    if path is None:
        raise UsageError(f"{checkpoint}: no complete checkpoint (no COMPLETE marker)")
    models = {n: m for n, m in read_meta(path)["models"].items() if m["role"]}
    if name is None and len(models) != 1:
        raise UsageError(f"{path} holds models {sorted(models)}: choose one with --model")
    name = name or next(iter(models))
    if name not in models:
        raise UsageError(f"{path}: no exportable model {name!r} (has {sorted(models)})")
    role, source = models[name]["role"], hf_dir(path, name)
    hf_config = AutoConfig.from_pretrained(source)
    _check_layout(hf_config, tp, pp, ep, role)

    init_distributed(tp, pp, ep=ep)
    dtype = DTYPES[models[name]["dtype"] or "float32"]
    lm = build_gpt(hf_config, "policy", dtype) if role == "policy" else build_discriminator(hf_config, dtype)
    load_checkpoint(path, {name: lm})
    has_tokenizer = any((source / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(source) if has_tokenizer else None
    try:
        return export_hf(lm, None, out, tokenizer, max_shard_bytes=max_shard_bytes)
    except FileExistsError as err:
        raise UsageError(str(err)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="HF model -> Megatron dist checkpoint")
    imp.add_argument("--model", required=True, help="hub id, HF directory, .gguf file or alias")
    imp.add_argument("--role", choices=("policy", "discriminator"), default="policy")
    imp.add_argument("--seed", type=int, default=0, help="seed of a discriminator's new head")
    imp.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: the HF config's")
    exp = commands.add_parser("export", help="Megatron dist checkpoint -> HF directory")
    exp.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint or a run directory")
    exp.add_argument("--model", help="which model of the checkpoint (needed when it holds several)")
    exp.add_argument("--max-shard-gb", type=float, default=2.0, help="size of each safetensors file")
    for sub in (imp, exp):
        sub.add_argument("--out", required=True, type=Path)
        sub.add_argument("--tp", type=int, default=1, help="tensor parallel size")
        sub.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
        sub.add_argument("--ep", type=int, default=1, help="expert parallel size (mixture-of-experts models)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (errors printed as one line by rank 0)."""
    args = parse_args(argv)
    try:
        if args.command == "import":
            written = import_model(args.model, args.role, args.out, args.tp, args.pp, args.seed, args.dtype, args.ep)
        else:
            written = export_model(args.checkpoint, args.model, args.out, args.tp, args.pp,
                                   int(args.max_shard_gb * 2**30), args.ep)  # fmt: skip
    except (UsageError, OSError, ValueError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"convert_checkpoint {args.command}: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":  # dist checkpoint saves start a multiprocessing Manager (spawn)
    status = main()
    if status == 0:
        from gad_megatron.parallel.launch import destroy_distributed

        destroy_distributed()
    sys.exit(status)
