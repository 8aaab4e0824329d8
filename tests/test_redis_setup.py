"""Redis setup: a silent Redis costs one short timeout (Slack hears back in time), and the test suite only
ever uses a Redis it was told about or started itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot.redis_client import (
    MAX_BLOCK_S,
    POOL_SIZE,
    SOCKET_TIMEOUT_S,
    WARM_CONNECTIONS,
    WARM_TIMEOUT_S,
    build_redis,
    is_cluster,
    warm_pool,
)
from tests.conftest import BotHarness
from tests.fakes.slack_api import FakeSlack
from tests.redis_servers import ENV, PrivateRedis, suite_redis
from tests.slack_requests import CHANNEL, mention

SLACK_PATIENCE_S = 3.0  # Slack counts a delivery as failed (and retries it) after 3 s without a response


def test_one_timed_out_call_leaves_time_to_answer_slack() -> None:
    assert MAX_BLOCK_S < SOCKET_TIMEOUT_S < SLACK_PATIENCE_S - 0.5


@pytest.fixture
async def silent_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A private redis-server the test may SIGSTOP (SIGCONTed and stopped afterwards, whatever happens)."""
    server = PrivateRedis(tmp_path, appendonly=False)
    await server.start()
    yield server
    await server.stop()


async def test_slack_hears_back_within_3_s_while_redis_is_silent_and_the_redelivery_is_answered_once(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, silent_redis: PrivateRedis
) -> None:
    bot: BotHarness = await make_bot(redis_url=silent_redis.url)
    await bot.send_event(
        mention("warm up", "1700000070.000100")
    )  # pooled connections exist, as in production
    await bot.settle()
    silent_redis.pause()
    try:
        started = time.monotonic()
        status, _ = await bot.send_event(mention("are you there?", "1700000070.000200"), event_id="EvSilent")
        took = time.monotonic() - started
    finally:
        silent_redis.resume()
    assert took < SLACK_PATIENCE_S, f"Slack waited {took:.1f} s"
    assert status >= 500  # Slack delivers it again later
    status, _ = await bot.send_event(
        mention("are you there?", "1700000070.000200"), event_id="EvSilent", retry_num=1
    )
    assert status == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700000070.000200")) == 1


async def test_a_silent_redis_costs_one_read_timeout_per_call_not_several(silent_redis: PrivateRedis) -> None:
    client = build_redis(silent_redis.url, "false")
    try:
        await client.set("k", "v")  # a pooled connection
        silent_redis.pause()
        for _ in range(2):  # the pooled connection, then a new one
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await client.get("k")
            assert time.monotonic() - started < SOCKET_TIMEOUT_S + 0.5
    finally:
        silent_redis.resume()
        await client.aclose()


async def test_a_blocking_command_may_wait_its_whole_timeout_without_tripping_the_read_timeout(
    redis_url: str,
) -> None:
    assert MAX_BLOCK_S < SOCKET_TIMEOUT_S
    client = build_redis(redis_url)
    try:
        started = time.monotonic()
        assert await client.blpop(["{kimibot-test}:nothing"], timeout=MAX_BLOCK_S) is None  # type: ignore[misc]
        assert time.monotonic() - started >= MAX_BLOCK_S * 0.9
    finally:
        await client.aclose()


def test_the_suite_starts_a_redis_of_its_own_when_not_told_which_to_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    with suite_redis(tmp_path) as target:
        assert target.started_here and not target.cluster
        port = int(target.url.rsplit(":", 1)[1].split("/")[0])
        assert port != 6379
        client = redis.Redis(port=port, decode_responses=True)
        try:
            # Ours: it keeps its files in the directory we gave it.
            assert client.config_get("dir")["dir"] == str(tmp_path)
        finally:
            client.close()
    assert not PrivateRedis(tmp_path, port=port).answers()  # and it is gone afterwards


def test_the_suite_uses_the_redis_it_is_told_to_use_and_starts_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "redis://127.0.0.1:1/7")
    with suite_redis(tmp_path) as target:
        assert target.url == "redis://127.0.0.1:1/7"
        assert not target.started_here
    assert list(tmp_path.iterdir()) == []


async def test_a_burst_of_more_commands_than_pooled_connections_waits_for_connections_instead_of_failing(
    redis_url: str,
) -> None:
    """300 answers starting at once issue more concurrent commands than the pool holds: each waits for a
    connection (redis-py's plain pool raised "Too many connections", a 503 to Slack). The pool is shrunk
    to 4 here, so the test does not open POOL_SIZE connections at once on a busy machine."""
    assert POOL_SIZE >= 100
    client = build_redis(redis_url)
    try:
        if is_cluster(client):
            pytest.skip("the cluster client keeps a pool per node")
        client.connection_pool.max_connections = 4
        key = "{kimibot-test}:burst"
        results = await asyncio.gather(*(client.incr(key) for _ in range(50)))
        assert sorted(results) == list(range(1, 51))
    finally:
        await client.aclose()


async def test_start_up_opens_pooled_connections_that_the_first_burst_then_uses(
    silent_redis: PrivateRedis,
) -> None:
    """warm_pool (run by serve's start-up): WARM_CONNECTIONS connections open before any request, and a
    burst of that many concurrent commands opens no new one."""
    client = build_redis(silent_redis.url)
    observer = redis.asyncio.Redis.from_url(silent_redis.url)
    try:
        before = len(await observer.client_list())
        assert await warm_pool(client, count=0) == 0
        assert await warm_pool(client) == WARM_CONNECTIONS
        assert len(await observer.client_list()) == before + WARM_CONNECTIONS
        await asyncio.gather(*(client.incr("burst") for _ in range(WARM_CONNECTIONS)))
        assert len(await observer.client_list()) == before + WARM_CONNECTIONS
    finally:
        await client.aclose()
        await observer.aclose()


async def test_opening_connections_ahead_gives_up_quietly_when_redis_is_silent(
    silent_redis: PrivateRedis,
) -> None:
    """A Redis that accepts connections but answers nothing: start-up waits WARM_TIMEOUT_S at most (not a
    socket timeout), nothing is raised, and no connection is kept out of the pool; nor when the warm-up
    itself is cancelled (a start-up check failing, a stop signal)."""
    client = build_redis(silent_redis.url)
    silent_redis.pause()
    try:
        started = time.monotonic()
        assert await warm_pool(client, count=4) == 0
        assert time.monotonic() - started < WARM_TIMEOUT_S + 1.0
        assert not client.connection_pool._in_use_connections
        warming = asyncio.create_task(warm_pool(client, count=4, timeout_s=30.0))
        await asyncio.sleep(0.2)
        warming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await warming
        assert not client.connection_pool._in_use_connections
    finally:
        silent_redis.resume()
        await client.aclose()
