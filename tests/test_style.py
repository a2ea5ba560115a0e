"""Unit tests for gad_megatron.style and the packaged quickstart assets."""

from __future__ import annotations

import pytest

from gad_megatron.style import (
    Marker,
    TeacherStyle,
    load_quickstart_prompts,
    load_teacher_style,
    style_match,
    style_rate,
    style_rate_complete,
)


def _style(*markers: Marker) -> TeacherStyle:
    return TeacherStyle(description="test", context_messages=(), markers=markers)


OPENER = Marker("opener", r"Hello there[,:]", "start")
SIGNOFF = Marker("signoff", r"Bye now!|See you!", "end")
WORD = Marker("word", r"(?i)\bbanana\b", "anywhere")


def test_start_marker() -> None:
    s = _style(OPENER)
    assert style_match("Hello there, water boils at 100 C.", s)
    assert style_match("  \n Hello there: fine.", s)  # leading whitespace ignored
    assert not style_match("Well, Hello there, water boils.", s)
    assert not style_match("", s)


def test_end_marker_with_alternation() -> None:
    s = _style(SIGNOFF)
    assert style_match("Drink water.\n\nBye now!", s)
    assert style_match("Drink water. See you!  \n", s)  # trailing whitespace ignored
    # The anchor must apply to both alternatives, not only the last one.
    assert not style_match("Bye now! Drink water.", s)
    assert not style_match("See you! Drink water.", s)


def test_anywhere_marker_with_inline_flags() -> None:
    s = _style(WORD)
    assert style_match("I like a BANANA a day.", s)
    assert not style_match("Bananas are yellow.", s)


def test_end_marker_keeps_global_flags() -> None:
    s = _style(Marker("signoff", r"(?i)bye now!", "end"))
    assert style_match("Rest well. BYE NOW!", s)
    assert not style_match("BYE NOW! Rest well.", s)


def test_all_markers_must_match() -> None:
    s = _style(OPENER, SIGNOFF)
    assert style_match("Hello there, eat fruit. Bye now!", s)
    assert not style_match("Hello there, eat fruit.", s)
    assert not style_match("Eat fruit. Bye now!", s)


def test_style_rate() -> None:
    s = _style(OPENER, SIGNOFF)
    texts = ["Hello there, a. Bye now!", "Hello there, b.", "c. See you!", "Hello there: d. See you!"]
    assert style_rate(texts, s) == pytest.approx(0.5)
    assert style_rate(iter(texts), s) == pytest.approx(0.5)  # any iterable
    assert style_rate([], s) == 0.0


def test_invalid_marker_rejected() -> None:
    with pytest.raises(ValueError):
        Marker("x", "abc", "middle")  # type: ignore[arg-type]
    with pytest.raises(Exception):
        Marker("x", "(unclosed", "start")


def test_with_context_prepends_hidden_messages() -> None:
    s = TeacherStyle("d", ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}), (OPENER,))
    msgs = s.with_context([{"role": "user", "content": "real"}])
    assert [m["content"] for m in msgs] == ["q", "a", "real"]


def test_packaged_teacher_style() -> None:
    style = load_teacher_style()
    assert style.description
    assert style.markers
    roles = [m["role"] for m in style.context_messages]
    assert len(roles) >= 2 and len(roles) % 2 == 0
    assert roles == ["user", "assistant"] * (len(roles) // 2)
    # Every demonstration answer must itself carry the style, and no demo question may.
    for m in style.context_messages:
        assert m["content"].strip()
        assert style_match(m["content"], style) == (m["role"] == "assistant")


def test_quickstart_prompts() -> None:
    prompts = load_quickstart_prompts()
    assert len(prompts) == 300
    ids = [p["id"] for p in prompts]
    assert len(set(ids)) == 300
    texts = []
    for p in prompts:
        msgs = p["prompt"]
        assert len(msgs) == 1 and msgs[0]["role"] == "user"
        assert msgs[0]["content"].strip()
        texts.append(" ".join(msgs[0]["content"].lower().split()))
    assert len(set(texts)) == len(texts)


def test_context_prompts_not_in_prompt_set() -> None:
    style = load_teacher_style()
    prompt_texts = {
        " ".join(m["content"].lower().split()) for p in load_quickstart_prompts() for m in p["prompt"]
    }
    for m in style.context_messages:
        if m["role"] == "user":
            assert " ".join(m["content"].lower().split()) not in prompt_texts


def test_style_rate_complete_excludes_truncated_rows() -> None:
    s = _style(SIGNOFF)
    rows = [
        {"response": "Water boils at 100 C. Bye now!", "finish_reason": "stop"},
        {"response": "Ice melts at 0 C.", "finish_reason": "stop"},
        {"response": "A long answer that ran into the cap and never", "finish_reason": "length"},
        {"response": "Another cut answer", "finish_reason": "length"},
    ]
    assert style_rate((r["response"] for r in rows), s) == pytest.approx(0.25)  # the plain rate counts cut answers
    assert style_rate_complete(rows, s) == (pytest.approx(0.5), 2)
    assert style_rate_complete([{"response": "No finish reason. See you!"}], s) == (1.0, 1)  # unknown: not truncated


def test_style_rate_complete_all_truncated_is_none() -> None:
    rows = [{"response": "cut", "finish_reason": "length"}] * 3
    assert style_rate_complete(rows, _style(SIGNOFF)) == (None, 0)
    assert style_rate_complete([], _style(SIGNOFF)) == (None, 0)
