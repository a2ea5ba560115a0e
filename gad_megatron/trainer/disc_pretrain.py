"""D's pretraining at the start of the warmup stage (``train.disc_pretrain``).

The warmup's own D steps see only ``batch_prompts`` new prompts each; here D first learns from
every training prompt: the starting generator samples ``rollouts_per_prompt`` rollouts of each
prompt once (cached in ``<stage>/disc_pretrain/``), then D takes ``epochs`` passes of
Bradley-Terry updates over (teacher answer, rollouts) groups, reshuffled each epoch, through the
trainer's own D update (:func:`gad_megatron.trainer.steps.discriminate_ids`). ``val_prompts``
training prompts are kept out; their pair accuracy after each epoch is logged and can end the
pretraining early (``target_acc``).

Under data parallelism each rank samples and trains on its share of every batch of prompts, as
the warmup steps do; the cache is one file per rank.
"""

from __future__ import annotations

import datetime
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gad_megatron.config import ConfigError, DiscPretrainConfig
from gad_megatron.data import read_jsonl, write_jsonl
from gad_megatron.loss import pair_accuracy
from gad_megatron.trainer.metrics import PhaseTimer
from gad_megatron.trainer.steps import Prompts, StepContext, discriminate_ids, dp_mean, generate

log = logging.getLogger(__name__)

PRETRAIN_DIR = "disc_pretrain"
Row = dict[str, float]  # one epoch's metrics, keys "disc_pretrain/..."
# Rollout seeds of the pretraining draw: steps below every training step's (which count from 1).
_SEED_STEP = -1


@dataclass(frozen=True)
class PairGroup:
    """One prompt's D inputs as token ids: the teacher's answer and its K rollouts, each after
    the prompt's ``prompt_length`` tokens."""

    teacher_ids: tuple[int, ...]
    rollout_ids: tuple[tuple[int, ...], ...]
    prompt_length: int

    def to_json(self) -> dict[str, Any]:
        return {"teacher_ids": list(self.teacher_ids), "rollout_ids": [list(r) for r in self.rollout_ids],
                "prompt_length": self.prompt_length}  # fmt: skip

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> PairGroup:
        return cls(tuple(row["teacher_ids"]), tuple(tuple(r) for r in row["rollout_ids"]), row["prompt_length"])


def _with_rollouts(ctx: StepContext, k: int) -> StepContext:
    return replace(ctx, rollout=replace(ctx.rollout, n=k))


def _progress(what: str, n: int, total: int, since: float, detail: str = "") -> None:
    """About 5 console lines over ``total`` items: ``what n/total``, seconds per item, ETA."""
    if n % max(1, total // 5) == 0 or n == total:
        pace = (time.monotonic() - since) / n
        log.info("disc_pretrain: %s %d/%d, %.1f s each, ETA %s%s", what, n, total, pace,
                 datetime.timedelta(seconds=round(pace * (total - n))), detail)  # fmt: skip


def sample_groups(ctx: StepContext, records: Prompts, k: int, batch_prompts: int) -> list[PairGroup]:
    """This rank's groups: ``k`` rollouts of each record by the engine's current weights, sampled
    ``batch_prompts`` records at a time (the last partial batch too: it must split over the
    data-parallel ranks). -> groups of this rank's share of every batch, in record order."""
    ctx_k = _with_rollouts(ctx, k)
    groups: list[PairGroup] = []
    starts, t0 = range(0, len(records), batch_prompts), time.monotonic()
    for i, start in enumerate(starts):
        batch = records[start : start + batch_prompts]
        rollouts = generate(ctx_k, batch, _SEED_STEP - i, reload_follows=False)
        _progress(f"sampling {k} rollouts of {len(records)} prompts, batch", i + 1, len(starts), t0)
        share = [batch[j] for j in ctx.dp_share(len(batch))]
        for j, p in enumerate(share):
            teacher = ctx.encoder.encode(p["prompt"], p["teacher_response"])
            groups.append(PairGroup(tuple(teacher), tuple(r.d_input_ids for r in rollouts[j * k : (j + 1) * k]),
                                    len(ctx.encoder.prompt_ids(p["prompt"]))))  # fmt: skip
    return groups


def cached_groups(path: Path, sample: Callable[[], list[PairGroup]]) -> list[PairGroup]:
    """The groups stored in ``path``, else ``sample()``'s, stored there."""
    if path.is_file():
        return [PairGroup.from_json(r) for r in read_jsonl(path)]
    groups = sample()
    write_jsonl(path, (g.to_json() for g in groups))
    return groups


def _flat(groups: Sequence[PairGroup]) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], list[int]]:
    """``discriminate_ids``'s teacher rows, rollout rows and prompt lengths."""
    return [g.teacher_ids for g in groups], [r for g in groups for r in g.rollout_ids], [g.prompt_length for g in groups]


def _rollouts_per_group(groups: Sequence[PairGroup]) -> int:
    counts = {len(g.rollout_ids) for g in groups}
    if len(counts) != 1:
        raise ValueError(f"every group needs the same number of rollouts, got {sorted(counts)}")
    return counts.pop()


def pair_accuracy_of(ctx: StepContext, groups: Sequence[PairGroup]) -> float:
    """D's pair accuracy on ``groups`` (this rank's; averaged over data-parallel ranks), no update."""
    frozen = replace(_with_rollouts(ctx, _rollouts_per_group(groups)), d=None)
    teacher_P, student_PN, _ = discriminate_ids(frozen, *_flat(groups), PhaseTimer())
    return dp_mean(float(pair_accuracy(teacher_P, student_PN)))


