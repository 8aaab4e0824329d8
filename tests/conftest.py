"""Fixtures: real Redis (a DB of its own, flushed per test), fake Slack and Kimi servers, and the bot."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.deps import Deps, build_deps
from bot.queue import Job, Lease
from bot.redis_client import build_redis
from bot.server import build_bolt_app, build_web_app, build_worker
from bot.settings import Settings, load_settings
from bot.slack.pacing import Pacer
from bot.slack.reply import Pace
from bot.turn import ThreadKey
from handlers.events import notices_sent
from tests.fakes.kimi_api import API_KEY, FakeKimi
from tests.fakes.slack_api import APP_ID, BOT_USER_ID, TEAM_ID, TOKEN, FakeSlack
from tests.redis_servers import SuiteRedis, flush, suite_redis
from tests.slack_requests import ALICE, BOB, SIGNING_SECRET, command_body, envelope, json_body, sign

FAST_PACE = Pace(
    first_flush_s=0.05, max_latency_s=0.1, min_call_interval_s=0.02, thinking_update_s=0.1, tick_s=0.02
)


@pytest.fixture(scope="session")
def suite_redis_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuiteRedis]:
    """KIMIBOT_TEST_REDIS_URL when set; otherwise a redis-server this session starts (never :6379)."""
    with suite_redis(tmp_path_factory.mktemp("redis")) as target:
        yield target


@pytest.fixture
async def redis_url(suite_redis_target: SuiteRedis) -> AsyncIterator[str]:
    """The test Redis's URL, emptied before and after the test (every primary's DB 0 on a cluster)."""
    await flush(suite_redis_target)
    yield suite_redis_target.url
    await flush(suite_redis_target)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client for the test database (a RedisCluster when the suite runs on a cluster)."""
    client = build_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    slack = FakeSlack()
    slack.add_user(ALICE, "alice")
    slack.add_user(BOB, "bob")
    slack.add_user(BOT_USER_ID, "kimibot")  # as in Slack, users.info knows the bot's own user
    slack.users[BOT_USER_ID]["is_bot"] = True
    await slack.start()
    yield slack
    await slack.stop()


@pytest.fixture
async def fake_kimi() -> AsyncIterator[FakeKimi]:
    kimi = FakeKimi()
    await kimi.start()
    yield kimi
    await kimi.stop()


@pytest.fixture
def make_settings(fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "_env_file": None,
            "slack_bot_token": TOKEN,
            "slack_signing_secret": SIGNING_SECRET,
            "slack_app_token": "",
            "slack_api_url": fake_slack.api_url,
            "moonshot_api_key": API_KEY,
            "kimi_base_url": fake_kimi.base_url,
            "kimi_model": "kimi-k2.6",
            "redis_url": redis_url,
            "kimi_retry_base_delay": 0.01,
            # The guest rule (ALLOW_GUESTS=false, the default) asks users.info when a person first speaks;
            # tests about other things leave it out so their Slack calls stay theirs. tests/test_access.py
            # runs with the real default.
            "allow_guests": True,
            **overrides,
        }
        return load_settings(**values)

    return make


