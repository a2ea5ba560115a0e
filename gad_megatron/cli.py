"""Command line: ``gad collect | train | generate | eval | report | check | plan | quickstart``.

The CLI only wires things: parse arguments, load and validate the config, call the stage.

Single machine:   gad train --config configs/quickstart.yaml --stage warmup
Several GPUs:     torchrun --nproc_per_node 8 -m gad_megatron.cli train --config my.yaml --stage gad
Several CPUs:     torchrun --nproc_per_node 2 -m gad_megatron.cli train --config my.yaml --stage gad --set parallel.tensor_parallel=2
Slurm:            sbatch --nodes 2 slurm/gad.sbatch my.yaml
Megatron layout:  torchrun --nproc_per_node 2 -m gad_megatron.cli check --model smollm2-135m-instruct --pp 2
Memory plan:      gad plan --config examples/qwen2.5-7b/gad.yaml --nodes 2 --gpus-per-node 8
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from gad_megatron import __version__
from gad_megatron.config import ConfigError, RunConfig, load_config


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def cmd_collect(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from gad_megatron.collect import run_collect

    return run_collect(cfg)


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.stage={args.stage}"] if args.stage else [])
    cfg = load_config(args.config, overrides)
    from gad_megatron.trainer.run import run_stage

    return run_stage(cfg, resume=args.resume)


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from gad_megatron.evaluation.generate import run_generate

    return run_generate(cfg, model=args.model, sweep=args.sweep)


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from gad_megatron.evaluation.evaluate import run_eval

    return run_eval(cfg)


def cmd_report(args: argparse.Namespace) -> int:
    from gad_megatron.evaluation.report import run_report

    return run_report(args.run_dirs, out_dir=args.out)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from gad_megatron.quickstart import run_quickstart

    return run_quickstart(run_dir=args.run_dir, tiny=args.tiny, fresh=args.fresh, discriminator=args.discriminator)


def cmd_check(args: argparse.Namespace) -> int:
    from gad_megatron.layout_check import run_check

    result = run_check(args.model, tp=args.tp, pp=args.pp, prompt=args.prompt, tolerance=args.tolerance, ep=args.ep)
    ok = result is None or (result.max_abs_logit_diff <= args.tolerance and result.megatron_text == result.transformers_text)
    return 0 if ok else 1


def cmd_plan(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.stage={args.stage}"] if args.stage else [])
    cfg = load_config(args.config, overrides)
    from gad_megatron.planner import run_plan

    return run_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_memory_gib)


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="run config YAML (see configs/)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.learning_rate=2e-6 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gad",
        description="Black-box on-policy distillation of LLMs with Generative Adversarial Distillation.",
        epilog="Start with `gad quickstart`: an offline end-to-end run on a laptop CPU.",
    )
    parser.add_argument("--version", action="version", version=f"gad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description)
        p.set_defaults(func=fn)
        return p

    p = add("collect", cmd_collect, "ask the teacher endpoint once per prompt (cached, resumable)",
            "Query an OpenAI-compatible teacher for every prompt and write the data back with teacher_response. "
            "Finished answers are cached; an interrupted run resumes without asking again.")
    _with_config(p)

    p = add("train", cmd_train, "train a stage: seqkd (baseline), warmup, gad",
            "seqkd: SFT on teacher text. warmup: SFT generator + Bradley-Terry discriminator. "
            "gad: GRPO generator rewarded by the discriminator, which keeps training every step.")
    _with_config(p)
    p.add_argument("--stage", choices=["seqkd", "warmup", "gad"], help="overrides train.stage")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from the latest checkpoint in the run dir, or from CHECKPOINT")

    p = add("generate", cmd_generate, "generate responses on prompt sets",
            "Greedy (by default) responses of a model on one or more prompt sets, written as JSONL.")
    _with_config(p)
    p.add_argument("--model", help="model dir or checkpoint (default: generate.model or the run's final model)")
    p.add_argument("--sweep", help="generate with every checkpoint under this run directory")

    p = add("eval", cmd_eval, "judge and score generated responses",
            "LLM-as-judge (the paper's protocol), ROUGE-L, n-gram F1, lengths, distinguishability.")
    _with_config(p)

    p = add("report", cmd_report, "write a Markdown + HTML report with plots",
            "Tables, training curves and example responses from one or more run directories.")
    p.add_argument("run_dirs", nargs="+", help="run directories")
    p.add_argument("--out", help="output directory (default: the first run dir's report/)")

    p = add("check", cmd_check, "load a model into Megatron at a TP x PP layout and compare with transformers",
            "Builds the megatron-core model (this rank's TP shard of its PP stage) from HF weights, compares its "
            "logits with transformers and decodes greedily with both. Run it under torchrun for TP/PP > 1.")
    p.add_argument("--model", default="smollm2-135m-instruct", help="hub id, HF dir, .gguf or alias")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (mixture-of-experts models)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest accepted logit difference (fp32)")

    p = add("plan", cmd_plan, "parallel layout and per-GPU memory estimate for a config (offline, no GPU)",
            "Prints TP/PP/DP, the vLLM engines and a per-GPU memory table (weights, gradients, optimizer, "
            "activations, the colocated engine); exits 2 with the reason when the layout does not divide or fit.")
    _with_config(p)
    p.add_argument("--stage", choices=["seqkd", "warmup", "gad"], help="overrides train.stage")
    p.add_argument("--nodes", type=int, required=True, help="nodes in the job")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80, an H100)")

    p = add("quickstart", cmd_quickstart, "offline end-to-end demo on a laptop CPU",
            "Serves SmolLM2-135M + a hidden few-shot style as the teacher on 127.0.0.1, distills it into "
            "SmolLM2-135M with SeqKD and GAD, evaluates on held-out prompts and writes a report.")
    p.add_argument("--run-dir", default="runs/quickstart", help="output directory (reruns reuse finished stages)")
    p.add_argument("--tiny", action="store_true", help="a few prompts and steps, for a smoke test")
    p.add_argument("--fresh", action="store_true", help="ignore finished stages (the teacher cache is still used)")
    from gad_megatron.quickstart import DISCRIMINATORS

    p.add_argument("--discriminator", choices=DISCRIMINATORS, default="head",
                   help="D's kind: head (the paper's score head) or likelihood-ratio (an LM scored against its "
                   "start, pretrained on cached rollouts first: a D that tells teacher from student, at about "
                   "12 more minutes; docs/results.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:  # megatron-core logs every parameter of every bucket at INFO
        logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"gad: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
