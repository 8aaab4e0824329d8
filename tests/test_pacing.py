"""Pacing: the token buckets, and many answers at once drawing no 429s from a rate-limiting Slack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from bot.slack.pacing import Pacer, TokenBucket
from tests.conftest import FAST_PACE, BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import CHANNEL, mention


def test_a_bucket_allows_its_burst_then_one_call_per_interval() -> None:
    bucket = TokenBucket(rate_per_s=1.0, capacity=3)
    now = bucket.updated
    for _ in range(3):
        assert bucket.delay(now) == 0
        bucket.take()
    assert bucket.delay(now) == 1.0
    assert bucket.delay(now + 0.5) == 0.5
    assert bucket.delay(now + 1.0) == 0


def test_tiers_are_per_method_and_workspace_and_posts_per_channel() -> None:
    pacer = Pacer()
    assert pacer.wait_estimate("chat.startStream", "T1") == 0
    bucket = pacer._bucket("chat.startStream", "T1", "C1")
    assert bucket is not None and bucket.capacity == 20 and bucket.rate_per_s < 20 / 60  # with a margin
    assert pacer._bucket("chat.startStream", "T2", "C1") is not bucket
    assert pacer._bucket("chat.postMessage", "T1", "C1") is not pacer._bucket("chat.postMessage", "T1", "C2")
    assert pacer._bucket("auth.test", "T1", "C1") is None


async def test_acquire_waits_once_the_burst_is_spent() -> None:
    pacer = Pacer(scale=10)  # 10 posts a second per channel, bursts of 30
    started = time.monotonic()
    for _ in range(35):
        await pacer.acquire("chat.postMessage", "T1", "C1")
    assert 0.4 <= time.monotonic() - started < 2.0
    assert pacer.waited_s > 0


async def burst_of_questions(bot: BotHarness, count: int) -> None:
    for i in range(count):
        await bot.send_event(mention(f"question {i}", f"1700000006.{i:06d}"))
    await bot.settle(limit_s=30)


async def test_many_answers_in_one_channel_draw_no_429s_when_paced(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_slack.enforce_limits = True
    bot: BotHarness = await make_bot()
    bot.deps.pacer = Pacer()  # Slack's documented pace, not the tests' loose one
    fake_kimi.script(*[Reply(content=f"answer {i}") for i in range(6)])
    await burst_of_questions(bot, 6)
    assert fake_slack.limit_hits == []
    assert bot.deps.metrics.snapshot()["slack_429s"] == 0
    assert sum(len(fake_slack.bodies(CHANNEL, f"1700000006.{i:06d}")) for i in range(6)) == 6


async def test_without_pacing_the_same_burst_is_rate_limited(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_slack.enforce_limits = True
    bot: BotHarness = await make_bot()
    assert bot.deps.pace is FAST_PACE
    await burst_of_questions(bot, 6)
    await asyncio.sleep(0)
    assert fake_slack.limit_hits  # what pacing saves us from
    assert bot.deps.metrics.snapshot()["slack_429s"] >= 1
