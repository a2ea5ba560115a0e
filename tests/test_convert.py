"""HF <-> Megatron mapping tables and conversion: pure tensor code, no processes, no Megatron model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gad_megatron.models.convert import (
    HFWeights,
    export_hf_config,
    hf_to_megatron,
    megatron_to_hf,
    save_hf_checkpoint,
    stage_state_dicts,
)
from gad_megatron.models.families import Split, gather, gpt_model_kwargs, layout_from_hf, padded_vocab_size, shard
from tests.helpers.tiny_hf import tiny_config, tiny_model


def hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an HF checkpoint stores: a tied ``lm_head`` is the embedding, not saved."""
    state = model.state_dict()
    if model.config.tie_word_embeddings and "lm_head.weight" in state:
        del state["lm_head.weight"]
    return state


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("role", ["policy", "discriminator"])
@pytest.mark.parametrize("spec", ["local", "te"])
def test_round_trip_tp2_pp2_is_bit_exact(family: str, role: str, spec: str) -> None:
    model = tiny_model(family, role)
    layout = layout_from_hf(model.config, tp=2, pp=2, role=role, spec=spec)
    original = hf_state(model)
    shards = hf_to_megatron(original, layout)
    assert set(shards) == {(t, p) for t in range(2) for p in range(2)}
    back = megatron_to_hf(shards, layout)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_stage_contents_and_shapes_llama_tied_tp2_pp2() -> None:
    """What megatron-core's GPTModel holds per rank: local layer numbers, padded vocab, the tied copy."""
    config = tiny_config("llama")  # tied
    layout = layout_from_hf(config, tp=2, pp=2)
    shards = hf_to_megatron(hf_state(tiny_model("llama")), layout)
    first, last = shards[(0, 0)], shards[(1, 1)]
    vocab_rows = padded_vocab_size(300, 2) // 2  # 256 per rank
    assert first["embedding.word_embeddings.weight"].shape == (vocab_rows, 64)
    assert "output_layer.weight" not in first and "embedding.word_embeddings.weight" not in last
    assert last["output_layer.weight"].shape == (vocab_rows, 64)  # the last stage's copy of the embedding
    assert torch.equal(last["output_layer.weight"], shards[(1, 0)]["embedding.word_embeddings.weight"])
    assert sorted({k.split(".")[2] for k in first if k.startswith("decoder.layers.")}) == ["0", "1"]
    assert "decoder.final_layernorm.weight" in last and "decoder.final_layernorm.weight" not in first
    # Per rank: 1 query group of (2 q heads + k + v) x head_dim 16 rows; fc1 [gate_r; up_r].
    assert first["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (64, 64)
    assert first["decoder.layers.0.mlp.linear_fc1.weight"].shape == (96, 64)
    assert first["decoder.layers.0.mlp.linear_fc2.weight"].shape == (64, 48)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_stage_shapes_use_head_dim_and_replicate_qk_norms(tied: bool) -> None:
    """Qwen3 at TP=2: QKV rows and the output projection's columns are heads x head_dim (32), not
    the hidden size (64); each TP rank holds the whole [head_dim] q and k norms."""
    model = tiny_model("qwen3", tied=tied)
    layout = layout_from_hf(model.config, tp=2, pp=2)
    shards = hf_to_megatron(hf_state(model), layout)
    attention = "decoder.layers.0.self_attention."
    for tp_rank in range(2):
        first = shards[(tp_rank, 0)]
        assert first[attention + "linear_qkv.weight"].shape == (128, 64)  # 1 group x (2 q + k + v) x 32
        assert first[attention + "linear_proj.weight"].shape == (64, 64)  # 128 / TP input columns
        for norm in ("q_layernorm", "k_layernorm"):
            hf = model.state_dict()[f"model.layers.0.self_attn.{norm[0]}_norm.weight"]
            assert hf.shape == (32,) and torch.equal(first[attention + norm + ".weight"], hf)
        assert attention + "linear_qkv.bias" not in first
    assert layout.tied == tied and "output_layer.weight" in shards[(0, 1)]  # PP=2: the tied copy or lm_head
    assert ("output_layer.weight" in layout_from_hf(model.config).megatron_names()) != tied  # PP=1


def test_tied_single_stage_has_no_output_layer_and_qwen_bias_mapped() -> None:
    llama = layout_from_hf(tiny_config("llama"), tp=1, pp=1)
    assert "output_layer.weight" not in llama.megatron_names()
    qwen = layout_from_hf(tiny_config("qwen2"), tp=1, pp=1)
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in qwen.megatron_names()
    assert "output_layer.weight" in qwen.megatron_names()


def test_qkv_is_interleaved_per_query_group() -> None:
    """Megatron's fused QKV: per query group, its q heads then its k head then its v head."""
    layout = layout_from_hf(tiny_config("llama"))
    hd = layout.head_dim
    q = torch.arange(4 * hd).float().unsqueeze(1)  # 4 heads
    k, v = 100 + torch.arange(2 * hd).float().unsqueeze(1), 200 + torch.arange(2 * hd).float().unsqueeze(1)
    names = layout.hf_names("decoder.layers.0.self_attention.linear_qkv.weight")
    fused = layout.hf_to_megatron("decoder.layers.0.self_attention.linear_qkv.weight", dict(zip(names, (q, k, v))))
    expected = torch.cat([q[: 2 * hd], k[:hd], v[:hd], q[2 * hd :], k[hd:], v[hd:]])
    assert torch.equal(fused, expected)


@pytest.mark.parametrize("split", list(Split))
def test_shard_gather_inverse(split: Split) -> None:
    full = torch.randn(8, 6)
    pieces = [shard(full, split, r, 2) for r in range(2)]
    assert torch.equal(gather(pieces, split), full)


def test_glu_shard_holds_gate_and_up_halves() -> None:
    gate, up = torch.zeros(4, 3), torch.ones(4, 3)
    piece = shard(torch.cat([gate, up]), Split.COLUMN_GLU, 1, 2)
    assert torch.equal(piece, torch.cat([gate[2:], up[2:]]))


def test_stage_and_name_mapping() -> None:
    layout = layout_from_hf(tiny_config("qwen2"), tp=2, pp=2, spec="te")
    assert layout.to_local("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == (
        1, "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight")  # fmt: skip
    assert layout.to_global("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", 1) == (
        "decoder.layers.3.mlp.linear_fc1.layer_norm_weight")  # fmt: skip
    assert layout.hf_names("decoder.layers.2.mlp.linear_fc1.layer_norm_weight") == (
        "model.layers.2.post_attention_layernorm.weight",)  # fmt: skip
    assert layout.to_local("embedding.word_embeddings.weight")[0] == 0
    assert layout.to_local("output_layer.weight")[0] == 1
    with pytest.raises(KeyError, match="no qwen2 mapping"):
        layout.rule_of("decoder.layers.0.input_layernorm.weight")  # a local-spec name under the TE spec


def test_te_names_agree_with_megatron_core_checkpoint_key_map() -> None:
    """megatron-core's local spec renames its norms to the TE names in dist checkpoints
    (``sharded_state_dict_keys_map``): the table's TE names must be those."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    key_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    prefix = "decoder.layers.{layer}."
    renamed = [rule for rule in layout_from_hf(tiny_config("qwen2")).rules if rule.te]
    assert len(renamed) == len(key_map) == 2
    for rule in renamed:
        local = rule.megatron.removeprefix(prefix)
        old, new = next((o, n) for o, n in key_map.items() if local.startswith(o))
        assert prefix + new + local.removeprefix(old) == rule.te


def test_llama3_rope_scaling_maps_to_gpt_model_kwargs() -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    kwargs = gpt_model_kwargs(tiny_config("llama", rope_parameters=rope), tp=2)
    assert kwargs["rotary_base"] == 500000.0 and kwargs["rope_scaling"] and kwargs["rope_scaling_factor"] == 32.0
    assert kwargs["vocab_size"] == 512 and kwargs["share_embeddings_and_output_weights"]
    with pytest.raises(ValueError, match="llama3 RoPE scaling other than"):
        gpt_model_kwargs(tiny_config("llama", rope_parameters={**rope, "low_freq_factor": 2.0}))


@pytest.mark.parametrize(
    ("family", "changes", "tp", "pp", "message"),
    [
        ("llama", {}, 4, 1, "TP=4 does not divide the 2 query groups"),
        ("llama", {}, 3, 1, "TP=3 does not divide the 4 attention heads"),
        ("qwen2", {}, 1, 3, "PP=3 does not divide the 4 layers"),
        ("llama", {"attention_bias": True}, 1, 1, "attention_bias=True is not supported"),
        ("qwen2", {"use_sliding_window": True}, 1, 1, "use_sliding_window=True is not supported"),
        ("qwen3", {"attention_bias": True}, 1, 1, "qwen3: attention_bias=True is not supported"),
        ("llama", {"hidden_act": "gelu"}, 1, 1, "hidden_act='gelu' is not supported"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, 1, 1,
         "unsupported RoPE scaling type 'yarn'"),
    ],
)  # fmt: skip
def test_refusals(family: str, changes: dict, tp: int, pp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        layout_from_hf(tiny_config(family, **changes), tp=tp, pp=pp)


def test_unsupported_architecture_refused() -> None:
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        layout_from_hf(GPT2Config())


def test_mismatched_hf_keys_refused() -> None:
    state = hf_state(tiny_model("qwen2"))
    del state["model.layers.0.self_attn.q_proj.bias"]
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.self_attn.q_proj.bias'\]"):
        hf_to_megatron(state, layout_from_hf(tiny_config("qwen2")))


def test_discriminator_export_loads_as_sequence_classifier(tmp_path: Path) -> None:
    """Megatron shards -> HF dir -> transformers ``*ForSequenceClassification``, every tensor equal;
    and a rank's shard read lazily from the directory equals the in-memory conversion."""
    from transformers import AutoModelForSequenceClassification

    model = tiny_model("qwen2", "discriminator")
    layout = layout_from_hf(model.config, tp=2, pp=2, role="discriminator")
    shards = hf_to_megatron(hf_state(model), layout)
    config = export_hf_config(model.config, "discriminator")
    out = save_hf_checkpoint(tmp_path / "d", megatron_to_hf(shards, layout), config)
    loaded = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert loaded.config.architectures == ["Qwen2ForSequenceClassification"] and loaded.config.num_labels == 1
    assert loaded.score.weight.shape == (1, 64)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    lazy = stage_state_dicts(layout, HFWeights(out), pp_rank=1, tp_ranks=[1])[1]
    assert lazy.keys() == shards[(1, 1)].keys()
    assert all(torch.equal(lazy[k], shards[(1, 1)][k]) for k in lazy)
