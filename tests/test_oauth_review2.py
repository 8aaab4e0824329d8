"""The second review's findings on OAuth installs (each test fails without its fix)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, cast

import pytest

import bot.worker
from bot.worker import RunLater, Worker
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import CHANNEL
from tests.test_oauth import SECOND_BOT_ID, SECOND_BOT_USER, SECOND_TEAM, ask_from, install, oauth_settings
from tests.test_oauth_review import refreshes
from tests.test_serve_process import wait_for

# ---- finding 1: token trouble hands the job back without counting attempts ----------------------------


async def queued_then_expired(bot: BotHarness, fake_slack: FakeSlack, ts: str) -> None:
    """A question of the second workspace queued while its token was valid, which has as good as expired
    by the time the worker takes it."""
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID, rotating=True, expires_in=3_600)
    assert bot.deps.installations is not None
    store = bot.deps.installations.store
    fake_slack.fail("oauth.v2.access", "invalid_refresh_token")  # the request's refresh: current token used
    assert await ask_from(bot, "later?", ts) == 200
    stored = await store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM)
    assert stored is not None
    stored.bot_token_expires_at = int(time.time()) + 10
    await store.async_save_bot(stored)


async def test_token_trouble_longer_than_the_attempts_does_not_dead_letter_the_job(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """Many more failed refreshes than JOB_MAX_ATTEMPTS (3): the job is not dead-lettered as "attempts";
    it is answered once the refresh works."""
    bot: BotHarness = await make_bot(**oauth_settings(job_visibility_timeout=0.3), start_worker=False)
    await queued_then_expired(bot, fake_slack, "1700001700.000100")
    fake_slack.fail("oauth.v2.access", status=503, times=6)
    bot.run_worker()
    await wait_for(lambda: len(refreshes(fake_slack)) >= 6, limit_s=20)  # the request's, then five tries
    assert await bot.deps.queue.dead_letters() == []
    assert fake_slack.bodies(CHANNEL, "1700001700.000100") == []
    await bot.settle(limit_s=20)
    assert len(fake_slack.bodies(CHANNEL, "1700001700.000100")) == 1
    assert await bot.deps.queue.dead_letters() == []


async def test_a_job_whose_token_cannot_be_had_for_too_long_is_given_up_on_age(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.worker, "LATER_GIVE_UP_S", 2.0)
    harness: BotHarness = await make_bot(**oauth_settings(job_visibility_timeout=0.3), start_worker=False)
    await queued_then_expired(harness, fake_slack, "1700001700.000100")
    fake_slack.fail("oauth.v2.access", status=503, times=1_000)
    harness.run_worker()
    await harness.settle(limit_s=20)
    dead = await harness.deps.queue.dead_letters()
    assert [d["reason"] for d in dead] == ["token"] and dead[0]["reference"]
    assert fake_slack.bodies(CHANNEL, "1700001700.000100") == []


# ---- finding 7a: showing the waiting questions without a token is quiet -------------------------------


async def test_showing_waiting_questions_without_a_token_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The sign of life for queued questions runs about once a second per leased thread: with no token
    (RunLater) it gives up quietly instead of logging a traceback each time."""

    async def no_token(lease: Any) -> None:
        raise RunLater("the bot token expired and was not refreshed")

    worker = Worker(cast(Any, None), cast(Any, None), concurrency=1, visibility_s=1.0, show_waiting=no_token)
    with caplog.at_level(logging.DEBUG):
        await worker._show_waiting(cast(Any, None))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []
