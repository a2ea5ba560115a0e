"""Distinguishability: a fresh classifier, split by prompt, with a Wilson interval."""

from __future__ import annotations

import random

import pytest

from gad_megatron.evaluation.distinguish import distinguishability, featurize, wilson_interval

WORDS = "the a cat dog sat ran on over mat hill quickly slowly green red house tree".split()


EPOCHS, LR = 10, 3e-4  # enough for a fresh tiny D to learn a sign-off (1.0 here; 6 epochs at 1e-3 give 0.75)


def _sentences(seed: int, n: int, prefix: str = "") -> list[str]:
    rng = random.Random(seed)
    return [prefix + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "." for _ in range(n)]


def test_wilson_interval():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_featurize_is_stable_and_sparse():
    a = featurize(["Hello world", "Hello world"], dim=1024).to_dense()
    assert a.shape == (2, 1024)
    assert (a[0] == a[1]).all() and (a[0] != 0).sum() > 3


def test_style_is_detected():
    teacher = _sentences(0, 60, prefix="Certainly! Here is my answer:\n")
    student = _sentences(1, 60)
    res = distinguishability(teacher, student, seed=0)
    assert res["accuracy"] > 0.9
    assert res["ci_low"] > 0.5  # clearly distinguishable
    assert res["n_test"] == 120 and res["n_prompts"] == 60 and len(res["fold_accuracy"]) == 2
    assert len(res["per_prompt"]) == 60 and set(res["per_prompt"]) <= {0.0, 0.5, 1.0}
    assert sum(res["per_prompt"]) / 60 == pytest.approx(res["accuracy"]), "per-prompt shares average to the accuracy"


def test_same_distribution_is_near_chance():
    res = distinguishability(_sentences(2, 60), _sentences(3, 60), seed=0)
    assert res["ci_low"] < 0.5 < res["ci_high"]


def test_identical_pairs_give_exactly_chance():
    # Both responses to a prompt are in the same half, and identical texts get identical scores:
    # exactly one of the two is classified correctly, whatever the classifier learned.
    texts = _sentences(4, 20)
    res = distinguishability(texts, list(texts))
    assert res["accuracy"] == pytest.approx(0.5) and res["per_prompt"] == [0.5] * 20


def test_too_few_prompts_and_misaligned_input():
    assert distinguishability(["a", "b"], ["c", "d"])["accuracy"] is None
    with pytest.raises(ValueError):
        distinguishability(["a"], ["b", "c"])


def test_discriminator_classifier_same_protocol(tiny_model_dir):
    from gad_megatron.evaluation.distinguish import discriminator_distinguishability

    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(6)]
    texts = _sentences(5, 6)
    # Identical responses get identical scores from any model: exactly chance, by construction.
    res = discriminator_distinguishability(str(tiny_model_dir), prompts, texts, list(texts), epochs=1, batch_size=4)
    assert res["accuracy"] == pytest.approx(0.5) and res["n_test"] == 12
    assert res["classifier"].startswith("discriminator")
    # A sign-off on every teacher answer, right before the scored end-of-turn token: trained long enough,
    # the fresh D tells the two sides apart on the held-out half.
    styled = discriminator_distinguishability(str(tiny_model_dir), prompts, [t + " Hope this helps!" for t in texts],
                                              texts, epochs=EPOCHS, lr=LR, batch_size=4)
    assert styled["accuracy"] >= 0.9 and styled["ci_low"] <= styled["accuracy"] <= styled["ci_high"]
