"""The resharding layer: a Megatron model's TP x PP shards -> full HF-named tensors, in buckets.

One stream serves the inference engine's ``update_weights`` (:func:`sync_weights`) and HF
checkpoint export (:func:`gad_megatron.rollout.hf_export.export_hf`). Every rank runs the same loop over the same plan, in
lockstep, so no PP layout can leave a rank waiting:

1. **Plan.** Each pipeline stage reports its shards' shapes and dtypes (one object all-gather
   over the PP group). A stage's tensors of one dtype fill buckets, in order, up to
   ``bucket_bytes`` full (TP-gathered) bytes; a larger tensor is a bucket of its own. Tensors
   without HF name (the last stage's tied output-layer copy at PP > 1) are left out.
2. **TP gather.** The owning stage's ranks pack their shards into their slot of one flat
   buffer ``[tp * slot]`` and fill the other slots with one collective per bucket.
3. **PP delivery.** Engine ranks of other stages receive the bucket point to point from the
   owning stage of their own pipeline. Ranks without an engine receive nothing, and a
   data-parallel replica without any engine skips the bucket altogether.
   MoE experts with expert parallelism (EP): every EP rank holds the same local experts'
   shapes, so a bucket of expert tensors is planned on EP rank 0's names and gathered a second
   time, over the EP group, into ``[ep * tp * slot]``; EP rank ``r``'s row holds its experts
   (global numbers ``r * E/ep + local``).
4. **Unpack.** :func:`families.gather` joins a tensor's shards and
   ``ModelLayout.megatron_to_hf`` splits QKV / gate-up and cuts the vocabulary padding: the
   name mapping lives in :mod:`gad_megatron.models.families` only.

Memory: one flat buffer, sized to the largest bucket the rank handles, is allocated once and
reused; at TP = 1 a stage's own tensors are read from the parameters, without buffer. A tensor
is unpacked as a view where the layout allows (TP = 1; the vocabulary tensors, the largest,
which get a bucket of their own); otherwise joining TP shards copies it, and the QKV split
copies q/k/v (strided in the fused tensor). The consumer still holds the previous tensor
while the next one is built, so the peak extra memory is the buffer plus two layer tensors'
copies: within ``max(bucket_bytes, largest tensor) + largest tensor`` for LM shapes, where
the vocabulary tensors dwarf a layer's. The price: **a yielded tensor is valid only until
the next one is requested** (a view of the reused buffer or of a live parameter); a consumer
that keeps tensors copies them, as HF export does. Both engines copy each tensor into
their parameters at once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gad_megatron.models.families import ModelLayout, Split, gather
from gad_megatron.models.moe import global_expert_name, is_expert, local_expert_name
from gad_megatron.models.policy import MegatronLM, model_device

DEFAULT_BUCKET_BYTES = 256 << 20

__all__ = [
    "DEFAULT_BUCKET_BYTES", "Bucket", "SyncStats", "TensorPlan", "plan_buckets", "stream_hf_weights", "sync_weights",
]  # fmt: skip


@dataclass(frozen=True)
class TensorPlan:
    """One Megatron tensor inside a bucket."""

    name: str  # global Megatron name
    split: Split
    shape: tuple[int, ...]  # one TP rank's shard
    offset: int  # element offset of the shard inside a rank's slot of the bucket

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Bucket:
    """Tensors of one pipeline stage and dtype, moved by one collective (per hop and group)."""

    stage: int
    dtype: torch.dtype
    tp: int
    tensors: tuple[TensorPlan, ...]
    ep: int = 1  # expert tensors gathered over this many EP ranks (named as on EP rank 0)

    @property
    def slot_numel(self) -> int:
        """Elements one TP rank contributes."""
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of the gathered bucket: the flat buffer ``[ep * tp * slot_numel]``."""
        return self.slot_numel * self.tp * self.ep * self.dtype.itemsize


def _pp_group() -> Any:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def _ep() -> tuple[int, int]:
    """(EP rank, EP size) of this rank."""
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size()


