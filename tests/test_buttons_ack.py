"""Show reasoning and 👍/👎 ack the click first, then do the slow Web API work (views.open,
chat.postEphemeral): Slack hears back at once even when Slack's own API is slow, over HTTP and in
Socket Mode."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.slack.blocks import ACTION_FEEDBACK_DOWN, ACTION_FEEDBACK_UP, ACTION_REASONING
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import APP_ID, TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, BOB, CHANNEL, envelope, mention
from tests.test_serve_process import ServeProcess, answered, wait_for
from tests.test_socket_mode import socket_mode_env

SLOW_S = 2.0  # how long the fake Slack takes to answer the slow method
FAST_ENOUGH_S = 1.0  # the click's response must come well before the slow call could have finished
# `kimibot serve` runs as its own process in Socket Mode: wider margins for a loaded machine.
SOCKET_SLOW_S, SOCKET_FAST_ENOUGH_S = 5.0, 2.5


async def until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - the state changes in the fake servers
            await asyncio.sleep(0.01)


async def answered_message(bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, ts: str) -> Any:
    fake_kimi.script(Reply(reasoning="Step one. Step two.", content="Done."))
    await bot.send_event(mention("question", ts))
    await bot.settle()
    return fake_slack.replies(CHANNEL, ts)[0]


async def timed_click(bot: BotHarness, message: Any, action_id: str, **kwargs: Any) -> tuple[int, float]:
    started = time.monotonic()
    status, _ = await bot.click(message, action_id, **kwargs)
    return status, time.monotonic() - started


async def test_show_reasoning_is_acked_before_the_slow_views_open(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    message = await answered_message(bot, fake_slack, fake_kimi, "1700000050.000100")
    fake_slack.delay["views.open"] = SLOW_S
    status, took = await timed_click(bot, message, ACTION_REASONING)
    assert status == 200
    assert took < FAST_ENOUGH_S, f"the click was answered after {took:.2f}s"
    assert not fake_slack.views  # the modal was not open yet when Slack heard back...
    await until(lambda: len(fake_slack.views) == 1)  # ...and opens afterwards
    assert "Step one." in str(fake_slack.views[0]["blocks"])
    assert fake_slack.problems == []


async def test_feedback_is_acked_before_the_slow_ephemeral_and_still_stored_and_confirmed(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    message = await answered_message(bot, fake_slack, fake_kimi, "1700000050.000200")
    fake_slack.delay["chat.postEphemeral"] = SLOW_S
    up_status, up_took = await timed_click(bot, message, ACTION_FEEDBACK_UP)
    down_status, down_took = await timed_click(bot, message, ACTION_FEEDBACK_DOWN, user=BOB)
    assert (up_status, down_status) == (200, 200)
    assert max(up_took, down_took) < FAST_ENOUGH_S, f"answered after {up_took:.2f}s / {down_took:.2f}s"
    await until(lambda: len(fake_slack.ephemerals) == 2)
    assert {e["user"] for e in fake_slack.ephemerals} == {ALICE, BOB}
    ratings = await bot.deps.feedback.ratings(TEAM_ID, CHANNEL, message["ts"])
    assert ratings[ALICE]["rating"] == "up" and ratings[BOB]["rating"] == "down"


async def test_a_failure_after_the_ack_is_logged_and_the_bot_goes_on(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, caplog: pytest.LogCaptureFixture
) -> None:
    message = await answered_message(bot, fake_slack, fake_kimi, "1700000050.000300")
    fake_slack.fail("views.open", "expired_trigger_id")
    with caplog.at_level(logging.ERROR):
        status, _ = await bot.click(message, ACTION_REASONING)
        assert status == 200
        await until(lambda: any(r.getMessage() == "button failed after its ack" for r in caplog.records))
    status, _ = await bot.click(message, ACTION_REASONING)  # the next click works
    assert status == 200
    await until(lambda: len(fake_slack.views) == 1)


def block_actions(message: dict[str, Any], action_id: str, user: str = ALICE) -> dict[str, Any]:
    """The interactive payload Slack sends for a button press on a bot message (Socket Mode form)."""
    element = next(
        e
        for b in message.get("blocks") or []
        if b.get("type") == "actions"
        for e in b["elements"]
        if e["action_id"] == action_id
    )
    return {
        "type": "block_actions",
        "user": {"id": user, "username": "someone", "team_id": TEAM_ID},
        "api_app_id": APP_ID,
        "token": "legacy",
        "trigger_id": f"{time.time():.0f}.42.trigger",
        "team": {"id": TEAM_ID, "domain": "fake"},
        "channel": {"id": CHANNEL, "name": "general"},
        "container": {"type": "message", "message_ts": message["ts"], "channel_id": CHANNEL},
        "message": {k: v for k, v in message.items() if k in ("ts", "thread_ts", "text", "blocks", "user")},
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": "kimi_answer",
                "value": element["value"],
                "action_ts": f"{time.time():.6f}",
            }
        ],
        "state": {"values": {}},
    }


def acked(fake_slack: FakeSlack, envelope_id: str) -> bool:
    return any(a["envelope_id"] == envelope_id for a in fake_slack.socket_acks)


async def test_in_socket_mode_the_envelope_is_acked_before_the_slow_calls(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    bot = ServeProcess(socket_mode_env(fake_slack, fake_kimi, redis_url, tmp_path), tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            await bot.wait_healthy(session)
        await wait_for(lambda: bool(fake_slack.sockets))
        fake_kimi.script(Reply(reasoning="Think. Then answer.", content="Done."))
        root = fake_slack.seed(CHANNEL, user=ALICE, text="question")
        await fake_slack.send_envelope("events_api", envelope(mention("question", root)), "env-q")
        await wait_for(lambda: answered(fake_slack, CHANNEL, root, 1))
        await wait_for(lambda: bool(fake_slack.replies(CHANNEL, root)[0].get("blocks")))
        message = fake_slack.replies(CHANNEL, root)[-1]

        fake_slack.delay["views.open"] = SOCKET_SLOW_S
        fake_slack.delay["chat.postEphemeral"] = SOCKET_SLOW_S
        for envelope_id, action_id in (("env-r", ACTION_REASONING), ("env-f", ACTION_FEEDBACK_UP)):
            sent = time.monotonic()
            await fake_slack.send_envelope("interactive", block_actions(message, action_id), envelope_id)
            await until(partial(acked, fake_slack, envelope_id))
            took = time.monotonic() - sent
            assert took < SOCKET_FAST_ENOUGH_S, f"{action_id} acked after {took:.2f}s"
        await until(lambda: len(fake_slack.views) == 1 and len(fake_slack.ephemerals) == 1, 20)
        code, output = await bot.terminate()
        assert code == 0, output
    finally:
        if bot.process.poll() is None:
            bot.process.kill()
