"""What an admin (and the benchmarks) can measure: Prometheus metrics on GET /metrics, counts on /healthz.

Each `Metrics` has its own `CollectorRegistry` (no module-level globals: two apps may run in one process).
Values are fed at the existing seams: the pipeline (answers by outcome, tokens and cost, tool calls), the
Kimi client (latency, time to first token), the Slack client (calls by method) and its 429 handler, the
Redis client (errors), and the job queue, read when /metrics is scraped (depth, oldest job's age).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from redis.exceptions import ClusterDownError, RedisError, ResponseError
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.acting import current as current_team_bot

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Thinking models take seconds to minutes; the first token (reasoning counts) comes much sooner.
KIMI_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60)
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
LOOP_LAG_TICK_S = 0.1


class _Queue(Protocol):
    async def length(self) -> int: ...

    async def oldest_age_s(self) -> float: ...


class _Usage(Protocol):
    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    @property
    def cached_tokens(self) -> int: ...


@dataclass
class Metrics:
    slack_429s: Counter[str] = field(default_factory=Counter)  # per Web API method, also on /healthz
    slack_token_rejected: str = ""  # Slack's error while it refuses SLACK_BOT_TOKEN at run time
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.answers = PromCounter(
            "kimibot_answers",
            "Questions finished, by outcome: answered, stopped, or the reason they were not answered",
            ["outcome"],
            registry=r,
        )
        self.kimi_seconds = Histogram(
            "kimibot_kimi_request_seconds",
            "One streamed Kimi request (one attempt), from asking to its last byte or its failure, "
            "by model and outcome (ok or the reason)",
            ["model", "outcome"],
            buckets=KIMI_SECONDS_BUCKETS,
            registry=r,
        )
        self.kimi_first_token = Histogram(
            "kimibot_kimi_time_to_first_token_seconds",
            "From asking Kimi to the first streamed token (reasoning or answer), by model",
            ["model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens = PromCounter(
            "kimibot_kimi_tokens",
            "Tokens Kimi billed, by model and kind: prompt (all input), cached (the part of prompt served "
            "from Kimi's cache), completion (reasoning and answer)",
            ["model", "kind"],
            registry=r,
        )
        self.cost = PromCounter(
            "kimibot_kimi_cost_usd",
            "Cost of Kimi requests in USD (the model table's list prices, or KIMI_PRICES), by model",
            ["model"],
            registry=r,
        )
        self.tool_calls = PromCounter(
            "kimibot_tool_calls",
            "Tool calls run by the agent loop, by tool and outcome",
            ["tool", "outcome"],
            registry=r,
        )
        self.queue_threads = Gauge(
            "kimibot_queue_threads", "Threads with jobs waiting or running (read when scraped)", registry=r
        )
        self.queue_oldest_age = Gauge(
            "kimibot_queue_oldest_job_age_seconds",
            "Age of the oldest job at the head of a thread's inbox, 0 when none (read when scraped)",
            registry=r,
        )
        self.gc_frozen = Gauge(
            "kimibot_gc_frozen_objects",
            "Objects serve froze out of the garbage collector's reach at start-up (gc.freeze)",
            registry=r,
        )
        self.gc_frozen.set_function(gc.get_freeze_count)
        self.slack_calls = PromCounter(
            "kimibot_slack_calls", "Slack Web API calls made, by method", ["method"], registry=r
        )
        self.slack_rate_limited = PromCounter(
            "kimibot_slack_rate_limited",
            "Slack Web API answers with HTTP 429, by method",
            ["method"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "kimibot_event_loop_lag_seconds",
            "How late the event loop ran a timer due every 0.1 s: the delay every request and stream of this "
            "process saw at that moment",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.redis_errors = PromCounter(
            "kimibot_redis_errors",
            "Redis commands that failed (connection, timeout, cluster down), by error type",
            ["error"],
            registry=r,
        )

    async def watch_loop(self, every_s: float = LOOP_LAG_TICK_S) -> None:
        """Measure the event loop's lag for as long as the process serves (a task of `serve`)."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + every_s
            await asyncio.sleep(every_s)
            self.loop_lag.observe(max(0.0, loop.time() - due))

    def __deepcopy__(self, memo: dict[int, Any]) -> Metrics:
        # One per app, shared: Bolt deep-copies a request (and its client's retry handlers, which hold this)
        # for lazy listeners, and the registry's locks cannot be copied.
        return self

    def snapshot(self) -> dict[str, Any]:
        return {"slack_429s": sum(self.slack_429s.values()), "slack_429s_by_method": dict(self.slack_429s)}

    # ---- the seams -------------------------------------------------------------------------------
    def answer(self, outcome: str) -> None:
        self.answers.labels(outcome).inc()

    def used(self, model: str, usage: _Usage, cost_usd: float) -> None:
        self.tokens.labels(model, "prompt").inc(usage.prompt_tokens)
        self.tokens.labels(model, "cached").inc(usage.cached_tokens)
        self.tokens.labels(model, "completion").inc(usage.completion_tokens)
        self.cost.labels(model).inc(max(cost_usd, 0.0))

    def tools_ran(self, calls: Iterable[Any]) -> None:
        """Calls of one finished agent step (records with `name` and `ok`)."""
        for call in calls:
            self.tool_calls.labels(str(call.name), "ok" if call.ok else "error").inc()

    def kimi_request(self, model: str, on_event: Callable[[Any], Awaitable[None]] | None) -> KimiRequest:
        return KimiRequest(self, model, on_event)

    def redis_failed(self, error: BaseException) -> None:
        if isinstance(error, RedisError) and (
            not isinstance(error, ResponseError) or isinstance(error, ClusterDownError)
        ):
            self.redis_errors.labels(type(error).__name__).inc()

    def watch_redis(self, client: Any) -> None:
        """Count the failures of every command this client sends (scripts and transactions included).
        Answers Redis gives on purpose (ResponseError: a script's refusal, BUSYGROUP...) are not counted."""
        command = client.execute_command
        pipeline = client.pipeline

        async def execute_command(*args: Any, **options: Any) -> Any:
            try:
                return await command(*args, **options)
            except RedisError as exc:
                self.redis_failed(exc)
                raise

        def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = pipeline(*args, **kwargs)
            execute = pipe.execute

            async def counted_execute(*a: Any, **kw: Any) -> Any:
                try:
                    return await execute(*a, **kw)
                except RedisError as exc:
                    self.redis_failed(exc)
                    raise

            pipe.execute = counted_execute
            return pipe

        client.execute_command = execute_command
        client.pipeline = counted_pipeline

    async def exposition(self, queue: _Queue, timeout_s: float = 1.0) -> bytes:
        """The text /metrics serves. The queue is read now; if Redis does not answer in time the queue
        gauges keep their last values (and the failure is counted)."""
        try:
            async with asyncio.timeout(timeout_s):
                self.queue_threads.set(await queue.length())
                self.queue_oldest_age.set(await queue.oldest_age_s())
        except (RedisError, TimeoutError) as exc:
            log.info("queue not read for /metrics", extra={"error": f"{type(exc).__name__}: {exc}"})
        return generate_latest(self.registry)


