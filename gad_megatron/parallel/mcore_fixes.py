"""Fixes to megatron-core 0.16.1 for machines without Apex or Transformer Engine (every CPU, GPUs
without TE). Each is pinned by source hash in ``tests/test_parallel_cpu.py``.

**Torch AdamW state.** Without Apex or TE, megatron-core falls back to ``torch.optim.AdamW``, whose per-parameter
state holds a ``step`` tensor. Loading a ``fully_reshardable`` distributed-optimizer checkpoint
then fails in ``DistributedOptimizer._set_main_param_and_optimizer_states`` with
``KeyError: 'step'``: the loader skips ``step`` (restored separately from the param groups) but
the setter copies every state key. The fix passes the parameter's own ``step`` through, so the
copy leaves it as the loader set it. This happens on any machine without Apex/TE (every CPU,
and GPUs without TE), so it is not part of the CPU bridge. Pinned by source hash in
``tests/test_parallel_cpu.py``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

TARGET = ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer._set_main_param_and_optimizer_states")
TARGET_SHA256 = "93c254228283b2df"
ROUTER_TARGET = ("megatron.core.transformer.moe.moe_utils", "RouterGatingLinearFunction")
ROUTER_TARGET_SHA256 = "a34180b771b42adc"


def apply_torch_adam_fixes() -> bool:
    """Apply the fix when megatron-core uses torch's optimizers; return whether it is active."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    cls = distrib_optimizer.DistributedOptimizer
    setter = cls._set_main_param_and_optimizer_states
    if getattr(setter, "_keeps_step", False):
        return True

    @functools.wraps(setter)
    def set_states_keeping_step(self: Any, model_param: torch.nn.Parameter, tensors: dict[str, torch.Tensor]) -> None:
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        setter(self, model_param, tensors)

    set_states_keeping_step._keeps_step = True  # type: ignore[attr-defined]
    cls._set_main_param_and_optimizer_states = set_states_keeping_step
    return True


def apply_moe_router_fix() -> bool:
    """Define ``moe_utils.te_general_gemm`` as None without TE; return whether the fix is active."""
    from megatron.core.transformer.moe import moe_utils

    if moe_utils.HAVE_TE:
        return False
    moe_utils.te_general_gemm = None
    return True
