"""How well could any D tell the teacher from the warmed-up student on held-out pairs? The
likelihood-ratio oracle next to what D and the student themselves know.

    .venv/bin/python bench/d_ceiling.py --source /tmp/qs --heldout-dir /tmp/d_warmup     # ~5 min on 2 CPU cores

(From a git worktree whose venv is another checkout's editable install: ``PYTHONPATH=.`` first.)

Pairs: those of ``bench/d_warmup.py`` (``<heldout-dir>/heldout_rollouts.jsonl``, sampled there
if absent): the teacher's answer to each test prompt, cut at the training response length as D
sees it, against N rollouts of the SeqKD model (= the warmed-up G). Every sequence gets these
scores; each is ranked as D is (teacher above rollout = right, ties wrong):

- ``oracle``: ``log p_teacher(y | hidden context, x) - log p_student(y | x)``, each under the
  temperature its sampler used (teacher: ``teacher.temperature``, local copy ``eval.teacher_model``;
  student: ``train.temperature``, the SeqKD model). With exact densities this likelihood ratio
  ranks pairs as well as anything can (the Bayes-optimal test); it needs the teacher's weights,
  which a black-box D never has. The teacher's server may also cut the tail of its distribution
  (top-k / min-p), which these densities ignore: the oracle's accuracy is reachable, so it is a
  lower bound on the best possible D, and a close one.
- ``teacher_loglik``: ``log p_teacher(y | context, x)`` alone.
- ``student_surprise``: ``-log p_student(y | x)``: what the warmed-up G's own likelihood says.
- ``length``: response tokens (longer = teacher).
- ``inside_teacher_top_k``: minus the number of response tokens outside the teacher's ``--top-k``
  most likely next tokens (default 40: the llama.cpp server's default ``top_k``, which the
  quickstart's requests do not set; its ``min_p`` 0.05 and ``repeat_penalty`` 1.1 are not modelled).
  A sampler with that cut never emits such a token; the student samples the whole softmax.
  The share of sequences with at least one is reported for both sides.
- ``d``: the trained D of ``--d`` dirs (HF sequence classifiers), e.g. the quickstart's warmup D.

Each on all pairs and on the pairs whose teacher answer ends within the training length (the
training pairs' kind: truncated teacher answers are left out of training). Writes
``<out>/ceiling.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from gad_megatron.config import RunConfig, load_config

log = logging.getLogger("d_ceiling")


def split_ids(encoder: Any, prompt: list[dict[str, str]], ids: list[int]) -> tuple[list[int], list[int]]:
    """D's ``prompt + response`` ids -> ``(student prompt ids, response ids)``."""
    prompt_ids = encoder.prompt_ids(prompt)
    assert ids[: len(prompt_ids)] == prompt_ids, "D's sequence does not start with the student prompt"
    return prompt_ids, ids[len(prompt_ids) :]


def teacher_prompt_ids(cfg: RunConfig, tokenizer: Any, prompt: list[dict[str, str]]) -> list[int]:
    """The prompt as the teacher sees it: system prompt, hidden few-shot turns, then the row's messages."""
    context = [{"role": "system", "content": cfg.teacher.system_prompt}] if cfg.teacher.system_prompt else []
    context += [{"role": m.role, "content": m.content} for m in cfg.teacher.context_messages]
    return list(tokenizer.apply_chat_template(context + prompt, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))  # fmt: skip


def sequence_scores(cfg: RunConfig, source: Path, rows: list[dict[str, Any]], top_k: int) -> dict[str, torch.Tensor]:
    """Per score name: ``[P, 1 + n]`` (teacher answer first, then its rollouts), one entry per sequence."""
    from gad_megatron.data import read_jsonl
    from gad_megatron.evaluation.loglik import token_logprobs
    from gad_megatron.models.sources import load_causal_lm, load_tokenizer
    from gad_megatron.text_encoding import TextEncoder

    prompts = {r["id"]: r["prompt"] for r in read_jsonl(source / "data" / "test.jsonl")}
    student_dir = str(source / "seqkd" / "final")
    tokenizer = load_tokenizer(student_dir)
    encoder = TextEncoder(tokenizer, cfg.data.max_prompt_length, cfg.train.max_response_length)
    student_pairs, teacher_pairs = [], []
    for r in rows:
        prompt = prompts[r["id"]]
        t_prompt = teacher_prompt_ids(cfg, tokenizer, prompt)
        for ids in (r["teacher_ids"], *r["rollout_ids"]):
            p_ids, resp = split_ids(encoder, prompt, ids)
            student_pairs.append((p_ids, resp))
            teacher_pairs.append((t_prompt, resp))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.monotonic()
    student = token_logprobs(load_causal_lm(student_dir), student_pairs, pad, temperature=cfg.train.temperature)
    teacher_lm = load_causal_lm(cfg.eval.teacher_model)
    teacher = token_logprobs(teacher_lm, teacher_pairs, pad, temperature=cfg.teacher.temperature)
    log.info("scored %d sequences under the student and the teacher in %.0f s", len(student_pairs),
             time.monotonic() - start)  # fmt: skip
    shape = (len(rows), -1)
    s_logp = torch.tensor([s for s, _ in student]).view(shape)
    t_logp = torch.tensor([s for s, _ in teacher]).view(shape)
    outside = torch.tensor([float(n) for n in outside_top_k(teacher_lm, teacher_pairs, top_k)]).view(shape)
    return {"oracle": t_logp - s_logp, "teacher_loglik": t_logp, "student_surprise": -s_logp,
            "length": torch.tensor([float(n) for _, n in student]).view(shape), "inside_teacher_top_k": -outside}  # fmt: skip


