"""FP8 training step of a tiny policy with Transformer Engine layers, against the same weights in bf16.

megatron-core 0.16.1's ``TransformerBlock.forward`` enters TE's fp8 autocast itself when
``config.fp8`` is set (per layer, through ``fp8_utils.get_fp8_context``; around the whole block
for ``delayed``), so the test calls the model as a trainer does, with no fp8 context of its
own. Each recipe runs where :func:`check_precision_supported` accepts this GPU, else is skipped.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from gad_megatron.config import ConfigError
from gad_megatron.models.precision import check_precision_supported, precision_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available()
        or importlib.util.find_spec("transformer_engine") is None
        or torch.cuda.get_device_capability() < (8, 9),
        reason="needs CUDA, Transformer Engine (the `gpu` extra) and compute capability >= 8.9",
    ),
]

BATCH, SEQ = 2, 64  # 128 tokens: a multiple of every recipe's block size
LAYERS = 4  # the first and last stay bf16 (first_last_layers_bf16): two fp8 layers
REL_TOL = 0.15  # fp8 (e4m3: 3 mantissa bits) against bf16 on the same weights


def tiny_hf_config() -> Any:
    from transformers import LlamaConfig

    # Every GEMM dimension a multiple of 128, as block-scaled fp8 GEMMs want.
    return LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """``target``'s parameters from ``source`` where names match (D's head has no counterpart)."""
    weights = dict(source.named_parameters())
    with torch.no_grad():
        for name, param in target.named_parameters():
            if name in weights and weights[name].shape == param.shape:
                param.copy_(weights[name])


def logits_and_loss(model: torch.nn.Module, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward + backward; -> (logits [B, T, V] detached, next-token loss)."""
    model.train()
    logits = model(input_ids=ids_BT, position_ids=None, attention_mask=None, runtime_gather_output=True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids_BT[:, 1:].flatten())
    loss.backward()
    return logits.detach(), loss.detach()


@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise", "delayed", "mxfp8"])
def test_fp8_step_matches_bf16(megatron_tp1: None, recipe: str) -> None:
    from gad_megatron.models.discriminator import build_discriminator
    from gad_megatron.models.policy import build_gpt, layer_spec

    try:
        check_precision_supported("fp8", recipe)  # type: ignore[arg-type]
    except ConfigError as err:
        pytest.skip(str(err))
    assert layer_spec()[1] == "te"
    hf_config = tiny_hf_config()
    torch.manual_seed(0)
    reference = build_gpt(hf_config, "policy", initialize=True, **precision_overrides("bf16")).model
    fp8 = build_gpt(hf_config, "policy", **precision_overrides("fp8", recipe)).model  # type: ignore[arg-type]
    assert fp8.config.fp8 is not None
    assert [n for n, _ in fp8.named_parameters()] == [n for n, _ in reference.named_parameters()]
    copy_weights(reference, fp8)
    # The embedding and megatron's output layer are not TE modules: bf16 under fp8 too.
    assert fp8.embedding.word_embeddings.weight.dtype == torch.bfloat16
    assert fp8.output_layer.weight.dtype == torch.bfloat16

    ids_BT = torch.randint(0, hf_config.vocab_size, (BATCH, SEQ), device="cuda")
    ref_logits, ref_loss = logits_and_loss(reference, ids_BT)
    logits, loss = logits_and_loss(fp8, ids_BT)
    assert torch.isfinite(loss) and abs(loss.item() - ref_loss.item()) < 0.05 * ref_loss.item()
    assert not torch.equal(logits, ref_logits), "fp8 changed nothing: its layers did not run in fp8"
    rel = ((logits.float() - ref_logits.float()).norm() / ref_logits.float().norm()).item()
    assert rel < REL_TOL, rel
    grad = fp8.decoder.layers[1].mlp.linear_fc1.weight.grad  # an fp8 layer
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    disc = build_discriminator(hf_config, **precision_overrides("fp8", recipe)).model  # type: ignore[arg-type]
    assert disc.output_layer.weight.dtype == torch.bfloat16  # stored in the params dtype, scores in fp32
    copy_weights(reference, disc)
    with torch.no_grad():
        disc.output_layer.weight.normal_(std=0.02)
        scores = disc(input_ids=ids_BT, position_ids=None, attention_mask=None)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


@pytest.mark.parametrize("recipe", ["blockwise", "tensorwise", "mxfp8"])
def test_fp8_micro_batches_of_odd_lengths_run_once_padded(megatron_tp1: None, recipe: str) -> None:
    """Rows of odd lengths, batched the trainer's way: micro-batches as wide as their longest row
    would hand Transformer Engine an FP8 GEMM of 37 tokens; rounded up to the recipe's multiple
    (``parallel.sequence_pad_multiple``'s default under fp8) every micro-batch runs."""
    from gad_megatron.models.policy import build_gpt
    from gad_megatron.models.precision import fp8_multiple
    from gad_megatron.trainer.batching import build_batch, micro_batches

    try:
        check_precision_supported("fp8", recipe)  # type: ignore[arg-type]
    except ConfigError as err:
        pytest.skip(str(err))
    hf_config = tiny_hf_config()
    model = build_gpt(hf_config, "policy", initialize=True, **precision_overrides("fp8", recipe)).model  # type: ignore[arg-type]
    lengths = [(11, 26), (3, 7), (20, 41), (5, 1)]  # prompt + response: 37, 10, 61, 6 tokens
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, hf_config.vocab_size, (p,), generator=gen).tolist() for p, _ in lengths]
    responses = [torch.randint(1, hf_config.vocab_size, (r,), generator=gen).tolist() for _, r in lengths]
    multiple = fp8_multiple(recipe)  # type: ignore[arg-type]
    batch = build_batch(prompts, responses, 0, width_multiple=multiple)
    for micro in micro_batches(batch, 80, multiple):
        assert micro.input_ids_BT.numel() % multiple == 0 and micro.input_ids_BT.shape[1] % multiple == 0
        logits_and_loss(model, micro.input_ids_BT.cuda())
    with pytest.raises(Exception):  # the unpadded first micro-batch: 61 tokens
        logits_and_loss(model, micro_batches(build_batch(prompts, responses, 0), 80)[0].input_ids_BT.cuda())
