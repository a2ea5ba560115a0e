"""LLM-as-judge: rating parser, score arithmetic with a scripted judge, and the real flow end to end
against llama.cpp's OpenAI-compatible server (SmolLM2-135M standing in for the judge)."""

from __future__ import annotations

import json
import re

import pytest

from gad_megatron.config import TeacherConfig, parse_config
from gad_megatron.data import read_jsonl, write_jsonl
from gad_megatron.evaluation.judge import format_demo_messages, judge_pairs, judge_references, parse_ratings, rating_messages
from gad_megatron.evaluation.text_metrics import rouge_l_f1
from gad_megatron.teacher.results import Completion
from tests.helpers.shared_data import shared_data_dir

VICUNA = shared_data_dir() / "vicuna80.jsonl"


@pytest.mark.parametrize("text, expected", [
    ("Both fine.\nRatings: A=7, B=5", (7.0, 5.0)),
    ("ratings: a = 9 , b = 10", (9.0, 10.0)),
    ("**Ratings:** A: 6/10, B: 8/10", (6.0, 8.0)),
    ("Rating: A=3 and B=4", (3.0, 4.0)),
    ("Ratings: A=1, B=2\nOn reflection:\nRatings: A=7.5, B=6", (7.5, 6.0)),  # the last line wins
    ("Answer A: 8/10\nSome words.\nAnswer B: 4/10", (8.0, 4.0)),
    ("A: 6\nB: 9", (6.0, 9.0)),
])
def test_parse_ratings(text, expected):
    assert parse_ratings(text) == expected


@pytest.mark.parametrize("text", [
    None, "", "Answer A is better.", "I rate them 7 and 5.", "Ratings: A=11, B=5", "Ratings: A=0, B=3",
    "A: 6\nA: 7\nB: 9",  # ambiguous: two ratings for A
    "Ratings: A=, B=",
])
def test_unparseable_is_never_guessed(text):
    assert parse_ratings(text) is None


class ScriptedJudge:
    """Stands in for JudgeClient: answers from a script, counts requests."""

    def __init__(self, ratings):
        self.cfg = TeacherConfig(base_url="http://127.0.0.1:9/v1", model="scripted", max_tokens=64)
        self.ratings = ratings  # (answer A, answer B, temperature) -> text
        self.requests = 0
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, requests, desc, sampling):
        out = {}
        for key, messages in requests:
            self.requests += 1
            self.calls.append((key, dict(sampling)))
            text = messages[-1]["content"]
            m = re.search(r"\[Answer A\]\n(.*)\n\n\[Answer B\]\n(.*)\n\nWrite", text, re.S)
            if m is None:
                out[key] = Completion(f"ref for {text}", "stop", 1, 1, 0.0, 1)
                continue
            reply = self.ratings(m.group(1), m.group(2), sampling["temperature"])
            out[key] = (Completion.failure("HTTP 500: boom", attempts=6) if reply is None
                        else Completion(reply, "stop", 1, 1, 0.0, 1))
        return out


RECORDS = [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"question {i}"}]} for i in range(4)]


def _script(a, b, temperature):
    cand_first = a.startswith("cand")
    cand = a if cand_first else b
    if cand == "cand-good":  # position-biased judge: +1 for whatever comes first
        return "Ratings: A=8, B=4" if cand_first else "Ratings: A=6, B=6"
    if cand == "cand-flaky":  # unparseable when greedy, fine when resampled
        return "I cannot decide." if temperature == 0.0 else "Ratings: A=5, B=5"
    if cand == "cand-hopeless":
        return "Both are answers."
    return None  # cand-down: the endpoint fails


def test_score_orders_retries_and_counts():
    judge = ScriptedJudge(_script)
    refs = judge_references(judge, RECORDS)
    assert refs == {r["id"]: f"ref for question {i}" for i, r in enumerate(RECORDS)}
    cands = {"q0": "cand-good", "q1": "cand-flaky", "q2": "cand-hopeless", "q3": "cand-down"}
    run = judge_pairs(judge, RECORDS, cands, refs, retries=2)
    d = {row["id"]: row for row in run.details}
    # q0: candidate 8 (first) and 6 (second), reference 4 and 6: 7 / (7 + 5).
    assert d["q0"]["cand_first"] == {"candidate": 8.0, "reference": 4.0}
    assert d["q0"]["cand_second"] == {"candidate": 6.0, "reference": 6.0}
    assert d["q0"]["score"] == pytest.approx(7 / 12)
    assert d["q1"]["score"] == pytest.approx(0.5)  # parsed on the first (sampled) retry
    assert d["q2"]["score"] is None and d["q2"]["cand_first"]["status"] == "unparseable"
    assert d["q3"]["score"] is None and d["q3"]["cand_second"]["status"] == "failed"
    assert run.score == pytest.approx(100 * (7 / 12 + 0.5) / 2)
    assert (run.n_scored, run.n_unscored, run.n_unparseable, run.n_failed) == (2, 2, 2, 2)
    # Retries: q1 and q2 (2 orders each) once, then only q2's two orders again.
    assert run.n_retries == 6
    assert run.position_bias == pytest.approx(1.0)  # ((8-6) + (6-4)) / 2 / 2 prompts
    retry_sampling = [s for k, s in judge.calls if s["temperature"] == 0.7]
    assert {s["seed"] for s in retry_sampling} == {1, 2}
    assert run.requests == 8 + 6


def test_single_order():
    judge = ScriptedJudge(_script)
    run = judge_pairs(judge, RECORDS[:1], {"q0": "cand-good"}, {"q0": "ref"}, both_orders=False)
    assert "cand_second" not in run.details[0] and run.score == pytest.approx(100 * 8 / 12)
    assert run.position_bias is None


