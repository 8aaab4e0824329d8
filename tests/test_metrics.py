"""GET /metrics: Prometheus text that prometheus-client's own parser reads, and counters that move when the
bot answers, calls tools, is rate limited or loses Redis. Each app has its own registry."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bot.metrics import Metrics
from bot.store import ThreadKeys
from bot.tools.base import ToolContext, ToolResult
from tests.conftest import BotHarness
from tests.fakes.kimi_api import Call, FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import mention

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(bot: BotHarness) -> tuple[Samples, set[str]]:
    assert bot.session is not None
    async with bot.session.get(bot.url("/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: Samples = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every label set that includes `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= set(got))


def test_two_apps_in_one_process_have_registries_of_their_own() -> None:
    first, second = Metrics(), Metrics()  # a module-level registry would refuse the second
    first.answer("answered")
    assert first.answers.labels("answered")._value.get() == 1
    assert second.answers.labels("answered")._value.get() == 0


async def test_metrics_parse_and_move_after_an_answer(bot: BotHarness, fake_kimi: FakeKimi) -> None:
    before, families = await scrape(bot)
    for name in (
        "kimibot_answers",
        "kimibot_kimi_request_seconds",
        "kimibot_kimi_time_to_first_token_seconds",
        "kimibot_kimi_tokens",
        "kimibot_kimi_cost_usd",
        "kimibot_tool_calls",
        "kimibot_queue_threads",
        "kimibot_queue_oldest_job_age_seconds",
        "kimibot_slack_calls",
        "kimibot_slack_rate_limited",
        "kimibot_redis_errors",
        "kimibot_gc_frozen_objects",
    ):
        assert name in families, name
    fake_kimi.script(Reply(content="Forty-two.", cached_tokens=5))
    assert (await bot.send_event(mention("What is the answer?", "1700000000.000100")))[0] == 200
    await bot.settle()
    after, _ = await scrape(bot)
    assert value(after, "kimibot_answers_total", outcome="answered") == 1 + value(
        before, "kimibot_answers_total", outcome="answered"
    )
    model = {"model": "kimi-k2.6"}
    assert value(after, "kimibot_kimi_request_seconds_count", outcome="ok", **model) == 1
    assert value(after, "kimibot_kimi_request_seconds_sum", outcome="ok", **model) > 0
    assert value(after, "kimibot_kimi_time_to_first_token_seconds_count", **model) == 1
    assert value(after, "kimibot_kimi_tokens_total", kind="prompt", **model) > 0
    assert value(after, "kimibot_kimi_tokens_total", kind="cached", **model) == 5
    assert value(after, "kimibot_kimi_tokens_total", kind="completion", **model) > 0
    assert value(after, "kimibot_kimi_cost_usd_total", **model) > 0
    assert value(after, "kimibot_slack_calls_total", method="chat.postMessage") >= 1
    assert value(after, "kimibot_slack_calls_total", method="auth.test") >= 1
    assert value(after, "kimibot_queue_threads") == 0
    assert value(after, "kimibot_queue_oldest_job_age_seconds") == 0


async def test_a_refused_answer_counts_by_its_reason(bot: BotHarness, fake_kimi: FakeKimi) -> None:
    fake_kimi.script(Reply(status=401, error_type="invalid_authentication_error", error_message="bad key"))
    await bot.send_event(mention("hello", "1700000000.000200"))
    await bot.settle()
    after, _ = await scrape(bot)
    assert value(after, "kimibot_answers_total", outcome="auth") == 1
    assert value(after, "kimibot_kimi_request_seconds_count", model="kimi-k2.6", outcome="auth") == 1


async def test_tool_calls_are_counted_by_tool_and_outcome(bot: BotHarness, fake_kimi: FakeKimi) -> None:
    class Lookup:
        name = "lookup"
        description = "Look something up."
        parameters: dict[str, Any] = {"type": "object", "properties": {"q": {"type": "string"}}}  # noqa: RUF012
        read_only = True

        def title(self, args: dict[str, Any]) -> str:
            return "Looking up"

        async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
            if args.get("q") == "broken":
                raise RuntimeError("down")
            return ToolResult("found it")

    async def source(ctx: ToolContext) -> list[Any]:
        return [Lookup()]

    bot.deps.tools = source
    fake_kimi.script(
        Reply(tool_calls=[Call("lookup", '{"q": "a"}'), Call("lookup", '{"q": "broken"}')]),
        Reply(content="Done."),
    )
    await bot.send_event(mention("look it up", "1700000000.000300"))
    await bot.settle()
    after, _ = await scrape(bot)
    assert value(after, "kimibot_tool_calls_total", tool="lookup", outcome="ok") == 1
    assert value(after, "kimibot_tool_calls_total", tool="lookup", outcome="error") == 1
    assert value(after, "kimibot_kimi_request_seconds_count", model="kimi-k2.6", outcome="ok") == 2
    assert value(after, "kimibot_answers_total", outcome="answered") == 1


async def test_slack_429s_are_counted_by_method(bot: BotHarness, fake_slack: FakeSlack) -> None:
    fake_slack.fail("chat.postMessage", status=429, retry_after=1)
    await bot.send_event(mention("hello", "1700000000.000400"))
    await bot.settle()
    after, _ = await scrape(bot)
    assert value(after, "kimibot_slack_rate_limited_total", method="chat.postMessage") == 1


async def test_queue_depth_and_oldest_job_age_are_read_when_scraped(make_bot: Any) -> None:
    bot: BotHarness = await make_bot(start_worker=False)
    await bot.send_event(mention("first", f"{time.time() - 30:.6f}"))
    await bot.send_event(mention("second", f"{time.time():.6f}"))
    samples, _ = await scrape(bot)
    assert value(samples, "kimibot_queue_threads") == 2
    assert 0 <= value(samples, "kimibot_queue_oldest_job_age_seconds") < 5  # queued just now
    # Redis stops answering: the gauges keep their last values and /metrics still answers.
    kwargs = dict(bot.deps.redis.connection_pool.connection_kwargs)
    await bot.deps.redis.connection_pool.disconnect()
    bot.deps.redis.connection_pool.connection_kwargs.update(port=1, host="127.0.0.1")
    samples, _ = await scrape(bot)
    assert value(samples, "kimibot_queue_threads") == 2
    await bot.deps.redis.connection_pool.disconnect()
    bot.deps.redis.connection_pool.connection_kwargs.update(kwargs)
    bot.run_worker()
    await bot.settle()
    samples, _ = await scrape(bot)
    assert value(samples, "kimibot_queue_threads") == 0


async def test_redis_errors_are_counted_by_type() -> None:
    metrics = Metrics()
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    metrics.watch_redis(client)
    try:
        for attempt in range(2):
            try:
                await client.ping()
            except RedisConnectionError:
                pass
            else:
                raise AssertionError(f"attempt {attempt}: nothing listens on port 1")
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.set("k", "v")
                await pipe.execute()
        except RedisConnectionError:
            pass
    finally:
        await client.aclose()
    assert metrics.redis_errors.labels("ConnectionError")._value.get() == 3


async def test_metrics_are_served_when_redis_is_down(make_bot: Any) -> None:
    bot: BotHarness = await make_bot(start_worker=False)
    await bot.deps.redis.connection_pool.disconnect()
    bot.deps.redis.connection_pool.connection_kwargs.update(port=1, host="127.0.0.1")
    assert bot.session is not None
    async with bot.session.get(bot.url("/metrics")) as response:
        assert response.status == 200
        text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert sum(s.value for s in families["kimibot_redis_errors"].samples if s.name.endswith("_total")) >= 1


def test_a_deep_copy_shares_the_metrics() -> None:
    import copy

    metrics = Metrics()  # Bolt deep-copies requests for lazy listeners, the client's retry handlers included
    assert copy.deepcopy({"m": metrics})["m"] is metrics


async def test_each_attempt_of_a_retried_kimi_request_is_timed(bot: BotHarness, fake_kimi: FakeKimi) -> None:
    fake_kimi.script(
        Reply(status=503, error_type="server_error", error_message="busy"),
        Reply(content="Second time lucky."),
    )
    await bot.send_event(mention("hello", "1700000000.000500"))
    await bot.settle()
    after, _ = await scrape(bot)
    model = {"model": "kimi-k2.6"}
    assert value(after, "kimibot_kimi_request_seconds_count", outcome="unavailable", **model) == 1
    assert value(after, "kimibot_kimi_request_seconds_count", outcome="ok", **model) == 1
    assert value(after, "kimibot_answers_total", outcome="answered") == 1


async def test_a_question_given_up_after_its_attempts_counts_as_gave_up(
    make_bot: Any, fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(start_worker=False)
    ts = "1700000000.000600"
    await bot.send_event(mention("poison", ts))
    thread = bot.thread(ts)
    for _ in range(3):  # three runs that die mid-answer: their leases simply lapse
        [(found, score)] = await bot.deps.queue.due(10)
        lease = await bot.deps.queue.claim(found, score)
        assert lease is not None and found == thread
        await lease.next_job()
        await bot.deps.redis.delete(ThreadKeys(thread).lease)
        await bot.deps.queue.notify(thread)
    bot.run_worker()
    await bot.settle()
    after, _ = await scrape(bot)
    assert value(after, "kimibot_answers_total", outcome="gave_up") == 1
    assert value(after, "kimibot_answers_total", outcome="answered") == 0
    assert any("given up" in body for body in fake_slack.bodies("C06H4T2MZ8R", ts))


async def test_event_loop_lag_is_measured_while_serving() -> None:
    """`serve` runs Metrics.watch_loop: a callback that blocks the loop shows as lag in the histogram."""
    import asyncio
    import time

    from bot.metrics import Metrics

    metrics = Metrics()
    watcher = asyncio.create_task(metrics.watch_loop(every_s=0.02))
    await asyncio.sleep(0.05)
    time.sleep(0.15)  # noqa: ASYNC251 - the point: something blocks the event loop
    await asyncio.sleep(0.05)
    watcher.cancel()
    samples = {s.name: s.value for f in metrics.registry.collect() for s in f.samples if "lag" in s.name}
    assert samples["kimibot_event_loop_lag_seconds_count"] >= 3
    assert samples["kimibot_event_loop_lag_seconds_sum"] >= 0.1


async def test_the_workers_slack_calls_share_one_kept_alive_connection(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    """deps.slack keeps one aiohttp session: successive calls reuse its connection (one TCP and TLS handshake
    with Slack, not one per call); closing the deps closes it. Bolt's own client stays session-less (Bolt
    deep-copies it for lazy listeners)."""
    from bot.server import build_bolt_app

    before = len(fake_slack.calls)
    for _ in range(3):
        await bot.deps.slack.auth_test()
    peers = {call.peer for call in fake_slack.calls[before:]}
    assert len(peers) == 1 and "" not in peers
    session = bot.deps.slack.session
    assert session is not None and not session.closed
    assert build_bolt_app(bot.deps).client.session is None
    assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)  # no workspace's cookies on another's calls
    await bot.deps.slack.close()  # what Deps.close does at shutdown
    assert session.closed
    await bot.deps.slack.auth_test()  # a late call still works, without a pooled session left open
    assert bot.deps.slack.session is None
