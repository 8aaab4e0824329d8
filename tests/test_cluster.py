"""Redis Cluster: a REDIS_URL naming any one node of a cluster works with no other setting.

Uses the cluster at KIMIBOT_TEST_CLUSTER_URL (scripts/test starts one; all its data is flushed), or starts a
3-master cluster of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import CrossSlotTransactionError, MovedError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot.channel_settings import SettingsKeys
from bot.redis_client import SOCKET_TIMEOUT_S, build_redis, is_cluster
from bot.settings import SettingsError
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import TEAM_ID, FakeSlack
from tests.redis_servers import PrivateCluster, SuiteRedis, flush
from tests.slack_requests import BOB, CHANNEL, mention, message


@pytest.fixture(scope="module")
def cluster_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """URLs of every primary of a test cluster."""
    url = os.environ.get("KIMIBOT_TEST_CLUSTER_URL", "")
    cluster: PrivateCluster | None = None
    if not url:
        cluster = PrivateCluster(tmp_path_factory.mktemp("cluster"))
        cluster.start_sync()
        url = cluster.url
    import redis

    client = redis.RedisCluster.from_url(url)
    try:
        nodes = [f"redis://{node.host}:{node.port}/0" for node in client.get_primaries()]
    finally:
        client.close()
    yield sorted(nodes)
    if cluster is not None:
        cluster.stop_sync()


@pytest.fixture
async def cluster_url(cluster_nodes: list[str]) -> AsyncIterator[str]:
    """A node of the test cluster (the second: not necessarily the one scripts/test named), emptied."""
    target = SuiteRedis(cluster_nodes[0], cluster=True, started_here=False)
    await flush(target)
    yield cluster_nodes[1]
    await flush(target)


async def test_any_one_node_of_a_cluster_is_enough_and_keys_land_on_every_primary(
    cluster_url: str, cluster_nodes: list[str]
) -> None:
    for url in cluster_nodes:
        client = build_redis(url)  # REDIS_CLUSTER=auto, the default
        try:
            assert is_cluster(client)
            for i in range(30):
                await client.set(f"kimibot:test:{i}", str(i))
            assert [await client.get(f"kimibot:test:{i}") for i in range(30)] == [str(i) for i in range(30)]
        finally:
            await client.aclose()
    cluster = build_redis(cluster_url)
    try:
        per_node = await cluster.dbsize(target_nodes=RedisCluster.PRIMARIES)  # type: ignore[call-arg]
        assert per_node == 30
        sizes = []
        for url in cluster_nodes:
            node: Redis = Redis.from_url(url)
            sizes.append(int(await node.dbsize()))
            await node.aclose()
        assert all(size > 0 for size in sizes) and sum(sizes) == 30
    finally:
        await cluster.aclose()


def test_a_single_redis_gets_the_plain_client(suite_redis_target: SuiteRedis) -> None:
    if suite_redis_target.cluster:
        pytest.skip("the suite's Redis is itself a cluster in this run")
    assert not is_cluster(build_redis(suite_redis_target.url))


def test_redis_cluster_false_is_obeyed_and_true_needs_no_question(cluster_url: str) -> None:
    assert not is_cluster(build_redis(cluster_url, "false"))
    assert is_cluster(build_redis("redis://127.0.0.1:1/0", "true"))  # not even reachable: no probe


def test_a_cluster_url_selecting_another_database_is_refused_in_one_sentence(cluster_url: str) -> None:
    with pytest.raises(SettingsError) as caught:
        build_redis(cluster_url.removesuffix("/0") + "/3")
    assert caught.value.problems == [
        "REDIS_URL selects database 3, but it is a Redis Cluster node and a cluster has only database 0. "
        "Expected: the same URL ending in /0."
    ]


def test_an_unreachable_redis_at_start_gets_the_plain_client_and_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="bot.redis_client"):
        client = build_redis("redis://127.0.0.1:1/0")
    assert not is_cluster(client)
    assert "REDIS_CLUSTER" in caplog.text


async def test_a_bot_pointed_at_one_node_answers_a_thread_in_order(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, cluster_url: str
) -> None:
    bot: BotHarness = await make_bot(redis_url=cluster_url)
    assert is_cluster(bot.deps.redis)
    root = "1700000080.000100"
    await bot.send_event(mention("first question", root))
    await bot.send_event(message("and a follow-up", "1700000080.000200", thread_ts=root, user=BOB))
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, root)) == 2
    assert fake_kimi.requests[1]["messages"][1]["content"] == "alice: first question"
    assert fake_slack.problems == []


async def test_channel_settings_save_and_resolve_on_a_cluster(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, cluster_url: str
) -> None:
    """A save is one MULTI over the team's settings keys (one hash slot); a read pipelines two hashes."""
    bot: BotHarness = await make_bot(redis_url=cluster_url)
    store = bot.deps.channel_settings
    await store.save(TEAM_ID, CHANNEL, {"model": "kimi-k3", "system_prompt": "Cluster."}, "U0ADMIN")
    await store.save(TEAM_ID, None, {"followups": "mentions"}, "U0ADMIN")
    config = await store.resolve(TEAM_ID, CHANNEL)
    assert config.model == "kimi-k3" and config.followups == "mentions"
    await store.save(TEAM_ID, "C0RESET01", {"model": "kimi-k3"}, "U0ADMIN")
    await store.save(TEAM_ID, "C0RESET01", {"model": None}, "U0ADMIN")  # back to the default
    own, more = await store.overridden(TEAM_ID)
    assert list(own) == [CHANNEL] and more == 0
    assert await bot.deps.redis.smembers(SettingsKeys(TEAM_ID).channels) == {CHANNEL}  # pruned (Lua)
    await bot.send_event(mention("on a cluster", "1700000090.000100"))
    await bot.settle()
    assert fake_kimi.requests[0]["model"] == "kimi-k3"
    assert fake_kimi.requests[0]["messages"][0]["content"].endswith("\n\nCluster.")


