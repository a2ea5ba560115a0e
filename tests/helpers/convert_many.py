"""Several ``tools/convert_checkpoint.py`` commands in one launch (one import of torch, megatron-core
and transformers for all of them).

    torchrun --nproc_per_node 4 tests/helpers/convert_many.py REPORT.json "import --model A ..." "import ..."
    python tests/helpers/convert_many.py REPORT.json "export ..." "scores:CHECKPOINT" ...

A ``scores:CHECKPOINT`` entry loads the discriminator of that checkpoint at this layout and
records its scores on :func:`tests.helpers.megatron_parity.padded_batch` (right padding), at
TP = PP = 1.
Each command may use its own TP x PP. Rank 0 writes ``{entry: exit status or scores}``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from tests.helpers.megatron_parity import padded_batch
from tools.convert_checkpoint import main as convert


def discriminator_scores(checkpoint: str) -> list[float]:
    from transformers import AutoConfig

    from gad_megatron.checkpoint import hf_dir, load_checkpoint
    from gad_megatron.models.discriminator import build_discriminator, scores
    from gad_megatron.parallel.launch import init_distributed

    init_distributed(1, 1)
    d = build_discriminator(AutoConfig.from_pretrained(hf_dir(checkpoint, "discriminator")))
    load_checkpoint(checkpoint, {"discriminator": d})
    return scores(d, *padded_batch(left=False)).tolist()


def main(report_path: str, entries: list[str]) -> None:
    from megatron.core import parallel_state

    report: dict[str, Any] = {}
    for entry in entries:
        if entry.startswith("scores:"):
            report[entry] = discriminator_scores(entry.removeprefix("scores:"))
        else:
            report[entry] = convert(shlex.split(entry))
        parallel_state.destroy_model_parallel()  # the next command may use another TP x PP
    if dist.get_rank() == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":  # dist checkpoint saves start a multiprocessing Manager (spawn)
    main(sys.argv[1], sys.argv[2:])
