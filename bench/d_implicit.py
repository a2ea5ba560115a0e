"""Does a discriminator whose score is a likelihood ratio generalise where a score head does not?

    .venv/bin/python bench/d_implicit.py --source /tmp/qs --heldout-dir /tmp/d_warmup   # ~20 min on 2 CPU cores

(From a git worktree whose venv is another checkout's editable install: ``PYTHONPATH=.`` first.)

The shipped D is the student with a fresh scalar head on the last token; with the quickstart's
data it stays near 0.6 on held-out pairs (docs/benchmarks.md). This bench trains another kind of
D on the same Bradley-Terry pairs: a causal LM ``pi`` started from the SeqKD model, scored as
``beta * (log pi(y | x) - log pi_ref(y | x))`` with ``pi_ref`` the frozen SeqKD model (the
implicit reward of DPO; 0 for every answer at the start). Its pretrained head is the LM head, so
what it learns about the teacher's answers is a change of the student's own next-token
distribution rather than a new direction for a random head. The optimal such D is
``beta * log(p_teacher / p_student)``, the ranking ``bench/d_ceiling.py`` calls the oracle.

Training pairs: the teacher's answer to each training prompt against ``--k`` SeqKD rollouts at
the training temperature (sampled once into ``<out>/train_rollouts_k<K>.jsonl``), ``--batch``
prompts an update, AdamW at ``--lr``. After each epoch: pair accuracy on the held-out pairs of
``bench/d_warmup.py`` (all, and those whose teacher answer is complete within the training length)
and on the training prompts held out (``--val-train``). Writes ``<out>/implicit.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from gad_megatron.config import load_config

log = logging.getLogger("d_implicit")


def response_logprob_sums(model: Any, seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> torch.Tensor:
    """``[B]`` sum of log p(response tokens) for right-padded ``prompt + response`` sequences (with grad)."""
    from gad_megatron.text_encoding import right_pad

    ids_BT, mask_BT = right_pad(seqs, pad_id)
    logp_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits[:, :-1].float().log_softmax(-1)
    token_logp_BT = logp_BTV.gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
    positions_T = torch.arange(1, ids_BT.shape[1])
    lengths_B = torch.tensor([len(s) for s in seqs])
    starts_B = torch.tensor(prompt_lens)
    response_BT = (positions_T[None] >= starts_B[:, None]) & (positions_T[None] < lengths_B[:, None])
    return (token_logp_BT * response_BT).sum(-1)


class Groups:
    """Teacher answer + rollouts per prompt, as D ids, with their prompt lengths and reference log-probs."""

    def __init__(self, rows: list[dict[str, Any]], prompt_len: dict[str, int]):
        self.rows = rows
        self.prompt_len = prompt_len
        self.ref: dict[str, torch.Tensor] = {}  # id -> [1 + n] reference log-prob sums

    def sequences(self, row: dict[str, Any]) -> list[list[int]]:
        return [row["teacher_ids"], *row["rollout_ids"]]

    @torch.no_grad()
    def fill_reference(self, ref_model: Any, pad_id: int, batch: int = 16) -> None:
        for row in self.rows:
            if row["id"] not in self.ref:
                seqs = self.sequences(row)
                self.ref[row["id"]] = torch.cat([
                    response_logprob_sums(ref_model, seqs[i : i + batch], [self.prompt_len[row["id"]]] * len(seqs[i : i + batch]), pad_id)
                    for i in range(0, len(seqs), batch)])  # fmt: skip

    def margins(self, model: Any, rows: list[dict[str, Any]], pad_id: int) -> torch.Tensor:
        """``[P, 1 + n]`` implicit rewards (without beta) of every sequence of ``rows``, with grad."""
        seqs = [s for r in rows for s in self.sequences(r)]
        lens = [self.prompt_len[r["id"]] for r in rows for _ in self.sequences(r)]
        logp = response_logprob_sums(model, seqs, lens, pad_id).view(len(rows), -1)
        return logp - torch.stack([self.ref[r["id"]] for r in rows])


@torch.no_grad()
def scores(groups: Groups, model: Any, pad_id: int, batch_prompts: int = 4) -> torch.Tensor:
    """``[P, 1 + n]`` implicit rewards of every sequence of ``groups``, in eval mode."""
    model.eval()
    out = torch.cat([groups.margins(model, groups.rows[i : i + batch_prompts], pad_id)
                     for i in range(0, len(groups.rows), batch_prompts)])  # fmt: skip
    model.train()
    return out


def main() -> None:
    from d_warmup import accuracy_and_se, heldout_rows, rollout_rows  # this script's folder is on sys.path

    from gad_megatron.data import read_jsonl
    from gad_megatron.models.sources import load_causal_lm, load_tokenizer
    from gad_megatron.text_encoding import TextEncoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="/tmp/qs_full", help="a finished quickstart run dir (its SeqKD stage at least)")
    ap.add_argument("--heldout-dir", default="runs/d_warmup", help="where bench/d_warmup.py keeps its held-out rollouts")
    ap.add_argument("--out", default="runs/d_implicit")
    ap.add_argument("--k", type=int, default=4, help="rollouts per training prompt")
    ap.add_argument("--batch", type=int, default=8, help="prompts per update")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--val-train", type=int, default=20, help="training prompts held out")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    source, out = Path(a.source).resolve(), Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(source / "config.yaml")
    seqkd = str(source / "seqkd" / "final")
    tokenizer = load_tokenizer(seqkd)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoder = TextEncoder(tokenizer, cfg.data.max_prompt_length, cfg.train.max_response_length)
    records = read_jsonl(source / "data" / "train.jsonl") + read_jsonl(source / "data" / "test.jsonl")
    prompt_len = {r["id"]: len(encoder.prompt_ids(r["prompt"])) for r in records}

    test = Groups(heldout_rows(cfg, source, Path(a.heldout_dir).resolve(), 8), prompt_len)
    train_rows = rollout_rows(cfg, source, out / f"train_rollouts_k{a.k}.jsonl", read_jsonl(source / "data" / "train.jsonl"), a.k)
    random.Random(cfg.seed).shuffle(train_rows)
    fit, held = Groups(train_rows[a.val_train :], prompt_len), Groups(train_rows[: a.val_train], prompt_len)
    eot = encoder.end_of_turn_ids()
    complete_P = torch.tensor([r["teacher_ids"][-len(eot) :] == eot for r in test.rows])

    start = time.monotonic()
    ref = load_causal_lm(seqkd).eval()
    for g in (fit, held, test):
        g.fill_reference(ref, pad)
    del ref
    log.info("reference log-probs in %.0f s", time.monotonic() - start)

    model = load_causal_lm(seqkd).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    epochs: list[dict[str, float]] = []
    for epoch in range(1, a.epochs + 1):
        start, losses, accs = time.monotonic(), [], []
        order = list(fit.rows)
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        for i in range(0, len(order), a.batch):
            rows = order[i : i + a.batch]
            rewards_PK = a.beta * fit.margins(model, rows, pad)
            diff_PN = rewards_PK[:, :1] - rewards_PK[:, 1:]
            loss = -torch.nn.functional.logsigmoid(diff_PN).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss))
            accs.append(float((diff_PN > 0).float().mean()))
            log.info("epoch %d update %d: loss %.3f, pre-update acc %.3f", epoch, i // a.batch + 1, losses[-1], accs[-1])
        train_s = time.monotonic() - start
        start = time.monotonic()
        row = {"epoch": epoch, "loss": sum(losses) / len(losses), "train_acc_pre_update": sum(accs) / len(accs),
               "train_s": train_s}  # fmt: skip
        test_PK = scores(test, model, pad)
        for name, groups_PK in (("test", test_PK), ("test_complete", test_PK[complete_P]),
                                ("train_heldout", scores(held, model, pad))):
            row[f"{name}_acc"], row[f"{name}_se"] = accuracy_and_se(groups_PK)
        row["score_s"] = time.monotonic() - start
        log.info("epoch %d: %s", epoch, row)
        epochs.append(row)
        (out / "implicit.json").write_text(json.dumps({"source": str(source), "k": a.k, "batch": a.batch, "lr": a.lr,
                                                       "beta": a.beta, "fit_prompts": len(fit.rows),
                                                       "epochs": epochs}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
