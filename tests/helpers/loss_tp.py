"""Fused vocab-parallel log-probs + policy loss on TP-sharded logits vs a plain full-vocab reference.

    torchrun --nproc_per_node 2 tests/helpers/loss_tp.py OUT.json

Every rank builds the same full logits (seeded), padded like Megatron (to a multiple of 128 x TP),
keeps its vocabulary shard, and compares log-probs, entropy, the policy loss and the gradients
on its shard with the single-process reference: full ``log_softmax`` over the real vocabulary
and a token-by-token Python loop for the surrogate, k3 KL and TIS. Rank 0 writes
``{case/check: max abs difference over ranks}``. tests/test_loss.py runs ``run_case`` at TP=1.
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.distributed as dist

from gad_megatron.loss import policy_loss, vocab_parallel_logprobs

B, S = 4, 9  # 36 tokens: no chunk size below divides it
# name: (real vocab, value of the padded logits, temperature, chunk_tokens). Megatron's padded
# logits are 0; "large" pads with 8.0 so that any leak of padding into the softmax shows.
CASES = {
    "pad-zero": (1000, 0.0, 0.8, 5),
    "pad-large": (1000, 8.0, 1.0, 7),
    "rank-all-padding": (100, 0.0, 0.8, 36),  # TP=2: 100 -> 256 columns, rank 1 holds only padding
}
CLIP, KL_BETA, TIS_CAP = 0.2, 0.1, 2.0  # beta large enough that a KL gradient error exceeds the tolerance


def padded_vocab(real: int, tp: int) -> int:
    return -(-real // (128 * tp)) * 128 * tp


def response_mask() -> torch.Tensor:
    """Row 0 truncated (valid to the last position, no end-of-turn), row 1 padded after its
    response, row 2 all masked, row 3 a response in the middle."""
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 2:] = True
    mask[1, 3:6] = True
    mask[3, 1:8] = True
    return mask


def reference_policy_loss(
    logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, n: float,
    ref: torch.Tensor | None, engine: torch.Tensor | None, clip: float, beta: float, cap: float | None,
) -> torch.Tensor:  # fmt: skip
    """The policy loss written out token by token."""
    total = logprobs.new_zeros(())
    for b, s in mask.nonzero().tolist():
        ratio = torch.exp(logprobs[b, s] - old[b, s])
        a = adv[b, s].item()
        surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
        weight = 1.0 if cap is None else min(math.exp(old[b, s].item() - engine[b, s].item()), cap)
        kl = 0.0
        if ref is not None:
            delta = ref[b, s].item() - logprobs[b, s]
            kl = torch.exp(delta) - delta - 1
        total = total + weight * surrogate + beta * kl
    return total / max(n, 1)


def run_case(name: str, group: dist.ProcessGroup | None, rank: int, tp: int) -> dict[str, float]:
    real, pad_value, temperature, chunk = CASES[name]
    padded = padded_vocab(real, tp)
    shard = padded // tp
    cols = slice(rank * shard, (rank + 1) * shard)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    full = torch.randn(B, S, padded, generator=gen) * 2
    full[..., real:] = pad_value
    target = torch.randint(0, real, (B, S), generator=gen)
    mask = response_mask()
    upstream = torch.randn(B, S, generator=gen)

    reference = full[..., :real].clone().requires_grad_()
    log_softmax = torch.log_softmax(reference / temperature, dim=-1)
    ref_lp = log_softmax.gather(-1, target[..., None]).squeeze(-1)
    ref_entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    (ref_grad_lp,) = torch.autograd.grad((ref_lp * upstream).sum(), reference, retain_graph=True)

    # Constants of the loss: old off the current log-probs (so some ratios clip), NaN in masked slots.
    noise = lambda scale: torch.randn(B, S, generator=gen) * scale  # noqa: E731
    garbage = torch.full((B, S), float("nan"))
    old = torch.where(mask, ref_lp.detach() + noise(0.3), garbage)
    engine = torch.where(mask, old + noise(0.5), garbage)
    ref_policy = torch.where(mask, ref_lp.detach() + noise(0.5), garbage)
    adv = torch.where(mask, torch.randn(B, 1, generator=gen).expand(B, S), garbage)
    n = int(mask.sum())
    ref_loss = reference_policy_loss(ref_lp, old, adv, mask, n, ref_policy, engine, CLIP, KL_BETA, TIS_CAP)
    (ref_grad_loss,) = torch.autograd.grad(ref_loss, reference)

    def on_shard(grad_real: torch.Tensor) -> torch.Tensor:
        whole = torch.zeros(B, S, padded)
        whole[..., :real] = grad_real
        return whole[..., cols]

    def fused() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        leaf = full[..., cols].clone().requires_grad_()
        lp, entropy = vocab_parallel_logprobs(leaf.clone(), target, group, rank * shard, chunk, real_vocab_size=real,
                                              temperature=temperature, with_entropy=True)  # fmt: skip
        return leaf, lp, entropy

    leaf, lp, entropy = fused()
    lp.backward(upstream)
    diffs = {
        "logprobs": (lp - ref_lp).abs().max().item(),
        "entropy": (entropy - ref_entropy).abs().max().item(),
        "grad_logprobs": (leaf.grad - on_shard(ref_grad_lp)).abs().max().item(),
    }
    leaf, lp, _ = fused()
    loss, _ = policy_loss(lp, old, adv, mask, n, ref_policy, engine, clip=CLIP, kl_beta=KL_BETA, tis_cap=TIS_CAP)
    loss.backward()
    diffs["loss"] = (loss - ref_loss).abs().item()
    diffs["grad_loss"] = (leaf.grad - on_shard(ref_grad_loss)).abs().max().item()
    return {k: v if math.isfinite(v) else float("inf") for k, v in diffs.items()}


def main(out: str) -> None:
    from megatron.core import parallel_state

    from gad_megatron.parallel.launch import destroy_distributed, init_distributed

    init_distributed(tp=2, pp=1, seed=0)
    group = parallel_state.get_tensor_model_parallel_group()
    rank, tp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    report = {f"{case}/{k}": v for case in CASES for k, v in run_case(case, group, rank, tp).items()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, report)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({k: max(r[k] for r in everyone) for k in report}, f, indent=1)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
