"""Activation recompute: megatron-core ``TransformerConfig`` kwargs for ``parallel.recompute_activations``.

Legal combinations in megatron-core 0.16.1 (``TransformerConfig.__post_init__``):

* ``full`` needs ``recompute_method`` (``uniform`` or ``block``) and ``recompute_num_layers``;
  ``uniform`` with 1 layer checkpoints every layer's input and recomputes the whole layer in
  backward (``TransformerBlock._checkpointed_forward``, in training mode only);
* ``selective`` needs ``recompute_method`` and ``recompute_num_layers`` unset and recomputes
  the listed ``recompute_modules``: here megatron's default, ``core_attn`` (attention scores,
  softmax and the weighted sum: large at long sequences and cheap to redo). With TE's fused
  attention, which never stores the scores, it saves little. ``mlp`` (the dense MLP) and
  ``layernorm`` (norms kept as modules: the local spec; TE fuses them into the linears) would
  recompute more for less; they are not offered.

Both go through ``tensor_parallel.checkpoint`` (``te_checkpoint`` for full recompute under
fp8), on CPUs too. Only the trained models get these kwargs: a model that never runs a backward
(the KL reference, a frozen D) would pay the bookkeeping for nothing.
"""

from __future__ import annotations

from typing import Any, Literal

RecomputeMode = Literal["none", "selective", "full"]


def recompute_overrides(mode: RecomputeMode) -> dict[str, Any]:
    """``TransformerConfig`` kwargs of ``mode``; none: no kwargs (megatron-core keeps every activation)."""
    if mode == "none":
        return {}
    if mode == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise ValueError(f"unknown activation recompute mode: {mode!r}")
