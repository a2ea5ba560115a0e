"""``gad report RUN_DIR...``: one Markdown and one self-contained HTML report with PNG plots.

Contents: a table per suite (models x metrics, with the quickstart's teacher-style rate where stored)
from ``eval/results.json``; training curves from ``<stage>/metrics.jsonl`` (stages laid end to end,
missing keys tolerated); eval metrics across a checkpoint sweep; response-length histograms per suite;
a few side-by-side example responses. The HTML embeds every image as base64 and has no scripts or
external links, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from pathlib import Path
from typing import Any

from gad_megatron.data import read_jsonl
from gad_megatron.evaluation.generate import STAGES, tag_order

log = logging.getLogger(__name__)

__all__ = [
    "CURVE_KEYS", "load_run", "plot_training_curves", "plot_length_histograms", "plot_sweep", "write_report", "run_report",
]

# (metrics.jsonl key, panel title); panels whose keys never appear are not drawn.
CURVE_KEYS: list[tuple[tuple[str, ...], str]] = [
    (("d_loss",), "discriminator loss"),
    (("d_acc",), "discriminator accuracy"),
    (("teacher_score", "student_score"), "D score: teacher vs student"),
    (("reward_mean",), "reward (mean)"),
    (("kl",), "KL to reference"),
    (("len_mean", "len_max"), "response length (tokens)"),
    (("policy_loss", "sft_loss"), "generator loss"),
    (("truncated_frac",), "share truncated"),
]

# A column (or sweep panel) appears only when some model has its metric: style_rate_complete (over answers
# not cut at the token cap) is the quickstart's headline, style_rate its plain rate over all answers
# (gad_megatron.quickstart.add_style_rates stores both in results.json), absent from other runs.
_METRIC_COLUMNS: list[tuple[str, str]] = [
    ("style_rate_complete", "teacher style, complete answers"),
    ("style_rate", "teacher style"),
    ("judge_score", "judge (50 = parity)"),
    ("judge_score_lc", "judge, length-controlled"),
    ("rouge_l", "ROUGE-L"),
    ("ngram_f1_mean", "n-gram F1 (1-6)"),
    ("rouge_l_human", "ROUGE-L vs human"),
    ("len_mean", "length"),
    ("truncated_frac", "truncated"),
    ("distinguish", "distinguishable (50% = no)"),
    ("ll_under_teacher", "log-lik under teacher"),
    ("ll_teacher_under_model", "teacher log-lik under model"),
]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: not JSON, skipped (a run killed mid-write leaves such a line)", path, lineno)
                continue
            if isinstance(row, dict) and _num(row.get("step")) is not None:
                rows.append(row)
    return rows


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything a report needs from one run directory (absent parts are empty)."""
    run_dir = Path(run_dir)
    results_path = run_dir / "eval" / "results.json"
    results = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else None
    metrics = {s: _read_metrics(run_dir / s / "metrics.jsonl") for s in STAGES if (run_dir / s / "metrics.jsonl").is_file()}
    generations: dict[str, dict[str, list[dict[str, Any]]]] = {}
    gen_root = run_dir / "generations"
    if gen_root.is_dir():
        for tag_dir in sorted(p for p in gen_root.iterdir() if p.is_dir()):
            for f in sorted(tag_dir.glob("*.jsonl")):
                generations.setdefault(tag_dir.name, {})[f.stem] = read_jsonl(f)
    lengths: dict[str, dict[str, list[int]]] = {}  # eval details first: one tokenizer for every model
    eval_root = run_dir / "eval"
    for tag, suites in generations.items():
        for suite, rows in suites.items():
            detail = eval_root / tag / f"{suite}.jsonl"
            src = read_jsonl(detail) if detail.is_file() else rows
            lengths.setdefault(tag, {})[suite] = [d["num_tokens"] for d in src if isinstance(d.get("num_tokens"), int)]
    return {"name": run_dir.resolve().name, "dir": run_dir, "results": results, "metrics": metrics,
            "generations": generations, "lengths": lengths}


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out_png: str | Path, suptitle: str = "") -> Path:
    """Lay out ``fig``, write it at 90 dpi and close it."""
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    _pyplot().close(fig)
    return Path(out_png)


