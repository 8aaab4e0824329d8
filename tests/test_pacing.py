"""Pacing: the token buckets, and many answers at once drawing no 429s from a rate-limiting Slack."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from bot.slack.pacing import Pacer, SharedPacer, TokenBucket
from tests.conftest import FAST_PACE, BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import TEAM_ID, FakeSlack
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
    # Tier 2's burst of 20, one kept spare (a reserved call reaches Slack a little later), and a margin.
    assert bucket is not None and bucket.capacity == 19 and bucket.rate_per_s < 20 / 60
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


async def test_two_replicas_draw_on_one_shared_budget(redis_url: str) -> None:
    """Slack's limits are per app and workspace: two processes' pacers reserve slots of one bucket in
    Redis (chat.postMessage: bursts of 3, then about one a second per channel)."""
    first, second = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        pacers = [SharedPacer(first), SharedPacer(second)]
        waits = [await pacers[i % 2].reserve_shared("chat.postMessage", "T1", "C1") for i in range(5)]
        assert waits[:2] == [0.0, 0.0]  # the burst (3, one kept spare), whichever process asks
        interval = 1 / (1.0 * 0.9)  # one a second, 10% margin
        for n, wait in enumerate(waits[2:], start=1):
            assert wait is not None and abs(wait - n * interval) < 0.5, waits
        # Another channel, another workspace's stream budget: their own buckets.
        assert await pacers[1].reserve_shared("chat.postMessage", "T1", "C2") == 0.0
        assert await pacers[0].reserve_shared("chat.startStream", "T2") == 0.0
        assert await pacers[0].reserve_shared("auth.test", "T1") is None  # not paced
        # Each process's mirror knows the shared bucket is spent once it has asked.
        assert pacers[0].headroom("chat.postMessage", "T1", "C1") < 0.5
    finally:
        await first.aclose()
        await second.aclose()


async def test_without_redis_the_shared_pacer_paces_per_process() -> None:
    silent = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)  # nothing listens there
    pacer = SharedPacer(silent)
    try:
        assert await pacer.reserve_shared("chat.postMessage", "T1", "C1") is None
        for _ in range(2):
            await pacer.acquire("chat.postMessage", "T1", "C1")  # the local burst: no wait, no error
        assert pacer.wait_estimate("chat.postMessage", "T1", "C1") > 0  # the local bucket paces now
    finally:
        await silent.aclose()


async def test_two_replicas_answering_one_channels_burst_draw_no_429s(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_slack.enforce_limits = True
    bots: list[BotHarness] = [await make_bot(), await make_bot()]
    for each in bots:
        each.deps.pacer = SharedPacer(each.deps.redis)  # Slack's documented pace, shared through Redis
    fake_kimi.script(*[Reply(content=f"answer {i}") for i in range(8)])
    for i in range(8):
        await bots[i % 2].send_event(mention(f"question {i}", f"1700000006.{i:06d}"))
    for _ in range(3):  # each worker may pick up jobs the other listed: settle both until quiet
        for each in bots:
            await each.settle(limit_s=40)
    assert fake_slack.limit_hits == []
    bodies = {i: fake_slack.bodies(CHANNEL, f"1700000006.{i:06d}") for i in range(8)}
    # One answer each (its footer names the model); a placeholder may stay above it as "Thought for Ns".
    assert all(sum("kimi-k2.6" in text for text in b) == 1 for b in bodies.values()), bodies


async def test_a_burst_in_one_channel_gets_a_reaction_at_once_where_the_placeholder_must_wait(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """Slack posts about one message a second per channel: questions past the burst are shown heard with
    a 👀 reaction (paced per workspace) before their placeholder can be posted; it goes once answered."""
    fake_slack.enforce_limits = True
    bot: BotHarness = await make_bot()
    bot.deps.pacer = Pacer()  # Slack's documented pace
    fake_kimi.script(*[Reply(content=f"answer {i}") for i in range(8)])
    asked = [f"1700000006.{i:06d}" for i in range(8)]
    for i, ts in enumerate(asked):
        await bot.send_event(mention(f"question {i}", ts))
    await bot.settle(limit_s=40)
    assert fake_slack.limit_hits == []
    reacted = [c.args["timestamp"] for c in fake_slack.calls_of("reactions.add")]
    assert len(reacted) >= 3 and set(reacted) <= set(asked) and len(set(reacted)) == len(reacted)
    for ts in reacted:
        added = next(c for c in fake_slack.calls_of("reactions.add") if c.args["timestamp"] == ts)
        placeholder = next(
            c for c in fake_slack.calls_of("chat.postMessage") if c.args.get("thread_ts") == ts
        )
        assert added.at < placeholder.at  # the sign of life came first
        assert added.args["name"] == "eyes"
    assert not any(fake_slack.reactions.values())  # every reaction removed once its answer landed
    assert all(len(fake_slack.bodies(CHANNEL, ts)) == 1 for ts in asked)  # one answer each


async def test_a_question_marked_heard_by_a_run_that_stopped_loses_the_mark_when_answered(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """The run that reacted 👀 is stopped while it waits for the channel's posting slot (shutdown); the
    run that answers in its place removes the reaction (it is kept in the job's progress)."""
    first: BotHarness = await make_bot()
    first.deps.pacer = Pacer()  # Slack's documented pace
    for _ in range(3):  # the channel's burst is spent: the next post is over a second away
        await first.deps.pacer.reserve("chat.postMessage", TEAM_ID, CHANNEL)
    ts = "1700000006.000900"
    await first.send_event(mention("question", ts))
    async with asyncio.timeout(10):
        while not fake_slack.reactions.get((CHANNEL, ts)):  # noqa: ASYNC110 - set by the fake server
            await asyncio.sleep(0.01)
    await first.worker.drain(grace_s=0)  # shutdown while the placeholder waits: the job is handed back
    second: BotHarness = await make_bot()
    await second.settle(limit_s=20)
    assert not fake_slack.reactions.get((CHANNEL, ts))
    assert len(fake_slack.bodies(CHANNEL, ts)) == 1 and len(fake_slack.calls_of("reactions.add")) == 1


async def test_a_silent_redis_holds_a_slack_call_a_quarter_second_once_then_pacing_is_local(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis that takes the connection and never answers (SIGSTOP, a dead proxy): the first paced call
    gives up on it after 0.25 s, the next ones within the cool-off (10 s; shortened here) do not ask it at
    all, and the first one after it asks again."""
    import bot.slack.pacing

    monkeypatch.setattr(bot.slack.pacing, "SHARED_COOL_OFF_S", 1.0)
    silent_calls = 0

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal silent_calls
        silent_calls += 1
        await reader.read(1 << 16)  # hears the command, never answers
        await asyncio.sleep(30)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    silent = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=30)
    pacer = SharedPacer(silent)
    try:
        started = time.monotonic()
        await pacer.acquire("chat.update", "T1", "C1")
        first = time.monotonic() - started
        started = time.monotonic()
        for _ in range(2):
            await pacer.acquire("chat.update", "T1", "C1")
        later = time.monotonic() - started
        assert first < 2.0 and later < 0.2, (first, later)  # not 30 s (the client's own timeout)
        assert silent_calls == 1
        await asyncio.sleep(1.0)  # the cool-off is over: Redis is asked (and waited for) again
        started = time.monotonic()
        await pacer.acquire("chat.update", "T1", "C1")
        assert time.monotonic() - started >= bot.slack.pacing.SHARED_TIMEOUT_S * 0.9
    finally:
        server.close()
        await silent.aclose()


async def test_calls_paced_locally_while_redis_failed_still_count_once_it_answers_again(
    redis_url: str,
) -> None:
    """While Redis does not answer, the pacer paces per process; Redis's bucket never sees those calls.
    Once Redis answers again it would grant a fresh burst on top of them (Slack then answers 429: seen as
    chat.stopStream 429s with 300 answers in flight, when a late loop made Redis's replies time out).
    The process's own count keeps the wait."""
    live = Redis.from_url(redis_url)
    silent = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)  # nothing listens there
    try:
        pacer = SharedPacer(silent)
        bucket = pacer._bucket("chat.stopStream", "T1", "")
        assert bucket is not None
        burst = int(bucket.capacity)
        assert await pacer.reserve("chat.stopStream", "T1") == 0.0  # Redis failed: paced locally
        for _ in range(burst - 1):
            assert await pacer.reserve("chat.stopStream", "T1") == 0.0  # the rest of the burst
        pacer.redis, pacer._local_until = live, 0.0  # Redis answers again, the cool-off is over
        wait = await pacer.reserve_shared("chat.stopStream", "T1")
        assert wait is not None and wait > 1.0, wait  # the burst is spent: one interval (3.3 s) at least
    finally:
        await live.aclose()
        await silent.aclose()


async def test_the_mirror_counts_reservations_still_on_their_way_to_redis(redis_url: str) -> None:
    """Answers decide (stream or not, flush or wait) from the local mirror while their reservations are
    on their way to Redis: it must count them at once, or a burst of answers all see room and over-commit
    Slack's Tier 2 budget (each extra stream then waits 3 s per call)."""
    client = Redis.from_url(redis_url)
    try:
        pacer = SharedPacer(client)
        capacity = pacer._bucket("chat.startStream", "T1", "")
        assert capacity is not None
        tasks = [
            asyncio.create_task(pacer.reserve_shared("chat.startStream", "T1"))
            for _ in range(int(capacity.capacity))
        ]
        await asyncio.sleep(0)  # each has sent its reservation; no reply has been read yet
        assert pacer.wait_estimate("chat.startStream", "T1") > 0  # the burst is taken, as far as we know
        waits = await asyncio.gather(*tasks)
        assert waits == [0.0] * len(tasks) and pacer.wait_estimate("chat.startStream", "T1") > 0
    finally:
        await client.aclose()


async def test_a_heard_question_whose_answer_fails_loses_the_mark_too(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """The 👀 goes when the failure's sentence lands, as when an answer does."""
    bot: BotHarness = await make_bot()
    bot.deps.pacer = Pacer()  # Slack's documented pace
    for _ in range(3):  # the channel's burst is spent: the placeholder is over a second away
        await bot.deps.pacer.reserve("chat.postMessage", TEAM_ID, CHANNEL)
    fake_kimi.script(Reply(status=400, error_type="invalid_request_error", error_message="bad request"))
    ts = "1700000006.000950"
    await bot.send_event(mention("question", ts))
    await bot.settle(limit_s=20)
    assert [c.args["timestamp"] for c in fake_slack.calls_of("reactions.add")] == [ts]
    assert not fake_slack.reactions.get((CHANNEL, ts))
    assert len(fake_slack.bodies(CHANNEL, ts)) == 1 and "kimi-k2.6" not in fake_slack.bodies(CHANNEL, ts)[0]


def test_reactions_are_paced_per_workspace_not_per_channel() -> None:
    """A burst in one channel waits for that channel's posting budget; its reactions draw on the
    workspace's Tier 3 budget, which other channels' posts do not touch."""
    pacer = Pacer()
    bucket = pacer._bucket("reactions.add", "T1", "C1")
    assert bucket is not None and bucket is pacer._bucket("reactions.add", "T1", "C2")
    assert bucket is not pacer._bucket("reactions.add", "T2", "C1")
    assert bucket.capacity == 49  # Tier 3: 50 a minute, one kept spare
    assert pacer._bucket("reactions.remove", "T1", "C1") is not bucket


def test_every_paced_method_has_the_tier_slacks_reference_data_gives() -> None:
    import json
    from pathlib import Path

    from bot.slack.pacing import METHOD_TIER

    reference = Path(__file__).parent / "fakes" / "slack_api_ref"
    for method, tier in METHOD_TIER.items():
        path = reference / f"{method}.json"
        assert path.exists(), f"no reference data for {method}"
        assert json.loads(path.read_text())["rate_limits"] == tier, method