@torch.no_grad()
def outside_top_k(model: Any, pairs: list[tuple[list[int], list[int]]], k: int) -> list[int]:
    """Per ``(prompt_ids, response_ids)``: response tokens outside the model's ``k`` most likely next tokens."""
    counts = []
    for prompt_ids, response_ids in pairs:
        logits_RV = model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0].float()
        logits_RV = logits_RV[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(response_ids)]
        chosen_R = logits_RV.gather(-1, torch.tensor(response_ids)[:, None])
        counts.append(int(((logits_RV > chosen_R).sum(-1) >= k).sum()))
    return counts


def teacher_complete(rows: list[dict[str, Any]], eos_ids: set[int]) -> torch.Tensor:
    """``[P]`` bool: the teacher answer ends (end-of-turn) within the training length."""
    return torch.tensor([r["teacher_ids"][-1] in eos_ids for r in rows])


def main() -> None:
    from d_warmup import accuracy_and_se, d_scores, heldout_rows  # this script's folder is on sys.path

    from gad_megatron.models.sources import load_tokenizer
    from gad_megatron.text_encoding import TextEncoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="/tmp/qs_full", help="a finished quickstart run dir (its SeqKD stage at least)")
    ap.add_argument("--heldout-dir", default="runs/d_warmup", help="where bench/d_warmup.py keeps its held-out rollouts")
    ap.add_argument("--out", default=None, help="default: --heldout-dir")
    ap.add_argument("--n", type=int, default=8, help="held-out rollouts per test prompt (if sampled here)")
    ap.add_argument("--top-k", type=int, default=40, help="the teacher sampler's top-k cut (llama.cpp server default)")
    ap.add_argument("--d", action="append", default=[], help="name=path of an HF discriminator to score too")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source, heldout = Path(a.source).resolve(), Path(a.heldout_dir).resolve()
    out = Path(a.out).resolve() if a.out else heldout
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(source / "config.yaml")
    rows = heldout_rows(cfg, source, heldout, a.n)
    scores = sequence_scores(cfg, source, rows, a.top_k)
    for spec in a.d:
        name, path = spec.split("=", 1)
        scores[f"d:{name}"] = d_scores(Path(path), rows)
    encoder = TextEncoder(load_tokenizer(str(source / "seqkd" / "final")), 1, 1)
    complete_P = teacher_complete(rows, set(encoder.end_of_turn_ids()))
    results = []
    for name, groups_PK in scores.items():
        acc, se = accuracy_and_se(groups_PK)
        acc_c, se_c = accuracy_and_se(groups_PK[complete_P])
        results.append({"score": name, "acc": acc, "se": se, "acc_complete": acc_c, "se_complete": se_c})
    summary = {"source": str(source), "prompts": len(rows), "pairs": sum(len(r["rollout_ids"]) for r in rows),
               "prompts_teacher_complete": int(complete_P.sum()), "results": results,
               "oracle_margin_mean": float((scores["oracle"][:, :1] - scores["oracle"][:, 1:]).mean()),
               "top_k": a.top_k, "teacher_answers_outside_top_k": float((scores["inside_teacher_top_k"][:, 0] < 0).float().mean()),
               "rollouts_outside_top_k": float((scores["inside_teacher_top_k"][:, 1:] < 0).float().mean())}  # fmt: skip
    (out / "ceiling.json").write_text(json.dumps(summary, indent=1))
    lines = [f"| score | pair accuracy, all {summary['pairs']} pairs (+- s.e.) | "
             f"teacher answer complete ({summary['prompts_teacher_complete']} prompts) |", "|---|---|---|"]
    lines += [f"| {r['score']} | {r['acc']:.3f} +- {r['se']:.3f} | {r['acc_complete']:.3f} +- {r['se_complete']:.3f} |"
              for r in results]  # fmt: skip
    print("\n".join(lines))
    print(f"with a token outside the teacher's top-{a.top_k}: teacher answers {summary['teacher_answers_outside_top_k']:.1%}, "
          f"rollouts {summary['rollouts_outside_top_k']:.1%}")


if __name__ == "__main__":
    main()