def test_rating_prompt_shows_the_whole_conversation():
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sum 2+2"}]
    (msg,) = rating_messages(prompt, "4", "")
    assert msg["role"] == "user"
    assert "USER: Hi" in msg["content"] and "ASSISTANT: Hello" in msg["content"] and "USER: Sum 2+2" in msg["content"]
    assert "[Answer B]\n(empty answer)" in msg["content"]


# ---------------------------------------------------------------- real server


@pytest.mark.server
def test_judge_end_to_end_real_server(tmp_path, tiny_model_dir):
    from gad_megatron.evaluation.evaluate import evaluate_run
    from gad_megatron.llama_server import LlamaServer

    run = tmp_path / "run"
    prompts = [json.loads(line) for line in VICUNA.read_text().splitlines()[:2]]
    write_jsonl(run / "generations" / "cand" / "vicuna80.jsonl", [
        {"id": p["id"], "prompt": p["prompt"], "response": text, "num_tokens": 5, "finish_reason": "stop", "model": "cand"}
        for p, text in zip(prompts, ["Plan your day, set priorities, and limit distractions.", "I don't know."])])

    with LlamaServer(n_ctx=4096) as server:
        endpoint = {"base_url": server.base_url, "model": server.model, "api_key_env": None, "concurrency": 2,
                    "timeout_s": 120.0}
        # A 135M judge copies a demonstrated format (it ignores the instruction alone).
        judge = {**endpoint, "max_tokens": 40, "context_messages": format_demo_messages()}
        cfg = parse_config({
            "run_dir": str(run), "student": str(tiny_model_dir), "data": {"path": str(VICUNA)},
            # The teacher's answers to the eval prompts are fetched from the endpoint (one client, two roles).
            "teacher": {**endpoint, "temperature": 0.0, "max_tokens": 24},
            "generate": {"prompt_sets": [str(VICUNA)], "limit": 2},
            "eval": {"judge": judge, "judge_max_tokens": 32, "judge_retries": 1, "distinguishability": False},
        })
        first = evaluate_run(cfg)
        second = evaluate_run(cfg)  # everything cached: not one request

    teacher_rows = read_jsonl(run / "generations" / "teacher" / "vicuna80.jsonl")
    assert [r["id"] for r in teacher_rows] == [p["id"] for p in prompts] and all(r["response"] for r in teacher_rows)
    assert (run / "teacher_cache.sqlite").is_file()
    # Scored against the fetched answers: recomputed here from the two texts of each prompt.
    cand_texts = {r["id"]: r["response"] for r in read_jsonl(run / "generations" / "cand" / "vicuna80.jsonl")}
    expected_rouge = sum(rouge_l_f1(cand_texts[t["id"]], t["response"]) for t in teacher_rows) / len(teacher_rows)
    assert first["results"]["cand"]["vicuna80"]["rouge_l"] == pytest.approx(expected_rouge, abs=1e-12)

    # References written by the judge, one per prompt.
    refs = read_jsonl(run / "eval" / "judge_references" / "vicuna80.jsonl")
    assert [r["id"] for r in refs] == [p["id"] for p in prompts]
    assert all(isinstance(r["reference"], str) and r["reference"].strip() for r in refs)

    assert first["judge"]["requests"] >= 2 + 2 * 2 * 2  # references + both orders for cand and teacher
    for tag in ("cand", "teacher"):
        summary = first["results"][tag]["vicuna80"]["judge"]
        details = read_jsonl(run / "eval" / tag / "vicuna80.jsonl")
        unparseable = 0
        for row in details:
            j = row["judge"]
            assert set(j) >= {"cand_first", "cand_second", "score"}  # both orders asked
            for order in ("cand_first", "cand_second"):
                if "status" in j[order]:
                    assert j[order]["status"] == "unparseable"  # never guessed
                    unparseable += 1
                else:
                    assert 1 <= j[order]["candidate"] <= 10 and 1 <= j[order]["reference"] <= 10
        assert summary["n_unparseable"] == unparseable and summary["n_failed"] == 0
        # The suite score from the parsed ratings of each order: per prompt, the candidate's mean rating
        # over (candidate + reference) means; the mean over scored prompts, x 100.
        per_prompt = []
        for row in details:
            parsed = [row["judge"][o] for o in ("cand_first", "cand_second") if "status" not in row["judge"][o]]
            if parsed:
                c = sum(p["candidate"] for p in parsed) / len(parsed)
                r = sum(p["reference"] for p in parsed) / len(parsed)
                per_prompt.append(c / (c + r))
        assert summary["n_scored"] == len(per_prompt) and summary["n_unscored"] == 2 - len(per_prompt)
        if per_prompt:
            assert summary["score"] == pytest.approx(100 * sum(per_prompt) / len(per_prompt), abs=1e-9)
        else:
            assert summary["score"] is None

    assert second["judge"]["requests"] == 0
    for tag in ("cand", "teacher"):
        a, b = first["results"][tag]["vicuna80"]["judge"], second["results"][tag]["vicuna80"]["judge"]
        assert b["requests"] == 0 and {**a, "requests": 0} == b


def test_format_demos_parse_and_validate():
    demos = format_demo_messages()
    assert [m["role"] for m in demos] == ["user", "assistant"] * 2
    assert [parse_ratings(m["content"]) for m in demos[1::2]] == [(9.0, 1.0), (2.0, 8.0)]
    TeacherConfig(base_url="http://127.0.0.1:1/v1", model="m", context_messages=demos)  # valid config value
