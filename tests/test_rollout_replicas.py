"""Rollout replicas (who generates which prompts, seeds, sharing with the data-parallel ranks),
the engine's sleep after sampling, and the rollout stop token."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from gad_megatron.config import ConfigError
from gad_megatron.rollout.replicas import Replicas, check_rollout_layout
from gad_megatron.rollout.step import special_token_ids, stop_token_ids
from gad_megatron.text_encoding import TextEncoder
from tests.helpers.torchrun import ROOT, run_torchrun


def test_replicas_are_consecutive_groups_and_shares_tile_the_prompts() -> None:
    replicas = Replicas.of(range(8), 2)
    assert replicas.groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert [replicas.index_of(r) for r in (0, 1, 5, 9)] == [0, 0, 2, None]
    for n in (0, 1, 3, 4, 7, 256):
        shares = [replicas.share(n, i) for i in range(4)]
        assert [i for s in shares for i in s] == list(range(n))  # each prompt once, in order
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert Replicas.of([4, 0], 1).groups == ((0,), (4,))
    with pytest.raises(ConfigError, match="do not divide the 3 engine rank"):
        Replicas.of(range(3), 2)


def test_rollout_layout_refused_before_any_model() -> None:
    check_rollout_layout(8, 2, use_vllm=True)
    check_rollout_layout(3, 2, use_vllm=False)  # the transformers engine has no replicas of several ranks
    with pytest.raises(ConfigError, match="rollout_tensor_parallel=4 does not divide the 6 ranks"):
        check_rollout_layout(6, 4, use_vllm=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[dict]:
    out = tmp_path_factory.mktemp("replicas") / "report.json"
    run_torchrun(ROOT / "tests" / "helpers" / "replica_check.py", 4, str(out), str(tiny_model_dir), timeout=300)
    return json.loads(out.read_text())


def test_a_replica_spanning_data_parallel_ranks_gets_one_share(report: list[dict]) -> None:
    """vLLM TP 2 over a trainer at DP 4: ranks 0-1 and 2-3 are replicas; each replica's ranks sample
    the same prompts; every prompt once; each rank then holds its own DP share's rollouts, in
    prompt order."""
    calls = [r["vllm_tp2_dp4"]["calls"] for r in report]
    assert calls[0] == calls[1] == [[0, 1, 2]] and calls[2] == calls[3] == [[3, 4, 5]]
    for rank, r in enumerate(report):
        layout = r["vllm_tp2_dp4"]
        share_start = 0 if max(layout["keep"]) < 3 else 3
        assert layout["got"] == [[i, p, share_start] for i, p in enumerate(layout["keep"])], rank


def test_replicas_of_one_rank_split_the_prompts_not_duplicate_them(report: list[dict]) -> None:
    calls = [r["vllm_tp1_dp2"]["calls"] for r in report]
    assert calls == [[[0, 1]], [[2, 3]], [[4]], [[5]]]
    for r in report:
        assert [g[1] for g in r["vllm_tp1_dp2"]["got"]] == r["vllm_tp1_dp2"]["keep"]
    hf = [r["hf_leaders_dp2"]["calls"] for r in report]
    assert hf == [[[0, 1, 2]], [], [[3, 4, 5]], []]  # only the engine ranks generate


def test_diverging_replica_ranks_stop_the_step(report: list[dict]) -> None:
    for r in report:
        assert "rollout replica 0 (ranks [0, 1]): its ranks sampled different tokens" in r["diverging"]["error"]


def test_the_engine_sleeps_after_sampling_and_drops_weights_only_before_a_sync(report: list[dict]) -> None:
    """A GAD step (a sync follows: level-2 sleep) then a D-only warmup step (no sync: keep the weights)."""
    for r in report:
        assert r["sleep"] == [["generate", 1], ["sleep", False], ["generate", 1], ["sleep", True]]


def test_stop_token_is_the_special_end_of_turn(tiny_tokenizer) -> None:
    """A template whose assistant suffix starts with a space: its first piece is a plain space,
    which must not stop a completion; the special end-of-turn token does."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content'] + '<|im_end|>'",
                                                              "message['content'] + ' <|im_end|>'")  # fmt: skip
    tokenizer.eos_token = "<|endoftext|>"  # so that eos does not stand in for the end-of-turn
    encoder = TextEncoder(tokenizer, 64, 8)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    suffix = encoder.end_of_turn_ids()
    assert len(suffix) == 2 and suffix[0] not in special_token_ids(tokenizer) and suffix[1] == im_end
    assert stop_token_ids(encoder) == (im_end, tokenizer.eos_token_id)
    assert stop_token_ids(TextEncoder(tiny_tokenizer, 64, 8)) == (im_end,)  # SmolLM2: eos is <|im_end|>
