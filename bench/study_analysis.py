"""Paired statistics and per-seed training curves of a finished context-distillation study.

    .venv/bin/python bench/study_analysis.py runs/context_distillation
    .venv/bin/python bench/study_analysis.py runs/context_distillation --archive bench/results/study_ratio

Reads each ``seed*/`` run's per-prompt evaluation details (``eval/<model>/test.jsonl``) and
generations, splits the held-out prompts by set (the id's prefix: ``vicuna-``, ``mtbench-``),
and compares GAD with SeqKD (and with the frozen-D ablation when it was trained) prompt by
prompt: the mean difference over seeds with a bootstrap 95% interval over prompts, and
McNemar's exact test on the style marker per seed and over all (seed, prompt) pairs. Writes
``paired.json``, ``paired.md`` and ``training_curves.png`` (D accuracy, reward, length against
the teacher and KL per GAD step, one line per seed) next to the seeds. ``paired.md`` opens with
each model's level per held-out set (mean over prompts, mean ± std over seeds). Repetition is
seq-rep-4 of the response (the share of its word 4-grams that repeat), where a hacked
generator's padding shows. ``--archive DIR`` also copies what the analysis reads (under 1 MB
a seed, no weights) to ``DIR``, which this script reads as it reads a study, so a study's
seeds can be pooled again after its run directory is gone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gad_megatron.data import read_jsonl
from gad_megatron.evaluation.paired import mcnemar, paired_bootstrap, per_prompt_differences
from gad_megatron.evaluation.text_metrics import mean, repetition
from gad_megatron.style import load_teacher_style, style_match

SUITE = "test"
# metric -> (how a per-prompt value is read from a details row and its generation row, which way is better)
Reader = Callable[[dict[str, Any], dict[str, Any]], float | None]
STYLE = load_teacher_style()
METRICS: dict[str, tuple[Reader, str]] = {
    "style": (lambda d, g: float(style_match(g["response"], STYLE)), "higher"),
    "style_complete": (lambda d, g: float(style_match(g["response"], STYLE)) if g.get("finish_reason") != "length"
                       else None, "higher"),  # fmt: skip
    "loglik_under_teacher": (lambda d, g: d.get("loglik_under_teacher"), "higher"),
    "distinguished": (lambda d, g: d.get("distinguished"), "lower"),
    "rouge_l": (lambda d, g: d.get("rouge_l"), "higher"),
    "repetition": (lambda d, g: repetition(g["response"]), "lower"),
    "judge": (lambda d, g: (d.get("judge") or {}).get("score"), "higher"),  # only when the study had a judge
    "num_tokens": (lambda d, g: d.get("num_tokens"), "neither"),
}
CURVES = {"d_acc": "D pair accuracy", "reward_mean": "reward (D score)", "len_vs_teacher": "length / teacher's",
          "kl": "KL to the reference"}  # fmt: skip


def held_out_set(prompt_id: str) -> str:
    return prompt_id.split("-", 1)[0]


def per_prompt_values(seed_dir: Path, tag: str) -> dict[str, dict[str, float | None]]:
    """metric -> prompt id -> value, for one model of one seed."""
    details = {d["id"]: d for d in read_jsonl(seed_dir / "eval" / tag / f"{SUITE}.jsonl")}
    generations = {g["id"]: g for g in read_jsonl(seed_dir / "generations" / tag / f"{SUITE}.jsonl")}
    return {name: {pid: read(d, generations[pid]) for pid, d in details.items()} for name, (read, _) in METRICS.items()}


def compare(seed_dirs: list[Path], a: str, b: str) -> dict[str, dict[str, Any]]:
    """held-out set -> metric -> the paired comparison of ``b - a`` over prompts and seeds."""
    va = [per_prompt_values(s, a) for s in seed_dirs]
    vb = [per_prompt_values(s, b) for s in seed_dirs]
    out: dict[str, dict[str, Any]] = {}
    for name, (_, better) in METRICS.items():
        diffs = per_prompt_differences([v[name] for v in va], [v[name] for v in vb])
        for held_out in sorted({held_out_set(p) for p in diffs}):
            mine = [d for p, d in sorted(diffs.items()) if held_out_set(p) == held_out]
            out.setdefault(held_out, {})[name] = {**paired_bootstrap(mine), "better": better}
    for held_out, metrics in out.items():
        pairs = [[(x[p] == 1.0, y[p] == 1.0) for p in x if p in y and held_out_set(p) == held_out]
                 for x, y in zip((v["style"] for v in va), (v["style"] for v in vb))]  # fmt: skip
        metrics["style"]["mcnemar_per_seed"] = [mcnemar(*zip(*seed)) for seed in pairs]
        metrics["style"]["mcnemar_pooled"] = mcnemar(*zip(*[pair for seed in pairs for pair in seed]))
    return out


def levels(seed_dirs: list[Path], models: list[str]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """held-out set -> model -> metric -> {mean, std}: each seed's mean over prompts, then mean and
    standard deviation over seeds (std 0.0 for one seed)."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for tag in models:
        per_seed = [per_prompt_values(s, tag) for s in seed_dirs]
        for name in METRICS:
            for held_out in sorted({held_out_set(p) for p in per_seed[0][name]}):
                means = [mean(v for p, v in seed[name].items() if held_out_set(p) == held_out) for seed in per_seed]
                means = [m for m in means if m is not None]
                if means:
                    out.setdefault(held_out, {}).setdefault(tag, {})[name] = {
                        "mean": statistics.mean(means), "std": statistics.stdev(means) if len(means) > 1 else 0.0}
    return out


