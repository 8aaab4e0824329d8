"""The intake path, request -> ack: what it costs in Redis round trips and in Bolt's listener matching,
and that nothing the ack does not need (a notice to the asker) holds it up. Timings are in bench/intake.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from slack_bolt.listener.async_listener import AsyncCustomListener

from bot.admission import NOT_ENABLED
from bot.queue import JobQueue
from bot.redis_client import is_cluster
from bot.store import READY_KEY
from bot.turn import ThreadKey
from tests.conftest import BotHarness
from tests.fakes.slack_api import BOT_USER_ID, FakeSlack
from tests.slack_requests import ALICE, mention, message

THREAD = ThreadKey("T1", "C1", "1700000000.000100")


def record_commands(client: Redis) -> list[str]:
    """The name of each command the client sends from now on (a pipeline would not show here)."""
    sent: list[str] = []
    command = client.execute_command

    async def recorded(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return await command(*args, **options)

    client.execute_command = recorded  # type: ignore[method-assign]
    return sent


async def test_queueing_a_message_is_one_evalsha_that_also_lists_its_thread(redis: Redis) -> None:
    """One round trip on a single Redis (two on a cluster, where `ready` is in another slot), sent by SHA:
    no script text, no SCRIPT EXISTS. A redelivery, refused as a duplicate, still lists the thread again."""
    queue = JobQueue(redis, consumer="a", visibility_s=5.0)
    calls = 2 if is_cluster(redis) else 1
    assert await queue.put(THREAD, "turn", {"job_id": "0"}, dedup_ts="1.0")  # the scripts are loaded now
    sent = record_commands(redis)
    assert await queue.put(THREAD, "turn", {"job_id": "1"}, dedup_ts="1.1", engage=True) is True
    assert sent == ["EVALSHA"] * calls
    await redis.zrem(READY_KEY, str(THREAD))  # as if the listing had been lost
    sent.clear()
    assert await queue.put(THREAD, "turn", {"job_id": "1"}, dedup_ts="1.1") is False  # a redelivery
    assert sent == ["EVALSHA"] * calls
    assert [t for t, _ in await queue.due(10)] == [THREAD]
    assert len(await queue.waiting(THREAD)) == 2


async def test_a_server_without_the_scripts_gets_them_once(redis: Redis) -> None:
    """After a restart (or SCRIPT FLUSH) EVALSHA answers NOSCRIPT: the text goes once, then SHA again."""
    queue = JobQueue(redis, consumer="a", visibility_s=5.0)
    assert await queue.put(THREAD, "turn", {"job_id": "0"}, dedup_ts="1.0")
    await redis.script_flush()
    sent = record_commands(redis)
    assert await queue.put(THREAD, "turn", {"job_id": "1"}, dedup_ts="1.1") is True
    assert sent == ["EVALSHA", "EVAL"] * (2 if is_cluster(redis) else 1)
    sent.clear()
    assert await queue.put(THREAD, "turn", {"job_id": "2"}, dedup_ts="1.2") is True
    assert sent == ["EVALSHA"] * (2 if is_cluster(redis) else 1)
    assert [t for t, _ in await queue.due(10)] == [THREAD]
    assert len(await queue.waiting(THREAD)) == 3


async def test_mentions_and_their_message_twins_are_matched_by_the_first_listener_bolt_tries(
    make_bot: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bolt builds every listener matcher's arguments as it tries it, in the order listeners were
    registered: the events that make up the burst are tried first, and their listener runs no middleware."""
    bot: BotHarness = await make_bot(start_worker=False)
    tried: list[AsyncCustomListener] = []
    matches = AsyncCustomListener.async_matches

    async def counted(self: AsyncCustomListener, **kwargs: Any) -> bool:
        tried.append(self)
        return await matches(self, **kwargs)

    monkeypatch.setattr(AsyncCustomListener, "async_matches", counted)
    ts, dm_ts = "1700000950.000100", "1700000950.000200"
    for event in (
        mention("hi", ts),
        message(f"<@{BOT_USER_ID}> hi", ts),  # its twin
        message("hello", dm_ts, channel="D1", channel_type="im"),
    ):
        assert (await bot.send_event(event))[0] == 200
    assert len(tried) == 3 and len(set(tried)) == 1
    assert tried[0].middleware == []
    assert await bot.deps.queue.length() == 2  # the mention and the DM, the twin a duplicate


async def test_a_refusal_notice_does_not_hold_up_the_ack(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    """The ephemeral "not enabled" is sent after the ack: Slack answering slowly (or rate limiting it)
    cannot make the event late and redelivered."""
    bot: BotHarness = await make_bot(allowed_users="U0SOMEONE")
    hold = fake_slack.hold("chat.postEphemeral")
    try:
        async with asyncio.timeout(10):  # no answer from Slack until released: an ack waiting for it hangs
            status, _ = await bot.send_event(mention("hello?", "1700000951.000100"))
        assert status == 200
        call = await hold.wait()
        assert call.args.get("user") == ALICE and call.args.get("text") == NOT_ENABLED
    finally:
        hold.release()
    await bot.settle()
    assert [e["text"] for e in fake_slack.ephemerals if e.get("user") == ALICE] == [NOT_ENABLED]
