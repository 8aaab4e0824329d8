"""Review of the merged `shortcuts` branch: failing tests that show the findings."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

import bot.pipeline as pipeline
import handlers.shortcuts as hs
from bot.pipeline import recover_orphans, stop_value
from bot.shortcuts import SUMMARY, announce_in_thread, announcement
from bot.slack.blocks import ACTION_STOP
from bot.store import ShortcutMessages
from bot.turn import Source, Turn
from handlers.shortcuts import ASK_ABOUT_MESSAGE, SUMMARIZE_THREAD
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import BOT_ID, BOT_USER_ID, TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, BOB, CHANNEL
from tests.test_shortcuts import kimi_saw, seeded, shortcut_payload


async def test_a_rerun_answer_in_the_thread_does_not_take_back_a_shortcuts_asked_post(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    """F1: a dead run's re-run (recover_orphans) adopts every later bot message in the thread as its own
    partial answer and chat.deletes it; the shortcut job posts its "asked" line into that same thread from
    another queue, so it is taken for that partial answer."""
    root = "1700000600.000100"
    fake_slack.seed(CHANNEL, user=ALICE, text="<@U07F3N1BOTX> plan the launch", ts=root)
    turn = Turn(Source.MENTION, TEAM_ID, CHANNEL, ALICE, "plan the launch", ts=root, thread_ts=root)
    # The dead run's placeholder (it carries this turn's Stop button) ...
    placeholder = fake_slack.seed(
        CHANNEL,
        user=BOT_USER_ID,
        bot_id=BOT_ID,
        text="Thinking…",
        thread_ts=root,
        blocks=[{"type": "actions", "elements": [{"action_id": ACTION_STOP, "value": stop_value(turn)}]}],
    )
    # ... then, while the job waits for its lease to lapse, Bob uses "Summarize thread" on it.
    asked = await announce_in_thread(bot.deps, CHANNEL, root, announcement(SUMMARY, BOB, ""), "trigger-1")
    assert asked is not None and float(asked) > float(placeholder)
    recovered = await recover_orphans(bot.deps, turn, {"started": "1", "placeholder_ts": placeholder})
    assert asked not in json.loads(recovered.get("answer_ts") or "[]")  # FAILS: it would be chat.deleted


async def test_summarize_a_thread_longer_than_the_read_limit_sees_its_newest_messages(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F2: THREAD_READ_LIMIT keeps the thread's first messages (conversations.replies is oldest first), so
    a thread longer than it is summarised without its latest part."""
    monkeypatch.setattr(pipeline, "THREAD_READ_LIMIT", 5)
    root = "1700000601.000100"
    fake_slack.seed(CHANNEL, user=ALICE, text="kick-off", ts=root)
    for i in range(1, 9):
        ts = f"1700000601.00010{i}"
        fake_slack.seed(CHANNEL, user=BOB, text=f"reply number {i}", ts=ts, thread_ts=root)
    target = fake_slack.find(CHANNEL, root)
    assert target is not None
    await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, {**target}))
    await bot.settle()
    assert "reply number 8" in kimi_saw(fake_kimi)  # FAILS: only kick-off .. reply 4 were read


async def test_summarize_when_slack_cannot_read_the_thread_does_not_summarise_nothing(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """F3: backfill() swallows every error and returns []; for a summary that is the whole input, so Kimi
    is asked to summarise an empty thread and the answer ("nothing to summarize") is posted as done."""
    root = "1700000602.000100"
    target = seeded(fake_slack, root, user=ALICE, text="We ship on Friday")
    fake_slack.seed(CHANNEL, user=BOB, text="Agreed, Friday", ts="1700000602.000200", thread_ts=root)
    fake_slack.fail("conversations.replies", "internal_error", times=20)
    await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    await bot.settle()
    assert fake_kimi.requests == [] or "Agreed, Friday" in kimi_saw(fake_kimi)  # FAILS


async def test_ask_form_is_acked_within_3_s_when_redis_is_slow(
    bot: BotHarness, fake_slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F4: the stash write sits outside OPEN_DEADLINE_S: Slack at its 1 s check plus Redis near its 2 s
    socket timeout holds the ack (process_before_response) past 3 s."""
    real_put = ShortcutMessages.put

    async def slow_put(self: ShortcutMessages, token: str, message: dict[str, Any]) -> None:
        await asyncio.sleep(1.9)  # a Redis answering just inside SOCKET_TIMEOUT_S
        await real_put(self, token, message)

    async def slow_info(deps: Any, channel: str) -> bool:
        await asyncio.sleep(hs.ACCESS_CHECK_S)  # conversations.info at its bound
        return False

    monkeypatch.setattr(ShortcutMessages, "put", slow_put)
    monkeypatch.setattr(hs, "_bot_absent", slow_info)
    target = seeded(fake_slack, "1700000603.000100", user=BOB, text="hello")
    started = time.monotonic()
    status, _ = await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, target))
    assert status == 200
    assert time.monotonic() - started < 2.5  # FAILS: ~2.9 s, plus Slack's network time


async def test_a_rerun_that_cannot_search_the_thread_does_not_post_the_asked_line_twice(
    make_bot: Any, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """F5: find_in_thread() answers None on any SlackApiError, and None means "never posted": one failed
    conversations.replies (rate limited, internal_error) after a kill -9 between the post and its note
    posts the "asked" line a second time."""
    from tests.test_shortcuts import announcements

    root = "1700000604.000100"
    target = seeded(fake_slack, root, user=BOB, text="A long debate")
    paused: BotHarness = await make_bot(start_worker=False)
    await paused.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    [(thread, score)] = await paused.deps.queue.due(5)
    dead = await paused.deps.queue.claim(thread, score)
    assert dead is not None
    job = await dead.next_job()
    assert job is not None and not isinstance(job, str)
    await dead.save_progress(job, announcing="1")
    await announce_in_thread(paused.deps, CHANNEL, root, announcement(SUMMARY, ALICE, ""), job.data["key"])
    await paused.deps.redis.delete(f"kimibot:thread:{{{thread}}}:lease")
    fake_slack.fail("conversations.replies", "internal_error")  # the re-run's one search fails
    await paused.deps.queue.notify(thread)
    paused.run_worker()
    await paused.settle()
    assert len(announcements(fake_slack, root)) == 1  # FAILS: 2
