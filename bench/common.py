"""What the benchmarks share: a fake Slack (enforcing rate limits) and a fake Kimi, on a clean Redis of
their own (or KIMIBOT_TEST_REDIS_URL, flushed)."""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

from redis.asyncio import Redis

from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.redis_servers import PrivateRedis
from tests.slack_requests import ALICE


def _bench_redis() -> str:
    """KIMIBOT_TEST_REDIS_URL when set (it is flushed); otherwise a redis-server of the benchmark's own,
    stopped at exit, so a benchmark never flushes a Redis it did not start."""
    if os.environ.get("KIMIBOT_TEST_REDIS_URL"):
        return os.environ["KIMIBOT_TEST_REDIS_URL"]
    server = PrivateRedis(Path(tempfile.mkdtemp(prefix="kimibot-bench-")), appendonly=False)
    server.start_sync()
    atexit.register(server.stop_sync)
    return server.url


REDIS_URL = _bench_redis()


async def start_fakes() -> tuple[FakeSlack, FakeKimi]:
    client: Redis = Redis.from_url(REDIS_URL)
    await client.flushdb()
    await client.aclose()
    slack, kimi = FakeSlack(), FakeKimi()
    slack.add_user(ALICE, "alice")
    slack.enforce_limits = True
    await slack.start()
    await kimi.start()
    return slack, kimi


def answers(count: int, *, reasoning: str, content: str, chunk_chars: int, chunk_delay: float) -> list[Reply]:
    """`count` identical scripted answers: reasoning first, then content, streamed in chunks."""
    return [
        Reply(reasoning=reasoning, content=content, chunk_chars=chunk_chars, chunk_delay=chunk_delay)
        for _ in range(count)
    ]
