"""The TRL implementation of the stages (the project's first engine), kept as the bench-only baseline
that `bench/step_time.py` times the Megatron stages against. Needs `pip install trl==1.16.*`."""

from __future__ import annotations

import logging
from pathlib import Path

from gad_megatron.config import RunConfig
from trl_baseline.settings import TrlSettings

log = logging.getLogger(__name__)


def train_stage(cfg: RunConfig, resume: str | None = None, trl: TrlSettings = TrlSettings()) -> Path:
    """Run ``cfg.train.stage`` with the TRL-only knobs ``trl``; return the exported final model directory.

    ``--resume`` on a stage that already exported a complete ``final/`` does nothing: its
    optimizer states are gone by design, and retraining from scratch would overwrite it.
    """
    from trl_baseline.common import is_complete, stage_dir

    final = stage_dir(cfg, cfg.train.stage) / "final"
    if resume is not None and is_complete(final):
        log.info("%s already finished: %s (delete it to train again)", cfg.train.stage, final)
        return final
    if cfg.train.stage == "seqkd":
        from trl_baseline.seqkd import run_seqkd

        return run_seqkd(cfg, resume, trl)
    from trl_baseline.gad import run_gad_stage

    return run_gad_stage(cfg, cfg.train.stage, resume, trl)

