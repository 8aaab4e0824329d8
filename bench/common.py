"""What the benchmarks share: a fake Slack (enforcing rate limits) and a fake Kimi, on a clean Redis of
their own (or KIMIBOT_TEST_REDIS_URL, flushed)."""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bot.settings import load_settings
from bot.slack.pacing import Pacer
from bot.slack.reply import Pace
from tests.conftest import BotHarness
from tests.fakes.kimi_api import API_KEY, FakeKimi, Reply
from tests.fakes.slack_api import TOKEN, FakeSlack
from tests.redis_servers import PrivateRedis
from tests.slack_requests import ALICE, SIGNING_SECRET


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


def bench_harness(
    slack: FakeSlack, slack_api_url: str, kimi_base_url: str, *, start_worker: bool = True, **settings: Any
) -> BotHarness:
    """The bot in this process (the tests' BotHarness) against the fakes at these URLs, with production
    pacing; `settings` override the defaults."""
    harness = BotHarness(
        load_settings(
            _env_file=None,
            slack_bot_token=TOKEN,
            slack_signing_secret=SIGNING_SECRET,
            slack_api_url=slack_api_url,
            moonshot_api_key=API_KEY,
            kimi_base_url=kimi_base_url,
            redis_url=REDIS_URL,
            **settings,
        ),
        slack,
        start_worker=start_worker,
    )
    harness.deps.pace, harness.deps.pacer = Pace(), Pacer()  # production pacing
    return harness
