"""Mentions, thread follow-ups, DMs: exactly one threaded answer per user message, with context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import BOT_ID, BOT_USER_ID, FakeSlack
from tests.slack_requests import BOB, CHANNEL, DM, mention, message, thread_key


async def test_mention_gets_one_threaded_answer_with_reasoning_stored(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    status, _ = await bot.send_event(mention("What is Redis?", "1700000000.000100"))
    assert status == 200
    await bot.settle()
    posts = fake_slack.bodies(CHANNEL, "1700000000.000100")
    assert len(posts) == 1
    assert "You said: alice: What is Redis?" in posts[0]
    assert "kimi-k2.6" in posts[0]  # footer
    request = fake_kimi.requests[0]
    assert request["messages"][0]["role"] == "system"
    assert request["thinking"] == {"type": "enabled"}  # kimi-k2.6: extra_body merged into the JSON body
    assert "temperature" not in request and "top_p" not in request
    assert request["max_completion_tokens"] > 0 and request["stream"] is True
    state = await bot.deps.threads.load(thread_key("1700000000.000100"))
    entries, meta = state.entries, state.meta
    assert [e["role"] for e in entries] == ["user", "assistant"]
    # kimi-k2.6 ignores earlier turns' reasoning: it is kept with the turn's details (Show reasoning), not
    # in the history every later turn reads and sends.
    assert "reasoning_content" not in entries[1]
    details = await bot.deps.threads.turn_details(thread_key("1700000000.000100"), "1700000000.000100")
    assert details is not None and details["reasoning"] == "Let me think about this carefully."
    assert meta["answered"] == "1"
    assert fake_slack.problems == []


async def test_mention_and_message_twins_and_retries_get_one_answer(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    ts = "1700000000.000200"
    mention_event = mention("hello there", ts)
    twin = message(f"<@{BOT_USER_ID}> hello there", ts)
    assert (await bot.send_event(mention_event, event_id="EvA"))[0] == 200
    assert (await bot.send_event(twin, event_id="EvB"))[0] == 200
    assert (await bot.send_event(mention_event, event_id="EvA", retry_num=1))[0] == 200
    assert (await bot.send_event(twin, event_id="EvB", retry_num=2))[0] == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, ts)) == 1


async def test_follow_up_in_thread_sees_earlier_turns_without_a_mention(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000000.000300"
    await bot.send_event(mention("Remember the number 42.", root))
    await bot.settle()
    await bot.send_event(message("What number did I say?", "1700000000.000301", thread_ts=root, user=BOB))
    await bot.settle()
    posts = fake_slack.bodies(CHANNEL, root)
    assert len(posts) == 2
    second = fake_kimi.requests[1]["messages"]
    contents = [m["content"] for m in second]
    assert "alice: Remember the number 42." in contents
    assert contents[-1] == "bob: What number did I say?"
    assistant = [m for m in second if m["role"] == "assistant"]
    assert assistant and assistant[0]["content"].startswith("You said: alice: Remember the number 42.")
    assert "reasoning_content" not in assistant[0]  # kimi-k2.6 ignores it; the history keeps it out


async def test_models_trained_with_preserved_thinking_get_earlier_reasoning_back_whole(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(kimi_model="kimi-k3")
    root = "1700000000.000310"
    await bot.send_event(mention("Remember the number 42.", root))
    await bot.settle()
    await bot.send_event(message("What number did I say?", "1700000000.000311", thread_ts=root, user=BOB))
    await bot.settle()
    assistant = [m for m in fake_kimi.requests[1]["messages"] if m["role"] == "assistant"]
    assert assistant and assistant[0]["reasoning_content"] == "Let me think about this carefully."


async def test_messages_in_threads_the_bot_never_joined_are_ignored(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    root = fake_slack.seed(CHANNEL, user=BOB, text="team chat")
    await bot.send_event(message("just people talking", "1700000000.000401", thread_ts=root))
    await bot.send_event(message("top-level chatter", "1700000000.000402"))
    await bot.settle()
    assert fake_slack.posts() == []


async def test_dm_is_answered_in_its_thread(bot: BotHarness, fake_slack: FakeSlack) -> None:
    ts = "1700000000.000500"
    await bot.send_event(message("hi in private", ts, channel=DM, channel_type="im"))
    await bot.settle()
    posts = fake_slack.bodies(DM, ts)
    assert len(posts) == 1 and "hi in private" in posts[0]


async def test_other_bots_edits_and_own_messages_are_ignored(bot: BotHarness, fake_slack: FakeSlack) -> None:
    root = "1700000000.000600"
    await bot.send_event(mention("start", root))
    await bot.settle()
    before = len(fake_slack.posts())
    events = [
        # a classic integration bot in our thread
        {
            "type": "message",
            "subtype": "bot_message",
            "bot_id": "B999",
            "text": "beep",
            "ts": "1700000000.000601",
            "channel": CHANNEL,
            "thread_ts": root,
            "channel_type": "channel",
        },
        # another Slack app's bot user mentioning us
        {**mention("ping", "1700000000.000602", thread_ts=root), "bot_id": "B998", "user": "U0OTHERBOT"},
        # our own reply echoed back
        {
            **message("my own words", "1700000000.000603", thread_ts=root),
            "user": BOT_USER_ID,
            "bot_id": BOT_ID,
        },
        # an edit of a user message
        {
            "type": "message",
            "subtype": "message_changed",
            "hidden": True,
            "channel": CHANNEL,
            "ts": "1700000000.000604",
            "channel_type": "channel",
            "message": {
                "type": "message",
                "user": BOB,
                "text": "edited",
                "ts": root,
                "edited": {"user": BOB, "ts": "1700000000.000604"},
            },
        },
        # a deletion
        {
            "type": "message",
            "subtype": "message_deleted",
            "hidden": True,
            "channel": CHANNEL,
            "ts": "1700000000.000605",
            "deleted_ts": root,
            "channel_type": "channel",
        },
        # someone joining
        {**message("has joined", "1700000000.000606"), "subtype": "channel_join"},
    ]
    for event in events:
        status, _ = await bot.send_event(event, seed=False)
        assert status == 200
    await bot.settle()
    assert len(fake_slack.posts()) == before


async def test_two_questions_in_one_thread_are_answered_in_order_and_the_second_sees_the_first(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from tests.fakes.kimi_api import Reply

    root = "1700000000.000700"
    fake_kimi.script(Reply(content="first answer", chunk_delay=0.05), Reply(content="second answer"))
    await bot.send_event(mention("first", root))
    await bot.send_event(message("second", "1700000000.000701", thread_ts=root, user=BOB))
    await bot.settle()
    # The follow-up only counts once the thread is engaged; it was sent while the first answer ran.
    # The answers' own text, whether an answer replaced its placeholder or streamed below it.
    assert fake_slack.answer_parts(CHANNEL, root) == ["first answer", "second answer"]
    second = fake_kimi.requests[1]["messages"]
    assert [m["content"] for m in second[1:]] == ["alice: first", "first answer", "bob: second"]


async def test_questions_in_different_threads_run_in_parallel(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from tests.fakes.kimi_api import Reply

    fake_kimi.script(*[Reply(content="slow", first_byte_delay=2.0) for _ in range(4)])
    for i in range(4):
        await bot.send_event(mention(f"q{i}", f"1700000000.00080{i}"))
    await bot.settle()
    # Four 2 s answers at once, not one after another: every request was sent before the first one ended.
    assert len(fake_kimi.request_times) == 4 and len(fake_kimi.finished) == 4
    assert max(fake_kimi.request_times) < min(fake_kimi.finished.values())
    assert len(fake_slack.posts(CHANNEL)) == 4
