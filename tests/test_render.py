"""Splitting answers for Slack: within limits, never inside a code fence (pure)."""

from __future__ import annotations

import re

from bot.slack.render import MARKDOWN_TEXT_LIMIT, footer, split_markdown, units


def fences_balanced(piece: str) -> bool:
    return len(re.findall(r"^```", piece, flags=re.M)) % 2 == 0


def test_short_answers_stay_whole() -> None:
    assert split_markdown("Hello **world**") == ["Hello **world**"]


def test_a_60000_char_answer_is_split_at_paragraphs_within_limits_and_nothing_is_lost() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 120 for i in range(100)]
    text = "\n\n".join(paragraphs)
    assert len(text) > 60_000
    pieces = split_markdown(text)
    assert len(pieces) >= 5
    assert all(len(p) <= MARKDOWN_TEXT_LIMIT for p in pieces)
    assert "\n\n".join(pieces) == text  # split only at paragraph boundaries


def test_code_fences_are_never_split_inside_unless_reopened_with_their_language() -> None:
    code = "\n".join(f"print({i})  # line {i}" for i in range(1500))
    text = "Intro\n\n```python\n" + code + "\n```\n\nOutro"
    pieces = split_markdown(text, limit=5_000)
    assert all(len(p) <= 5_000 for p in pieces)
    assert all(fences_balanced(p) for p in pieces)
    middle = [p for p in pieces if "print(" in p]
    assert len(middle) > 1
    assert all(re.search(r"^```python$", p, flags=re.M) for p in middle)  # each reopened with its language
    recovered = "\n".join(line for p in pieces for line in p.splitlines() if line.startswith("print("))
    assert recovered == code


def test_blank_lines_inside_a_fence_do_not_break_it() -> None:
    text = "```\na\n\nb\n```\n\nafter"
    assert [u.fence for u in units(text)] == ["```", ""]


def test_an_unclosed_fence_is_closed() -> None:
    pieces = split_markdown("```js\nconsole.log(1)")
    assert pieces == ["```js\nconsole.log(1)\n```"]


def test_a_huge_line_without_spaces_is_hard_split() -> None:
    pieces = split_markdown("x" * 25_000, limit=10_000)
    assert [len(p) for p in pieces] == [10_000, 10_000, 5_000]


def test_footer_names_model_time_tokens_and_left_out_turns() -> None:
    line = footer("kimi-k2.6", 12.34, 1500, 300, left_out=4)
    assert (
        "kimi-k2.6" in line
        and "12.3s" in line
        and "1,500 in" in line
        and "4 earlier messages left out" in line
    )
