"""Distributed checkpoints of a run: save, resume, reshard, atomic.

A checkpoint is a directory::

    iter_0000100/
      dist/            megatron-core dist checkpoint (torch_dist): models, optimizers
                       (fully reshardable), schedulers (common state)
      rng/rank_00003.pt  one per rank: python, numpy, torch CPU and CUDA, megatron's tracker
      hf/<model>/      HF config (and tokenizer, when given) of each model: conversion needs
                       nothing else
      meta.json        step, layout, model roles and dtypes, the caller's JSON-able ``extra_state``
      COMPLETE         written (fsynced) last: a directory without it is partial

Atomicity: every rank writes into ``.tmp-<name>``; after a barrier rank 0 renames it to
``<name>`` and then writes ``COMPLETE``. A save killed at any point leaves the previous
checkpoints intact and :func:`latest_checkpoint` skips the partial one.

Resharding: model and optimizer tensors are saved by their global (TP x PP-independent) keys,
so a checkpoint saved at one TP x PP loads at another. RNG states are per rank and only
restored at the layout they were saved at (elsewhere they would not mean the same streams).

Optimizers are megatron-core ``MegatronOptimizer``s (``get_megatron_optimizer``); schedulers
anything with ``state_dict`` / ``load_state_dict`` (e.g. ``OptimizerParamScheduler``). Requires
:func:`gad_megatron.parallel.launch.init_distributed` first (also for a single process).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gad_megatron.models.policy import MegatronLM

log = logging.getLogger(__name__)

PREFIX, TMP_PREFIX = "iter_", ".tmp-"
COMPLETE, META = "COMPLETE", "meta.json"
DIST_DIR, RNG_DIR, HF_DIR = "dist", "rng", "hf"
# Optimizer state saved per parameter in full-tensor coordinates: loadable at any TP x PP x DP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

Model = MegatronLM | torch.nn.Module


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _layout() -> dict[str, int]:
    """The parallel layout; ``ep`` only with expert parallelism (older checkpoints have none)."""
    from megatron.core import parallel_state

    ep = parallel_state.get_expert_model_parallel_world_size()
    return {
        "world_size": torch.distributed.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        **({"ep": ep} if ep > 1 else {}),
    }


def _module(model: Model) -> torch.nn.Module:
    """The GPTModel of a MegatronLM, a DDP wrapper or a bare module."""
    module = model.model if isinstance(model, MegatronLM) else model
    return getattr(module, "module", module)  # megatron DDP keeps no sharded_state_dict of its own


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _model_meta(model: Model) -> dict[str, str | None]:
    """Role (None for a bare module, which has no HF config either) and parameter dtype."""
    dtype = getattr(getattr(_module(model), "config", None), "params_dtype", None)
    return {"role": model.layout.role if isinstance(model, MegatronLM) else None,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None}  # fmt: skip


def _step_of(path: Path) -> int | None:
    match = re.fullmatch(re.escape(PREFIX) + r"(\d+)", path.name)
    return int(match.group(1)) if match else None


def is_complete(path: str | Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


# --- sharded state ---------------------------------------------------------------------------


def _sharded_state(models: Mapping[str, Model], optimizers: Mapping[str, Any], is_loading: bool) -> dict[str, Any]:
    """{"models": {name: sharded sd}, "optimizers": {name: sharded sd}} with globally unique keys."""
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    model_states = {}
    for name, model in models.items():
        sharded = _module(model).sharded_state_dict()
        add_prefix_for_sharding(sharded, f"{name}.")  # G and D share tensor names: keep them apart
        model_states[name] = sharded
    state: dict[str, Any] = {"models": model_states}
    if optimizers:
        # An optimizer finds its parameters' keys by identity, so it may see every model's.
        state["optimizers"] = {
            name: opt.sharded_state_dict(model_states, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
            for name, opt in optimizers.items()
        }
    return state


def _stepped(optimizer: Any) -> bool:
    """Whether the optimizer has taken a step on any rank (its state exists).

    One that never stepped (G during warmup's D-only steps, a frozen model) has no state to
    save: megatron-core cannot even build its state dict then. It is recorded as fresh and
    stays fresh on load, which is exactly where an uninterrupted run is.
    """
    local = any(inner.optimizer.state for inner in getattr(optimizer, "chained_optimizers", [optimizer]))
    flag = torch.tensor([int(local)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


# --- RNG -------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's key array as a tensor: the file then loads with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(path: Path, rank: int) -> Path:
    return path / RNG_DIR / f"rank_{rank:05d}.pt"


# --- save ------------------------------------------------------------------------------------


def _write(
    path: Path,
    models: Mapping[str, Model],
    optimizers: Mapping[str, Any],
    schedulers: Mapping[str, Any],
    meta: dict[str, Any],
    rng: bool,
    tokenizers: Mapping[str, Any],
) -> Path:
    """Write a checkpoint atomically at ``path`` (every rank calls this)."""
    from megatron.core import dist_checkpointing

    json.dumps(meta)  # fail before anything is written when extra_state is not JSON-able
    tmp = path.parent / (TMP_PREFIX + path.name)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier save of this step that died
        (tmp / DIST_DIR).mkdir(parents=True)
        if rng:
            (tmp / RNG_DIR).mkdir()
    _barrier()

    # The RNG first: building and saving the state must not change what it records.
    if rng:
        buffer = io.BytesIO()
        torch.save(_rng_state(), buffer)
        _fsync_write(_rng_file(tmp, _rank()), buffer.getvalue())
    fresh = sorted(name for name, opt in optimizers.items() if not _stepped(opt))
    state = _sharded_state(models, {n: o for n, o in optimizers.items() if n not in fresh}, is_loading=False)
    state["schedulers"] = {name: s.state_dict() for name, s in schedulers.items()}
    dist_checkpointing.save(state, str(tmp / DIST_DIR))

    if _rank() == 0:
        for name, model in models.items():
            if isinstance(model, MegatronLM):
                model.hf_config.save_pretrained(tmp / HF_DIR / name)
            if name in tokenizers:
                tokenizers[name].save_pretrained(tmp / HF_DIR / name)
        meta = {**meta, "layout": _layout(), "models": {name: _model_meta(m) for name, m in models.items()},
                "optimizers": sorted(optimizers), "fresh_optimizers": fresh, "schedulers": sorted(schedulers),
                "rng": rng}  # fmt: skip
        _fsync_write(tmp / META, json.dumps(meta, indent=1).encode())
    _barrier()  # every rank's files are written
    if _rank() == 0:
        if path.exists():  # the same step saved again (e.g. after a resume): replace it
            old = path.parent / (TMP_PREFIX + "old-" + path.name)
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            shutil.rmtree(old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
        _fsync_write(path / COMPLETE, f"{meta.get('step')}\n".encode())
        _fsync_dir(path)
    _barrier()
    return path


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    models: Mapping[str, Model],
    optimizers: Mapping[str, Any] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
    keep: int | None = None,
    tokenizers: Mapping[str, Any] | None = None,
) -> Path:
    """Save a resumable checkpoint ``run_dir/iter_<step>``; keep the newest ``keep`` (all if None).

    ``models`` are MegatronLMs (their HF config and role are recorded) or GPTModels (bare or in
    megatron's DDP); ``extra_state`` (data position, counters) must be JSON-able.
    """
    run_dir = Path(run_dir)
    if _rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    path = _write(run_dir / f"{PREFIX}{step:07d}", models, dict(optimizers or {}), dict(schedulers or {}),
                  {"step": step, "extra_state": extra_state or {}}, True, dict(tokenizers or {}))  # fmt: skip
    if keep is not None and _rank() == 0:
        prune(run_dir, keep)
    _barrier()
    return path


def save_models(path: str | Path, models: Mapping[str, Model], tokenizers: Mapping[str, Any] | None = None) -> Path:
    """A model-only checkpoint at ``path`` (conversion, evaluation): no optimizer, no RNG."""
    path = Path(path)
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
    return _write(path, models, {}, {}, {"step": None, "extra_state": {}}, False, dict(tokenizers or {}))


# --- find, prune -----------------------------------------------------------------------------


def _partials(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.is_dir() and (p.name.startswith(TMP_PREFIX)
            or (_step_of(p) is not None and not is_complete(p)))]  # fmt: skip


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete ``iter_*`` checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _step_of(p) is not None and is_complete(p)]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def latest_checkpoint(run_dir: str | Path, clean: bool = False) -> Path | None:
    """The newest complete checkpoint of a run, None if there is none.

    ``clean=True`` also deletes partial ones (on rank 0): only from the process that owns the
    run, e.g. when resuming, never from a reader while a save may be under way.
    """
    run_dir = Path(run_dir)
    if clean and run_dir.is_dir() and _rank() == 0:
        for partial in _partials(run_dir):
            log.warning("removing partial checkpoint %s", partial)
            shutil.rmtree(partial, ignore_errors=True)
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and partial ones (call on rank 0)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep})")
    run_dir = Path(run_dir)
    for old in complete_checkpoints(run_dir)[:-keep] + _partials(run_dir):
        shutil.rmtree(old, ignore_errors=True)


# --- load ------------------------------------------------------------------------------------


def _unshare_steps(optimizer: Any) -> None:
    """One ``step`` tensor per parameter again after megatron-core loaded a torch Adam state.

    megatron-core 0.16.1 (``DistributedOptimizer.load_state_dict``, path without Apex/TE) gives
    every parameter's state the same ``step`` tensor; torch's Adam increments it in place once
    per parameter, so each resumed step would advance the bias correction N-fold.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in inner.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def read_meta(path: str | Path) -> dict[str, Any]:
    """A complete checkpoint's ``meta.json``; a one-line ValueError otherwise."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    return json.loads((path / META).read_text())


def hf_dir(path: str | Path, name: str) -> Path:
    """Where a checkpoint keeps model ``name``'s HF config (and tokenizer, when saved)."""
    return Path(path) / HF_DIR / name


def load_checkpoint(
    path: str | Path,
    models: Mapping[str, Model],
    optimizers: Mapping[str, Any] | None = None,
    schedulers: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load models (and optimizers, schedulers) from a checkpoint saved at any TP x PP.

    Returns the saved ``extra_state``. RNG states are restored when the checkpoint has them
    for this layout. An optimizer must be loaded together with its models: filling its state
    takes one optimizer step on zero gradients, which moves weights the model load then resets.
    Loading models alone into a mixed-precision run, call ``optimizer.reload_model_params()``.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = read_meta(path)
    optimizers, schedulers = dict(optimizers or {}), dict(schedulers or {})
    for kind, wanted in (("models", models), ("optimizers", optimizers), ("schedulers", schedulers)):
        missing = sorted(set(wanted) - set(meta[kind]))
        if missing:
            raise ValueError(f"{path}: has no {kind} {missing} (has {sorted(meta[kind])})")

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    optimizers = {n: o for n, o in optimizers.items() if n not in meta.get("fresh_optimizers", [])}
    for opt in optimizers.values():
        for inner in getattr(opt, "chained_optimizers", [opt]):
            if isinstance(inner, DistributedOptimizer):
                # Its loader copies into existing state tensors: create them first.
                inner._init_optimizer_states_with_dummy_values()
    loaded = dist_checkpointing.load(_sharded_state(models, optimizers, is_loading=True), str(path / DIST_DIR))
    for name, model in models.items():
        _module(model).load_state_dict(loaded["models"][name])
    for name, opt in optimizers.items():
        opt.load_state_dict(loaded["optimizers"][name])
        _unshare_steps(opt)
    for name, scheduler in schedulers.items():
        scheduler.load_state_dict(loaded["schedulers"][name])

    if meta["rng"]:
        if meta["layout"] == _layout():
            _set_rng_state(torch.load(_rng_file(path, _rank()), weights_only=True))
        elif _rank() == 0:
            log.warning("%s: RNG states not restored (saved at %s, loading at %s)", path, meta["layout"], _layout())
    return meta["extra_state"]

