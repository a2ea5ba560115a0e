"""VLLMEngine on a GPU with the pinned vLLM, against transformers on the same tiny random Llama.

The engine starts from the first model's checkpoint; every test loads the weights it compares
against through ``update_weights`` first, and a second model's update must replace them, so
matching transformers' log-probs shows the hand-off loads every tensor; sleep/wake must free and
take back the memory. Skipped without CUDA and vLLM.
"""

from __future__ import annotations

import gc
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from gad_megatron.models.sources import load_tokenizer, make_tiny_model
from gad_megatron.rollout.engine import Completion, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
        reason="needs CUDA and vLLM (the `gpu` extra)",
    ),
]

CONTRACT = json.loads((Path(__file__).parent / "data" / "vllm_contract.json").read_text())
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PROMPTS = [[1, 2, 3, 4, 5], [10, 200, 3000], [42]]
GIB = 1024**3
ATOL = 2e-3  # fp32 in both; vLLM's attention and GEMM kernels differ from transformers'


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Any]]:
    """``(path, transformers model)`` of two tiny random Llamas (seeds 0 and 1), fp32 on the GPU;
    head dim 64 suits every attention backend."""
    import os

    from transformers import AutoModelForCausalLM

    tokenizer = os.environ.get("GAD_TEST_TOKENIZER", "smollm2-135m-instruct")
    out = []
    for seed in (0, 1):
        path = make_tiny_model(tmp_path_factory.mktemp(f"llama{seed}") / "model", tokenizer, hidden=256, seed=seed)
        out.append((str(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()))
    return out


@pytest.fixture(scope="module")
def engine(models: list[tuple[str, Any]]) -> Iterator[Any]:
    from gad_megatron.rollout.vllm_engine import VLLMEngine

    with pytest.MonkeyPatch.context() as mp:
        for var in LAUNCH_VARS:  # a single process: the engine exports its own, removed afterwards
            mp.setenv(var, "")
            mp.delenv(var)
        engine = VLLMEngine(
            models[0][0], load_tokenizer(models[0][0]), dtype="float32",
            gpu_memory_utilization=0.3, max_model_len=256, enforce_eager=True,
        )
        yield engine
        del engine
        gc.collect()
        if torch.distributed.is_initialized():  # vLLM started a world of one for itself
            torch.distributed.destroy_process_group()


def _reference(
    model: Any, prompt: list[int], tokens: list[int], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' log-softmax(logits / T) over the vocab at each generated position (T = 1 greedy)."""
    ids = torch.tensor([prompt + tokens], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    logp = (logits / (temperature or 1.0)).log_softmax(-1)
    return logp, logp.gather(-1, torch.tensor(tokens, device="cuda")[:, None]).squeeze(1)


def _assert_matches(model: Any, completions: list[Completion], temperature: float, n: int) -> None:
    assert [c.prompt_index for c in completions] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    for c in completions:
        logp, chosen = _reference(model, PROMPTS[c.prompt_index], c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs, device="cuda"), chosen, atol=ATOL, rtol=0)
        if temperature == 0:  # greedy picks transformers' argmax wherever the top two are not a near-tie
            top2 = logp.topk(2, -1)
            clear = top2.values[:, 0] - top2.values[:, 1] > 1e-3
            assert torch.equal(top2.indices[:, 0][clear], torch.tensor(c.token_ids, device="cuda")[clear])


def test_pinned_vllm_is_installed() -> None:
    import vllm

    assert vllm.__version__ == CONTRACT["version"]


def test_updated_weights_reproduce_transformers(engine: Any, models: list[tuple[str, Any]]) -> None:
    model = models[0][1]
    engine.update_weights(model.state_dict().items())
    greedy = SamplingParams(max_tokens=12, temperature=0)
    _assert_matches(model, engine.generate(PROMPTS, greedy), 0, 1)
    sampled = SamplingParams(max_tokens=12, temperature=0.7, seed=1, n=2)
    first = engine.generate(PROMPTS, sampled)
    _assert_matches(model, first, 0.7, 2)
    assert [c.token_ids for c in engine.generate(PROMPTS, sampled)] == [c.token_ids for c in first]  # seeded


def test_second_update_replaces_the_weights(engine: Any, models: list[tuple[str, Any]]) -> None:
    (_, first), (_, second) = models
    greedy = SamplingParams(max_tokens=8, temperature=0)
    engine.update_weights(first.state_dict().items())
    before = engine.generate(PROMPTS, greedy)
    engine.update_weights(second.state_dict().items())
    after = engine.generate(PROMPTS, greedy)
    _assert_matches(second, after, 0, 1)
    assert [c.logprobs for c in after] != [c.logprobs for c in before]


def test_sleep_frees_memory_and_wake_takes_it_back(engine: Any, models: list[tuple[str, Any]]) -> None:
    model = models[0][1]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    engine.update_weights(model.state_dict().items())
    engine.generate(PROMPTS, greedy)
    torch.cuda.empty_cache()
    awake = torch.cuda.mem_get_info()[0]

    engine.sleep(keep_weights=False)  # level 2: an update comes before the next generate
    asleep = torch.cuda.mem_get_info()[0]
    assert asleep - awake > 1 * GIB  # the KV cache (30% of the card) and the weights
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate(PROMPTS, greedy)

    engine.update_weights(model.state_dict().items())  # wakes the weights only
    torch.cuda.empty_cache()
    weights_only = torch.cuda.mem_get_info()[0]
    assert weights_only - awake > 1 * GIB  # the KV cache is still released

    _assert_matches(model, engine.generate(PROMPTS, greedy), 0, 1)  # wakes the KV cache
    torch.cuda.empty_cache()
    assert abs(torch.cuda.mem_get_info()[0] - awake) < 0.5 * GIB

    engine.sleep()  # level 1 keeps a host copy: waking without an update gives the same model
    engine.wake()
    _assert_matches(model, engine.generate(PROMPTS, greedy), 0, 1)
