"""What the slurm/ scripts need to know about a run, from its `gad` command line.

    python slurm/run_info.py run-dir train --config my.yaml --set run_dir=/scratch/x
    python slurm/run_info.py model 3 generate --config my.yaml

``run-dir`` prints the run directory; ``model N`` prints the N-th model that ``gad generate
--sweep`` would use (checkpoints by step, then final, per stage), for one array task each.
The config and its --set overrides are read exactly as the CLI reads them.
"""

from __future__ import annotations

import sys

from gad_megatron.cli import build_parser
from gad_megatron.config import load_config


def main(argv: list[str]) -> int:
    what, argv = argv[0], argv[1:]
    index = int(argv.pop(0)) if what == "model" else None
    args = build_parser().parse_args(argv)
    run_dir = load_config(args.config, args.overrides).run_dir
    if index is None:
        print(run_dir)
        return 0
    from gad_megatron.evaluation.generate import find_checkpoints

    models = find_checkpoints(run_dir)
    if index >= len(models):
        print(f"run_info: model {index} requested, {run_dir} has {len(models)} (0-{len(models) - 1})", file=sys.stderr)
        return 2
    print(models[index][1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