def _stage_params(lm: MegatronLM, layout: ModelLayout) -> dict[str, torch.Tensor]:
    """Global Megatron name -> this stage's (TP-sharded) parameter, detached. With EP, experts
    are named as on EP rank 0 (this rank's own experts, its local numbers)."""
    from megatron.core import parallel_state

    stage = parallel_state.get_pipeline_model_parallel_rank()
    params = dict(lm.model.named_parameters())
    experts, ep = getattr(layout, "num_experts", 0), _ep()[1]
    names = [n for n in layout.names_of_stage(stage) if local_expert_name(n, experts, ep, 0) is not None]
    missing = [layout.to_local(n)[1] for n in names if layout.to_local(n)[1] not in params]
    if missing:
        raise ValueError(f"stage {stage} has no parameters {missing[:4]}: is lm.model the unwrapped GPTModel?")
    return {n: params[layout.to_local(n)[1]].detach() for n in names}


def plan_buckets(lm: MegatronLM, layout: ModelLayout, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Bucket]:
    """The buckets of the whole model in pipeline order, the same on every rank (collective over PP)."""
    mine = [(name, tuple(p.shape), p.dtype) for name, p in _stage_params(lm, layout).items()]
    stages: list[Any] = [None] * layout.pp
    dist.all_gather_object(stages, mine, group=_pp_group())
    ep = _ep()[1]
    buckets: list[Bucket] = []
    for stage, tensors in enumerate(stages):
        # One open bucket per dtype (and expert or not): megatron-core keeps norm weights in fp32
        # beside bf16 linears, and consecutive-only grouping would cut a bucket at every norm.
        open_bucket: dict[tuple[torch.dtype, int], int] = {}
        for name, shape, dtype in tensors:
            split = layout.split_of(name)
            # Shapes only (meta tensors): the mapping itself says which tensors have no HF name.
            if not layout.megatron_to_hf(name, gather([torch.empty(shape, device="meta")] * layout.tp, split)):
                continue
            gathered = ep if is_expert(name) else 1
            i = open_bucket.get((dtype, gathered))
            if split == Split.VOCAB:  # alone, so that unpacking it is a view (the largest tensors)
                i = len(buckets)
                buckets.append(Bucket(stage, dtype, layout.tp, ()))
            elif i is None or (buckets[i].slot_numel + math.prod(shape)) * layout.tp * gathered * dtype.itemsize \
                    > bucket_bytes:
                open_bucket[(dtype, gathered)] = i = len(buckets)
                buckets.append(Bucket(stage, dtype, layout.tp, (), gathered))
            tensor = TensorPlan(name, split, shape, buckets[i].slot_numel)
            buckets[i] = Bucket(stage, dtype, layout.tp, buckets[i].tensors + (tensor,), gathered)
    return buckets


def _deliver(flat: torch.Tensor, owned: bool, owner: int, receivers: Iterable[int]) -> None:
    """Send a packed bucket from the owning stage to the engine ranks of this pipeline."""
    if owned:
        for work in [dist.isend(flat, dst) for dst in receivers]:
            work.wait()
    else:
        dist.recv(flat, src=owner)


def _all_gather_in_place(flat: torch.Tensor, mine: torch.Tensor, group: Any) -> None:
    """Fill every TP rank's slot of ``flat`` [tp * slot]; ``mine`` is this rank's slot, packed.

    NCCL gathers in place. Gloo's all-gather stages the whole output in a temporary (a second
    bucket) and was 2.8x slower than an all-reduce of the zero-padded buffer (128 MiB, 2 CPU
    ranks: 0.56 s vs 0.20 s), which allocates nothing and is exact (x + 0 == x).
    """
    if dist.get_backend(group) != "gloo":
        dist.all_gather_into_tensor(flat, mine, group=group)
        return
    start = mine.data_ptr() - flat.data_ptr()
    flat.view(torch.uint8)[:start].zero_()
    flat.view(torch.uint8)[start + mine.nbytes :].zero_()
    dist.all_reduce(flat, group=group)


