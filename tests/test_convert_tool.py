"""``tools/convert_checkpoint.py``: HF -> Megatron at TP=2 x PP=2 -> HF at TP=1, bit-exact.

Tiny Llama (tied embeddings), Qwen2 (untied, QKV bias) and Qwen3 (untied here, q/k norms,
head_dim != hidden / heads), each as policy and discriminator: the Llama and Qwen3 Ds keep an HF
sequence-classification ``score.weight``, the Qwen2 D is made from the causal LM with a seeded
new head. All six imports run in one 4-process torchrun launch (with
a TP=1 import exported at TP=2 x PP=2), the exports (and our D's scores) in one single-process
launch. Qwen3-MoE policy and D are imported with expert parallelism (TP=2 x EP=2, PP=2 x EP=2)
in the same launch and exported at TP = PP = EP = 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gad_megatron.checkpoint import read_meta
from gad_megatron.models.discriminator import new_head_weight
from tests.helpers.megatron_parity import padded_batch
from tests.helpers.tiny_hf import save_tiny_model
from tests.helpers.torchrun import ENV, ROOT, run_torchrun

TOOL = ROOT / "tools" / "convert_checkpoint.py"
HELPER = Path(__file__).parent / "helpers" / "convert_many.py"
# name -> (HF source directory, import arguments)
MODELS = {
    "llama-policy": ("llama-policy", "--role policy"),
    "llama-discriminator": ("llama-seqcls", "--role discriminator"),
    "qwen2-policy": ("qwen2-policy", "--role policy"),
    "qwen2-discriminator": ("qwen2-policy", "--role discriminator --seed 5"),
    "qwen3-policy": ("qwen3-policy", "--role policy"),
    "qwen3-discriminator": ("qwen3-seqcls", "--role discriminator"),
}
# name -> (HF source directory, import arguments with the layout, the layout in the checkpoint's meta)
MOE_MODELS = {
    "qwen3_moe-policy": ("qwen3_moe-policy", "--role policy --tp 2 --ep 2", {"world_size": 4, "tp": 2, "pp": 1, "ep": 2}),
    "qwen3_moe-discriminator": ("qwen3_moe-seqcls", "--role discriminator --pp 2 --ep 2",
                                {"world_size": 4, "tp": 1, "pp": 2, "ep": 2}),
}  # fmt: skip
DISCRIMINATORS = ("llama-discriminator", "qwen2-discriminator", "qwen3-discriminator", "qwen3_moe-discriminator")
ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe"}


def launch(nproc: int, report: Path, *entries: str) -> dict[str, Any]:
    run_torchrun(HELPER, nproc, str(report), *entries)
    return json.loads(report.read_text())


def save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 300)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                        pad_token="<pad>")  # fmt: skip
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    work = tmp_path_factory.mktemp("convert")
    save_tiny_model(work / "hf" / "llama-policy", "llama", "policy", seed=0)
    save_tokenizer(work / "hf" / "llama-policy")
    save_tiny_model(work / "hf" / "llama-seqcls", "llama", "discriminator", seed=1)
    save_tiny_model(work / "hf" / "qwen2-policy", "qwen2", "policy", seed=2)
    save_tiny_model(work / "hf" / "qwen3-policy", "qwen3", "policy", seed=3, tied=False)
    save_tiny_model(work / "hf" / "qwen3-seqcls", "qwen3", "discriminator", seed=4)
    save_tiny_model(work / "hf" / "qwen3_moe-policy", "qwen3_moe", "policy", seed=6)
    save_tiny_model(work / "hf" / "qwen3_moe-seqcls", "qwen3_moe", "discriminator", seed=7)
    imports = [f"import --model {work / 'hf' / src} {args} --tp 2 --pp 2 --out {work / 'mg' / name}"
               for name, (src, args) in MODELS.items()]  # fmt: skip
    imports += [f"import --model {work / 'hf' / src} {args} --out {work / 'mg' / name}"
                for name, (src, args, _) in MOE_MODELS.items()]  # fmt: skip
    # The weight stream gathering experts over TP and EP: exported at TP=2 x EP=2.
    imports.append(f"export --checkpoint {work / 'mg' / 'qwen3_moe-policy'} --tp 2 --ep 2 "
                   f"--out {work / 'out' / 'qwen3_moe-tp2ep2'}")
    # The other way round too: imported at TP=1 (4 data-parallel replicas), exported at TP=2 x PP=2.
    imports += [f"import --model {work / 'hf' / 'qwen2-policy'} --out {work / 'mg' / 'qwen2-tp1'}",
                f"export --checkpoint {work / 'mg' / 'qwen2-tp1'} --tp 2 --pp 2 --out {work / 'out' / 'qwen2-tp1'}"]
    imported = launch(4, work / "imports.json", *imports)
    exports = [f"export --checkpoint {work / 'mg' / name} --out {work / 'out' / name}"
               for name in {**MODELS, **MOE_MODELS}]  # fmt: skip
    scores = [f"scores:{work / 'mg' / name}" for name in DISCRIMINATORS]
    exported = launch(1, work / "exports.json", *exports, *scores)
    return work, imported, exported


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def test_import_at_tp2_pp2_then_export_at_tp1_is_bit_exact(converted: tuple) -> None:
    work, imported, exported = converted
    assert set(imported.values()) == {0} and all(v == 0 for k, v in exported.items() if k.startswith("export")), (
        imported, exported)  # fmt: skip
    layouts = {name: {"world_size": 4, "tp": 2, "pp": 2} for name in MODELS}
    layouts.update({name: layout for name, (_, _, layout) in MOE_MODELS.items()})
    for name, (src, args, *_) in {**MODELS, **MOE_MODELS}.items():
        role = args.split()[1]
        meta = read_meta(work / "mg" / name)
        assert meta["layout"] == layouts[name], name
        assert meta["models"] == {role: {"role": role, "dtype": "float32"}}
        source, got = tensors(work / "hf" / src), tensors(work / "out" / name)
        if name == "qwen2-discriminator":  # from the causal LM: its head dropped, a new one drawn from --seed
            source.pop("lm_head.weight")
            source["score.weight"] = new_head_weight(64, 0.02, seed=5)
        assert got.keys() == source.keys(), name
        for key, tensor in source.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), (name, key)
        architecture = json.loads((work / "out" / name / "config.json").read_text())["architectures"]
        suffix = "ForSequenceClassification" if role == "discriminator" else "ForCausalLM"
        assert architecture == [ARCHITECTURES[name.split("-")[0]] + suffix]
    source, got = tensors(work / "hf" / "qwen3_moe-policy"), tensors(work / "out" / "qwen3_moe-tp2ep2")
    assert got.keys() == source.keys() and all(torch.equal(got[k], v) for k, v in source.items())
    assert read_meta(work / "mg" / "qwen2-tp1")["layout"] == {"world_size": 4, "tp": 1, "pp": 1}
    source, got = tensors(work / "hf" / "qwen2-policy"), tensors(work / "out" / "qwen2-tp1")
    assert got.keys() == source.keys() and all(torch.equal(got[k], v) for k, v in source.items())


def test_exported_discriminator_scores_like_ours_in_transformers(converted: tuple) -> None:
    from transformers import AutoModelForSequenceClassification

    work, _, exported = converted
    ids, mask = padded_batch(left=False)  # pad id 0 after the real tokens (ids 1..299)
    for name in DISCRIMINATORS:
        model = AutoModelForSequenceClassification.from_pretrained(work / "out" / name, dtype=torch.float32).eval()
        assert model.config.num_labels == 1
        with torch.no_grad():
            theirs = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        ours = torch.tensor(exported[f"scores:{work / 'mg' / name}"])
        assert (theirs - ours).abs().max().item() < 1e-5, (name, theirs, ours)


def test_tokenizer_travels_with_the_checkpoint(converted: tuple) -> None:
    from transformers import AutoTokenizer

    work, _, _ = converted
    assert (work / "mg" / "llama-policy" / "hf" / "policy" / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(work / "out" / "llama-policy")
    assert tokenizer.convert_tokens_to_ids("w7") == 7
    assert not (work / "out" / "qwen2-policy" / "tokenizer.json").exists()  # its source had none


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], env=ENV, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)  # fmt: skip


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    cases = [
        (["import", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "model path not found"),
        (["import", "--model", str(model_dir), "--tp", "3", "--out", str(tmp_path / "x")],
         "TP=3 does not divide the 4 attention heads"),
        (["import", "--model", str(model_dir), "--ep", "2", "--out", str(tmp_path / "x")], "llama has no experts"),
        (["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "y")], "no complete checkpoint"),
    ]  # fmt: skip
    for args, message in cases:
        proc = run_tool(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("convert_checkpoint") and message in lines[0], proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_smollm2_alias_round_trip(tmp_path: Path) -> None:
    """The offline default model: alias -> Megatron (one process) -> HF, bit-exact, tokenizer kept."""
    from gad_megatron.models.sources import resolve_model_path

    for args in (["import", "--model", "smollm2-135m-instruct", "--out", str(tmp_path / "mg")],
                 ["export", "--checkpoint", str(tmp_path / "mg"), "--out", str(tmp_path / "out")]):  # fmt: skip
        proc = run_tool(*args)
        assert proc.returncode == 0, proc.stderr[-4000:]
    source, got = tensors(Path(resolve_model_path("smollm2-135m-instruct"))), tensors(tmp_path / "out")
    assert got.keys() == source.keys() and all(torch.equal(got[k], v) for k, v in source.items())
    assert (tmp_path / "out" / "tokenizer.json").is_file()
