"""Splitting answers for Slack: within limits, never inside a code fence (pure)."""

from __future__ import annotations

import random
import re

import pytest

from bot.slack.render import (
    MARKDOWN_TEXT_LIMIT,
    WORD_JOINER,
    BroadcastGuard,
    footer,
    neutralise_broadcasts,
    neutralise_fields,
    split_markdown,
    units,
)

# What would ping a channel, a group or everyone if Slack received it.
PINGS = re.compile(r"<!(channel|here|everyone|group|subteam)|(?<!\w)@(channel|here|everyone)", re.I)


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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<!channel> look", "@⁠channel look"),
        ("<!here>", "@⁠here"),
        ("<!here|here> and <!channel|@channel>", "@⁠here and @⁠channel"),
        ("<!everyone>!", "@⁠everyone!"),
        ("<!group>", "@⁠channel"),
        ("<!subteam^S0614TZR7|@platform-team> please", "@⁠platform-team please"),
        ("<!subteam^S0614TZR7>", "@⁠group"),
        ("@here, @channel and @Everyone", "@⁠here, @⁠channel and @⁠Everyone"),
        ("<!HERE>", "@⁠HERE"),
    ],
)
def test_broadcast_mentions_become_harmless_text(text: str, expected: str) -> None:
    assert neutralise_broadcasts(text) == expected
    assert not PINGS.search(neutralise_broadcasts(text))
    assert neutralise_broadcasts(expected) == expected  # applying it twice changes nothing


@pytest.mark.parametrize(
    "text",
    [
        "<@U04RZ8N2PQM> asked in <#C06H4T2MZ8R|general>",
        "write to ops@here.example or admin@channel.io",
        "<!date^1392734382^{date_short}|Feb 18, 2014>",
        "a < b and c > d; if (x<!y) return",
        "```\nplain code\n```",
    ],
)
def test_user_mentions_channel_links_emails_and_dates_are_left_alone(text: str) -> None:
    assert neutralise_broadcasts(text) == text


STREAMED = (
    "Heads up <!channel>: the deploy is done. <!here|here> ping <!subteam^S1|@oncall> and @everyone; "
    "mail ops@here.example, ask <@U04RZ8N2PQM> in <#C06H4T2MZ8R>. x < y, <b>, <!date^1|d> @ @h @her @here"
)


@pytest.mark.parametrize("seed", range(40))
def test_streamed_text_is_neutralised_whatever_the_chunk_boundaries(seed: int) -> None:
    """Cut the same text into random pieces: what the guard lets out, piece by piece, adds up to
    exactly the whole text neutralised, and no prefix of it ever holds a broadcast."""
    rng = random.Random(seed)
    guard, out = BroadcastGuard(), ""
    rest = STREAMED
    while rest:
        size = rng.randint(1, 9)
        out += guard.feed(rest[:size])
        rest = rest[size:]
        assert not PINGS.search(out), out
    out += guard.flush()
    assert out == neutralise_broadcasts(STREAMED)
    assert "<@U04RZ8N2PQM>" in out and "<#C06H4T2MZ8R>" in out


def test_a_piece_ending_in_half_a_broadcast_is_held_until_the_next_piece() -> None:
    guard = BroadcastGuard()
    assert guard.feed("Everyone look <!he") == "Everyone look "
    assert guard.feed("re> now") == f"@{WORD_JOINER}here now"
    assert guard.feed(" mail @") == " mail "
    assert guard.feed("ever") == ""
    assert guard.flush() == "@ever"  # the text ended: what was held goes out, it was no broadcast


def test_payload_fields_people_read_are_neutralised_and_ids_are_not() -> None:
    payload = {
        "channel": "C06H4T2MZ8R",
        "text": "<!here> done",
        "markdown_text": "@channel",
        "blocks": [
            {"type": "markdown", "text": "<!everyone>"},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "<!subteam^S1|@ops>"}]},
            {"type": "actions", "elements": [{"type": "button", "value": "<!here>", "action_id": "a"}]},
        ],
        "loading_messages": ["@here thinking"],
    }
    clean = neutralise_fields(payload)
    assert not PINGS.search(str({k: v for k, v in clean.items() if k != "blocks"}))
    assert clean["blocks"][0]["text"] == f"@{WORD_JOINER}everyone"
    assert clean["blocks"][1]["elements"][0]["text"] == f"@{WORD_JOINER}ops"
    assert clean["blocks"][2]["elements"][0]["value"] == "<!here>"  # a button's value is data, not text
    assert clean["channel"] == "C06H4T2MZ8R"


def test_cuts_prefer_sentence_ends_then_word_ends_never_mid_word() -> None:
    from bot.slack.render import cut_point, fitting_cut, sentence_cut, whole_words

    text = "One sentence here. Another one follows, and it runs on for a while without any end"
    assert text[: fitting_cut(text, 40)] == "One sentence here. "  # no line end: the last sentence end
    assert fitting_cut("no sentence ends here at all", 10) == 0  # else the next message
    assert text[: cut_point(text, 30)] == "One sentence here. "  # a sentence end in the second half
    assert text[: cut_point(text, 40)] == "One sentence here. Another one follows, "  # else a word end
    assert text[: cut_point(text, 70)].endswith("a while ")  # no sentence end in the second half: a word end
    assert sentence_cut("Done! “Quoted.” Next", 0, 20) == len("Done! “Quoted.” ")  # closing quotes stay
    assert cut_point("a" * 50, 20) == 20  # one "word" longer than half a message: a hard cut
    assert whole_words("streaming text stops mid-wo", 200) == len("streaming text stops ")
    assert whole_words("partword", 200) == 0  # nothing whole yet
    assert whole_words("x" * 300, 200) == 300  # a part-word too long to hold back
    assert whole_words("line\n" + "y" * 250, 200) == len("line\n") + 250


def test_a_paragraph_longer_than_a_message_is_packed_at_sentence_ends() -> None:
    from bot.slack.render import split_markdown

    sentence = "Sed ut perspiciatis unde omnis iste natus error sit voluptatem accusantium doloremque. "
    pieces = split_markdown(sentence * 400, limit=3_000)
    assert len(pieces) > 5 and all(len(p) <= 3_000 for p in pieces)
    assert all(p.endswith("doloremque.") for p in pieces[:-1])
    assert " ".join(pieces).split() == (sentence * 400).split()


def test_chinese_and_japanese_text_streams_without_waiting_for_spaces() -> None:
    from bot.slack.render import cut_point, whole_words

    chinese = "这是第一句话。这是第二句话，还没有写完"
    assert whole_words(chinese, 200) == len(chinese)  # any CJK character ends a "word"
    assert whole_words("混合 text mid-wo", 200) == len("混合 text ")
    text = "第一句。" * 30
    assert text[: cut_point(text, 50)].endswith("。")  # full stops take no space after them
