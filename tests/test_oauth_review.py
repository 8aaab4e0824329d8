"""OAuth mode after the adversarial review: a refresh that fails or is slow never makes a workspace look
uninstalled, a refresh never outlives its lock nor overwrites a newer token, encryption keys rotate,
uninstall is complete and not undone, and the smaller findings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from slack_sdk.oauth.installation_store.models.bot import Bot
from slack_sdk.web.async_client import AsyncWebClient

from bot.installations import Installations
from bot.server import team_bot_for_job
from bot.worker import RunLater
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import CLIENT_ID, CLIENT_SECRET, FakeSlack
from tests.slack_requests import CHANNEL
from tests.test_oauth import (
    SECOND_BOT_ID,
    SECOND_BOT_USER,
    SECOND_TEAM,
    ask_from,
    install,
    oauth_settings,
)

LOCK = f"kimibot:install:{{{SECOND_TEAM}}}:rotate-lock"


def refreshes(fake_slack: FakeSlack) -> list[Any]:
    return [c for c in fake_slack.calls_of("oauth.v2.access") if c.args.get("grant_type") == "refresh_token"]


async def rotating_install(bot: BotHarness, expires_in: int) -> str:
    """The second workspace installed with a rotating token `expires_in` seconds from expiry: its token."""
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID, rotating=True, expires_in=expires_in)
    return str(bot.slack.calls_of("oauth.v2.access")[-1].args["_result"]["access_token"])


def replica(bot: BotHarness, **extra: Any) -> Installations:
    """Another replica's token path over the same Redis (its own rotator client)."""
    assert bot.deps.installations is not None
    return Installations(
        bot.deps.installations.store,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        client=AsyncWebClient(base_url=bot.slack.api_url),
        **extra,
    )


# ---- finding 2: a failed or slow refresh is not "not installed" ----------------------------------------


async def test_a_refused_refresh_keeps_the_valid_token_in_use(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    token = await rotating_install(bot, 3_600)  # due for a refresh (2 h before expiry), valid for an hour
    fake_slack.fail("oauth.v2.access", status=503, times=3)  # Slack's trouble, for a while
    assert await ask_from(bot, "still answered?", "1700001000.000100") == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700001000.000100")) == 1
    assert len(fake_kimi.requests) == 1
    # One attempt each (the request's, then the job's), no retries (the rotator's own client, so a refresh
    # never outlives its lock); the answer went out with the current token.
    assert len(fake_slack.calls_of("oauth.v2.access")) == 3  # the install and two failed refreshes
    assert {str(c.args.get("token")) for c in fake_slack.calls_of("chat.postMessage")} == {token}


async def test_a_busy_lock_does_not_hold_up_a_request_while_the_token_is_valid(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    token = await rotating_install(bot, 3_600)
    await bot.deps.redis.set(LOCK, "another-replica", px=60_000)  # its refresh is under way
    started = time.monotonic()
    assert await ask_from(bot, "quick?", "1700001100.000100") == 200
    assert time.monotonic() - started < 1.0  # not the 20 s lock wait before the 3 s ack
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700001100.000100")) == 1
    assert refreshes(fake_slack) == []
    assert {str(c.args.get("token")) for c in fake_slack.calls_of("chat.postMessage")} == {token}


async def test_an_expired_token_that_cannot_be_refreshed_is_an_error_not_an_uninstall(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await rotating_install(bot, 30)  # less than a minute left: as good as expired
    fake_slack.fail("oauth.v2.access", "invalid_refresh_token", times=2)
    status = await ask_from(bot, "hello?", "1700001200.000100")
    assert status == 503  # Slack redelivers; a 200 would have dropped the event for good
    assert fake_kimi.requests == []
    # A job of the workspace runs again later (RunLater), it is not dead-lettered as "not installed".
    lease: Any = type("L", (), {"thread": type("T", (), {"team_id": SECOND_TEAM})()})()
    with pytest.raises(RunLater):
        await team_bot_for_job(bot.deps, lease)


# ---- finding 1: the refresh keeps its lock and never overwrites a newer token ---------------------------


async def test_a_refresh_slower_than_the_lock_ttl_is_still_the_only_one(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await rotating_install(bot, 30)  # expired, as good as: both replicas must wait for the refresh
    first, second = replica(bot, lock_ttl_ms=300), replica(bot, lock_ttl_ms=300)
    fake_slack.delay["oauth.v2.access"] = 1.0  # more than three lock TTLs: renewed while in flight
    try:
        one = asyncio.create_task(first.bot_for_team(SECOND_TEAM))
        await asyncio.sleep(0.1)
        other = await second.bot_for_team(SECOND_TEAM)  # waits for the lock, then re-reads
        got = await one
    finally:
        fake_slack.delay.clear()
    [refresh] = refreshes(fake_slack)
    new_token = refresh.args["_result"]["access_token"]
    assert refresh.args["_result"]["ok"] is True
    assert got is not None and other is not None and got.token == other.token == new_token


async def test_a_late_refresh_does_not_overwrite_a_reinstall(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await rotating_install(bot, 3_600)
    installations = bot.deps.installations
    assert installations is not None
    hold = fake_slack.hold("oauth.v2.access", when=lambda a: a.get("grant_type") == "refresh_token")
    refreshing = asyncio.create_task(installations.bot_for_team(SECOND_TEAM))
    await hold.wait()
    reinstalled = Bot(
        app_id="A0KIMIBOT",
        team_id=SECOND_TEAM,
        bot_token="xoxb-reinstalled",
        bot_id=SECOND_BOT_ID,
        bot_user_id=SECOND_BOT_USER,
        installed_at=time.time(),
    )
    await installations.store.async_save_bot(reinstalled)
    hold.release()
    got = await refreshing
    assert got is not None and got.token == "xoxb-reinstalled"
    stored = await installations.store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM)
    assert stored is not None and stored.bot_token == "xoxb-reinstalled"
    assert not await bot.deps.redis.exists(LOCK)
