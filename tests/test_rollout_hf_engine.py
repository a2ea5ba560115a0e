"""TransformersEngine: sampling loop, log-probs, seeds, stops, weight updates (tiny random Llama)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from gad_megatron.rollout.engine import InferenceEngine, SamplingParams
from gad_megatron.rollout.hf_engine import TransformersEngine

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TransformersEngine:
    return TransformersEngine.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:
    """Chat-rendered prompts of different lengths, so a batch needs left padding."""
    questions = ["Hi", "What is the capital of France?", "Name three colours of the rainbow, please."]
    return [
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False)
        for q in questions
    ]


def _other_model(engine: TransformersEngine, seed: int = 1):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(engine.model.config, dtype=torch.float32).eval()


def _full_forward_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits_TV = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp_TV = (logits_TV / (temperature or 1.0)).log_softmax(-1)
    return logp_TV.gather(-1, torch.tensor(completion)[:, None]).squeeze(1).tolist()


@pytest.mark.parametrize("engine_class", ["TransformersEngine", "VLLMEngine"])
def test_engines_keep_the_protocol_signatures(engine_class: str) -> None:
    """Both engines take exactly the protocol's parameters (names, defaults, order): the trainer calls
    them by keyword through ``InferenceEngine``; ``runtime_checkable`` only checks that names exist."""
    from gad_megatron.rollout import hf_engine, vllm_engine  # vllm_engine imports vLLM lazily

    cls = getattr(hf_engine, engine_class, None) or getattr(vllm_engine, engine_class)
    for name in ("generate", "update_weights", "sleep", "wake"):
        want = inspect.signature(getattr(InferenceEngine, name))
        got = inspect.signature(getattr(cls, name))
        assert [(p.name, p.default, p.kind) for p in got.parameters.values()] == \
            [(p.name, p.default, p.kind) for p in want.parameters.values()], (engine_class, name, got)


def test_greedy_matches_hf_generate(engine: TransformersEngine, prompts: list[list[int]], tiny_tokenizer) -> None:
    eos = tiny_tokenizer.eos_token_id
    completions = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=(eos,)))
    width = max(map(len, prompts))
    pad = tiny_tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = engine.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_TOKENS,
                                eos_token_id=eos, pad_token_id=pad)
    for row, c in zip(out[:, width:].tolist(), completions):
        expected = row[: row.index(eos) + 1] if eos in row else row
        assert c.token_ids == expected
        assert c.text == tiny_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 0.9), (1.3, 1.0)])
def test_logprobs_equal_full_forward(engine: TransformersEngine, prompts: list[list[int]], temperature: float, top_p: float) -> None:
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, top_p=top_p, seed=3, n=2)
    for c in engine.generate(prompts, sampling):
        expected = _full_forward_logprobs(engine.model, prompts[c.prompt_index], c.token_ids, temperature)
        assert c.logprobs == pytest.approx(expected, abs=1e-5)


def test_tiny_top_p_is_greedy_but_logprobs_are_before_truncation(engine: TransformersEngine, prompts: list[list[int]]) -> None:
    greedy = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    nucleus = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.5, top_p=1e-9, seed=0))
    assert [c.token_ids for c in nucleus] == [c.token_ids for c in greedy]
    assert all(lp < -1e-3 for c in nucleus for lp in c.logprobs)  # not log(1) of the truncated distribution


def test_seed_reproducible_whatever_else_ran(engine: TransformersEngine, prompts: list[list[int]]) -> None:
    def sample(seed: int) -> list[list[int]]:
        return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, seed=seed, n=2))]

    first = sample(7)
    torch.manual_seed(123)  # disturb the global RNG and run other sampling in between
    torch.rand(10)
    sample(8)
    assert sample(7) == first
    assert sample(8) != first


def test_stop_token_ends_and_is_kept(engine: TransformersEngine, prompts: list[list[int]]) -> None:
    free = engine.generate(prompts[:1], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    stop = free.token_ids[3]
    end = free.token_ids.index(stop) + 1
    stopped = engine.generate(prompts[:1], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=(stop,)))[0]
    assert stopped.token_ids == free.token_ids[:end]
    assert stopped.token_ids[-1] == stop
    assert stopped.finish_reason == "stop" and not stopped.truncated
    assert stopped.logprobs == pytest.approx(free.logprobs[:end], abs=1e-6)


def test_early_stop_in_a_batch_leaves_other_rows_unchanged(engine: TransformersEngine, prompts: list[list[int]]) -> None:
    free = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    stop = free[0].token_ids[1]  # ends the first row early; the batch shrinks under the others
    stopped = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, stop_token_ids=(stop,)))
    for f, s in zip(free, stopped):
        end = f.token_ids.index(stop) + 1 if stop in f.token_ids else MAX_TOKENS
        assert s.token_ids == f.token_ids[:end]
        assert s.logprobs == pytest.approx(f.logprobs[:end], abs=1e-5)


def test_length_finish_reason(engine: TransformersEngine, prompts: list[list[int]]) -> None:
    for c in engine.generate(prompts, SamplingParams(max_tokens=4, temperature=1.0, seed=0)):
        assert len(c.token_ids) == len(c.logprobs) == 4
        assert c.finish_reason == "length" and c.truncated


def test_n_completions_grouped_in_prompt_order(engine: TransformersEngine, prompts: list[list[int]]) -> None:
    completions = engine.generate(prompts, SamplingParams(max_tokens=3, temperature=1.0, seed=0, n=3))
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(c.token_ids) for c in completions[:3]}) > 1  # independent samples, not copies


def test_batches_split_by_max_batch_size_give_valid_completions(tiny_model_dir: Path, prompts: list[list[int]]) -> None:
    small = TransformersEngine.from_pretrained(str(tiny_model_dir), max_batch_size=2)
    completions = small.generate(prompts, SamplingParams(max_tokens=3, temperature=1.0, seed=0, n=2))
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1, 2, 2]
    for c in completions:
        assert c.logprobs == pytest.approx(_full_forward_logprobs(small.model, prompts[c.prompt_index], c.token_ids, 1.0), abs=1e-5)


def test_invalid_requests_raise(engine: TransformersEngine, prompts: list[list[int]]) -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([prompts[0], []], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="invalid sampling"):
        engine.generate(prompts, SamplingParams(max_tokens=0))


@pytest.mark.parametrize("with_tied_alias", [False, True])
def test_update_weights_makes_logits_equal_the_source(tiny_model_dir: Path, prompts: list[list[int]], with_tied_alias: bool) -> None:
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir))
    other = _other_model(engine)
    pointers = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    # named_parameters() lists a tied lm_head once (under the embedding); state_dict() names it twice.
    stream = other.state_dict().items() if with_tied_alias else other.named_parameters()
    engine.update_weights((n, t.detach()) for n, t in stream)
    assert {n: p.data_ptr() for n, p in engine.model.named_parameters()} == pointers  # in place
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():
        assert torch.equal(engine.model(input_ids=ids).logits, other(input_ids=ids).logits)


def test_update_weights_converts_dtype(tiny_model_dir: Path) -> None:
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    other = _other_model(engine)
    engine.update_weights(other.named_parameters())
    for name, param in engine.model.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, other.get_parameter(name).to(torch.bfloat16))


def test_from_config_needs_weights_before_generate(tiny_model_dir: Path, tiny_tokenizer, prompts: list[list[int]]) -> None:
    source = TransformersEngine.from_pretrained(str(tiny_model_dir))
    engine = TransformersEngine.from_config(source.model.config, tiny_tokenizer)
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate(prompts, sampling)
    engine.update_weights(source.model.named_parameters())
    assert [c.token_ids for c in engine.generate(prompts, sampling)] == [c.token_ids for c in source.generate(prompts, sampling)]


def test_update_weights_errors_name_the_tensor(tiny_model_dir: Path, prompts: list[list[int]]) -> None:
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir))
    weights = dict(_other_model(engine).state_dict())

    with pytest.raises(ValueError, match="unknown tensor 'model.layers.9.mlp.up_proj.weight'"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    bad = weights["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(64, 63\)"):
        engine.update_weights([("model.layers.0.self_attn.q_proj.weight", bad[:, :-1])])
    with pytest.raises(ValueError, match="'model.norm.weight' received twice"):
        engine.update_weights([("model.norm.weight", weights["model.norm.weight"])] * 2)
    with pytest.raises(ValueError, match="'lm_head.weight' is tied to"):
        engine.update_weights([("model.embed_tokens.weight", weights["model.embed_tokens.weight"]),
                               ("lm_head.weight", torch.zeros_like(weights["lm_head.weight"]))])

    consumed = []

    def stream_without_one():
        for name, tensor in weights.items():
            if name != "model.layers.1.mlp.down_proj.weight":
                consumed.append(name)
                yield name, tensor

    with pytest.raises(ValueError, match=r"1 parameter\(s\) never received: model.layers.1.mlp.down_proj.weight"):
        engine.update_weights(stream_without_one())
    assert len(consumed) == len(weights) - 1  # raised after the whole stream
    with pytest.raises(RuntimeError, match="no valid weights"):  # never sample from half-loaded weights
        engine.generate(prompts, SamplingParams(max_tokens=2))
    engine.update_weights(weights.items())
    engine.generate(prompts, SamplingParams(max_tokens=2))


def test_untied_model_requires_lm_head(tiny_tokenizer) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    engine = TransformersEngine.from_config(config, tiny_tokenizer)
    source = _other_model(engine)
    with pytest.raises(ValueError, match="never received: lm_head.weight"):
        engine.update_weights((n, p) for n, p in source.named_parameters() if n != "lm_head.weight")
    engine.update_weights(source.named_parameters())
    assert torch.equal(engine.model.lm_head.weight, source.lm_head.weight)
    assert not torch.equal(engine.model.lm_head.weight, engine.model.model.embed_tokens.weight)


@pytest.mark.slow
def test_smollm2_greedy_answers_paris() -> None:
    engine = TransformersEngine.from_pretrained("smollm2-135m-instruct")
    tok = engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
    [c] = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=(tok.eos_token_id,)))
    assert "Paris" in c.text, c.text


def test_sleep_without_weights_refuses_generate_until_an_update(tiny_model_dir: Path, prompts: list[list[int]]) -> None:
    """``sleep(keep_weights=False)`` is the caller's promise of an update before the next generate
    (vLLM's level-2 sleep drops the weights): this engine holds the caller to it too."""
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir))
    sampling = SamplingParams(max_tokens=3, temperature=0.0)
    before = engine.generate(prompts, sampling)
    engine.sleep()  # keeps the weights
    assert [c.token_ids for c in engine.generate(prompts, sampling)] == [c.token_ids for c in before]
    engine.sleep(keep_weights=False)
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate(prompts, sampling)
    engine.update_weights(engine.model.named_parameters())
    assert [c.token_ids for c in engine.generate(prompts, sampling)] == [c.token_ids for c in before]


