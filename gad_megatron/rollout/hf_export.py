"""HF checkpoint export of a Megatron model in any TP x PP layout, from the resharding stream.

One rank writes: it receives the full HF-named tensors of :func:`~gad_megatron.rollout.reshard.stream_hf_weights`
one bucket at a time and fills safetensors shards of at most ``max_shard_bytes``, in a
``.<name>.partial`` folder renamed when complete, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gad_megatron.models.convert import export_hf_config
from gad_megatron.models.families import ModelLayout
from gad_megatron.models.policy import MegatronLM
from gad_megatron.rollout.reshard import DEFAULT_BUCKET_BYTES, stream_hf_weights

DEFAULT_SHARD_BYTES = 2 << 30


def _agree(error: str | None, src: int) -> None:
    """Raise ``error`` (decided on rank ``src``) on every rank, so no rank waits in a collective."""
    box = [error]
    dist.broadcast_object_list(box, src=src)
    if box[0]:
        raise FileExistsError(box[0])


def export_hf(lm: MegatronLM, layout: ModelLayout | None, out_dir: str | Path, tokenizer: Any | None = None,
              bucket_bytes: int = DEFAULT_BUCKET_BYTES, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              dst_rank: int = 0) -> Path:  # fmt: skip
    """Write the model as an HF directory (safetensors + config [+ tokenizer]) from rank ``dst_rank``.

    Every rank calls it. Rank ``dst_rank`` holds one bucket and one safetensors shard at a time
    (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index above
    ``max_shard_bytes``), writes into ``.<name>.partial`` beside ``out_dir`` and renames it when
    complete. An existing non-empty ``out_dir`` is refused on every rank. Returns ``out_dir``
    after a barrier, so every rank may read it.
    """
    layout = layout or lm.layout
    out = Path(out_dir)
    writer = dist.get_rank() == dst_rank
    busy = writer and out.exists() and any(out.iterdir())
    _agree(f"{out} exists and is not empty" if busy else None, dst_rank)
    partial = out.with_name(f".{out.name}.partial")
    if writer:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    shards: list[tuple[list[str], int]] = []  # (HF names, tensor bytes) per written file
    current: dict[str, torch.Tensor] = {}
    for name, tensor in stream_hf_weights(lm, layout, bucket_bytes, [dst_rank]):
        if current and sum(t.nbytes for t in current.values()) + tensor.nbytes > max_shard_bytes:
            shards.append(_write_shard(partial, len(shards), current))
        # A copy: the stream's tensors are views of a reused buffer or of live parameters.
        current[name] = tensor.to("cpu", copy=True, memory_format=torch.contiguous_format)
    if writer:
        shards.append(_write_shard(partial, len(shards), current))
        _name_shards(partial, shards)
        export_hf_config(lm.hf_config, layout.role).save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(partial, out)
    dist.barrier()
    return out


def _write_shard(directory: Path, index: int, tensors: dict[str, torch.Tensor]) -> tuple[list[str], int]:
    """Write and empty ``tensors``; returns their names and bytes."""
    from safetensors.torch import save_file

    save_file(tensors, directory / f"shard-{index}.safetensors", metadata={"format": "pt"})
    written = (list(tensors), sum(t.nbytes for t in tensors.values()))
    tensors.clear()
    return written


def _name_shards(directory: Path, shards: list[tuple[list[str], int]]) -> None:
    """Give the written files HF's names, with an index when there are several."""
    if len(shards) == 1:
        (directory / "shard-0.safetensors").rename(directory / "model.safetensors")
        return
    weight_map = {}
    for i, (names, _) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (directory / f"shard-{i}.safetensors").rename(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": sum(size for _, size in shards)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
