"""D pretrained on cached rollouts of every training prompt: held-out pair accuracy per epoch.

    .venv/bin/python bench/d_pretrain.py --source /tmp/qs_full --heldout-dir /tmp/d_warmup
    .venv/bin/python bench/d_pretrain.py --recipe lr2e-5:3:8:2e-5:4   # name:epochs:batch_prompts:lr:k, repeatable

(From a git worktree whose venv is another checkout's editable install: ``PYTHONPATH=.`` first.)

Reuses a finished quickstart run (``--source``: config.yaml, data/, seqkd/final). The warmup
stage's models are built as the quickstart builds them (G and D from the SeqKD model), then the
product's ``train.disc_pretrain`` code runs: the SeqKD model samples ``--k`` rollouts of every
training prompt at the training temperature once (cached in ``<out>/train_rollouts_k<K>.jsonl``
and shared by every recipe), then each recipe trains a fresh D for its epochs on the first
``k`` rollouts of each prompt (all 148 training prompts; none held out, the test prompts are the
validation), through the trainer's D update. After each epoch D scores the held-out pairs of
``bench/d_warmup.py`` (the teacher's answer to each test prompt against 8 SeqKD rollouts; same
pairs, same accuracy definition). Writes ``<out>/summary.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gad_megatron.config import DiscPretrainConfig, RunConfig, load_config

log = logging.getLogger("d_pretrain")


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_prompts: int
    lr: float
    k: int  # rollouts per prompt used (at most --k)

    @classmethod
    def parse(cls, spec: str) -> Recipe:
        name, epochs, batch, lr, k = spec.split(":")
        return cls(name, int(epochs), int(batch), float(lr), int(k))


DEFAULT_RECIPES = ("lr1e-5_b8_k4:3:8:1e-5:4",)


def warmup_config(cfg: RunConfig, source: Path, discriminator: str | None, disc_score: str = "head") -> RunConfig:
    """The quickstart's warmup stage: G starts from the SeqKD model, D too unless ``discriminator``
    names another start (e.g. the student before SeqKD); D of kind ``disc_score``."""
    update: dict[str, Any] = {"stage": "warmup", "init_from": str(source / "seqkd" / "final"), "disc_score": disc_score}
    if discriminator:
        update["discriminator"] = discriminator
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def run_recipe(cfg: RunConfig, out: Path, k_sampled: int, val_train: int, heldout: list[Any],
               r: Recipe) -> dict[str, Any]:  # fmt: skip
    """A fresh D (the quickstart's warmup D), pretrained by ``r`` on the training prompts but
    ``val_train``. -> timings and, per epoch, pair accuracy on: the test pairs (``val_acc``), those
    whose teacher answer ends within the token budget (``val_acc_complete``), and the held-out
    training prompts' own rollouts (``train_heldout_acc``)."""
    from gad_megatron.trainer.disc_pretrain import (cached_groups, pair_accuracy_of, pretrain_discriminator,
                                                    sample_groups, split_validation)
    from gad_megatron.trainer.run import build_context

    start = time.monotonic()
    ctx, _, records, _ = build_context(cfg, "warmup")
    built = time.monotonic() - start
    start = time.monotonic()
    everyone = cached_groups(out / f"train_rollouts_k{k_sampled}.jsonl",
                             lambda: sample_groups(ctx, records, k_sampled, 16))  # fmt: skip
    sampled = time.monotonic() - start
    by_id = dict(zip((rec["id"] for rec in records), everyone))
    fit, held = split_validation(records, val_train, cfg.seed)
    train = [replace(by_id[rec["id"]], rollout_ids=by_id[rec["id"]].rollout_ids[: r.k]) for rec in fit]
    train_heldout = [by_id[rec["id"]] for rec in held]
    eot = tuple(ctx.encoder.end_of_turn_ids())
    complete = [g for g in heldout if g.teacher_ids[-len(eot):] == eot]
    rows: list[dict[str, float]] = []

    def more(row: dict[str, float]) -> None:
        row["disc_pretrain/val_acc_complete"] = pair_accuracy_of(ctx, complete)
        if train_heldout:
            row["disc_pretrain/train_heldout_acc"] = pair_accuracy_of(ctx, train_heldout)
        rows.append(row)

    settings = DiscPretrainConfig(epochs=r.epochs, rollouts_per_prompt=r.k, batch_prompts=r.batch_prompts,
                                  learning_rate=r.lr, val_prompts=0)  # fmt: skip
    pretrain_discriminator(ctx, train, heldout, settings, more)
    return {"recipe": r.name, "epochs": r.epochs, "batch_prompts": r.batch_prompts, "lr": r.lr, "k": r.k,
            "prompts": len(train), "train_heldout_prompts": len(train_heldout), "complete_heldout_prompts": len(complete),
            "build_s": built, "sample_or_read_s": sampled,
            "epochs_rows": [{k.removeprefix("disc_pretrain/"): v for k, v in row.items()} for row in rows]}  # fmt: skip


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| recipe | epochs | batch | lr | k | epoch | train loss (pre-update mean) | train acc (pre-update mean) | "
             "test pairs acc | test pairs, complete teacher answers | held-out training prompts acc | train s | "
             "scoring s |", "|" + "---|" * 13]  # fmt: skip
    for r in results:
        for e in r["epochs_rows"]:
            cell = lambda key, p: "-" if key not in e else p.format(e[key])  # noqa: E731
            lines.append(f"| {r['recipe']} | {r['epochs']} | {r['batch_prompts']} | {r['lr']} | {r['k']} | "
                         f"{int(e['epoch'])} | {cell('d_loss', '{:.3f}')} | {cell('d_acc', '{:.3f}')} | "
                         f"{cell('val_acc', '{:.3f}')} | {cell('val_acc_complete', '{:.3f}')} | "
                         f"{cell('train_heldout_acc', '{:.3f}')} | {cell('time_train', '{:.0f}')} | "
                         f"{cell('time_val', '{:.0f}')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="/tmp/qs_full", help="a finished quickstart run dir")
    ap.add_argument("--heldout-dir", default="/tmp/d_warmup",
                    help="holds bench/d_warmup.py's heldout_rollouts.jsonl (sampled into it when missing)")  # fmt: skip
    ap.add_argument("--out", default="runs/d_pretrain")
    ap.add_argument("--k", type=int, default=4, help="rollouts sampled per training prompt")
    ap.add_argument("--discriminator", help="D's start (a model spec or path; default: the SeqKD model, as G)")
    ap.add_argument("--disc-score", default="head", choices=("head", "likelihood_ratio"), help="train.disc_score")
    ap.add_argument("--val-train", type=int, default=20, help="training prompts kept out of D's pretraining")
    ap.add_argument("--recipe", action="append", help="name:epochs:batch_prompts:lr:k (default: %s)"
                    % " ".join(DEFAULT_RECIPES))  # fmt: skip
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from d_warmup import heldout_rows  # this script's folder is on sys.path
    from gad_megatron.parallel.launch import init_distributed
    from gad_megatron.trainer.disc_pretrain import PairGroup

    source, out = Path(a.source).resolve(), Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = warmup_config(load_config(source / "config.yaml"), source, a.discriminator, a.disc_score).model_copy(update={"run_dir": str(out)})
    heldout = [PairGroup.from_json(r) for r in heldout_rows(cfg, source, Path(a.heldout_dir).resolve(), 8)]
    init_distributed(1, 1, cfg.seed)
    results = []
    for recipe in map(Recipe.parse, a.recipe or DEFAULT_RECIPES):
        results.append(run_recipe(cfg, out, a.k, a.val_train, heldout, recipe))
        (out / "summary.json").write_text(json.dumps({"source": str(source), "heldout_pairs": 8 * len(heldout),
                                                      "k_sampled": a.k, "results": results}, indent=1))  # fmt: skip
    print(markdown(results))


if __name__ == "__main__":
    main()
