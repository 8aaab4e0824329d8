"""Deps: the one object handed to handlers and the pipeline. No module-level globals."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.admins import Admins
from bot.budgets import budget_warnings
from bot.channel_settings import ChannelSettings
from bot.installations import Installations, RedisInstallationStore, Sealer
from bot.intake import Intake
from bot.kimi.client import KimiClient
from bot.kimi.profiles import parse_prices, profile_for
from bot.metrics import CountingRateLimitHandler, CountingWebClient, Metrics
from bot.queue import JobQueue, consumer_name
from bot.redis_client import build_redis
from bot.settings import Settings, split_ids
from bot.slack import acting
from bot.slack.pacing import Pacer, SharedPacer
from bot.slack.reply import Pace
from bot.store import Approvals, Feedback, Stops, ThreadStore, UserNames
from bot.tools.base import Tool, ToolContext
from bot.usage import UsageLedger

log = logging.getLogger(__name__)

# The tools offered for one turn (the agent loop runs when there are any): built-ins, MCP servers'.
ToolSource = Callable[[ToolContext], Awaitable[Sequence[Tool]]]


@dataclass
class BotIdentity:
    user_id: str = ""
    bot_id: str = ""
    team_id: str = ""


@dataclass
class Deps:
    settings: Settings
    slack: AsyncWebClient
    redis: Redis
    kimi: KimiClient
    threads: ThreadStore
    names: UserNames
    usage: UsageLedger
    queue: JobQueue
    stops: Stops
    feedback: Feedback
    admins: Admins
    channel_settings: ChannelSettings
    metrics: Metrics = field(default_factory=Metrics)
    pacer: Pacer = field(default_factory=Pacer)
    pace: Pace = field(default_factory=Pace)
    identity: BotIdentity = field(default_factory=BotIdentity)
    intake: Intake = field(default_factory=Intake)  # Slack's requests go ahead of new job starts
    approvals: Approvals | None = None
    installations: Installations | None = None  # OAuth mode: each workspace's bot (bot/installations.py)
    tools: ToolSource | None = None  # None: no tools, every answer is one Kimi request

    def current_identity(self) -> BotIdentity:
        """Who the bot is where this task acts (OAuth mode: that workspace's bot), without a Slack call;
        single workspace: what `whoami` found."""
        team_bot = acting.current()
        if team_bot is not None:
            return BotIdentity(user_id=team_bot.user_id, bot_id=team_bot.bot_id, team_id=team_bot.team_id)
        return self.identity

    async def whoami(self) -> BotIdentity:
        """Our bot user and bot ids: the workspace's this task acts for (OAuth mode), else from one auth.test
        call per process."""
        if acting.current() is not None:
            return self.current_identity()
        if not self.identity.user_id:
            response = await self.slack.auth_test()
            self.identity = BotIdentity(
                user_id=str(response.get("user_id") or ""),
                bot_id=str(response.get("bot_id") or ""),
                team_id=str(response.get("team_id") or ""),
            )
        return self.identity

    async def close(self) -> None:
        # Connections first (quick), then the tools: an MCP server slow to exit must not keep Kimi's and
        # Redis's connections open past the shutdown budget.
        await self.kimi.close()
        closer_of_slack = getattr(self.slack, "close", None)
        if closer_of_slack is not None:
            await closer_of_slack()
        if self.installations is not None:
            await self.installations.close()  # token refreshes in flight use Redis
        await self.redis.aclose()
        closer = getattr(self.tools, "close", None)  # a ToolBox: its MCP sessions
        if closer is not None:
            await closer()


def slack_client(settings: Settings, metrics: Metrics, *, pooled: bool = False) -> CountingWebClient:
    """A Web API client pointed at SLACK_API_URL, with slack_sdk's retry handlers; `pooled`: its calls share
    kept-alive connections (see CountingWebClient)."""
    base_url = (
        settings.slack_api_url if settings.slack_api_url.endswith("/") else settings.slack_api_url + "/"
    )
    return CountingWebClient(
        metrics=metrics,
        pooled=pooled,
        token=settings.slack_bot_token,
        base_url=base_url,
        timeout=30,
        retry_handlers=[
            CountingRateLimitHandler(metrics, max_retry_count=3),  # honours Retry-After
            AsyncConnectionErrorRetryHandler(max_retry_count=2),
            AsyncServerErrorRetryHandler(max_retry_count=2),
        ],
    )


def build_deps(settings: Settings) -> Deps:
    profile = profile_for(settings.kimi_model, parse_prices(settings.kimi_prices))
    if not profile.known:
        log.warning(
            "unknown model id: using a conservative profile (128k window, 16k output, no extra parameters)",
            extra={"model": settings.kimi_model},
        )
    output_budget = settings.kimi_max_completion_tokens or profile.output_budget
    for line in budget_warnings(
        settings.budget_user_daily_usd, settings.budget_team_monthly_usd, profile, output_budget
    ):
        log.warning(line)
    redis = build_redis(settings.redis_url, settings.redis_cluster)
    metrics = Metrics()
    metrics.watch_redis(redis)
    kimi = KimiClient(
        api_key=settings.moonshot_api_key,
        base_url=settings.kimi_base_url,
        model=settings.kimi_model,
        profile=profile,
        reasoning_effort=settings.kimi_reasoning_effort,
        max_completion_tokens=settings.kimi_max_completion_tokens,
        idle_timeout=settings.kimi_idle_timeout,
        retry_budget=settings.kimi_retry_budget,
        max_attempts=settings.kimi_max_attempts,
        backoff_base=settings.kimi_retry_base_delay,
        concurrency=settings.kimi_concurrency,
    )
    kimi.metrics = metrics
    # The workers' and handlers' client: every answer's calls over a few kept-alive connections.
    slack = slack_client(settings, metrics, pooled=True)
    installations = None
    if settings.oauth:
        installations = Installations(
            RedisInstallationStore(redis, Sealer(settings.kimibot_encryption_key)),
            client_id=settings.slack_client_id,
            client_secret=settings.slack_client_secret,
            client=slack_client(settings, metrics),  # oauth.v2.access at SLACK_API_URL, app credentials
        )
    return Deps(
        installations=installations,
        settings=settings,
        slack=slack,
        metrics=metrics,
        redis=redis,
        kimi=kimi,
        threads=ThreadStore(redis, settings.thread_ttl_seconds),
        names=UserNames(redis),
        usage=UsageLedger(redis),
        queue=JobQueue(
            redis,
            consumer=consumer_name(),
            visibility_s=settings.job_visibility_timeout,
            thread_ttl_s=settings.thread_ttl_seconds,
        ),
        stops=Stops(redis),
        feedback=Feedback(redis),
        admins=Admins(slack, frozenset(split_ids(settings.admin_users))),
        channel_settings=ChannelSettings(redis, settings),
        approvals=Approvals(redis),
        pacer=SharedPacer(redis),  # Slack's limits are per app and workspace: one budget for all replicas
    )
