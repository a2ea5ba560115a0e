"""Activation recompute (``parallel.recompute_activations``): the same losses and gradients as
keeping every activation (CPU, fp32), recompute really running in the backward, and only the
trained models (G, D) recomputing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gad_megatron.config import load_config
from tests.helpers.tiny_hf import tiny_model
from tests.helpers.tiny_run import write_tiny_setup

MODES = ("none", "selective", "full")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recompute") / "model"
    tiny_model("qwen2", seed=3).save_pretrained(out)  # 4 layers, QKV biases, untied head
    return out


class CheckpointSpy:
    """Counts megatron-core's ``CheckpointFunction`` forwards (activations dropped) and backwards
    (the recompute), the one autograd function ``tensor_parallel.checkpoint`` goes through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from megatron.core.tensor_parallel.random import CheckpointFunction

        self.forwards = self.backwards = 0
        forward, backward = CheckpointFunction.forward, CheckpointFunction.backward

        def counted_forward(ctx, *args):  # type: ignore[no-untyped-def]
            self.forwards += 1
            return forward(ctx, *args)

        def counted_backward(ctx, *grads):  # type: ignore[no-untyped-def]
            self.backwards += 1
            return backward(ctx, *grads)

        monkeypatch.setattr(CheckpointFunction, "forward", staticmethod(counted_forward))
        monkeypatch.setattr(CheckpointFunction, "backward", staticmethod(counted_backward))


def _token_batches() -> list:
    from gad_megatron.trainer.batching import build_batch

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (7, 11, 5)]
    responses = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (9, 4, 12)]
    return [build_batch(prompts[:2], responses[:2], pad_id=0), build_batch(prompts[2:], responses[2:], pad_id=0)]


def _score_batches() -> list:
    from gad_megatron.trainer.batching import build_score_batch

    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 300, (n,), generator=gen).tolist() for n in (14, 9, 17, 6)]
    batch = build_score_batch(rows, pad_id=0)  # one group: the teacher answer, then 3 rollouts
    return [batch]


