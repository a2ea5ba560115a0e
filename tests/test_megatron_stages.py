"""The stages on megatron-core (CPU, gloo), through the real CLI: each runs 3 steps on a tiny
model, checkpoints, logs every metric; warmup -> gad chains; 2-process TP=2 / PP=2 runs give
the losses of 1 process; a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.tiny_run import TOPICS, write_tiny_setup
from tests.helpers.torchrun import ENV, ROOT, free_port

GAD_METRICS = {
    "d_loss", "d_acc", "teacher_score", "student_score", "reward_mean", "reward_std", "adv_std", "kl",
    "policy_loss", "clip_frac", "entropy", "grad_norm_g", "grad_norm_d", "len_mean", "len_max", "truncated_frac", "repetition",
    "time/rollout", "time/d_update", "time/g_update", "time/sync", "time/step",
}  # no time/scoring: a prompt's teacher answer and rollouts fit one micro-batch, D scores and learns in one pass


def gad(config: Path, stage: str, *sets: str, nproc: int = 1, resume: bool = False) -> subprocess.CompletedProcess:
    """``gad train`` as a user runs it: one process, or torchrun with ``nproc``."""
    launcher = [sys.executable, "-m", "gad_megatron.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "gad_megatron.cli"]  # fmt: skip
    args = ["train", "--config", str(config), "--stage", stage, *[a for s in sets for a in ("--set", s)]]
    return subprocess.run([*launcher, *args, *(["--resume"] if resume else [])], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    config = write_tiny_setup(tmp_path_factory.mktemp("chain"), tiny_model_dir)
    ok(gad(config, "warmup"))
    ok(gad(config, "gad"))
    run = config.parent / "run"
    return {"config": config, "warmup": run / "warmup", "gad": run / "gad"}


def test_warmup_trains_d_alone_first_then_both(chained: dict) -> None:
    stage: Path = chained["warmup"]
    assert (stage / "final" / "COMPLETE").is_file()
    # saved at step 2 (save_steps=2) and at the end; keep_resume_states=1 keeps the newest only
    assert [p.name for p in (stage / "megatron").iterdir()] == ["iter_0000003"]
    assert (stage / "megatron" / "iter_0000003" / "COMPLETE").is_file()
    assert (stage / "checkpoint-2" / "COMPLETE").is_file() and (stage / "checkpoint-2" / "discriminator").is_dir()
    rows = metrics(stage)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "sft_loss" not in rows[0] and "grad_norm_g" not in rows[0], "disc_only_steps=1: step 1 updates D alone"
    assert all("sft_loss" in r and r["sft_loss"] > 0 for r in rows[1:])
    for key in ("d_loss", "d_acc", "grad_norm_d", "time/rollout", "time/d_update", "len_mean"):
        assert all(key in r for r in rows), key


def test_gad_logs_every_metric_and_starts_at_its_reference(chained: dict) -> None:
    rows = metrics(chained["gad"])
    assert len(rows) == 3
    for row in rows:
        assert not GAD_METRICS - set(row), GAD_METRICS - set(row)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7), "G starts as its KL reference (warmup's final G)"
    assert rows[-1]["kl"] > 0
    # N = 2: group-normalised advantages are +-1/sqrt(2), whose unbiased std over the batch is sqrt(2/3)
    assert all(r["adv_std"] == pytest.approx((2 / 3) ** 0.5, abs=1e-3) for r in rows)
    assert all(abs(r["engine_logprob_diff"]) < 1e-4 for r in rows), "engine samples with the trainer's weights"


def test_final_models_load_with_transformers(chained: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    final = chained["gad"] / "final"
    assert AutoModelForSequenceClassification.from_pretrained(final / "discriminator").config.num_labels == 1
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 2


def test_frozen_discriminator_and_ce_loss(chained: dict, tmp_path: Path) -> None:
    warm_final = chained["warmup"] / "final"
    ok(gad(chained["config"], "gad", f"run_dir={tmp_path / 'frozen'}", f"train.init_from={warm_final}",
           "train.freeze_discriminator=true", "train.max_steps=2"))  # fmt: skip
    before = load_file(warm_final / "discriminator" / "model.safetensors")
    after = load_file(tmp_path / "frozen" / "gad" / "final" / "discriminator" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all("grad_norm_d" not in r and r["time/scoring"] > 0 for r in metrics(tmp_path / "frozen" / "gad"))
    ok(gad(chained["config"], "warmup", f"run_dir={tmp_path / 'ce'}", "train.disc_loss=ce", "train.max_steps=1"))
    assert metrics(tmp_path / "ce" / "warmup")[0]["d_loss"] > 0


def _window_means(accuracy: list[float]) -> list[float | None]:
    """The early stop's 3-step means, by step (None before step 3)."""
    return [None if s < 3 else sum(accuracy[s - 3 : s]) / 3 for s in range(1, len(accuracy) + 1)]