def test_prompt_seeds_make_a_prompts_completions_independent_of_the_batch(
    engine: TransformersEngine, prompts: list[list[int]]
) -> None:
    """What lets any split of a step over engine replicas (1 process, DP, EP) sample the same: with
    its own seed a prompt gets the same completions alone, with other prompts, or in another
    micro-batch; its n samples differ from one another."""
    assert len(prompts) >= 2
    seeds = tuple(100 + i for i in range(len(prompts)))

    def sample(ids: list[list[int]], own: tuple[int, ...]) -> list[list[int]]:
        sampling = SamplingParams(max_tokens=MAX_TOKENS, n=2, prompt_seeds=own)
        return [c.token_ids for c in engine.generate(ids, sampling)]

    together = sample(prompts, seeds)
    last_alone = sample(prompts[-1:], seeds[-1:])
    assert together[-2:] == last_alone and together[-2] != together[-1]
    engine.max_batch_size, before = 1, engine.max_batch_size
    try:
        assert sample(prompts, seeds) == together
    finally:
        engine.max_batch_size = before
    assert sample(prompts[-1:], (999,)) != last_alone
    with pytest.raises(ValueError, match="1 prompt seeds for 2 prompts"):
        engine.generate(prompts[:2], SamplingParams(max_tokens=2, prompt_seeds=(1,)))
