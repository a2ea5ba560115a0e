"""Training stages: ``seqkd`` (baseline), ``warmup`` and ``gad``."""

from __future__ import annotations

import logging
from pathlib import Path

from gad_megatron.config import RunConfig

log = logging.getLogger(__name__)


def train_stage(cfg: RunConfig, resume: str | None = None) -> Path:
    """Run ``cfg.train.stage``; return the exported final model directory.

    ``--resume`` on a stage that already exported a complete ``final/`` does nothing: its
    optimizer states are gone by design, and retraining from scratch would overwrite it.
    """
    from gad_megatron.trainers.common import is_complete, stage_dir

    final = stage_dir(cfg, cfg.train.stage) / "final"
    if resume is not None and is_complete(final):
        log.info("%s already finished: %s (delete it to train again)", cfg.train.stage, final)
        return final
    if cfg.train.stage == "seqkd":
        from gad_megatron.trainers.seqkd import run_seqkd

        return run_seqkd(cfg, resume)
    from gad_megatron.trainers.gad import run_gad_stage

    return run_gad_stage(cfg, cfg.train.stage, resume)


def run_stage(cfg: RunConfig, resume: str | None = None) -> int:
    """CLI entry: train, report where the model went; a NaN/inf stops with a clear message (exit 1)."""
    from gad_megatron.trainers.discriminator_update import NonFiniteError

    try:
        final = train_stage(cfg, resume)
    except NonFiniteError as err:
        log.error("training stopped: %s; the last complete checkpoint is intact (resume with --resume)", err)
        return 1
    log.info("%s finished: %s", cfg.train.stage, final)
    return 0