def plot_training_curves(metrics: dict[str, list[dict[str, Any]]], out_png: str | Path, title: str = "") -> Path | None:
    """One panel per logged quantity; stages (seqkd, warmup, gad) laid end to end. None if nothing to plot."""
    plt = _pyplot()
    panels = [(keys, name) for keys, name in CURVE_KEYS
              if any(_num(r.get(k)) is not None for rows in metrics.values() for r in rows for k in keys)]
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 3 * rows_n), squeeze=False)
    offsets, offset = {}, 0.0
    for stage, rows in metrics.items():
        offsets[stage] = offset
        offset += max((_num(r["step"]) or 0 for r in rows), default=0) + 1
    for ax, (keys, name) in zip(axes.flat, panels):
        for s_i, (stage, rows) in enumerate(metrics.items()):
            for k_i, key in enumerate(keys):
                pts = [(offsets[stage] + r["step"], _num(r.get(key))) for r in rows if _num(r.get(key)) is not None]
                if pts:
                    # Colour = stage, line style = quantity: a panel reads the same in every report.
                    ax.plot(*zip(*pts), color=f"C{s_i}", ls=("-", "--", ":")[k_i % 3], marker="." if len(pts) < 30 else None,
                            label=f"{stage} {key}" if len(keys) > 1 or len(metrics) > 1 else None)
        for stage, start in offsets.items():
            if start > 0:
                ax.axvline(start, color="grey", lw=0.8, ls=":")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step (stages end to end)" if len(metrics) > 1 else "step", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(fig, out_png, title)


def plot_length_histograms(lengths_by_model: dict[str, list[int]], out_png: str | Path, title: str = "") -> Path | None:
    """Overlaid step histograms of response lengths, one line per model. None if no lengths."""
    plt = _pyplot()
    data = {k: v for k, v in lengths_by_model.items() if v}
    if not data:
        return None
    hi = max(max(v) for v in data.values())
    bins = [i * max(1, math.ceil((hi + 1) / 30)) for i in range(31)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, values in data.items():
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{label} (mean {sum(values) / len(values):.0f})")
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("responses")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)


_SWEEP_KEYS = [("style_rate_complete", "teacher style, complete answers"), ("style_rate", "share in teacher style"),
               ("judge_score", "judge score"), ("rouge_l", "ROUGE-L vs teacher"), ("len_mean", "mean length"),
               ("distinguish", "distinguishability")]


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    if key == "distinguish":
        return _num((metrics.get("distinguishability") or {}).get("accuracy"))
    return _num(metrics.get(key))


def plot_sweep(results: dict[str, Any], out_png: str | Path, title: str = "") -> Path | None:
    """Eval metrics across models in training order (a checkpoint sweep); the teacher as a dashed line.

    None when fewer than two models were evaluated.
    """
    plt = _pyplot()
    tags = sorted((t for t in results["models"] if t != "teacher"), key=tag_order)
    if len(tags) < 2:
        return None
    by_tag = results["results"]
    panels = [(k, name) for k, name in _SWEEP_KEYS
              if sum(_metric(m, k) is not None for t in tags for m in by_tag.get(t, {}).values()) >= 2]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for s_i, suite in enumerate(results["suites"]):
            ys = [_metric(by_tag.get(t, {}).get(suite, {}), key) for t in tags]
            ax.plot(range(len(tags)), [float("nan") if y is None else y for y in ys], marker="o", color=f"C{s_i}", label=suite)
            teacher = _metric(by_tag.get("teacher", {}).get(suite, {}), key)
            if teacher is not None:
                ax.axhline(teacher, color=f"C{s_i}", ls="--", lw=1)
        if key == "distinguish":
            ax.axhline(0.5, color="grey", ls=":", lw=1)
        ax.set_xticks(range(len(tags)), tags, rotation=45, ha="right", fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out_png, title)


