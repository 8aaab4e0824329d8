"""Nothing the bot posts pings a channel, `here`, everyone or a user group, whoever wrote the text
(Kimi, text injected into the thread, the asker of /kimi), and however Kimi's stream is chunked."""

from __future__ import annotations

import json
import re

import pytest

from bot.slack.render import WORD_JOINER
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE, CHANNEL, mention

PINGS = re.compile(r"<!(channel|here|everyone|group|subteam)|(?<!\w)@(channel|here|everyone)", re.I)
HOSTILE = (
    "Heads up <!channel>: done. Also <!here|here>, <!subteam^S0614TZR7|@oncall> and @everyone. "
    f"Ask <@{ALICE}> in <#C06H4T2MZ8R>."
)
LONG_HOSTILE = "\n\n".join(f"Paragraph {i}: lorem ipsum dolor sit amet. {HOSTILE}" for i in range(30))


def everything_sent(fake_slack: FakeSlack) -> str:
    """Every argument of every Web API call, response_url reply and ephemeral, as one string."""
    calls = [{k: v for k, v in c.args.items() if k not in ("_result", "token")} for c in fake_slack.calls]
    return json.dumps([calls, fake_slack.responses, fake_slack.ephemerals], ensure_ascii=False)


def assert_nothing_pings(fake_slack: FakeSlack) -> None:
    sent = everything_sent(fake_slack)
    found = PINGS.search(sent)
    assert found is None, sent[max(0, found.start() - 80) : found.end() + 80]


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        (Reply(content=HOSTILE, chunk_chars=12), "short answer, one edit"),
        (Reply(content=HOSTILE, chunk_chars=1, chunk_delay=0.002), "one character per chunk"),
        (Reply(content=LONG_HOSTILE, chunk_chars=7, chunk_delay=0.001), "long answer, streamed"),
    ],
    ids=["short", "char-by-char", "streamed"],
)
async def test_broadcasts_from_kimi_split_across_chunks_never_reach_slack(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, reply: Reply, label: str
) -> None:
    assert "<!chan" in HOSTILE[: 12 * 2] and HOSTILE.index("<!channel>") % 12 > 0  # a chunk ends inside it
    fake_kimi.script(reply)
    ts = "1700000040.000100"
    await bot.send_event(mention("summarise the thread", ts))
    await bot.settle()
    assert_nothing_pings(fake_slack)
    answer = "".join(fake_slack.answer_parts(CHANNEL, ts))
    expected = reply.content if isinstance(reply.content, str) else ""
    assert answer.count(f"@{WORD_JOINER}channel") == expected.count("<!channel>"), label  # nothing lost
    assert f"<@{ALICE}>" in answer and "<#C06H4T2MZ8R>" in answer  # real mentions and links still work
    assert f"@{WORD_JOINER}oncall" in answer
    if len(expected) > bot.deps.pace.update_message_chars:
        assert fake_slack.calls_of("chat.appendStream"), "the long answer did not stream"
    assert fake_slack.problems == []


async def test_broadcasts_survive_no_fallback_post_and_update(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_slack.fail("chat.startStream", "not_allowed_token_type", times=50)  # streaming unavailable
    fake_kimi.script(Reply(content=LONG_HOSTILE, chunk_chars=9, chunk_delay=0.001))
    ts = "1700000040.000200"
    await bot.send_event(mention("again", ts))
    await bot.settle()
    assert fake_slack.calls_of("chat.update")
    assert_nothing_pings(fake_slack)
    assert "".join(fake_slack.answer_parts(CHANNEL, ts)).count("Paragraph") == 30


async def test_kimi_command_does_not_let_the_asker_ping_the_channel(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    """The "@user asked: …" announcement and the answer (which echoes the question) are both posted
    by the bot: a user who may not @channel must not be able to do it through the bot."""
    await bot.command("<!channel> is this on? @here <!subteam^S1|@everyone-team>")
    await bot.settle()
    asked = [p for p in fake_slack.posts(CHANNEL) if "thread_ts" not in p]
    assert len(asked) == 1 and asked[0]["text"].startswith(f"<@{ALICE}> asked: @{WORD_JOINER}channel")
    assert fake_slack.bodies(CHANNEL, asked[0]["_result"]["ts"])  # answered in its thread
    assert_nothing_pings(fake_slack)


async def test_private_answers_through_response_url_are_neutralised_too(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_slack.not_member_of.add("C0PRIVATE1")
    fake_kimi.script(Reply(content=HOSTILE, chunk_chars=5))
    await bot.command("tell everyone", channel="C0PRIVATE1")
    await bot.settle()
    assert len(fake_slack.responses) == 1
    assert f"@{WORD_JOINER}channel" in fake_slack.responses[0]["blocks"][0]["text"]
    assert_nothing_pings(fake_slack)