def test_warmup_stops_once_d_is_accurate_never_before_g_trained(chained: dict, tmp_path: Path) -> None:
    """``warmup_until_d_acc``: the stage ends at the first step past ``disc_only_steps`` whose
    last-3-step mean pair accuracy reaches the target, and still exports final/ (GAD starts from
    it). The target is taken from an uninterrupted run (runs are deterministic): the mean that
    step 3, a D-only step, already reaches, so stopping there would hand GAD the untrained G.
    A warmup that is D-only throughout (G warmed up by SeqKD) stops at the first step that reaches it."""
    from gad_megatron.trainer.run import d_accuracy_reached

    assert not d_accuracy_reached([1.0, 1.0], 0.5) and not d_accuracy_reached([0.9] * 5, None)
    assert d_accuracy_reached([0.0, 0.8, 0.9, 1.0], 0.9) and not d_accuracy_reached([1.0, 0.8, 0.9, 0.9], 0.9)
    sets = ("train.max_steps=6", "train.disc_only_steps=3", "train.save_steps=100")
    ok(gad(chained["config"], "warmup", f"run_dir={tmp_path / 'full'}", *sets))
    accuracy = [r["d_acc"] for r in metrics(tmp_path / "full" / "warmup")]
    means = _window_means(accuracy)
    target = means[2]
    assert target > 0, accuracy
    stop = next((s for s in range(4, 7) if means[s - 1] >= target - 1e-9), 6)
    ok(gad(chained["config"], "warmup", f"run_dir={tmp_path / 'early'}", *sets, f"train.warmup_until_d_acc={target}"))
    rows = metrics(tmp_path / "early" / "warmup")
    assert [r["step"] for r in rows] == list(range(1, stop + 1)) and stop > 3
    assert [r["d_acc"] for r in rows] == accuracy[:stop]
    assert "sft_loss" in rows[-1], "G had its SFT steps before the warmup ended"
    assert (tmp_path / "early" / "warmup" / "final" / "COMPLETE").is_file()
    # A warmup of D-only steps alone (G is warmed up elsewhere: the quickstart's SeqKD) stops at step 3.
    ok(gad(chained["config"], "warmup", f"run_dir={tmp_path / 'd_only'}", "train.max_steps=6",
           "train.disc_only_steps=6", "train.save_steps=100", f"train.warmup_until_d_acc={target}"))  # fmt: skip
    assert [r["d_acc"] for r in metrics(tmp_path / "d_only" / "warmup")] == accuracy[:3]
    assert (tmp_path / "d_only" / "warmup" / "final" / "COMPLETE").is_file()
    # Resumed after step 2, the window still holds steps 1-2: the stop comes at the same step.
    resumed = tmp_path / "resumed"
    ok(gad(chained["config"], "warmup", f"run_dir={resumed}", *sets[1:], "train.max_steps=2",
           "train.keep_resume_states=1", "train.save_steps=2"))  # fmt: skip
    meta = json.loads((resumed / "warmup" / "megatron" / "iter_0000002" / "meta.json").read_text())
    assert meta["extra_state"]["d_acc_recent"] == accuracy[:2]
    (resumed / "warmup" / "final" / "COMPLETE").unlink()  # a run that died while exporting final/
    ok(gad(chained["config"], "warmup", f"run_dir={resumed}", *sets, f"train.warmup_until_d_acc={target}",
           resume=True))  # fmt: skip
    assert [r["step"] for r in metrics(resumed / "warmup")] == list(range(1, stop + 1))


def test_seqkd_stage(chained: dict, tmp_path: Path) -> None:
    ok(gad(chained["config"], "seqkd", f"run_dir={tmp_path}", "train.learning_rate=1e-3"))
    rows = metrics(tmp_path / "seqkd")
    assert len(rows) == 3 and all(r["sft_loss"] > 0 for r in rows)
    assert rows[-1]["sft_loss"] < rows[0]["sft_loss"]
    assert (tmp_path / "seqkd" / "final" / "model.safetensors").is_file()