def levels_markdown(table: dict[str, dict[str, dict[str, dict[str, float]]]], seeds: int) -> list[str]:
    lines = [f"Per held-out set, each model's mean over prompts (mean ± std over {seeds} seeds):", ""]
    for held_out, models in table.items():
        cols = [m for m in METRICS if any(m in metrics for metrics in models.values())]
        lines += [f"### {held_out} held-out prompts", "", "| model | " + " | ".join(cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]  # fmt: skip
        for tag, metrics in models.items():
            cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" if m in metrics else "-" for m in cols]
            lines.append(f"| {tag} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def markdown(comparisons: dict[str, dict[str, dict[str, Any]]], seeds: int) -> list[str]:
    lines = [f"Paired differences over {seeds} seeds: mean of (second - first) per prompt, averaged over seeds, "
             "with a bootstrap 95% interval over prompts; * where the interval excludes 0.", ""]  # fmt: skip
    for title, comparison in comparisons.items():
        for held_out, metrics in comparison.items():
            lines += [f"### {title}, {held_out} held-out prompts", "", "| metric | better | difference | 95% CI | prompts |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for name, r in metrics.items():
                ci = "-" if r["ci_low"] is None else f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
                star = " *" if r["excludes_zero"] else ""
                lines.append(f"| {name} | {r['better']} | {r['mean']:+.3f}{star} | {ci} | {r['n']} |")
            style = metrics["style"]
            per_seed = ", ".join(f"{m['a_only']}/{m['b_only']} p={m['p_value']:.3g}" for m in style["mcnemar_per_seed"])
            pooled = style["mcnemar_pooled"]
            lines += ["", f"McNemar on the style marker (prompts with it only under the first / only under the second): "
                      f"per seed {per_seed}; pooled {pooled['a_only']}/{pooled['b_only']} p={pooled['p_value']:.3g}", ""]  # fmt: skip
    return lines


def plot_curves(seed_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.4))
    for color, seed_dir in enumerate(seed_dirs):
        for label, path, style in (("GAD", Path("gad"), "-"), ("frozen D", Path("frozen") / "gad", "--")):
            metrics = seed_dir / path / "metrics.jsonl"
            if not metrics.is_file():
                continue
            rows = [r for r in read_jsonl(metrics) if "d_acc" in r]
            for ax, key in zip(axes, CURVES):
                ax.plot([r["step"] for r in rows], [r.get(key) for r in rows], style, color=f"C{color}",
                        label=f"{label} {seed_dir.name}")  # fmt: skip
    for ax, title in zip(axes, CURVES.values()):
        ax.set(title=title, xlabel="GAD step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def finished_seeds(root: Path) -> list[Path]:
    """The ``seed*`` runs under ``root`` whose evaluation finished (``eval/results.json``)."""
    return sorted(p for p in root.glob("seed*") if (p / "eval" / "results.json").is_file())


def analyse(root: Path) -> dict[str, Any]:
    """Write paired.json, paired.md and training_curves.png under ``root``; return the comparisons."""
    seed_dirs = finished_seeds(root)
    if not seed_dirs:
        raise SystemExit(f"{root}: no seed*/eval/results.json")
    models = json.loads((seed_dirs[0] / "eval" / "results.json").read_text())["models"]
    comparisons = {"GAD vs SeqKD": compare(seed_dirs, "seqkd-final", "gad-final")}
    frozen = [m for m in models if m.startswith("frozen")]
    if frozen:
        comparisons["GAD vs frozen D"] = compare(seed_dirs, frozen[0], "gad-final")
    table = levels(seed_dirs, [m for m in models if (seed_dirs[0] / "eval" / m / f"{SUITE}.jsonl").is_file()])
    (root / "paired.json").write_text(json.dumps({"seeds": [p.name for p in seed_dirs], "levels": table, **comparisons},
                                                 indent=1))  # fmt: skip
    md = levels_markdown(table, len(seed_dirs)) + markdown(comparisons, len(seed_dirs))
    (root / "paired.md").write_text("\n".join(md))
    plot_curves(seed_dirs, root / "training_curves.png")
    return comparisons


def archive(root: Path, dest: Path) -> list[Path]:
    """Copy each finished seed's evaluation (results, per-prompt details, generations) and GAD's
    metrics from ``root`` to ``dest``, keeping their paths; return the files written."""
    wanted = ["eval/results.json", "eval/*/*.jsonl", "generations/*/*.jsonl", "gad/metrics.jsonl",
              "frozen/gad/metrics.jsonl"]  # fmt: skip
    written = []
    for seed_dir in finished_seeds(root):
        for path in sorted({f for pattern in wanted for f in seed_dir.glob(pattern)}):
            target = dest / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            written.append(Path(shutil.copyfile(path, target)))
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="the study's --out directory (or an --archive of one)")
    ap.add_argument("--archive", type=Path, help="also copy what this analysis reads, per seed, to this directory")
    a = ap.parse_args()
    root = a.root.resolve()
    analyse(root)
    if a.archive:
        files = archive(root, a.archive.resolve())
        print(f"archived {len(files)} files ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) to {a.archive}")
    print((root / "paired.md").read_text())


if __name__ == "__main__":
    main()
