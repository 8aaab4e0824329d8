"""The second review's findings on OAuth installs (each test fails without its fix)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography.fernet import Fernet
from redis.exceptions import ConnectionError as RedisConnectionError

import bot.worker
from bot.health import Health
from bot.installations import Sealer, Undecryptable
from bot.kimi.events import Usage
from bot.queue import Lease
from bot.server import _start_up
from bot.startup import check_client
from bot.store import READY_KEY, ThreadKeys, thread_from_member
from bot.usage import Limits, UsageKeys
from bot.worker import RunLater, Worker
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import TEAM_ID, TOKEN, FakeSlack
from tests.slack_requests import ALICE, CHANNEL
from tests.test_oauth import SECOND_BOT_ID, SECOND_BOT_USER, SECOND_TEAM, ask_from, install, oauth_settings
from tests.test_oauth_review import ALSO_IN_ORG, IN_ORG, LOCK, ORG, org_event, refreshes, rotating_install
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


# ---- finding 4: the gone mark does not outlive a reinstall, and holds no reservation ------------------


async def test_a_settlement_after_the_uninstall_releases_its_reservation(
    make_bot: Callable[..., Any],
) -> None:
    """While the gone mark stands nothing is recorded, and the reservation goes too (it must not count
    against budgets, then be booked at its bound)."""
    harness: BotHarness = await make_bot(**oauth_settings())
    usage = harness.deps.usage
    await usage.reserve(SECOND_TEAM, "job-1:0", 5_000, user=ALICE, channel=CHANNEL, limits=Limits())
    assert await usage.reserved(SECOND_TEAM) == {"job-1:0": 5_000}
    await harness.deps.redis.set(UsageKeys(SECOND_TEAM).gone, "1", ex=3_600)  # uninstalled meanwhile
    counted = await usage.settle(
        SECOND_TEAM, "job-1:0", Usage(100, 20), 5_000, user=ALICE, channel=CHANNEL, model="kimi-k2.6"
    )
    assert counted is False
    assert await harness.deps.redis.hgetall(UsageKeys(SECOND_TEAM).reservations) == {}  # type: ignore[misc]


async def test_an_org_wide_reinstall_lifts_the_gone_marks_of_its_workspaces(
    make_bot: Callable[..., Any],
) -> None:
    harness: BotHarness = await make_bot(**oauth_settings())
    redis = harness.deps.redis
    await install(harness, IN_ORG, "U0ORGBOT", "B0ORGBOT", enterprise_id=ORG, is_enterprise_install=True)
    # A workspace the org's install serves (still pointed to), with a mark left by an earlier uninstall.
    await redis.set(f"kimibot:install:{{{ALSO_IN_ORG}}}:org", ORG)
    await redis.set(UsageKeys(ALSO_IN_ORG).gone, "1", ex=3_600)
    await install(harness, IN_ORG, "U0ORGBOT", "B0ORGBOT", enterprise_id=ORG, is_enterprise_install=True)
    assert not await redis.exists(UsageKeys(ALSO_IN_ORG).gone)


async def test_access_granted_again_to_a_workspace_of_the_org_lifts_its_gone_mark(
    make_bot: Callable[..., Any],
) -> None:
    """team_access_revoked, then the org grants the workspace access again: its first request (served by
    the org's install) lifts the mark, so its usage is recorded again."""
    harness: BotHarness = await make_bot(**oauth_settings())
    redis = harness.deps.redis
    await install(harness, IN_ORG, "U0ORGBOT", "B0ORGBOT", enterprise_id=ORG, is_enterprise_install=True)
    event = {"type": "team_access_revoked", "team_ids": [ALSO_IN_ORG], "event_ts": f"{time.time():.6f}"}
    assert (await harness.post(org_event(event, org_wide=True), "application/json"))[0] == 200
    assert await redis.exists(UsageKeys(ALSO_IN_ORG).gone) == 1
    assert harness.deps.installations is not None
    served = await harness.deps.installations.bot_for(ORG, ALSO_IN_ORG, False)
    assert served is not None and served.bot_id == "B0ORGBOT"
    assert not await redis.exists(UsageKeys(ALSO_IN_ORG).gone)
    assert await redis.get(f"kimibot:install:{{{ALSO_IN_ORG}}}:org") == ORG


# ---- finding 3: a refresh Slack processed is always stored ------------------------------------------


def is_refresh(args: dict[str, Any]) -> bool:
    return args.get("grant_type") == "refresh_token"


async def stored_token(harness: BotHarness) -> str:
    assert harness.deps.installations is not None
    stored = await harness.deps.installations.store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM)
    assert stored is not None
    return str(stored.bot_token)