class BotHarness:
    """The real Bolt app behind the real aiohttp routes, reached over loopback HTTP like Slack does."""

    def __init__(self, settings: Settings, slack: FakeSlack, *, start_worker: bool = True) -> None:
        self.start_worker = start_worker
        self.settings = settings
        self.slack = slack
        self.deps: Deps = build_deps(settings)
        # Slack's real pace (1 s between calls, 3 s thinking updates) would make the suite slow; tests that
        # are about pacing build their own.
        self.deps.pace = FAST_PACE
        self.deps.pacer = Pacer(scale=1_000)
        self.worker = build_worker(self.deps, block_ms=50)
        self.server = TestServer(
            build_web_app(self.deps, build_bolt_app(self.deps), self.worker), host="127.0.0.1"
        )
        self.session: aiohttp.ClientSession | None = None
        self.worker_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start_server()
        self.session = aiohttp.ClientSession()
        if self.start_worker:
            self.run_worker()

    def run_worker(self) -> None:
        self.worker_task = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        if self.worker_task is not None:
            await self.settle()
        await self.worker.drain(5)
        if self.worker_task is not None:
            await self.worker_task
        assert self.session is not None
        await self.session.close()
        await self.server.close()
        await self.deps.close()

    async def claim_queued(self) -> tuple[ThreadKey, Lease, Job]:
        """The one queued job, taken as a run that will die takes it: its thread, lease and job (an attempt
        counted)."""
        [(thread, score)] = await self.deps.queue.due(5)
        lease = await self.deps.queue.claim(thread, score)
        assert lease is not None
        job = await lease.next_job()
        assert job is not None and not isinstance(job, str)
        return thread, lease, job

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def post(
        self, body: bytes, content_type: str, headers: dict[str, str] | None = None, signed: bool = True
    ) -> tuple[int, str]:
        assert self.session is not None
        all_headers = {"Content-Type": content_type, **(sign(body) if signed else {}), **(headers or {})}
        async with self.session.post(self.url("/slack/events"), data=body, headers=all_headers) as response:
            return response.status, await response.text()

    async def send_event(
        self,
        event: dict[str, Any],
        *,
        event_id: str | None = None,
        retry_num: int | None = None,
        seed: bool = True,
    ) -> tuple[int, str]:
        """Deliver an event as Slack would; by default the message also exists in the fake workspace."""
        if (
            seed
            and event.get("ts")
            and not any(m["ts"] == event["ts"] for m in self.slack.messages[event["channel"]])
        ):
            self.slack.messages[event["channel"]].append({k: v for k, v in event.items() if k != "channel"})
        headers = {}
        if retry_num:
            headers = {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
        return await self.post(json_body(envelope(event, event_id)), "application/json", headers)

    async def command(self, text: str, **kwargs: Any) -> tuple[int, str]:
        kwargs.setdefault("response_url", self.slack.response_url())
        return await self.post(command_body(text, **kwargs), "application/x-www-form-urlencoded")

    @staticmethod
    def thread(thread_ts: str, channel: str = "C06H4T2MZ8R") -> ThreadKey:
        return ThreadKey(TEAM_ID, channel, thread_ts)

    async def click(
        self, message: dict[str, Any], action_id: str, *, user: str = ALICE, channel: str = "C06H4T2MZ8R"
    ) -> tuple[int, str]:
        """Press a button on a message the bot posted, as Slack sends it (block_actions, form-encoded)."""
        element = next(
            e
            for b in message.get("blocks") or []
            if b.get("type") == "actions"
            for e in b["elements"]
            if e["action_id"] == action_id
        )
        payload = {
            "type": "block_actions",
            "user": {"id": user, "username": "someone", "team_id": TEAM_ID},
            "api_app_id": APP_ID,
            "token": "legacy",
            "trigger_id": f"{time.time():.0f}.42.trigger",
            "team": {"id": TEAM_ID, "domain": "fake"},
            "channel": {"id": channel, "name": "general"},
            "container": {
                "type": "message",
                "message_ts": message["ts"],
                "channel_id": channel,
                "is_ephemeral": False,
            },
            "message": {
                k: v for k, v in message.items() if k in ("ts", "thread_ts", "text", "blocks", "user")
            },
            "response_url": self.slack.response_url("action"),
            "actions": [
                {
                    "type": "button",
                    "action_id": action_id,
                    "block_id": "kimi",
                    "value": element["value"],
                    "action_ts": f"{time.time():.6f}",
                }
            ],
            "state": {"values": {}},
        }
        body = b"payload=" + quote(json.dumps(payload)).encode()
        return await self.post(body, "application/x-www-form-urlencoded")

    async def interact(self, payload: dict[str, Any]) -> tuple[int, str]:
        """Post an interaction payload (form-encoded `payload=`, signed) as Slack does."""
        body = b"payload=" + quote(json.dumps(payload)).encode()
        return await self.post(body, "application/x-www-form-urlencoded")

    async def submit_view(
        self,
        view: dict[str, Any],
        values: dict[str, dict[str, Any]],
        *,
        user: str = ALICE,
        user_team: str = TEAM_ID,
        **payload_fields: Any,
    ) -> tuple[int, Any]:
        """Submit a modal the bot opened (view_submission) with `values` as Slack's view.state.values;
        returns the status and the JSON the bot acked with (None for an empty ack). `user_team` is the
        submitter's home workspace; `payload_fields` replace the payload's top-level fields (an org-wide
        install's `team: None`, say)."""
        payload = {
            "type": "view_submission",
            "team": {"id": TEAM_ID, "domain": "fake"},
            "user": {"id": user, "username": "someone", "name": "someone", "team_id": user_team},
            "api_app_id": APP_ID,
            "token": "legacy",
            "trigger_id": f"{time.time():.0f}.42.trigger",
            "view": {
                "id": "V0SETTINGS",
                "team_id": TEAM_ID,
                "app_id": APP_ID,
                "bot_id": "B0BOT",
                "hash": f"{time.time():.0f}.abc",
                "root_view_id": "V0SETTINGS",
                "previous_view_id": None,
                "clear_on_close": False,
                "notify_on_close": False,
                "external_id": "",
                **view,
                "state": {"values": values},
            },
            "response_urls": [],
            "is_enterprise_install": False,
            "enterprise": None,
            **payload_fields,
        }
        status, text = await self.interact(payload)
        return status, json.loads(text) if text.strip() else None

    async def pick_in_view(
        self,
        view: dict[str, Any],
        action_id: str,
        value: str,
        *,
        user: str = ALICE,
        view_id: str = "V00000001",
    ) -> tuple[int, str]:
        """Pick `value` in a select of an open modal whose input block dispatches its action (block_actions
        from a modal, with the view's current state as Slack sends it)."""
        block = next(b for b in view["blocks"] if (b.get("element") or {}).get("action_id") == action_id)
        selected = {"text": {"type": "plain_text", "text": value}, "value": value}
        values = {block["block_id"]: {action_id: {"type": "static_select", "selected_option": selected}}}
        payload = {
            "type": "block_actions",
            "user": {"id": user, "username": "someone", "team_id": TEAM_ID},
            "api_app_id": APP_ID,
            "token": "legacy",
            "trigger_id": f"{time.time():.0f}.44.trigger",
            "team": {"id": TEAM_ID, "domain": "fake"},
            "container": {"type": "view", "view_id": view_id},
            "view": {
                "id": view_id,
                "team_id": TEAM_ID,
                "hash": f"{time.time():.0f}.abc",
                **view,
                "state": {"values": values},
            },
            "actions": [
                {
                    "type": "static_select",
                    "action_id": action_id,
                    "block_id": block["block_id"],
                    "selected_option": selected,
                    "action_ts": f"{time.time():.6f}",
                }
            ],
        }
        return await self.interact(payload)

    async def open_home(self, user: str = ALICE, tab: str = "home") -> tuple[int, str]:
        """The user opens the app's Home (or Messages) tab: app_home_opened."""
        event = {
            "type": "app_home_opened",
            "user": user,
            "channel": "D0HOMETAB",
            "tab": tab,
            "event_ts": f"{time.time():.6f}",
        }
        return await self.post(json_body(envelope(event)), "application/json")

    async def click_home(self, action_id: str, *, user: str = ALICE) -> tuple[int, str]:
        """Press a button on the user's Home tab (block_actions from a `home` view)."""
        view = self.slack.home_views[user]
        element = next(
            e
            for b in view.get("blocks") or []
            if b.get("type") == "actions"
            for e in b["elements"]
            if e["action_id"] == action_id
        )
        payload = {
            "type": "block_actions",
            "user": {"id": user, "username": "someone", "team_id": TEAM_ID},
            "api_app_id": APP_ID,
            "token": "legacy",
            "trigger_id": f"{time.time():.0f}.43.trigger",
            "team": {"id": TEAM_ID, "domain": "fake"},
            "container": {"type": "view", "view_id": "VH0000001"},
            "view": {"id": "VH0000001", "team_id": TEAM_ID, "state": {"values": {}}, **view},
            "actions": [
                {
                    "type": "button",
                    "action_id": action_id,
                    "block_id": "home",
                    "value": element.get("value", ""),
                    "action_ts": f"{time.time():.6f}",
                }
            ],
        }
        return await self.interact(payload)

    async def settle(self, limit_s: float = 15.0) -> None:
        """Wait until the job queue is empty, every job taken has finished and every notice is sent."""
        async with asyncio.timeout(limit_s):
            while await self._queued() or self.worker.running:
                await self.worker.idle()
                await asyncio.sleep(0.01)
            await notices_sent()  # notices to the asker go out after the ack (handlers/events.py)

    async def _queued(self) -> int:
        try:
            return await self.deps.queue.length()
        except RedisError:  # tests of a Redis outage: nothing can be queued
            return 0


@pytest.fixture
async def make_bot(
    make_settings: Callable[..., Settings], fake_slack: FakeSlack
) -> AsyncIterator[Callable[..., Any]]:
    bots: list[BotHarness] = []

    async def make(*, start_worker: bool = True, **overrides: Any) -> BotHarness:
        harness = BotHarness(make_settings(**overrides), fake_slack, start_worker=start_worker)
        await harness.start()
        bots.append(harness)
        return harness

    yield make
    for harness in bots:
        await harness.stop()


@pytest.fixture
async def bot(make_bot: Callable[..., Any]) -> BotHarness:
    harness: BotHarness = await make_bot()
    return harness


__all__ = ["BOT_USER_ID", "BotHarness"]
