"""Responses of a model on prompt sets: greedy by default (the paper's protocol), batched.

vLLM is used when it is installed and a GPU is present (``backend="auto"``); otherwise Hugging
Face ``generate``. Output rows: ``id``, ``prompt``, ``response``, ``num_tokens`` (generated tokens,
end-of-turn excluded), ``finish_reason`` (``stop`` | ``length``), ``model`` (the model tag).

Files: ``<run_dir>/generations/<model_tag>/<suite>.jsonl`` plus ``<suite>.meta.json``; a file whose
meta matches the request is reused, so a rerun (or a checkpoint sweep) only does what is missing.
The meta names the model: a tag that already holds another model's generations is refused, never
overwritten (see :func:`model_tag` for how tags stay unique).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from gad_megatron.config import ConfigError, RunConfig
from gad_megatron.data import write_jsonl
from gad_megatron.evaluation.suites import Suite, load_suite

log = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "generate_responses",
    "find_checkpoints",
    "final_model",
    "model_tag",
    "check_tag_free",
    "tag_order",
    "generations_path",
    "run_generate",
]

STAGES = ("seqkd", "warmup", "gad")  # training order; the last one present is "the" final model
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_STAGE_TAG = re.compile(rf"^(?:(.+)-)?({'|'.join(STAGES)})-(final|step(\d+))$")


def _render_prompts(tokenizer: Any, prompts: Sequence[list[dict[str, str]]]) -> list[str]:
    """Prompt text exactly as the model saw it in training: chat template + generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return ["\n".join(m["content"] for m in p) + "\n" for p in prompts]


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _progress(desc: str, total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    # stderr: stdout stays free for what a command prints as its result.
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
    return progress, progress.add_task(desc, total=total)


@torch.no_grad()
def _generate_hf(model: Any, tokenizer: Any, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int,
                 temperature: float, batch_size: int, desc: str) -> list[tuple[str, int, str]]:
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = _render_prompts(tokenizer, prompts)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    # Longest first: similar lengths share a batch (less padding) and an OOM shows up at once.
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    eos = _eos_ids(model, tokenizer)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                               pad_token_id=tokenizer.pad_token_id, **sampling)
    device = next(model.parameters()).device
    results: list[tuple[str, int, str] | None] = [None] * len(texts)
    progress, task = _progress(desc, len(texts))
    with progress:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], add_special_tokens=False, padding=True, return_tensors="pt").to(device)
            out = model.generate(**enc, generation_config=gen_cfg)
            new = out[:, enc["input_ids"].shape[1] :].tolist()
            for i, ids in zip(idx, new):
                stop = next((k for k, t in enumerate(ids) if t in eos), None)
                # No end-of-turn token: generation ran into max_new_tokens.
                n, reason = (stop, "stop") if stop is not None else (len(ids), "length")
                results[i] = (tokenizer.decode(ids[:n], skip_special_tokens=True).strip(), n, reason)
            progress.advance(task, len(idx))
    return results  # type: ignore[return-value]


def _vllm_usable() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def _generate_vllm(model_path: str, prompts: Sequence[list[dict[str, str]]], max_new_tokens: int,
                   temperature: float, seed: int, trust_remote_code: bool) -> list[tuple[str, int, str]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, seed=seed, trust_remote_code=trust_remote_code)
    eos = llm.get_tokenizer().eos_token_id
    params = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_new_tokens, seed=seed)
    outs = llm.chat([list(p) for p in prompts], params, use_tqdm=True)
    results = []
    for o in outs:
        c = o.outputs[0]
        ids = list(c.token_ids)
        # Same convention as the HF path: the end-of-turn token is not counted.
        n = len(ids) - 1 if ids and ids[-1] == eos else len(ids)
        results.append((c.text.strip(), n, "length" if c.finish_reason == "length" else "stop"))
    del llm
    return results