def _grads(actor) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Each parameter's accumulated gradient (Megatron DDP's ``main_grad``), before any clipping."""
    return {name: p.main_grad.detach().clone() for name, p in actor.ddp.module.named_parameters()}


def _train_step(hf_dir: Path, mode: str, spy: CheckpointSpy) -> dict[str, object]:
    """One G SFT step and one D step on fixed batches; the forward and backward counts of the spy
    taken during each model's training pass."""
    from gad_megatron.models.discriminator import load_discriminator
    from gad_megatron.models.policy import build_policy
    from gad_megatron.models.recompute import recompute_overrides
    from gad_megatron.trainer.actor import TRAINING_OVERRIDES, build_actor
    from gad_megatron.trainer.ops import disc_score_and_update, sft_update

    overrides = {**TRAINING_OVERRIDES, **recompute_overrides(mode)}  # type: ignore[arg-type]
    no_clip = 1e9  # the gradients compared are the raw ones (clipping scales main_grad in place)
    g = build_actor(build_policy(hf_dir, torch.float32, **overrides), 1e-6, no_clip, distributed_optimizer=False)
    d = build_actor(load_discriminator(hf_dir, torch.float32, seed=5, **overrides), 1e-6, no_clip,
                    distributed_optimizer=False)  # fmt: skip
    counts_before = spy.forwards, spy.backwards
    metrics, g_norm = sft_update(g, _token_batches())
    g_counts = spy.forwards - counts_before[0], spy.backwards - counts_before[1]
    scores, d_norm = disc_score_and_update(d, _score_batches(), total_rows=4, group_size=4, loss_name="bt")
    return {
        "sft_loss": sum(float(m["sft_loss"]) for m in metrics), "g_norm": g_norm, "d_norm": d_norm,
        "scores": scores, "g_grads": _grads(g), "d_grads": _grads(d), "g_counts": g_counts,
        "d_counts": (spy.forwards - counts_before[0] - g_counts[0], spy.backwards - counts_before[1] - g_counts[1]),
    }


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_losses_and_gradients(megatron_tp1: None, hf_dir: Path, mode: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Each trained layer is recomputed in the backward (full: 4 layers, one checkpoint each;
    selective: each layer's core attention), per micro-batch; the losses, D's scores and every
    gradient equal those of keeping the activations."""
    spy = CheckpointSpy(monkeypatch)
    plain = _train_step(hf_dir, "none", spy)
    assert (plain["g_counts"], plain["d_counts"]) == ((0, 0), (0, 0))  # none: megatron never checkpoints
    recomputed = _train_step(hf_dir, mode, spy)
    layers, g_micro, d_micro = 4, 2, 1
    assert recomputed["g_counts"] == (layers * g_micro, layers * g_micro)
    assert recomputed["d_counts"] == (layers * d_micro, layers * d_micro)
    assert recomputed["sft_loss"] == pytest.approx(plain["sft_loss"], rel=1e-6)
    assert recomputed["g_norm"] == pytest.approx(plain["g_norm"], rel=1e-6) and plain["g_norm"] > 0
    assert recomputed["d_norm"] == pytest.approx(plain["d_norm"], rel=1e-6) and plain["d_norm"] > 0
    torch.testing.assert_close(recomputed["scores"], plain["scores"], rtol=1e-6, atol=1e-7)
    for key in ("g_grads", "d_grads"):
        assert recomputed[key].keys() == plain[key].keys()
        for name, grad in plain[key].items():
            torch.testing.assert_close(recomputed[key][name], grad, rtol=1e-6, atol=1e-8, msg=f"{key} {name}")


def test_only_the_trained_models_recompute(megatron_tp1: None, tmp_path: Path, tiny_model_dir: Path) -> None:
    """G and D get the recompute settings from the run config; the KL reference (forward only)
    does not, nor a frozen D."""
    from gad_megatron.trainer import run

    cfg = load_config(write_tiny_setup(tmp_path, tiny_model_dir),
                      [f"train.init_from={tiny_model_dir}", "parallel.recompute_activations=full"])  # fmt: skip
    ctx, *_ = run.build_context(cfg, "gad")
    assert ctx.g.lm.config.recompute_granularity == "full" and ctx.d_lm.config.recompute_granularity == "full"
    assert ctx.g.lm.config.recompute_method == "uniform" and ctx.g.lm.config.recompute_num_layers == 1
    assert ctx.ref is not None and ctx.ref.config.recompute_granularity is None
    frozen = cfg.model_copy(update={"train": cfg.train.model_copy(update={"freeze_discriminator": True})})
    ctx, *_ = run.build_context(frozen, "gad")
    assert ctx.d is None and ctx.d_lm.config.recompute_granularity is None
    assert ctx.g.lm.config.recompute_granularity == "full"


def test_a_gad_stage_with_full_recompute_logs_the_steps_of_none(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``gad train --stage gad`` (rollouts, KL reference, D and G updates), 2 steps, through the
    CLI: with full recompute every logged loss and gradient norm is that of none."""
    import json
    import subprocess
    import sys

    from tests.helpers.torchrun import ENV, ROOT

    config = write_tiny_setup(tmp_path, tiny_model_dir, max_steps=2, init_from=str(tiny_model_dir))
    rows = {}
    for mode in ("none", "full"):
        run_dir = tmp_path / mode
        proc = subprocess.run([sys.executable, "-m", "gad_megatron.cli", "train", "--config", str(config), "--stage", "gad",
                               "--set", f"run_dir={run_dir}", "--set", f"parallel.recompute_activations={mode}"],
                              env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        rows[mode] = [json.loads(line) for line in (run_dir / "gad" / "metrics.jsonl").read_text().splitlines()]
    keys = ("d_loss", "policy_loss", "kl", "grad_norm_g", "grad_norm_d", "len_mean")
    assert len(rows["none"]) == 2 and all(r["grad_norm_g"] > 0 for r in rows["none"])
    for plain, recomputed in zip(rows["none"], rows["full"], strict=True):
        assert [recomputed[k] for k in keys] == pytest.approx([plain[k] for k in keys], rel=1e-5, abs=1e-7)
