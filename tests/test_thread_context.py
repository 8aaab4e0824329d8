"""Thread context: backfill when joining a thread, survival across restarts, and window fitting."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import BOT_ID, BOT_USER_ID, FakeSlack
from tests.slack_requests import ALICE, BOB, CHANNEL, mention, message, thread_key


async def test_first_mention_inside_an_existing_thread_backfills_its_messages(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = fake_slack.seed(CHANNEL, user=BOB, text="Our deploy failed at step 3")
    fake_slack.seed(CHANNEL, user=ALICE, text="Logs say OOM", thread_ts=root)
    fake_slack.seed(
        CHANNEL,
        user="U0GHOST",
        bot_id="B0CI",
        text="CI: build #12 red",
        thread_ts=root,
        subtype="bot_message",
        username="ci-bot",
    )
    fake_slack.seed(CHANNEL, user=BOB, text="has joined", thread_ts=root, subtype="channel_join")
    ts = fake_slack.new_ts()
    await bot.send_event(mention("what should we try?", ts, thread_ts=root, user=BOB))
    await bot.settle()
    assert len(fake_slack.calls_of("conversations.replies")) == 1
    contents = [m["content"] for m in fake_kimi.requests[0]["messages"][1:]]
    assert contents == [
        "bob: Our deploy failed at step 3",
        "alice: Logs say OOM",
        "ci-bot (bot): CI: build #12 red",
        "bob: what should we try?",
    ]
    assert len(fake_slack.bodies(CHANNEL, root)) == 1
    # Second turn: from Redis, no second backfill.
    await bot.send_event(message("and then?", fake_slack.new_ts(), thread_ts=root))
    await bot.settle()
    assert len(fake_slack.calls_of("conversations.replies")) == 1
    assert fake_slack.problems == []


async def test_backfill_keeps_the_bots_own_earlier_replies_as_assistant_turns(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = fake_slack.seed(CHANNEL, user=ALICE, text="first question")
    fake_slack.seed(CHANNEL, user=BOT_USER_ID, bot_id=BOT_ID, text="an old answer", thread_ts=root)
    await bot.send_event(mention("follow-up after the TTL", fake_slack.new_ts(), thread_ts=root))
    await bot.settle()
    roles = [(m["role"], m["content"]) for m in fake_kimi.requests[0]["messages"][1:]]
    assert roles == [
        ("user", "alice: first question"),
        ("assistant", "an old answer"),
        ("user", "alice: follow-up after the TTL"),
    ]


async def test_backfill_failure_still_answers(bot: BotHarness, fake_slack: FakeSlack) -> None:
    root = fake_slack.seed(CHANNEL, user=ALICE, text="hidden history")
    fake_slack.fail("conversations.replies", "missing_scope")
    await bot.send_event(mention("hello", fake_slack.new_ts(), thread_ts=root))
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, root)) == 1


async def test_context_survives_a_restart(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    first: BotHarness = await make_bot()
    root = "1700000003.000100"
    await first.send_event(mention("My name is Ada.", root))
    await first.settle()
    await first.stop()
    second: BotHarness = await make_bot()
    await second.send_event(message("What is my name?", "1700000003.000101", thread_ts=root))
    await second.settle()
    contents = [m["content"] for m in fake_kimi.requests[-1]["messages"]]
    assert "alice: My name is Ada." in contents
    assert len(fake_slack.bodies(CHANNEL, root)) == 2
    assert not fake_slack.calls_of("conversations.replies")


async def test_thread_history_expires_after_the_ttl_setting(bot: BotHarness) -> None:
    await bot.send_event(mention("hi", "1700000003.000200"))
    await bot.settle()
    ttl = await bot.deps.redis.ttl(bot.deps.threads.history_key(thread_key("1700000003.000200")))
    assert 29 * 86_400 < ttl <= 30 * 86_400


async def test_long_threads_summarise_the_oldest_turns_and_say_so(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    # An unknown model (128k window) with a 120k output budget leaves ~8k tokens for the prompt.
    # (tests/test_compaction.py has the details, and the fallback to leaving turns out.)
    small: BotHarness = await make_bot(kimi_model="mystery-model", kimi_max_completion_tokens=120_000)
    root = "1700000003.000300"
    await small.send_event(mention("start " + "a" * 6_000, root))
    await small.settle()
    for i in range(1, 6):
        await small.send_event(message(f"more {i} " + "b" * 6_000, f"1700000003.00030{i}", thread_ts=root))
        await small.settle()
    last = fake_slack.bodies(CHANNEL, root)[-1]
    assert re.search(r"\d+ earlier messages? summarised to fit the context window", last)
    sent = fake_kimi.requests[-1]["messages"]
    assert sent[-1]["content"].startswith("alice: more 5")
    assert sent[1]["content"].startswith("Summary of the earlier conversation")
    assert sent[2]["role"] == "user"
    assert len(sent) < 1 + 11


async def test_a_message_too_big_for_the_window_gets_a_clear_answer_not_an_api_error(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    small: BotHarness = await make_bot(kimi_model="mystery-model", kimi_max_completion_tokens=120_000)
    await small.send_event(mention("z" * 39_000, "1700000003.000400"))
    await small.settle()
    texts = fake_slack.bodies(CHANNEL, "1700000003.000400")
    assert len(texts) == 1 and "too long for the model's context window" in texts[0]
    assert fake_kimi.requests == []


async def test_a_60000_char_answer_is_delivered_complete_in_several_valid_messages(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    answer = "\n\n".join(
        f"Section {i}\n\n```python\n" + "\n".join(f"x_{i}_{j} = {j}" for j in range(80)) + "\n```"
        for i in range(60)
    )
    assert len(answer) > 60_000
    fake_kimi.script(Reply(content=answer, chunk_chars=2_000))
    await bot.send_event(mention("write a lot", "1700000003.000500"))
    await bot.settle()
    assert fake_slack.problems == []
    parts = fake_slack.answer_parts(CHANNEL, "1700000003.000500")
    assert len(parts) >= 5
    assert all(len(part) <= 12_000 and part.count("```") % 2 == 0 for part in parts)  # fences closed/reopened
    delivered = "".join(parts)
    expected_lines = [line for line in answer.splitlines() if line.startswith(("x_", "Section"))]
    assert [line for line in delivered.splitlines() if line.startswith(("x_", "Section"))] == expected_lines
    footer = fake_slack.bodies(CHANNEL, "1700000003.000500")[-1]
    assert "kimi-k2.6" in footer


async def test_usage_is_recorded_per_team_and_day(bot: BotHarness, fake_kimi: FakeKimi) -> None:
    import datetime as dt

    from tests.fakes.slack_api import TEAM_ID

    fake_kimi.script(Reply(cached_tokens=5))
    await bot.send_event(mention("count me", "1700000003.000600"))
    await bot.settle()
    usage = await bot.deps.usage.day(TEAM_ID, dt.datetime.now(dt.UTC).date())
    assert usage["turns"] == "1" and int(usage["prompt_tokens"]) > 0 and usage["cached_tokens"] == "5"
    assert float(usage["cost_usd"]) > 0


async def test_a_thread_switched_from_k3_to_k2_6_does_not_resend_k3s_reasoning(
    bot: BotHarness, fake_kimi: FakeKimi
) -> None:
    team = thread_key("1").team_id
    await bot.deps.channel_settings.save(team, CHANNEL, {"model": "kimi-k3"}, ALICE)
    fake_kimi.script(Reply(reasoning="K3's long private reasoning.", content="K3's answer."))
    root = "1700000950.000100"
    await bot.send_event(mention("first", root))
    await bot.settle()
    await bot.deps.channel_settings.save(team, CHANNEL, {"model": "kimi-k2.6"}, ALICE)
    await bot.send_event(message("second", "1700000950.000200", thread_ts=root))
    await bot.settle()
    assert fake_kimi.requests[1]["model"] == "kimi-k2.6"
    answers = [m for m in fake_kimi.requests[1]["messages"] if m["role"] == "assistant"]
    assert answers and answers[0]["content"].startswith("K3's answer")
    assert "reasoning_content" not in answers[0]  # kimi-k2.6 ignores earlier turns' reasoning