def generate_responses(
    model: str | Any,
    records: Sequence[dict[str, Any]],
    max_new_tokens: int = 1536,
    temperature: float = 0.0,
    batch_size: int = 16,
    *,
    tokenizer: Any = None,
    backend: str = "auto",
    seed: int = 0,
    tag: str | None = None,
    trust_remote_code: bool = False,
    desc: str = "generate",
) -> list[dict[str, Any]]:
    """Generate one response per record (``id``, ``prompt``); returns rows in input order.

    ``model`` is a spec (HF dir, checkpoint dir, hub id, .gguf, alias) or a loaded model (then
    ``tokenizer`` is required). ``temperature=0`` is greedy decoding.
    """
    from gad_megatron.models.sources import load_causal_lm, load_tokenizer, resolve_model_path

    if not records:
        return []
    prompts = [r["prompt"] for r in records]
    torch.manual_seed(seed)
    use_vllm = isinstance(model, str) and (backend == "vllm" or (backend == "auto" and _vllm_usable()))
    if use_vllm:
        results = _generate_vllm(resolve_model_path(model), prompts, max_new_tokens, temperature, seed, trust_remote_code)
    else:
        if isinstance(model, str):
            tokenizer = tokenizer or load_tokenizer(model, trust_remote_code=trust_remote_code)
            on_gpu = torch.cuda.is_available()
            dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
            lm = load_causal_lm(model, dtype=dtype, trust_remote_code=trust_remote_code)
            lm = lm.to("cuda") if on_gpu else lm
        else:
            if tokenizer is None:
                raise ValueError("generate_responses: a loaded model needs its tokenizer")
            lm = model
        was_training = lm.training
        lm.eval()
        try:
            results = _generate_hf(lm, tokenizer, prompts, max_new_tokens, temperature, batch_size, desc)
        finally:
            lm.train(was_training)
    rows = []
    for rec, (text, n, reason) in zip(records, results):
        row = {"id": rec["id"], "prompt": rec["prompt"], "response": text, "num_tokens": n, "finish_reason": reason}
        if tag:
            row["model"] = tag
        rows.append(row)
    return rows


# ---------------------------------------------------------------- run directories


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def find_checkpoints(run_dir: str | Path) -> list[tuple[str, Path]]:
    """Every generator under a run dir as ``(tag, path)``: per stage, checkpoints by step, then final."""
    run_dir = Path(run_dir)
    found: list[tuple[str, Path]] = []
    stages = [s for s in STAGES if (run_dir / s).is_dir()]
    stages += sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name not in STAGES
                     and any(_CKPT.match(c.name) for c in p.iterdir() if c.is_dir())) if run_dir.is_dir() else []
    for stage in stages:
        ckpts = [(int(m.group(1)), c) for c in (run_dir / stage).iterdir() if (m := _CKPT.match(c.name)) and _is_model_dir(c)]
        final = run_dir / stage / "final"
        candidates = sorted(ckpts) + ([(None, final)] if _is_model_dir(final) else [])
        # Where the trainer marks finished checkpoints, an unmarked one is still being written: skip it.
        marked = any((p / "COMPLETE").is_file() for _, p in candidates)
        for _, path in candidates:
            if marked and not (path / "COMPLETE").is_file():
                log.info("skipping %s: no COMPLETE marker (being written?)", path)
                continue
            found.append((model_tag(str(path), run_dir), path))
    return found


def final_model(run_dir: str | Path) -> Path | None:
    """The last stage's ``final/`` generator (gad, else warmup, else seqkd), or None."""
    for stage in reversed(STAGES):
        path = Path(run_dir) / stage / "final"
        if _is_model_dir(path):
            return path
    return None


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _path_tag(parts: Sequence[str]) -> str:
    """Path parts joined by ``-``, a last ``checkpoint-N`` shortened to ``stepN`` (``gad-step50``)."""
    parts = list(parts)
    if m := _CKPT.match(parts[-1]):
        parts[-1] = f"step{m.group(1)}"
    return _safe_name("-".join(parts))


def model_tag(spec: str, run_dir: str | Path | None = None) -> str:
    """A short filesystem-safe name for a model, unique per model wherever a path allows.

    Inside ``run_dir``: the path from it (``gad-final``, ``gad-step50``). A trainer output elsewhere
    (``final/``, ``checkpoint-N/``) keeps its run and stage (``runA-gad-final``), since ``final``
    alone names every stage of every run. Any other directory, an alias or a hub id: its last name
    (``Qwen2.5-7B-Instruct``). Two models that still get one tag are told apart by
    :func:`check_tag_free`.
    """
    path = Path(spec).expanduser()
    if path.exists():
        resolved = path.resolve()
        if run_dir is not None and resolved.is_relative_to(Path(run_dir).resolve()):
            parts = resolved.relative_to(Path(run_dir).resolve()).parts
            if parts:
                return _path_tag(parts)
        if resolved.name == "final" or _CKPT.match(resolved.name):
            return _path_tag(resolved.parts[-3:])
    name = path.name if path.exists() else spec.rstrip("/").split("/")[-1]
    return _safe_name(name.removesuffix(".gguf")) or "model"


def tag_order(tag: str) -> tuple[str, int, int, str]:
    """Sort key putting tags in training order: other models, then each stage's steps, then its final
    (this run's own tags first, then each other run's)."""
    m = _STAGE_TAG.match(tag)
    if m is None:
        return ("", 0, 0, tag)
    run, stage, _, step = m.groups()
    return (run or "", 1 + STAGES.index(stage), int(step) if step else 1 << 62, tag)


