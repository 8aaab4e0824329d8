"""What a long-running process keeps stays bounded: the user-name cache (LRU), the pacing buckets
(idle ones dropped), and the feedback log in Redis (capped, with a TTL, in one cluster slot)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from bot.redis_client import build_redis
from bot.slack.pacing import PRUNE_FLOOR, Pacer
from bot.store import USAGE_TTL_S, Feedback, UserNames
from tests.redis_servers import PrivateCluster, SuiteRedis, flush

TEAM = "T05KQ2R7JNB"


async def test_the_name_cache_keeps_only_the_most_recently_used_names(redis: Redis) -> None:
    names = UserNames(redis)
    names.LOCAL_MAX = 100
    for i in range(1_000):
        await names.put(TEAM, f"U{i:05d}", f"user {i}")
        if i % 10 == 0:
            assert await names.get(TEAM, "U00000") == "user 0"  # used all along: never evicted
    assert len(names._local) == 100
    assert (TEAM, "U00000") in names._local and (TEAM, "U00999") in names._local
    assert (TEAM, "U00001") not in names._local  # least recently used: gone from the process...
    assert await names.get(TEAM, "U00001") == "user 1"  # ...but still in Redis
    assert len(names._local) == 100


async def test_an_expired_name_is_dropped_from_the_process_when_read(redis: Redis) -> None:
    names = UserNames(redis)
    names.LOCAL_TTL_S = -1  # every entry is already stale
    await names.put(TEAM, "U1", "alice")
    await redis.delete(UserNames.key(TEAM, "U1"))
    assert await names.get(TEAM, "U1") is None
    assert names._local == {}


def test_pacing_buckets_of_channels_gone_quiet_are_dropped() -> None:
    pacer = Pacer()
    for i in range(PRUNE_FLOOR * 5):
        bucket = pacer._bucket("chat.postMessage", TEAM, f"C{i:06d}")
        assert bucket is not None
        bucket.updated -= 10.0  # ten seconds ago: full again by now
    assert len(pacer._buckets) <= PRUNE_FLOOR


async def test_busy_pacing_buckets_are_kept_and_still_pace() -> None:
    pacer = Pacer()
    for _ in range(3):  # the channel's burst is spent: its bucket is busy
        await pacer.acquire("chat.postMessage", TEAM, "CBUSY")
    busy = pacer._bucket("chat.postMessage", TEAM, "CBUSY")
    for i in range(PRUNE_FLOOR * 3):
        quiet = pacer._bucket("chat.postMessage", TEAM, f"C{i:06d}")
        assert quiet is not None
        quiet.updated -= 10.0
    assert pacer._bucket("chat.postMessage", TEAM, "CBUSY") is busy
    assert pacer.wait_estimate("chat.postMessage", TEAM, "CBUSY") > 0  # still pacing that channel
    assert len(pacer._buckets) <= PRUNE_FLOOR


def test_a_pruned_bucket_comes_back_full() -> None:
    pacer = Pacer()
    for i in range(PRUNE_FLOOR + 1):
        bucket = pacer._bucket("chat.update", f"T{i:05d}", "")
        assert bucket is not None
        bucket.updated -= 3_600
    assert pacer.headroom("chat.update", "T00000") == 1.0


def test_a_vote_and_the_teams_log_share_one_cluster_slot() -> None:
    for team in (TEAM, "", "T{odd}"):
        vote = Feedback.key(team, "C06H4T2MZ8R", "1700000000.000100")
        assert key_slot(vote.encode()) == key_slot(Feedback.log_key(team).encode()), team


async def test_the_feedback_log_expires_and_is_capped(redis: Redis) -> None:
    feedback = Feedback(redis)
    feedback.LOG_LENGTH = 5
    for i in range(8):
        await feedback.record(TEAM, "C1", f"1700000000.00010{i}", "U1", "up", {"model": "kimi-k2.6"})
    assert await redis.llen(Feedback.log_key(TEAM)) == 5
    assert 0 < await redis.ttl(Feedback.log_key(TEAM)) <= USAGE_TTL_S
    assert 0 < await redis.ttl(Feedback.key(TEAM, "C1", "1700000000.000107")) <= USAGE_TTL_S


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    nodes = PrivateCluster(tmp_path_factory.mktemp("feedback-cluster"))
    nodes.start_sync()
    yield nodes.url
    nodes.stop_sync()


async def test_feedback_is_recorded_on_a_redis_cluster(cluster: str) -> None:
    """The vote and the log are one MULTI: on a cluster that only works within one slot."""
    client = build_redis(cluster)
    try:
        feedback = Feedback(client)
        for team in ("T1", "T2", "T3", "T4"):  # teams whose keys land on different primaries
            await feedback.record(team, "C1", "1700000000.000100", "U1", "down", {"latency_s": 1.5})
            ratings = await feedback.ratings(team, "C1", "1700000000.000100")
            assert ratings["U1"]["rating"] == "down"
            assert await client.llen(Feedback.log_key(team)) == 1
    finally:
        await flush(SuiteRedis(cluster, cluster=True, started_here=True))
        await client.aclose()