async def test_a_cluster_transaction_runs_in_one_slot_without_a_thread_per_command(
    cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = build_redis(cluster_url)
    try:
        await client.ping()

        def no_thread(_: threading.Thread) -> None:
            raise AssertionError("redis-py queued a transaction's command through a thread")

        monkeypatch.setattr(threading.Thread, "start", no_thread)
        async with client.pipeline(transaction=True) as pipe:
            pipe.set("{kimibot-test}:a", 1)
            pipe.incr("{kimibot-test}:a")
            pipe.eval("return redis.call('GET', KEYS[1])", 1, "{kimibot-test}:a")
            pipe.hset("{kimibot-test}:h", mapping={"f": "v"})
            pipe.expire("{kimibot-test}:a", 60)
            assert await pipe.execute() == [True, 2, "2", 1, True]
        with pytest.raises(CrossSlotTransactionError):
            async with client.pipeline(transaction=True) as pipe:
                pipe.set("{kimibot-test}:a", 1)
                pipe.set("{another-tag}:a", 1)
                await pipe.execute()
    finally:
        await client.aclose()


async def test_a_silent_cluster_node_costs_one_read_timeout_per_call(tmp_path: Path) -> None:
    cluster = PrivateCluster(tmp_path)
    cluster.start_sync()
    client = build_redis(cluster.url)
    try:
        key = "{kimibot-test}:k"
        await client.set(key, "v")
        node = client.get_node_from_key(key)  # type: ignore[attr-defined]
        silent = next(n for n in cluster.nodes if n.port == int(node.port))
        silent.pause()
        for call in ("get", "transaction"):
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                if call == "get":
                    await client.get(key)
                else:
                    async with client.pipeline(transaction=True) as pipe:
                        pipe.incr(key)
                        pipe.expire(key, 60)
                        await pipe.execute()
            assert time.monotonic() - started < SOCKET_TIMEOUT_S + 1.0, call
        silent.resume()
        assert await client.get(key) == "v"
    finally:
        for n in cluster.nodes:
            n.resume()
        await client.aclose()
        cluster.stop_sync()


async def test_a_cluster_node_silent_at_start_is_named_plainly_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = PrivateCluster(tmp_path)
    cluster.start_sync()
    try:
        cluster.nodes[0].pause()
        try:
            with caplog.at_level(logging.WARNING, logger="bot.redis_client"):
                client = build_redis(cluster.url)  # the probe times out: a single Redis is assumed
        finally:
            cluster.nodes[0].resume()
        assert not is_cluster(client)
        assert "could not ask Redis whether it is a cluster" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="bot.redis_client"), contextlib.suppress(MovedError):
            await client.set("{a}", "x", ex=60)  # this node's slot, or MOVED
        await client.aclose()
    finally:
        cluster.stop_sync()
    assert "REDIS_URL is a Redis Cluster node" in caplog.text and "REDIS_CLUSTER=true" in caplog.text


def test_kimibot_serve_with_a_cluster_url_selecting_another_database_says_so_in_one_line(
    cluster_url: str, tmp_path: Path
) -> None:
    from tests.test_settings_cli import run_cli

    env = {
        "SLACK_BOT_TOKEN": "xoxb-111-222-abcdef",
        "SLACK_SIGNING_SECRET": "a-signing-secret",
        "MOONSHOT_API_KEY": "sk-a-real-looking-key",
        "REDIS_URL": cluster_url.removesuffix("/0") + "/3",
    }
    result = run_cli("serve", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "REDIS_URL selects database 3" in result.stderr and "Traceback" not in result.stderr