async def test_a_job_cancelled_mid_refresh_still_stores_the_new_token(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    harness: BotHarness = await make_bot(**oauth_settings())
    await rotating_install(harness, 30)  # as good as expired: the job waits for the refresh
    installations = harness.deps.installations
    assert installations is not None
    hold = fake_slack.hold("oauth.v2.access", when=is_refresh)
    try:
        job = asyncio.create_task(installations.bot_for_team(SECOND_TEAM))
        await hold.wait()  # Slack has rotated the pair; its answer is on the way
        job.cancel()  # shutdown cancels the job
        await asyncio.gather(job, return_exceptions=True)
    finally:
        hold.release()
    await installations.close()
    [refresh] = refreshes(fake_slack)
    assert await stored_token(harness) == refresh.args["_result"]["access_token"]
    assert not await harness.deps.redis.exists(LOCK)


async def test_shutdown_waits_for_a_refresh_in_flight(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    harness: BotHarness = await make_bot(**oauth_settings())
    await rotating_install(harness, 3_600)  # valid: a request refreshes beside it
    installations = harness.deps.installations
    assert installations is not None
    hold = fake_slack.hold("oauth.v2.access", when=is_refresh)
    try:
        assert await installations.bot_for(None, SECOND_TEAM, False) is not None
        await hold.wait()
        closing = asyncio.create_task(installations.close())
        await asyncio.sleep(0.2)
    finally:
        hold.release()
    await closing
    [refresh] = refreshes(fake_slack)
    assert await stored_token(harness) == refresh.args["_result"]["access_token"]


async def test_a_refresh_whose_lock_lapsed_still_stores_its_token(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    """The stored bot is still the one whose refresh token was spent: the new pair is stored even though
    the lock lapsed meanwhile (the old pair is dead)."""
    harness: BotHarness = await make_bot(**oauth_settings())
    await rotating_install(harness, 3_600)
    installations = harness.deps.installations
    assert installations is not None
    hold = fake_slack.hold("oauth.v2.access", when=is_refresh)
    try:
        refreshing = asyncio.create_task(installations.bot_for_team(SECOND_TEAM))
        await hold.wait()
        await harness.deps.redis.delete(LOCK)  # as if it had lapsed
    finally:
        hold.release()
    got = await refreshing
    new_token = refreshes(fake_slack)[0].args["_result"]["access_token"]
    assert got is not None and got.token == new_token
    assert await stored_token(harness) == new_token


# ---- finding 2: SLACK_BOT_TOKEN beside OAuth never stops the bot for the other workspaces --------------


async def test_a_revoked_slack_bot_token_beside_oauth_is_a_warning_not_a_crash(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """SLACK_BOT_TOKEN's workspace uninstalled kimibot (Slack revoked the token): at the next start the
    bot still serves the workspaces installed through OAuth, and that one is not seeded."""
    harness: BotHarness = await make_bot(**oauth_settings(slack_bot_token=TOKEN))
    await install(harness, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID)
    fake_slack.fail("auth.test", "token_revoked")
    health = Health(checks={"SLACK_BOT_TOKEN": "checking"})
    await _start_up(harness.deps, health, check_client(harness.settings), None, False)
    assert health.checks == {"SLACK_BOT_TOKEN": "ok"}
    assert harness.deps.installations is not None
    assert await harness.deps.installations.bot_for_team(TEAM_ID) is None  # not seeded
    assert await ask_from(harness, "still there?", "1700001800.000100") == 200
    await harness.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700001800.000100")) == 1


async def test_seeding_slack_bot_tokens_workspace_waits_out_a_redis_error(
    make_bot: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    harness: BotHarness = await make_bot(**oauth_settings(slack_bot_token=TOKEN))
    installations = harness.deps.installations
    assert installations is not None
    seed, tries = installations.seed, []

    async def flaky_seed(token: str, auth: dict[str, Any]) -> bool:
        tries.append(token)
        if len(tries) == 1:
            raise RedisConnectionError("Redis is restarting")
        return await seed(token, auth)

    monkeypatch.setattr(installations, "seed", flaky_seed)
    health = Health(checks={"SLACK_BOT_TOKEN": "checking"})
    await _start_up(harness.deps, health, check_client(harness.settings), None, False)
    assert len(tries) == 2 and health.checks == {"SLACK_BOT_TOKEN": "ok"}
    seeded = await installations.bot_for_team(TEAM_ID)
    assert seeded is not None and seeded.token == TOKEN


# ---- finding 5: changing the encryption key in a rolling deploy -------------------------------------


def readable_by_each_other(*settings: str) -> bool:
    """Replicas with these KIMIBOT_ENCRYPTION_KEY settings, side by side: each reads what any other
    writes (a fresh record, and one it re-sealed on reading)."""
    for writer in settings:
        written = Sealer(writer).seal({"bot_token": "xoxb-t"})
        for reader in settings:
            try:
                if Sealer(reader).open(written) != {"bot_token": "xoxb-t"}:
                    return False
            except Undecryptable:
                return False
    return True


def test_the_documented_key_change_keeps_every_replica_reading_during_both_rollouts() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Installing in many workspaces") :]
    first, second = section.index("first `old,new` on every replica"), section.index("`new,old`")
    assert first < second  # two rollouts, in this order
    assert readable_by_each_other(old, f"{old},{new}")  # during the first rollout
    assert readable_by_each_other(f"{old},{new}", f"{new},{old}")  # during the second
    assert not readable_by_each_other(old, f"{new},{old}")  # what going straight to new,old would do


async def test_a_job_that_cannot_run_nor_be_handed_back_waits_for_its_lease_to_lapse(
    make_bot: Callable[..., Any],
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis fails just as the job is handed back: the thread's task ends cleanly (no stray exception);
    the lease lapses and the job runs once the token can be had."""
    harness: BotHarness = await make_bot(**oauth_settings(job_visibility_timeout=0.3), start_worker=False)
    await queued_then_expired(harness, fake_slack, "1700001900.000100")
    fake_slack.fail("oauth.v2.access", status=503, times=2)
    hand_back, failed = Lease.hand_back, []

    async def flaky_hand_back(self: Lease, job: Any, *, after_ms: int = 0) -> None:
        if not failed:
            failed.append(job)
            raise RedisConnectionError("Redis is restarting")
        await hand_back(self, job, after_ms=after_ms)

    monkeypatch.setattr(Lease, "hand_back", flaky_hand_back)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    harness.run_worker()
    await harness.settle(limit_s=20)
    assert failed and errors == []
    assert len(fake_slack.bodies(CHANNEL, "1700001900.000100")) == 1
    assert await harness.deps.queue.dead_letters() == []


async def test_a_job_past_its_attempts_is_told_once_the_token_can_be_had(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """The attempt limit is applied once the token works: telling the asker needs it, so the job is not
    dead-lettered untold while the token cannot be had."""
    harness: BotHarness = await make_bot(**oauth_settings(job_visibility_timeout=0.3), start_worker=False)
    await queued_then_expired(harness, fake_slack, "1700002000.000100")
    [member] = await harness.deps.redis.zrange(READY_KEY, 0, -1)
    thread = thread_from_member(str(member))
    [raw] = await harness.deps.queue.waiting(thread)
    await harness.deps.redis.hset(ThreadKeys(thread).attempts, raw, 3)  # type: ignore[misc]  # the next is the 4th
    fake_slack.fail("oauth.v2.access", status=503, times=3)
    harness.run_worker()
    await wait_for(lambda: len(refreshes(fake_slack)) >= 4, limit_s=20)
    assert await harness.deps.queue.dead_letters() == []  # not given up while the asker cannot be told
    await harness.settle(limit_s=20)
    assert [d["reason"] for d in await harness.deps.queue.dead_letters()] == ["attempts"]
    assert len(fake_slack.bodies(CHANNEL, "1700002000.000100")) == 1  # told, with the new token
