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


def test_message_cuts_prefer_paragraphs_then_lines_and_never_split_a_line_when_appending() -> None:
    from bot.slack.render import close_fence, cut_point, fitting_cut

    text = "first paragraph\n\nsecond line one\nsecond line two"
    assert fitting_cut(text, 100) == len(text)  # fits whole
    assert text[: fitting_cut(text, 30)] == "first paragraph\n\n"  # a paragraph end before a later line end
    assert "one\ntwo\nthree"[: fitting_cut("one\ntwo\nthree", 9)] == "one\ntwo\n"  # else the last line end
    assert fitting_cut("no line ends here at all", 10) == 0  # better to start the next message
    assert fitting_cut(text, 0) == 0
    assert text[: cut_point(text, 20)] == "first paragraph\n\n"
    assert cut_point("x" * 50, 20) == 20  # no boundary: a hard cut, as a last resort
    assert close_fence("code\n", "```") == "```" and close_fence("code", "```") == "\n```"