def _full(bucket: Bucket, t: TensorPlan, slots: torch.Tensor | None, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full Megatron tensor ``t`` from one EP rank's gathered ``slots`` [tp, slot] (None:
    from this stage's parameters), as a view wherever the layout allows."""
    if slots is None:
        return params[t.name]
    if bucket.tp == 1:  # gather() of one shard would still copy it (torch.cat)
        return slots[0, t.offset : t.offset + t.numel].view(t.shape)
    if len(bucket.tensors) == 1 and t.split in (Split.COLUMN, Split.VOCAB):
        return slots.view(-1, *t.shape[1:])  # split on dim 0 and alone: the slots in order are the whole
    return gather([slots[r, t.offset : t.offset + t.numel].view(t.shape) for r in range(bucket.tp)], t.split)


def stream_hf_weights(
    lm: MegatronLM, layout: ModelLayout | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dst_ranks: Iterable[int] | None = None, plan: list[Bucket] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """``(hf_name, full tensor)`` for every HF tensor of the model, on the ranks in ``dst_ranks``
    (default: all); the other ranks yield nothing but must iterate the stream to its end too.

    Every rank must call with the same ``bucket_bytes`` and ``dst_ranks``. Tensors come stage
    by stage, each exactly once, in its parameter's dtype, on its device. A tensor is valid
    only until the next one is requested (see the module docstring). ``plan``: the buckets
    :func:`plan_buckets` made for these arguments (made here when not given).
    """
    from megatron.core import parallel_state

    layout = layout or lm.layout
    plan = plan if plan is not None else plan_buckets(lm, layout, bucket_bytes)
    params = _stage_params(lm, layout)
    dsts = set(range(dist.get_world_size()) if dst_ranks is None else dst_ranks)
    ep_rank, ep = _ep()
    experts = getattr(layout, "num_experts", 0)
    if ep == 1 and not dsts & set(dist.get_process_group_ranks(parallel_state.get_model_parallel_group())):
        return  # no engine in this data-parallel replica: nothing to gather or send (with EP: its experts)
    me, stage = dist.get_rank(), parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    expert_tp_rank = parallel_state.get_expert_tensor_parallel_rank()  # experts' TP group (same size)
    pipeline = dist.get_process_group_ranks(_pp_group())
    keep = me in dsts

    def receivers(bucket: Bucket) -> list[int]:
        return [r for r in pipeline if r in dsts and r != pipeline[bucket.stage]]

    def uses_buffer(bucket: Bucket) -> bool:  # else TP = EP = 1 and nothing to send: read the parameters
        return (bucket.tp * bucket.ep > 1 or bool(receivers(bucket))) if bucket.stage == stage else keep

    sizes = [b.nbytes for b in plan if uses_buffer(b)]
    buffer = torch.empty(max(sizes), dtype=torch.uint8, device=model_device()) if sizes else None
    for bucket in plan:
        owned = bucket.stage == stage
        if not (owned or keep):
            continue
        flat = None
        if uses_buffer(bucket):
            assert buffer is not None
            flat = buffer[: bucket.nbytes].view(bucket.dtype)
            if owned:
                row = flat.view(bucket.ep, -1)[ep_rank if bucket.ep > 1 else 0]  # this EP rank's [tp * slot]
                rank_in_tp = expert_tp_rank if bucket.ep > 1 else tp_rank
                mine = row[rank_in_tp * bucket.slot_numel : (rank_in_tp + 1) * bucket.slot_numel]
                for t in bucket.tensors:
                    mine[t.offset : t.offset + t.numel].copy_(params[t.name].reshape(-1))
                if bucket.tp > 1:
                    tp_group = (parallel_state.get_expert_tensor_parallel_group() if bucket.ep > 1
                                else parallel_state.get_tensor_model_parallel_group())  # fmt: skip
                    _all_gather_in_place(row, mine, tp_group)
                if bucket.ep > 1:
                    _all_gather_in_place(flat, row, parallel_state.get_expert_model_parallel_group())
            if receivers(bucket):
                _deliver(flat, owned, pipeline[bucket.stage], receivers(bucket))
        if keep:
            for r in range(bucket.ep):
                slots = None if flat is None else flat.view(bucket.ep, bucket.tp, bucket.slot_numel)[r]
                for t in bucket.tensors:
                    name = t.name if bucket.ep == 1 else global_expert_name(t.name, experts, bucket.ep, r)
                    yield from layout.megatron_to_hf(name, _full(bucket, t, slots, params))


# --- engine sync ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncStats:
    """One weight sync, as seen by one rank."""

    seconds: float
    bytes: int  # HF tensor bytes this rank handed to its engine (0 without one)
    tensors: int
    peak_bytes: int | None = None  # extra memory the sync allocated at its peak (when measured)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


@contextlib.contextmanager
def _allocation_peak(enabled: bool) -> Iterator[list[int]]:
    """Peak bytes torch allocated inside the block over what was live at its start, appended to
    the yielded list on exit. GPU: the CUDA allocator's peak. CPU: the allocations and frees
    torch's profiler records (exact, unlike RSS)."""
    peak: list[int] = []
    if not enabled:
        yield peak
    elif torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield peak
        torch.cuda.synchronize()
        peak.append(torch.cuda.max_memory_allocated() - base)
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield peak
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())  # fmt: skip
        live = high = 0
        for event in events:
            live += event.nbytes()  # negative for a free
            high = max(high, live)
        peak.append(high)


class _Counted:
    """Wraps a stream, counting what passes through."""

    def __init__(self, stream: Iterator[tuple[str, torch.Tensor]]) -> None:
        self.stream, self.bytes, self.tensors = stream, 0, 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.stream:
            self.bytes += tensor.numel() * tensor.element_size()
            self.tensors += 1
            yield name, tensor


def sync_weights(lm: MegatronLM, layout: ModelLayout | None, engine: Any | None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, measure_memory: bool = False) -> SyncStats:  # fmt: skip
    """Load the model's current weights into ``engine`` on every rank that has one.

    Every rank calls it (``engine=None`` on ranks hosting none). Order: wake the engine's
    weights, stream, then wake its KV cache (vLLM), so the cache is not allocated while the
    stream's buffer is alive. ``measure_memory`` fills ``SyncStats.peak_bytes`` (CPU: the
    profiler slows the sync a little).

    Stale weights: the stream reads ``lm.model``'s parameters as they are. With the distributed
    optimizer's ``overlap_param_gather`` the updated shards reach them only in the next
    forward's hooks: call ``ddp.start_param_sync(force_sync=True)`` first. With tied embeddings
    at PP > 1 the schedule must all-reduce the embedding's gradients with its last-stage copy
    (``config.finalize_model_grads_func = finalize_model_grads``, as Megatron-LM sets it), or
    the engine, which gets the embedding, drifts from the copy the trainer's loss uses.
    """
    start = time.perf_counter()
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, engine is not None)
    layout = layout or lm.layout
    # The object exchanges (pickles, freed by gloo's threads whenever) come before the measured part.
    plan = plan_buckets(lm, layout, bucket_bytes)
    with _allocation_peak(measure_memory) as peak:
        stream = _Counted(stream_hf_weights(lm, layout, bucket_bytes, [r for r, h in enumerate(hosts) if h], plan))
        if engine is None:
            for _ in stream:  # yields nothing here, but takes part in every collective
                pass
        else:
            (getattr(engine, "wake_weights", None) or engine.wake)()
            engine.update_weights(stream)
            if hasattr(engine, "wake_kv_cache"):
                engine.wake_kv_cache()
        seconds = time.perf_counter() - start
    return SyncStats(seconds, stream.bytes, stream.tensors, peak[0] if peak else None)