@contextmanager
def _learning_rate(ctx: StepContext, lr: float | None) -> Iterator[None]:
    """D's optimizer at ``lr`` inside the block (None: unchanged), its own lr again after."""
    assert ctx.d is not None
    groups = ctx.d.optimizer.param_groups
    before = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = lr if lr is not None else g["lr"]
    try:
        yield
    finally:
        for g, old in zip(groups, before):
            g["lr"] = old


def train_epoch(ctx: StepContext, groups: Sequence[PairGroup], batch_groups: int, order_seed: str) -> Row:
    """One pass of D updates over ``groups`` (this rank's), ``batch_groups`` of them an update, in
    a seeded shuffle (the last partial batch dropped). -> mean pre-update loss and pair accuracy."""
    ctx_k = _with_rollouts(ctx, _rollouts_per_group(groups))
    order = list(range(len(groups)))
    random.Random(order_seed).shuffle(order)
    losses, accs = [], []
    starts, t0 = range(0, len(order) - batch_groups + 1, batch_groups), time.monotonic()
    for n, start in enumerate(starts, 1):
        batch = [groups[i] for i in order[start : start + batch_groups]]
        teacher_P, student_PN, metrics = discriminate_ids(ctx_k, *_flat(batch), PhaseTimer())
        losses.append(metrics["d_loss"])
        accs.append(dp_mean(float(pair_accuracy(teacher_P, student_PN))))
        _progress("epoch update", n, len(starts), t0, f", d_acc so far {sum(accs) / n:.3f}")
    return {"d_loss": sum(losses) / max(len(losses), 1), "d_acc": sum(accs) / max(len(accs), 1),
            "updates": float(len(losses))}  # fmt: skip


def split_validation(records: Prompts, val_prompts: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, validation) records: a seeded choice of ``val_prompts`` records held out."""
    order = list(range(len(records)))
    random.Random(f"{seed}:disc_pretrain:val").shuffle(order)
    held = set(order[:val_prompts])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _validate(ctx: StepContext, val: Sequence[PairGroup], row: Row) -> Row:
    if val:
        start = time.monotonic()
        row["disc_pretrain/val_acc"] = pair_accuracy_of(ctx, val)
        row["disc_pretrain/time_val"] = time.monotonic() - start
    return row


def pretrain_discriminator(ctx: StepContext, train: Sequence[PairGroup], val: Sequence[PairGroup],
                           cfg: DiscPretrainConfig, log_epoch: Callable[[Row], None], before: Row | None = None,
                           ) -> list[Row]:  # fmt: skip
    """Up to ``cfg.epochs`` epochs of D updates on ``train`` at ``cfg.learning_rate``. Epoch 0's
    row (``before`` plus the validation accuracy before any update) and each epoch's (its mean
    pre-update loss and accuracy, the validation accuracy after it) go to ``log_epoch``. Stops
    after the first epoch whose validation accuracy reaches ``cfg.target_acc``. -> the rows."""
    batch_groups = cfg.batch_prompts // ctx.dp_size
    rows = [_validate(ctx, val, {"disc_pretrain/epoch": 0.0, **(before or {})})]
    log_epoch(rows[0])
    with _learning_rate(ctx, cfg.learning_rate):
        for epoch in range(1, cfg.epochs + 1):
            start = time.monotonic()
            stats = train_epoch(ctx, train, batch_groups, f"{ctx.seed}:disc_pretrain:{epoch}")
            row = _validate(ctx, val, {"disc_pretrain/epoch": float(epoch),
                                       **{f"disc_pretrain/{k}": v for k, v in stats.items()},
                                       "disc_pretrain/time_train": time.monotonic() - start})  # fmt: skip
            log_epoch(row)
            rows.append(row)
            log.info("disc_pretrain: epoch %d: %s", epoch, {k.split("/")[1]: round(v, 4) for k, v in row.items()})
            if cfg.target_acc is not None and row.get("disc_pretrain/val_acc", 0.0) >= cfg.target_acc:
                break
    return rows


def run_disc_pretrain(ctx: StepContext, records: Prompts, cfg: DiscPretrainConfig, cache_dir: Path, rank: int,
                      world: int, log_epoch: Callable[[Row], None]) -> list[Row]:
    """The whole phase: split, sample (or read the cache ``cache_dir/rollouts.<rank>-of-<world>.jsonl``),
    pretrain. Every rank calls it. -> the epoch rows."""
    train_records, val_records = split_validation(records, cfg.val_prompts, ctx.seed)
    if len(train_records) < cfg.batch_prompts:
        raise ConfigError(f"train.disc_pretrain: {len(train_records)} prompts left after val_prompts="
                          f"{cfg.val_prompts}, fewer than batch_prompts={cfg.batch_prompts}")  # fmt: skip
    start = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    k = cfg.rollouts_per_prompt
    train = cached_groups(cache_dir / f"rollouts.{rank}-of-{world}.jsonl",
                          lambda: sample_groups(ctx, train_records, k, cfg.batch_prompts))  # fmt: skip
    val = cached_groups(cache_dir / f"val_rollouts.{rank}-of-{world}.jsonl",
                        lambda: sample_groups(ctx, val_records, k, cfg.batch_prompts))  # fmt: skip
    seconds = time.monotonic() - start
    log.info("disc_pretrain: %d + %d validation prompts x %d rollouts ready in %.0f s", len(train_records),
             len(val_records), k, seconds)  # fmt: skip
    return pretrain_discriminator(ctx, train, val, cfg, log_epoch, {"disc_pretrain/time_sample": seconds})
