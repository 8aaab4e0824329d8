"""What the benchmarks share: a fake Slack (enforcing rate limits) and a fake Kimi, on a clean Redis."""

from __future__ import annotations

import os

from redis.asyncio import Redis

from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE

REDIS_URL = os.environ.get("KIMIBOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


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
