"""How well does the quickstart's D-only warmup teach D? Held-out pair accuracy per recipe.

    .venv/bin/python bench/d_warmup.py --source /tmp/qs_full          # 4 variants, ~15 min on 2 CPU cores
    .venv/bin/python bench/d_warmup.py --variant k8_lr5e-5:5:8:5e-5  # name:steps:k:disc_lr, repeatable

(From a git worktree whose venv is another checkout's editable install: ``PYTHONPATH=.`` first.)

Reuses a finished quickstart run (``--source``: its config.yaml, data/ and seqkd/final). Each
variant runs the real warmup stage (D-only steps from the SeqKD model, as the quickstart does)
into ``<out>/<variant>/warmup`` with its own step count, D updates per step
(``train.disc_updates_per_step``) and D lr. Then the warmed D (``warmup/final/discriminator``,
an HF sequence classifier) scores held-out pairs: the teacher's answer to each prompt of
``data/test.jsonl`` (never trained on) against N rollouts of the SeqKD model (= the warmed-up G)
at the training temperature, sampled once (``<out>/heldout_rollouts.jsonl``) and reused by every
variant. Pair accuracy is the share of (teacher score > rollout score) pairs, ties wrong, as the
trainer's ``d_acc``. Writes ``<out>/summary.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gad_megatron.config import RunConfig, load_config
from gad_megatron.data import read_jsonl, write_jsonl
from gad_megatron.loss import pair_accuracy
from gad_megatron.quickstart import train_once
from gad_megatron.text_encoding import TextEncoder

log = logging.getLogger("d_warmup")


@dataclass(frozen=True)
class Variant:
    name: str
    steps: int  # D-only warmup steps
    disc_updates: int  # train.disc_updates_per_step
    disc_lr: float  # train.disc_learning_rate

    @classmethod
    def parse(cls, spec: str) -> Variant:
        name, steps, k, lr = spec.split(":")
        return cls(name, int(steps), int(k), float(lr))


DEFAULT_VARIANTS = ("baseline:5:1:1e-5", "k4:5:4:1e-5", "lr5e-5:5:1:5e-5", "k4_lr5e-5:5:4:5e-5")


def encoder_for(cfg: RunConfig, tokenizer: Any) -> TextEncoder:
    """The trainer's encoding of prompts and responses (same limits as the warmup)."""
    return TextEncoder(tokenizer, cfg.data.max_prompt_length, cfg.train.max_response_length)


def heldout_rows(cfg: RunConfig, source: Path, out: Path, n: int) -> list[dict[str, Any]]:
    """Per test prompt: D's token ids of the teacher answer and of ``n`` SeqKD rollouts. Sampled
    once into ``out/heldout_rollouts.jsonl``, then read from there."""
    return rollout_rows(cfg, source, out / "heldout_rollouts.jsonl", read_jsonl(source / "data" / "test.jsonl"), n)


