"""HF state dicts <-> per-(tp_rank, pp_rank) Megatron state dicts, built on :mod:`families`.

What megatron-core 0.16.1 expects of a rank's GPTModel state dict, and this module produces:

* layers numbered from 0 on every pipeline stage (stage p holds global layers
  ``[p * L/pp, (p+1) * L/pp)``);
* embedding and output layer padded to the padded vocabulary (rows added as zeros on import,
  cut on export); each TP rank holds a contiguous block of rows;
* tied embeddings: with PP = 1 the output layer has no weight of its own (GPTModel passes the
  embedding to it), so no ``output_layer.weight``; with PP > 1 the last stage holds a copy of
  the embedding as ``output_layer.weight`` (``LanguageModule.setup_embeddings_and_output_layer``
  zeroes it and all-reduces it with the first stage's embedding at construction; training
  all-reduces the two copies' gradients). Import writes the embedding into it; export ignores
  it, the first stage's embedding being canonical;
* ``*._extra_state`` entries (TE's FP8 metadata, empty for local modules) are neither made nor
  read.

The discriminator is exported as an HF ``*ForSequenceClassification`` with ``num_labels=1``
(``score.weight`` [1, hidden]).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gad_megatron.models.families import ModelLayout, Role, family_of, gather, shard
from gad_megatron.models.moe import local_expert_name

ShardKey = tuple[int, int]  # (tp_rank, pp_rank)
EXTRA_STATE = "._extra_state"


def _hf_names_needed(layout: ModelLayout) -> set[str]:
    return {h for name in layout.megatron_names() for h in layout.hf_names(name)}


def check_hf_keys(layout: ModelLayout, keys: Sequence[str] | set[str]) -> None:
    """Raise a one-line ValueError when an HF state dict does not match the layout.

    ``lm_head.weight`` may be present without being used: a tied copy, or a causal LM's head
    when a discriminator is made from it.
    """
    needed, keys = _hf_names_needed(layout), set(keys)
    missing = sorted(needed - keys)
    unexpected = sorted(keys - needed - {"lm_head.weight"})
    if missing or unexpected:
        raise ValueError(
            f"HF tensors do not match the {layout.family.name} {layout.role} layout: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}"
        )


def stage_state_dicts(
    layout: ModelLayout, hf: Mapping[str, torch.Tensor], pp_rank: int, tp_ranks: Sequence[int] | None = None,
    ep: tuple[int, int] = (0, 1),
) -> dict[int, dict[str, torch.Tensor]]:
    """tp_rank -> the state dict of pipeline stage ``pp_rank`` (local layer numbers, TP shard).

    ``ep`` = (EP rank, EP size): an MoE stage holds only that rank's experts, numbered from 0.
    Each full tensor is built once and cut for every requested TP rank; ``hf`` is only read
    for this stage's (and EP rank's) tensors, so a lazy mapping (:class:`HFWeights`) reads
    1/pp of the files.
    """
    tp_ranks = range(layout.tp) if tp_ranks is None else tp_ranks
    states: dict[int, dict[str, torch.Tensor]] = {t: {} for t in tp_ranks}
    for name in layout.names_of_stage(pp_rank):
        local = local_expert_name(layout.to_local(name)[1], getattr(layout, "num_experts", 0), ep[1], ep[0])
        if local is None:  # another EP rank's expert
            continue
        full = layout.hf_to_megatron(name, hf)
        for tp_rank in tp_ranks:
            # clone: a shard is a view that would keep the whole full tensor alive
            states[tp_rank][local] = shard(full, layout.split_of(name), tp_rank, layout.tp).clone()
    return states


def hf_to_megatron(hf: Mapping[str, torch.Tensor], layout: ModelLayout) -> dict[ShardKey, dict[str, torch.Tensor]]:
    """Every rank's Megatron state dict from a full HF state dict."""
    check_hf_keys(layout, set(hf.keys()))
    return {
        (tp_rank, pp_rank): state
        for pp_rank in range(layout.pp)
        for tp_rank, state in stage_state_dicts(layout, hf, pp_rank).items()
    }


def megatron_to_hf(
    shards: Mapping[ShardKey, Mapping[str, torch.Tensor]], layout: ModelLayout
) -> dict[str, torch.Tensor]:
    """The HF state dict from every rank's Megatron state dict (inverse of :func:`hf_to_megatron`)."""
    for (tp_rank, pp_rank), state in shards.items():
        expected = {layout.to_local(n)[1] for n in layout.names_of_stage(pp_rank)}
        unexpected = sorted(k for k in state if k not in expected and not k.endswith(EXTRA_STATE))
        if unexpected:
            raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) has tensors with no HF mapping: {unexpected[:4]}")
    hf: dict[str, torch.Tensor] = {}
    for name in layout.megatron_names():
        pp_rank, local = layout.to_local(name)
        full = gather([shards[(tp_rank, pp_rank)][local] for tp_rank in range(layout.tp)], layout.split_of(name))
        hf.update(layout.megatron_to_hf(name, full))
    return hf


def load_rank_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a rank's state dict into its GPTModel; every parameter must be covered."""
    result = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"state dict does not fit the model: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}"
        )


class HFWeights(Mapping[str, torch.Tensor]):
    """Tensors of an HF model directory, read from its safetensors files one at a time."""

    def __init__(self, model_dir: str | Path) -> None:
        from safetensors import safe_open

        root = Path(model_dir)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            self._file_of = {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (root / "model.safetensors").is_file():
            with safe_open(root / "model.safetensors", framework="pt") as f:
                self._file_of = {k: root / "model.safetensors" for k in f.keys()}
        else:
            raise ValueError(f"{root}: no model.safetensors(.index.json); convert .bin weights to safetensors first")

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._file_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def export_hf_config(hf_config: Any, role: Role) -> Any:
    """The HF config of an exported model: ``*ForCausalLM``, or ``*ForSequenceClassification``
    with one label for the discriminator."""
    config = copy.deepcopy(hf_config)
    suffix = "ForSequenceClassification" if role == "discriminator" else "ForCausalLM"
    config.architectures = [family_of(hf_config).class_prefix + suffix]
    if role == "discriminator":
        config.num_labels = 1
    return config


def save_hf_checkpoint(out_dir: str | Path, hf: Mapping[str, torch.Tensor], hf_config: Any) -> Path:
    """Write an HF state dict and its config as a directory ``from_pretrained`` loads."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf.items()}, out / "model.safetensors", metadata={"format": "pt"})
    hf_config.save_pretrained(out)
    return out