def _cell(metrics: dict[str, Any], key: str) -> str:
    if key == "distinguish":
        d = metrics.get("distinguishability") or {}
        acc = _num(d.get("accuracy"))
        return "-" if acc is None else f"{acc:.0%} [{d['ci_low']:.0%}, {d['ci_high']:.0%}]"
    if key.startswith("ll_"):
        part = (metrics.get("loglik") or {}).get("under_teacher" if key == "ll_under_teacher" else "teacher_under_model") or {}
        v = _num(part.get("mean_token_loglik"))
        return "-" if v is None else f"{v:.3f}"
    v = _num(metrics.get(key))
    if v is None:
        return "-"
    if key in ("truncated_frac", "style_rate"):
        return f"{v:.0%}"
    if key == "style_rate_complete":
        n = metrics.get("n_complete")
        return f"{v:.0%}" if n is None else f"{v:.0%} of {n}"
    if key == "judge_score":
        j = metrics.get("judge") or {}
        bad = (j.get("n_unparseable") or 0) + (j.get("n_failed") or 0)
        return f"{v:.1f}" + (f" ({bad} unparsed)" if bad else "")
    return f"{v:.1f}" if key in ("len_mean", "judge_score_lc") else f"{v:.3f}"


def _tables(runs: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per suite: (suite, header, rows) with one row per (run, model)."""
    multi = len(runs) > 1
    suites: list[str] = []
    for run in runs:
        for s in (run["results"] or {}).get("suites", []):
            if s not in suites:
                suites.append(s)
    tables = []
    for suite in suites:
        entries = [(run, tag, run["results"]["results"][tag][suite]) for run in runs if run["results"]
                   for tag in run["results"]["models"] if suite in run["results"]["results"].get(tag, {})]
        keys = [k for k, _ in _METRIC_COLUMNS if any(_cell(m, k) != "-" for _, _, m in entries)]
        header = ["model"] + [dict(_METRIC_COLUMNS)[k] for k in keys]
        rows = [[(f"{run['name']}/{tag}" if multi else tag)] + [_cell(m, k) for k in keys] for run, tag, m in entries]
        tables.append((suite, header, rows))
    return tables


def _examples(runs: list[dict[str, Any]], k: int, max_chars: int = 1200) -> list[dict[str, Any]]:
    """Up to ``k`` prompts per suite, spread over the suite, with every model's response."""
    out = []
    multi = len(runs) > 1
    suites = {s for run in runs for suites_ in run["generations"].values() for s in suites_}
    for suite in sorted(suites):
        columns: list[tuple[str, dict[str, dict[str, Any]]]] = []
        for run in runs:
            tags = sorted(run["generations"], key=lambda t: (t != "teacher", tag_order(t)))  # teacher first
            for tag in tags:
                if suite in run["generations"][tag]:
                    label = f"{run['name']}/{tag}" if multi else tag
                    columns.append((label, {r["id"]: r for r in run["generations"][tag][suite]}))
        if not columns:
            continue
        ids = [i for i in columns[0][1] if all(i in c for _, c in columns)]
        picks = [ids[round(j * (len(ids) - 1) / max(1, k - 1))] for j in range(min(k, len(ids)))] if ids else []
        for rid in dict.fromkeys(picks):
            prompt = columns[0][1][rid]["prompt"]
            text = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
            clip = lambda s: s if len(s) <= max_chars else s[:max_chars] + " [...]"  # noqa: E731
            out.append({"suite": suite, "id": rid, "prompt": clip(text),
                        "responses": [(label, clip(c[rid].get("response") or ""), c[rid].get("finish_reason")) for label, c in columns]})
    return out


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", "<br>")


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
.ex{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:8px;margin-bottom:1.5em}
.ex div{border:1px solid #ddd;padding:6px;font-size:12px;white-space:pre-wrap;overflow-wrap:anywhere}
.ex b{display:block;margin-bottom:4px}.prompt{background:#f7f7ff;padding:6px;white-space:pre-wrap;font-size:13px}
.note{color:#666;font-size:12px}"""


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None, examples: int = 3) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and PNGs into ``out_dir`` (default: first run's ``report/``)."""
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir) if out_dir else Path(run_dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    multi = len(runs) > 1
    figures: list[tuple[str, Path]] = []  # (caption, png)

    for run in runs:
        if run["metrics"]:
            png = plot_training_curves(run["metrics"], out / f"curves_{run['name']}.png", title=run["name"] if multi else "")
            if png:
                figures.append((f"Training curves: {run['name']} ({', '.join(run['metrics'])})", png))
        if run["results"]:
            png = plot_sweep(run["results"], out / f"sweep_{run['name']}.png", title=run["name"] if multi else "")
            if png:
                figures.append((f"Eval metrics by model, in training order (dashed: teacher): {run['name']}", png))
    suites = sorted({s for run in runs for by_suite in run["lengths"].values() for s in by_suite})
    for suite in suites:
        data = {(f"{run['name']}/{tag}" if multi else tag): by_suite[suite]
                for run in runs for tag, by_suite in sorted(run["lengths"].items(), key=lambda kv: tag_order(kv[0]))
                if suite in by_suite}
        png = plot_length_histograms(data, out / f"lengths_{suite}.png", title=f"Response lengths: {suite}")
        if png:
            figures.append((f"Response lengths: {suite}", png))
    tables = _tables(runs)
    exs = _examples(runs, examples)
    notes = []
    for run in runs:
        r = run["results"]
        if r is None:
            notes.append(f"{run['name']}: no eval/results.json (run `gad eval`); tables are empty.")
        elif r.get("judge"):
            orders = "each pair rated in both orders" if r["judge"]["both_orders"] else "one order only"
            notes.append(f"{run['name']}: judge {r['judge']['model']} ({orders}); lengths in {r.get('length_unit', 'tokens')}.")

    title = "GAD report: " + ", ".join(run["name"] for run in runs)
    md = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>"] + [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    md.append("## Results")
    h.append("<h2>Results</h2>")
    for suite, header, rows in tables:
        md += [f"### {suite}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows] + [""]
        h.append(f"<h3>{html.escape(suite)}</h3><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>")
        h += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        h.append("</table>")
    if figures:
        md.append("## Plots")
        h.append("<h2>Plots</h2>")
    for caption, png in figures:
        md += [f"![{caption}]({png.name})", ""]
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        h.append(f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
                 f"<figcaption class='note'>{html.escape(caption)}</figcaption></figure>")
    if exs:
        md.append("## Examples")
        h.append("<h2>Examples</h2>")
    for ex in exs:
        md += [f"### {ex['suite']} / {ex['id']}", "", "> " + ex["prompt"].replace("\n", "\n> "), ""]
        h.append(f"<h3>{html.escape(ex['suite'])} / {html.escape(str(ex['id']))}</h3><div class='prompt'>{html.escape(ex['prompt'])}</div><div class='ex'>")
        for label, text, reason in ex["responses"]:
            flag = " (truncated)" if reason == "length" else ""
            md += [f"**{label}**{flag}:", "", "```text", text.replace("```", "'''"), "```", ""]
            h.append(f"<div><b>{html.escape(label)}{flag}</b>{html.escape(text)}</div>")
        h.append("</div>")
    h.append("</body></html>")
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    html_path.write_text("\n".join(h), encoding="utf-8")
    return {"markdown": md_path, "html": html_path, "images": [p for _, p in figures]}


def run_report(run_dirs: list[str], out_dir: str | None = None) -> int:
    """CLI entry."""
    from gad_megatron.config import ConfigError

    missing = [d for d in run_dirs if not Path(d).is_dir()]
    if missing:
        raise ConfigError(f"run directory not found: {', '.join(missing)}")
    paths = write_report(run_dirs, out_dir)
    print(f"report: {paths['markdown']}\nreport: {paths['html']} ({len(paths['images'])} plots embedded)")
    return 0