class KimiRequest:
    """Times one attempt of a Kimi request: `on_event` wraps the caller's (first token), `done` ends it."""

    def __init__(
        self, metrics: Metrics, model: str, on_event: Callable[[Any], Awaitable[None]] | None
    ) -> None:
        self.metrics = metrics
        self.model = model
        self.inner = on_event
        self.started = time.monotonic()
        self.first = False

    async def on_event(self, event: Any) -> None:
        if not self.first:
            self.first = True
            self.metrics.kimi_first_token.labels(self.model).observe(time.monotonic() - self.started)
        if self.inner is not None:
            await self.inner(event)

    def done(self, outcome: str) -> None:
        self.metrics.kimi_seconds.labels(self.model, outcome).observe(time.monotonic() - self.started)


# What Slack answers to a token it no longer accepts (revoked, app uninstalled, account deactivated).
TOKEN_REJECTED = frozenset(
    {"invalid_auth", "not_authed", "token_revoked", "token_expired", "account_inactive"}
)


class CountingWebClient(AsyncWebClient):  # type: ignore[misc]
    """slack_sdk's client, counting every Web API call by method (every method goes through api_call)."""

    def __init__(self, *args: Any, metrics: Metrics, pooled: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics
        # `pooled`: one aiohttp session (its kept-alive connections) for every call, made on the first call
        # (inside the running loop) and closed by `close`. Without it slack_sdk opens, and closes, a session
        # (a TCP and TLS handshake with Slack) per call. Not for Bolt's own client: Bolt deep-copies a
        # request's client (with its session) for lazy listeners, and a session cannot be copied.
        self.pooled = pooled

    async def _request(self, *, http_verb: str, api_url: str, req_args: dict[str, Any]) -> dict[str, Any]:
        if self.pooled and (self.session is None or self.session.closed):
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                # No connection cap: a call must not time out queueing behind 100 others (the pacer bounds
                # how many are in flight); no cookies: one workspace's must not ride on another's calls.
                connector=aiohttp.TCPConnector(limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        result: dict[str, Any] = await super()._request(
            http_verb=http_verb, api_url=api_url, req_args=req_args
        )
        return result

    async def close(self) -> None:
        """Close the pooled session (a no-op without one); a call after this opens a session of its own
        (slack_sdk's way), never a pooled one nobody would close."""
        session, self.session, self.pooled = self.session, None, False
        if session is not None and not session.closed:
            await session.close()

    async def api_call(self, api_method: str, *args: Any, **kwargs: Any) -> Any:
        self.metrics.slack_calls.labels(api_method).inc()
        team_bot = current_team_bot()
        explicit = any("token" in (kwargs.get(part) or {}) for part in ("params", "json", "data"))
        if team_bot is not None and not explicit and kwargs.get("auth") is None:
            # OAuth mode: the workspace this task acts for (bot/slack/acting.py), not the client's token.
            kwargs["headers"] = {**(kwargs.get("headers") or {}), "Authorization": f"Bearer {team_bot.token}"}
        try:
            response = await super().api_call(api_method, *args, **kwargs)
        except SlackApiError as exc:
            data = getattr(exc.response, "data", None)
            error = str(data.get("error") or "") if isinstance(data, dict) else ""
            # One workspace's revoked token (OAuth mode) is that workspace's uninstall, not the bot's health.
            if error in TOKEN_REJECTED and team_bot is None and self.metrics.slack_token_rejected != error:
                # Revoked or uninstalled while running: /healthz turns 503 naming the setting.
                self.metrics.slack_token_rejected = error
                log.error(
                    "Slack no longer accepts SLACK_BOT_TOKEN; nothing can be answered until it is replaced",
                    extra={"error": error, "method": api_method},
                )
            raise
        if team_bot is None:
            self.metrics.slack_token_rejected = ""
        return response


class CountingRateLimitHandler(AsyncRateLimitErrorRetryHandler):
    """slack_sdk's 429 handler (waits Retry-After, retries), counting every 429 it sees: the goal is none."""

    def __init__(self, metrics: Metrics, max_retry_count: int = 3) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.metrics = metrics

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        limited = response is not None and response.status_code == 429
        if limited:
            method = request.url.rstrip("/").rsplit("/", 1)[-1]
            self.metrics.slack_429s[method] += 1
            self.metrics.slack_rate_limited.labels(method).inc()
            log.warning(
                "slack rate limited a call",
                extra={"method": method, "count": self.metrics.slack_429s[method]},
            )
        return limited
