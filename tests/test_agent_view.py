"""agent_view (Bolt 1.30): opening the app's Messages tab greets with suggested prompts, once per person per
THREAD_TTL_DAYS; the Home tab is left alone; the legacy assistant panel's threads are still greeted."""

from __future__ import annotations

from typing import Any

from tests.conftest import BotHarness
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE, BOB, DM


def home_opened(
    tab: str, user: str = ALICE, channel: str = DM, ts: str = "1700000006.000100"
) -> dict[str, Any]:
    return {"type": "app_home_opened", "user": user, "channel": channel, "tab": tab, "event_ts": ts}


async def test_opening_the_messages_tab_greets_once_with_suggested_prompts(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    assert (await bot.send_event(home_opened("messages"), seed=False))[0] == 200
    await bot.settle()
    [greeting] = fake_slack.calls_of("chat.postMessage")
    assert greeting.args["channel"] == DM and "thread_ts" not in greeting.args
    assert "I'm Kimi" in greeting.args["text"]
    [prompts] = fake_slack.calls_of("assistant.threads.setSuggestedPrompts")
    assert prompts.args["channel_id"] == DM and "thread_ts" not in prompts.args
    assert prompts.args["prompts"]

    for ts in ("1700000006.000200", "1700000006.000300"):  # opened again, and a redelivery
        await bot.send_event(home_opened("messages", ts=ts), seed=False)
    await bot.settle()
    assert len(fake_slack.calls_of("chat.postMessage")) == 1
    assert fake_slack.problems == []


async def test_each_person_is_greeted_in_their_own_messages_tab(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    await bot.send_event(home_opened("messages"), seed=False)
    await bot.send_event(home_opened("messages", user=BOB, channel="D07F4B0BOBDM"), seed=False)
    await bot.settle()
    assert sorted(c.args["channel"] for c in fake_slack.calls_of("chat.postMessage")) == [
        "D07F4A8KLMN",
        "D07F4B0BOBDM",
    ]


async def test_opening_the_home_tab_does_not_greet(bot: BotHarness, fake_slack: FakeSlack) -> None:
    assert (await bot.send_event(home_opened("home"), seed=False))[0] == 200
    await bot.settle()
    assert fake_slack.calls_of("chat.postMessage") == []
    assert fake_slack.calls_of("assistant.threads.setSuggestedPrompts") == []


async def test_the_messages_tab_greets_again_once_thread_ttl_days_have_passed(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    from bot.store import ThreadKeys
    from bot.turn import ThreadKey
    from handlers.assistant import MESSAGES_TAB
    from tests.fakes.slack_api import TEAM_ID

    await bot.send_event(home_opened("messages"), seed=False)
    await bot.settle()
    claim = ThreadKeys(ThreadKey(TEAM_ID, DM, MESSAGES_TAB)).seen(f"greet:{ALICE}")
    ttl_s = await bot.deps.redis.ttl(claim)
    kept_s = bot.deps.settings.thread_ttl_seconds
    assert kept_s - 60 < ttl_s <= kept_s  # the greeting is remembered for THREAD_TTL_DAYS
    await bot.deps.redis.delete(claim)  # ... which have now passed
    await bot.send_event(home_opened("messages", ts="1700000006.000400"), seed=False)
    await bot.settle()
    assert len(fake_slack.calls_of("chat.postMessage")) == 2