def _other_tokenizer_model(out: Path) -> Path:
    """A tiny Llama with a word-level tokenizer of its own (not SmolLM2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", *sorted({w for t in TOPICS for w in ("fact", "about", t)})]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="[EOS]")  # fmt: skip
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_discriminator_of_another_tokenizer_is_refused(chained: dict, tmp_path: Path) -> None:
    """D scores the generator's token ids: a D from another family would read wrong ids."""
    other = _other_tokenizer_model(tmp_path / "other")
    proc = gad(chained["config"], "warmup", f"run_dir={tmp_path / 'run'}", f"train.discriminator={other}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("gad: error:")]
    assert len(line) == 1 and f"train.discriminator: {other} has another tokenizer than the generator" in line[0]
    assert not (tmp_path / "run" / "warmup" / "megatron").exists()


def test_fp8_width_padding_leaves_the_losses_unchanged(chained: dict, tmp_path: Path) -> None:
    """Micro-batches padded to widths of 16 (what FP8 GEMMs need; right padding, masked): the same
    D and G losses and KL as unpadded, step by step (fp32 on CPU: only the shapes differ)."""
    warm = chained["warmup"] / "final"
    sets = [f"train.init_from={warm}", "train.max_steps=2", "train.save_steps=100"]
    ok(gad(chained["config"], "gad", f"run_dir={tmp_path / 'plain'}", *sets))
    ok(gad(chained["config"], "gad", f"run_dir={tmp_path / 'pad16'}", *sets, "parallel.sequence_pad_multiple=16"))
    plain, padded = metrics(tmp_path / "plain" / "gad"), metrics(tmp_path / "pad16" / "gad")
    for key in ("d_loss", "policy_loss", "kl", "grad_norm_g", "grad_norm_d", "engine_logprob_diff_max"):
        assert [r[key] for r in padded] == pytest.approx([r[key] for r in plain], abs=2e-5), key


def test_config_errors_come_before_any_model_loads(chained: dict, tmp_path: Path) -> None:
    proc = gad(chained["config"], "warmup", f"run_dir={tmp_path}", "train.batch_prompts=64")
    assert proc.returncode == 2 and "batch_prompts=64 but only 8 prompts" in proc.stderr
    proc = gad(chained["config"], "warmup", f"run_dir={tmp_path}", "parallel.precision=fp8")
    assert proc.returncode == 2
    line = [x for x in proc.stderr.splitlines() if x.startswith("gad: error:")]
    assert len(line) == 1 and "fp8" in line[0] and "Transformer Engine" in line[0]
    assert not (tmp_path / "warmup").exists()


def _losses(stage_dir: Path) -> list[float]:
    """D's and G's loss of every step, flat."""
    return [x for r in metrics(stage_dir) for x in (r["d_loss"], r.get("sft_loss", 0.0))]


LAYOUTS = {"tp2": (2, ["parallel.tensor_parallel=2"]), "pp2": (2, ["parallel.pipeline_parallel=2"]),
           "tp2pp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])}  # fmt: skip
PER_STEP = {"warmup": ("d_loss", "sft_loss", "grad_norm_g", "grad_norm_d", "d_acc"),
            "gad": ("d_loss", "policy_loss", "kl", "grad_norm_g", "grad_norm_d", "d_acc", "len_mean")}  # fmt: skip


def final_weights(stage_dir: Path, export: str = "final") -> dict[str, torch.Tensor]:
    """G's and D's exported HF tensors (D's prefixed ``d/``)."""
    g = load_file(stage_dir / export / "model.safetensors")
    return g | {f"d/{k}": v for k, v in load_file(stage_dir / export / "discriminator" / "model.safetensors").items()}


def update_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """|got - want| / |want - start| over every tensor: how far a run's weights land from the
    reference run's, relative to how far training moved them."""
    assert got.keys() == want.keys()
    num = sum(float((got[k] - want[k]).double().pow(2).sum()) for k in want)
    return (num / sum(float((want[k] - start[k]).double().pow(2).sum()) for k in want)) ** 0.5


def test_layouts_train_as_one_process(chained: dict, tmp_path: Path) -> None:
    """The same run at TP=2, PP=2 and TP=2 x PP=2 as in one process: 3 warmup steps that update
    G (SFT) and D, then 3 GAD steps (policy gradient, KL, D), compared step by step (losses,
    gradient norms, which Adam would hide from the losses alone) and by the final weights."""
    sets = ["train.max_steps=3", "train.save_steps=100", "train.disc_only_steps=0"]
    runs = {"one": (1, [])} | LAYOUTS
    for name, (nproc, layout) in runs.items():
        ok(gad(chained["config"], "warmup", f"run_dir={tmp_path / name}", *sets, *layout, nproc=nproc))
        ok(gad(chained["config"], "gad", f"run_dir={tmp_path / name}", *sets, *layout, nproc=nproc))
    for stage in ("warmup", "gad"):
        one = metrics(tmp_path / "one" / stage)
        assert len(one) == 3 and all(r["grad_norm_g"] > 0 and r["grad_norm_d"] > 0 for r in one)
        for name in LAYOUTS:
            rows = metrics(tmp_path / name / stage)
            for key in PER_STEP[stage]:
                assert [r[key] for r in rows] == pytest.approx([r[key] for r in one], rel=1e-4, abs=2e-5), (name, key)
    begin = final_weights(tmp_path / "one" / "warmup")  # where GAD started
    for name in LAYOUTS:
        error = update_error(final_weights(tmp_path / name / "gad"), final_weights(tmp_path / "one" / "gad"), begin)
        assert error < 1e-3, (name, error)


def test_discriminator_in_two_passes_equals_one_pass(chained: dict, tmp_path: Path) -> None:
    """A budget too small for a teacher answer and its rollouts together: D scores first, then
    re-runs one micro-batch at a time, and learns exactly what the one-pass update learns."""
    sets = ["train.max_steps=2", "train.save_steps=100"]
    ok(gad(chained["config"], "warmup", f"run_dir={tmp_path / 'one'}", *sets))
    ok(gad(chained["config"], "warmup", f"run_dir={tmp_path / 'two_pass'}", "parallel.micro_batch_tokens=140", *sets))
    assert _losses(tmp_path / "two_pass" / "warmup") == pytest.approx(_losses(tmp_path / "one" / "warmup"), abs=2e-5)
    assert all("time/scoring" not in r for r in metrics(tmp_path / "one" / "warmup"))
    assert all(r["time/scoring"] > 0 for r in metrics(tmp_path / "two_pass" / "warmup"))


def test_resume_equals_an_uninterrupted_run_and_reshards(chained: dict, tmp_path: Path) -> None:
    """TP=2, checkpoint every step, G and D both trained from step 1: a run restarted from step 1
    reproduces steps 2-3 and both final models bit for bit; the TP=2 checkpoint also resumes at
    TP=1, to rounding."""
    sets = ["train.save_steps=1", "train.keep_resume_states=3", "train.disc_only_steps=0", "parallel.tensor_parallel=2"]
    ok(gad(chained["config"], "warmup", f"run_dir={tmp_path / 'full'}", *sets, nproc=2))
    full = tmp_path / "full" / "warmup"
    after_step1 = final_weights(full, "checkpoint-1")
    for run, nproc, tp in (("tp2", 2, 2), ("tp1", 1, 1)):
        resumed = tmp_path / run / "warmup"
        (resumed / "megatron").mkdir(parents=True)
        subprocess.run(["cp", "-r", str(full / "megatron" / "iter_0000001"), str(resumed / "megatron")], check=True)
        ok(gad(chained["config"], "warmup", f"run_dir={tmp_path / run}", *sets[:3], f"parallel.tensor_parallel={tp}",
               nproc=nproc, resume=True))  # fmt: skip
        assert [r["step"] for r in metrics(resumed)] == [2, 3]
        assert _losses(resumed) == pytest.approx(_losses(full)[2:], abs=2e-5), run  # steps 2 and 3
        got, want = final_weights(resumed), final_weights(full)
        if run == "tp2":  # same layout: bit-exact G and D
            assert all(torch.equal(got[k], want[k]) for k in want)
        else:
            assert update_error(got, want, after_step1) < 1e-3


def test_no_generator_warmup_and_a_discriminator_of_another_size(chained: dict, tmp_path: Path,
                                                                tiny_model_dir: Path) -> None:
    """Paper ablations: gad straight from the student (no warmup), and D larger than G."""
    from gad_megatron.models.sources import make_tiny_model

    big_d = make_tiny_model(tmp_path / "d", tokenizer_spec=str(tiny_model_dir), layers=3, hidden=96, seed=3)
    ok(gad(chained["config"], "gad", f"run_dir={tmp_path / 'run'}", f"train.init_from={tiny_model_dir}",
           f"train.discriminator={big_d}", "train.max_steps=1"))  # fmt: skip
    rows = metrics(tmp_path / "run" / "gad")
    assert len(rows) == 1 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-7) and rows[0]["d_loss"] > 0
    d = load_file(tmp_path / "run" / "gad" / "final" / "discriminator" / "model.safetensors")
    assert d["score.weight"].shape == (1, 96) and "model.layers.2.mlp.up_proj.weight" in d
