"""``gad check``: load a model into megatron-core at a TP x PP (x EP) layout and prove it is right.

    gad check --model smollm2-135m-instruct                                     # one process
    torchrun --nproc_per_node 2 -m gad_megatron.cli check --model smollm2-135m-instruct --pp 2
    torchrun --nproc_per_node 2 -m gad_megatron.cli check --model Qwen/Qwen2.5-0.5B-Instruct --tp 2
    torchrun --nproc_per_node 2 -m gad_megatron.cli check --model Qwen/Qwen3-30B-A3B --ep 2   # MoE experts

On every rank the Megatron model (this rank's TP shard of its PP stage) is built from the HF
weights; rank 0 also runs transformers on the same prompt and reports the largest logit
difference, then both decode greedily. The first thing to run on a new cluster or a laptop:
it exercises process groups, the CPU bridge, the mapping tables and the pipeline schedule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "What is the capital of France?"


@dataclass
class CheckResult:
    max_abs_logit_diff: float
    megatron_text: str
    transformers_text: str
    seconds: float


def greedy_megatron(lm, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:  # noqa: ANN001
    """Greedy decoding by full forwards (no KV cache: a check, not a server); same on every rank."""
    from gad_megatron.models.policy import broadcast_from_last_stage, full_logits

    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = full_logits(lm, torch.tensor([ids]))
        next_id = None if logits is None else logits[0, -1].argmax().view(1)
        token = int(broadcast_from_last_stage(next_id, (1,), torch.long).item())
        ids.append(token)
        if token in stop_ids:
            break
    return ids[len(prompt_ids):]


def run_check(model: str, tp: int = 1, pp: int = 1, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24,
              tolerance: float = 1e-3, ep: int = 1) -> CheckResult | None:
    """Build, compare, decode; rank 0 returns the result, other ranks None. ``ep``: expert
    parallelism (mixture-of-experts models)."""
    from gad_megatron.models.policy import broadcast_from_last_stage, build_policy, full_logits
    from gad_megatron.models.sources import load_causal_lm, load_tokenizer, resolve_model_path
    from gad_megatron.parallel.launch import init_distributed

    start = time.perf_counter()
    launch = init_distributed(tp, pp, seed=0, ep=ep)
    path = resolve_model_path(model)
    tokenizer = load_tokenizer(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)  # fmt: skip
    lm = build_policy(path)
    lm.model.eval()  # inference (megatron-core refuses MoE at TP > 1 in training mode without sequence parallelism)
    logits = full_logits(lm, torch.tensor([ids]))
    shape = (1, len(ids), lm.layout.vocab_size)
    logits = broadcast_from_last_stage(logits, shape, torch.float32)
    stop_ids = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])} - {None}
    stop_ids = {i for i in stop_ids if i != tokenizer.unk_token_id}
    new_ids = greedy_megatron(lm, ids, max_new_tokens, stop_ids)
    if launch.rank != 0:
        return None
    reference = load_causal_lm(path).eval()
    with torch.no_grad():
        ref_logits = reference(torch.tensor([ids])).logits
        ref_ids = reference.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=sorted(stop_ids), pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    diff = (logits - ref_logits).abs().max().item()
    result = CheckResult(
        max_abs_logit_diff=diff,
        megatron_text=tokenizer.decode(new_ids, skip_special_tokens=True),
        transformers_text=tokenizer.decode(ref_ids[0, len(ids):], skip_special_tokens=True),
        seconds=time.perf_counter() - start,
    )
    verdict = "OK" if diff <= tolerance and result.megatron_text == result.transformers_text else "MISMATCH"
    layout = f"TP={tp} PP={pp}" + (f" EP={ep}" if ep > 1 else "")
    print(f"gad check: {verdict}: {layout} world={launch.world_size} ({launch.source}), "
          f"max |logit diff| vs transformers {diff:.2e} (tolerance {tolerance:g}), {result.seconds:.1f} s")
    print(f"  megatron:     {result.megatron_text!r}\n  transformers: {result.transformers_text!r}")
    return result