def rollout_rows(cfg: RunConfig, source: Path, path: Path, records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Per record: D's token ids of its teacher answer and of ``n`` rollouts of the SeqKD model at
    the training temperature (transformers engine, the trainer's rollout path). Cached in ``path``."""
    if path.is_file():
        return read_jsonl(path)
    from gad_megatron.rollout.hf_engine import TransformersEngine
    from gad_megatron.rollout.step import RolloutSettings, rollout_step

    start = time.monotonic()
    engine = TransformersEngine.from_pretrained(str(source / "seqkd" / "final"))
    encoder = encoder_for(cfg, engine.tokenizer)
    settings = RolloutSettings(n=n, max_tokens=cfg.train.max_response_length, temperature=cfg.train.temperature)
    rollouts = rollout_step(engine, [r["prompt"] for r in records], encoder, encoder, settings, cfg.seed, 0, 0)
    rows = [{"id": r["id"], "teacher_ids": encoder.encode(r["prompt"], r["teacher_response"]),
             "prompt_length": len(encoder.prompt_ids(r["prompt"])),
             "rollout_ids": [list(x.d_input_ids) for x in rollouts if x.prompt_index == i],
             "rollout_texts": [x.text for x in rollouts if x.prompt_index == i]}
            for i, r in enumerate(records)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    log.info("%s: %d prompts x %d rollouts in %.0f s", path.name, len(rows), n, time.monotonic() - start)
    return rows


def heldout_accuracy(d_dir: Path, rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Pair accuracy of the HF discriminator in ``d_dir`` on the held-out rows, and its standard
    error over prompts."""
    return accuracy_and_se(d_scores(d_dir, rows))


@torch.no_grad()
def d_scores(d_dir: Path, rows: list[dict[str, Any]], batch_size: int = 16) -> torch.Tensor:
    """A trained HF discriminator's scores ``[P, 1 + n]`` (teacher answer first, then its rollouts)."""
    from gad_megatron.evaluation.hf_discriminator import load_hf_discriminator, score_sequences
    from gad_megatron.text_encoding import right_pad

    model = load_hf_discriminator(str(d_dir)).eval()
    seqs = [ids for r in rows for ids in (r["teacher_ids"], *r["rollout_ids"])]
    scores = torch.cat([score_sequences(model, *right_pad(seqs[i : i + batch_size], model.config.pad_token_id))
                        for i in range(0, len(seqs), batch_size)])  # fmt: skip
    return scores.view(len(rows), -1)  # every prompt has n rollouts


def accuracy_and_se(groups_PK: torch.Tensor) -> tuple[float, float]:
    """Pair accuracy of scores ``[P, 1 + n]`` (teacher first, then its n rollouts; ties wrong) and its
    standard error over prompts (a prompt's pairs share its teacher answer: they are not independent)."""
    per_prompt_P = (groups_PK[:, :1] > groups_PK[:, 1:]).float().mean(dim=1)
    accuracy = float(pair_accuracy(groups_PK[:, 0], groups_PK[:, 1:]))
    return accuracy, float(per_prompt_P.std() / len(groups_PK) ** 0.5)


def run_variant(cfg: RunConfig, source: Path, out: Path, v: Variant) -> dict[str, Any]:
    """The quickstart's D-only warmup with this variant's settings, trained afresh. -> its log's numbers."""
    run_cfg = cfg.model_copy(update={"run_dir": str(out / v.name)})
    start = time.monotonic()
    train_once(run_cfg, "warmup", v.steps, fresh=True, init_from=str(source / "seqkd" / "final"),
               disc_only_steps=v.steps, disc_updates_per_step=v.disc_updates, disc_learning_rate=v.disc_lr)  # fmt: skip
    wall = time.monotonic() - start
    rows = read_jsonl(out / v.name / "warmup" / "metrics.jsonl")
    return {"variant": v.name, "steps": v.steps, "disc_updates": v.disc_updates, "disc_lr": v.disc_lr,
            "warmup_wall_s": wall, "train_d_acc": [r["d_acc"] for r in rows],
            "train_d_acc_after_last": rows[-1].get("d_acc_after"),
            "steps_s": sum(r["time/step"] for r in rows),
            "time_d_update_s": sum(r.get("time/d_update", 0.0) for r in rows)}  # fmt: skip


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| variant | steps | k | D lr | warmup wall s | steps s | D update s | train d_acc, last step | "
             "train d_acc_after, last step | held-out pair accuracy (+- s.e. over prompts) |", "|" + "---|" * 10]  # fmt: skip
    for r in results:
        after = "-" if r.get("train_d_acc_after_last") is None else f"{r['train_d_acc_after_last']:.2f}"
        last = f"{r['train_d_acc'][-1]:.2f}" if r.get("train_d_acc") else "-"
        se = "" if r.get("heldout_se") is None else f" +- {r['heldout_se']:.3f}"
        wall, steps_s, d_time = ("-" if r.get(k) is None else f"{r[k]:.0f}"
                                 for k in ("warmup_wall_s", "steps_s", "time_d_update_s"))
        lines.append(f"| {r['variant']} | {r.get('steps', '-')} | {r.get('disc_updates', '-')} | "
                     f"{r.get('disc_lr', '-')} | {wall} | {steps_s} | {d_time} | {last} | {after} | {r['heldout_acc']:.3f}{se} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="/tmp/qs_full", help="a finished quickstart run dir")
    ap.add_argument("--out", default="runs/d_warmup")
    ap.add_argument("--variant", action="append", help="name:steps:k:disc_lr (default: %s)" % " ".join(DEFAULT_VARIANTS))
    ap.add_argument("--n", type=int, default=8, help="held-out rollouts per test prompt")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source, out = Path(a.source).resolve(), Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(source / "config.yaml")
    rows = heldout_rows(cfg, source, out, a.n)
    results = []
    own = source / "warmup" / "final" / "discriminator"
    if own.is_dir():  # the source run's own warmup: what the quickstart shipped
        acc, se = heldout_accuracy(own, rows)
        results.append({"variant": "source run's warmup", "heldout_acc": acc, "heldout_se": se})
    for v in map(Variant.parse, a.variant or DEFAULT_VARIANTS):
        result = run_variant(cfg, source, out, v)
        result["heldout_acc"], result["heldout_se"] = heldout_accuracy(out / v.name / "warmup" / "final" / "discriminator",
                                                                       rows)  # fmt: skip
        log.info("%s: held-out pair accuracy %.3f, warmup %.0f s", v.name, result["heldout_acc"],
                 result["warmup_wall_s"])  # fmt: skip
        results.append(result)
        (out / "summary.json").write_text(json.dumps({"source": str(source), "n": a.n, "pairs": len(rows) * a.n,
                                                      "results": results}, indent=1))  # fmt: skip
    print(markdown(results))


if __name__ == "__main__":
    main()