def _model_id(spec: str) -> str:
    """What the generations record as their model: the resolved path of a local model, else the spec."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def check_tag_free(run_dir: str | Path, tag: str, spec: str) -> None:
    """Refuse ``tag`` when its folder already holds generations of another model (its meta files say)."""
    mine = _model_id(spec)
    for meta_path in sorted((Path(run_dir) / "generations" / tag).glob("*.meta.json")):
        try:
            other = json.loads(meta_path.read_text(encoding="utf-8")).get("model")
        except (OSError, json.JSONDecodeError):
            continue
        if other is not None and other != mine:
            raise ConfigError(
                f"model tag '{tag}' is taken: {meta_path.parent} holds generations of {other}, and {mine} "
                "would overwrite them; move that folder away, or generate from a directory whose path "
                "gives another tag (a symlink with another name will do)"
            )


def generations_path(run_dir: str | Path, tag: str, suite: str) -> Path:
    return Path(run_dir) / "generations" / tag / f"{suite}.jsonl"


def _meta(spec: str, suite: Suite, cfg: RunConfig) -> dict[str, Any]:
    g = cfg.generate
    return {"model": _model_id(spec),
            "suite": suite.source, "ids": [r["id"] for r in suite.records], "max_new_tokens": g.max_new_tokens,
            "temperature": g.temperature, "seed": cfg.seed}


def _up_to_date(path: Path, meta: dict[str, Any]) -> bool:
    meta_path = path.with_suffix(".meta.json")
    if not (path.is_file() and meta_path.is_file()):
        return False
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")) == meta
    except (OSError, json.JSONDecodeError):
        return False


def _load_tokenizer_with_fallback(spec: str, fallback: str, trust_remote_code: bool) -> Any:
    from gad_megatron.models.sources import load_tokenizer

    try:
        return load_tokenizer(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        # A bare Trainer checkpoint may lack tokenizer files: the student's tokenizer is the same one.
        log.info("no tokenizer in %s; using the student's (%s)", spec, fallback)
        return load_tokenizer(fallback, trust_remote_code=trust_remote_code)


def run_generate(cfg: RunConfig, model: str | None = None, sweep: str | None = None) -> int:
    """``gad generate``: one model (``--model``, ``generate.model`` or the run's final one) or a sweep."""
    from gad_megatron.models.sources import load_causal_lm

    g = cfg.generate
    if not g.prompt_sets:
        raise ConfigError("generate.prompt_sets is empty: list prompt files or suite names (lmsys, dolly, selfinst, vicuna)")
    suites = [load_suite(s, limit=g.limit) for s in g.prompt_sets]
    if sweep:
        # Tagged as seen from this run's dir: another run's checkpoints keep their run's name.
        targets = [(model_tag(str(p), cfg.run_dir), str(p)) for _, p in find_checkpoints(sweep)]
        if not targets:
            raise ConfigError(f"--sweep {sweep}: no checkpoint-N/ or final/ model directories found")
    else:
        spec = model or g.model
        if spec is None:
            final = final_model(cfg.run_dir)
            if final is None:
                raise ConfigError(f"{cfg.run_dir}: no trained model (stage/final/) found; pass --model")
            spec = str(final)
        targets = [(model_tag(spec, cfg.run_dir), spec)]
    for tag, spec in targets:  # all refused before any is generated
        check_tag_free(cfg.run_dir, tag, spec)

    for tag, spec in targets:
        todo = []
        for s in suites:
            path, meta = generations_path(cfg.run_dir, tag, s.name), _meta(spec, s, cfg)
            if _up_to_date(path, meta):
                log.info("%s / %s: up to date (%s)", tag, s.name, path)
            else:
                todo.append((s, path, meta))
        if not todo:
            continue
        use_vllm = g.backend == "vllm" or (g.backend == "auto" and _vllm_usable())
        lm = None
        if use_vllm:  # one engine start for every suite of this model
            every = generate_responses(spec, [r for s, _, _ in todo for r in s.records], g.max_new_tokens,
                                       g.temperature, backend="vllm", seed=cfg.seed, tag=tag,
                                       trust_remote_code=cfg.trust_remote_code)
            starts = [0]
            for s, _, _ in todo:
                starts.append(starts[-1] + len(s.records))
            per_suite = [every[a:b] for a, b in zip(starts, starts[1:])]
        else:  # load once per model, not once per suite
            tok = _load_tokenizer_with_fallback(spec, cfg.student, cfg.trust_remote_code)
            lm = load_causal_lm(spec, trust_remote_code=cfg.trust_remote_code)
            if torch.cuda.is_available():
                lm = lm.to("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
            per_suite = [generate_responses(lm, s.records, g.max_new_tokens, g.temperature, g.batch_size, tokenizer=tok,
                                            backend="hf", seed=cfg.seed, tag=tag, desc=f"{tag} / {s.name}")
                         for s, _, _ in todo]
        for (suite, path, meta), rows in zip(todo, per_suite):
            write_jsonl(path, rows)
            path.with_suffix(".meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
            truncated = sum(r["finish_reason"] == "length" for r in rows)
            log.info("%s / %s: %d responses (%d truncated) -> %s", tag, suite.name, len(rows), truncated, path)
        del lm
    return 0
