"""ROUGE-L, n-gram F1 and length statistics against values computed by hand."""

from __future__ import annotations

import pytest

from gad_megatron.evaluation.text_metrics import (
    lcs_length,
    length_stats,
    ngram_f1,
    ngram_f1_all,
    repetition,
    rouge_l_f1,
    tokenize,
)


def test_tokenize_keeps_non_ascii_text():
    assert tokenize("Hello, World!") == ["hello", "world"]
    assert tokenize("Привет, мир!") == ["привет", "мир"]
    assert tokenize("Café crème") == ["café", "crème"]
    # Scripts written without spaces: one token per character, so overlap is still measurable.
    assert tokenize("我喜欢猫") == ["我", "喜", "欢", "猫"]
    assert tokenize("snake_case ok") == ["snake", "case", "ok"]
    # NFKC: full-width letters and the decomposed accent match their plain forms.
    assert tokenize("ＡＢＣ cafe\u0301") == ["abc", "café"]


def test_lcs_length():
    assert lcs_length("abcbdab", "bdcaba") == 4
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 of 6 and 6.
    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = "a c": P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
    assert rouge_l_f1("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l_f1("Same Text.", "same text") == pytest.approx(1.0)
    assert rouge_l_f1("", "anything") == 0.0
    assert rouge_l_f1("!!!", "???") == 0.0


def test_rouge_l_non_ascii_is_not_empty():
    # Chinese: LCS = 我喜欢 (3 of 4 on each side) -> F = 3/4. An ASCII-only tokenizer would give 0.
    assert rouge_l_f1("我喜欢猫", "我喜欢狗") == pytest.approx(3 / 4)
    # Russian, differing only in case and punctuation.
    assert rouge_l_f1("Привет, мир!", "привет мир") == pytest.approx(1.0)
    # Accented Latin: "café" matches, P = 1/2, R = 1 -> F = 2/3.
    assert rouge_l_f1("Café crème", "café") == pytest.approx(2 / 3)


def test_ngram_f1_hand_computed():
    cand, ref = "the the the cat", "the cat the dog"
    # Unigrams: cand {the:3, cat:1}, ref {the:2, cat:1, dog:1}; clipped overlap 3 -> P = R = 3/4.
    assert ngram_f1(cand, ref, 1) == pytest.approx(0.75)
    # Bigrams: cand {the the:2, the cat:1}, ref {the cat, cat the, the dog}; overlap 1 -> P = R = 1/3.
    assert ngram_f1(cand, ref, 2) == pytest.approx(1 / 3)
    # 4-grams differ; no 5-grams at all.
    assert ngram_f1(cand, ref, 4) == 0.0
    assert ngram_f1(cand, ref, 5) == 0.0
    # P = 1 (both cand bigrams in ref), R = 2/5 -> F = 2 * 0.4 / 1.4 = 4/7.
    assert ngram_f1("a b c", "a b c d e f", 2) == pytest.approx(4 / 7)


def test_ngram_f1_non_ascii():
    # Character bigrams 我喜 喜欢 欢猫 vs 我喜 喜欢 欢狗: overlap 2 of 3 each side.
    assert ngram_f1("我喜欢猫", "我喜欢狗", 2) == pytest.approx(2 / 3)
    assert ngram_f1("Über größe", "über Größe", 2) == pytest.approx(1.0)
    all_n = ngram_f1_all("我喜欢猫", "我喜欢狗", max_n=6)
    assert list(all_n) == [1, 2, 3, 4, 5, 6]
    assert all_n[1] == pytest.approx(3 / 4) and all_n[3] == pytest.approx(1 / 2) and all_n[4] == 0.0
    for n in range(1, 7):
        assert all_n[n] == pytest.approx(ngram_f1("我喜欢猫", "我喜欢狗", n))


def test_length_stats():
    s = length_stats([1, 2, 3, 10], ["stop", "stop", "length", "stop"], bins=5)
    assert s["count"] == 4
    assert s["mean"] == pytest.approx(4.0)
    assert s["median"] == pytest.approx(2.5)
    assert s["max"] == 10 and s["p90"] == 10
    assert s["truncated_frac"] == pytest.approx(0.25)
    assert sum(s["histogram"]["counts"]) == 4
    assert len(s["histogram"]["edges"]) == 6
    assert length_stats([]) == {"count": 0}


def test_repetition_hand_computed():
    # 12 words, 9 four-grams of which 4 are distinct: a b c d / b c d a / c d a b / d a b c
    assert repetition("a b c d a b c d a b c d") == pytest.approx(1 - 4 / 9)
    assert repetition("In a nutshell: keep it dry. Stay curious!") == 0.0
    assert repetition("too short") == 0.0
    assert repetition("") == 0.0
    once = "In a nutshell: plan your day and avoid distractions. Stay curious!"
    looped = once + " Stay curious! Stay curious! Stay curious!"
    assert repetition(looped) > 0.2 > repetition(once)
    assert repetition("stay curious stay curious", n=2) == pytest.approx(1 - 2 / 3)  # n is honoured
