"""The likelihood-ratio discriminator (``train.disc_score: likelihood_ratio``).

D keeps its causal-LM head and scores a response y to a prompt x by

    D(x, y) = beta * (log pi_D(y | x) - log pi_ref(y | x)),    summed over y's tokens (temperature 1)

with ``pi_ref`` the frozen model D started from: DPO's implicit reward, 0 for every response at
the start. ``train.disc_ratio_reduce: mean`` divides by y's token count (SimPO's length
normalisation), so that a longer answer does not score higher for its length alone. The
Bradley-Terry loss and everything downstream (rewards, pair accuracy) are those of the
scalar-head D. The best such D is ``beta * log(p_teacher / p_student)`` up to a per-prompt
constant; on the quickstart's data it ranked 0.99 of held-out pairs (docs/benchmarks.md).

A saved likelihood-ratio D is an HF causal LM plus :data:`MARKER`, which names its reference
(an absolute path), beta and the reduction: the gad stage reads it to score with the warmup's
D against the model that D started from, not against itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gad_megatron.config import ConfigError, RatioReduce
from gad_megatron.models.convert import HFWeights
from gad_megatron.models.policy import MegatronLM

MARKER = "gad_discriminator.json"
log = logging.getLogger(__name__)


@dataclass
class RatioScore:
    """What turns D's LM into a score: its frozen reference, beta, the reduction over a response's
    tokens (``sum`` or ``mean``), and the reference's log-likelihood of responses already seen
    (:meth:`remember`: the teacher's answers, scored again every epoch)."""

    reference: MegatronLM
    reference_dir: str  # where ``reference`` was loaded from: written to a saved D's marker
    beta: float
    reduce: RatioReduce
    known: dict[bytes, float] = field(default_factory=dict)

    @staticmethod
    def key(ids: Any) -> bytes:
        """A 16-byte digest of a row's token ids (a cache of 10^5 long answers stays small)."""
        return hashlib.blake2b(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes(), digest_size=16).digest()

    def remember(self, rows: list[Any], sums: torch.Tensor) -> None:
        self.known.update((self.key(r), float(s)) for r, s in zip(rows, sums))


def read_marker(d_dir: str | Path) -> dict[str, Any] | None:
    """The marker of a saved likelihood-ratio D (``{"score", "beta", "reduce", "reference"}``), None for any
    other model. A marker written before ``reduce`` existed reads as ``sum``."""
    path = Path(d_dir) / MARKER
    return {"reduce": "sum", **json.loads(path.read_text())} if path.is_file() else None


def write_marker(d_dir: str | Path, reference: str | Path, beta: float, reduce: RatioReduce) -> None:
    marker = {"score": "likelihood_ratio", "beta": beta, "reduce": reduce, "reference": str(Path(reference).resolve())}
    (Path(d_dir) / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def ratio_reference(d_dir: str | Path, disc_score: str, beta: float, reduce: RatioReduce) -> str | None:
    """The frozen reference of the D in ``d_dir`` under ``disc_score``: the one its marker names,
    else ``d_dir`` itself (a fresh D: pi_D = pi_ref). None for a scalar-head D. Refuses a saved D
    of the other kind (it would be silently re-headed or read as an LM); warns when ``beta`` or
    ``reduce`` differs from the one the saved D learnt with (its scores change scale)."""
    marker = read_marker(d_dir)
    if disc_score == "head":
        if marker is not None:
            raise ConfigError(f"{d_dir} holds a likelihood-ratio discriminator: set train.disc_score=likelihood_ratio "
                              "(or train.discriminator to another model)")  # fmt: skip
        return None
    if "score.weight" in HFWeights(d_dir):
        raise ConfigError(f"{d_dir} holds a scalar-head discriminator (score.weight): train.disc_score="
                          "likelihood_ratio needs a causal LM (point train.discriminator at one)")  # fmt: skip
    if marker is None:
        return str(d_dir)
    if not Path(marker["reference"], "config.json").is_file():
        raise ConfigError(f"{d_dir}/{MARKER}: its reference model {marker['reference']} is gone; D's scores are "
                          "log-likelihood ratios against it")  # fmt: skip
    if marker["beta"] != beta:
        log.warning("train.disc_ratio_beta=%g but the discriminator in %s learnt with %g: its scores, and the "
                    "rewards, change scale by %.3g", beta, d_dir, marker["beta"], beta / marker["beta"])  # fmt: skip
    if marker["reduce"] != reduce:
        log.warning("train.disc_ratio_reduce=%s but the discriminator in %s learnt with %s: its scores change scale "
                    "by about the response length, and it has learnt to rank the other form", reduce, d_dir,
                    marker["reduce"])  # fmt: skip
    return str(marker["reference"])
