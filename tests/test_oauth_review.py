"""OAuth mode after the adversarial review: a refresh that fails or is slow never makes a workspace look
uninstalled, a refresh never outlives its lock nor overwrites a newer token, encryption keys rotate,
uninstall is complete and not undone, and the smaller findings."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from slack_sdk.oauth.installation_store.models.bot import Bot
from slack_sdk.web.async_client import AsyncWebClient

from bot.health import Health
from bot.installations import Installations
from bot.kimi.events import Usage
from bot.redis_client import build_redis
from bot.server import _start_up, team_bot_for_job
from bot.settings import SettingsError, load_settings
from bot.slack.acting import TeamBot
from bot.startup import check_client
from bot.store import DEAD_LETTER_KEY
from bot.worker import RunLater
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import BOT_ID, BOT_USER_ID, CLIENT_ID, CLIENT_SECRET, TEAM_ID, TOKEN, FakeSlack
from tests.slack_requests import ALICE, CHANNEL
from tests.test_doctor import doctor
from tests.test_oauth import (
    SECOND_BOT_ID,
    SECOND_BOT_USER,
    SECOND_TEAM,
    THIRD_TEAM,
    ask_from,
    finish_install,
    install,
    keys_of,
    oauth_settings,
    start_install,
    team_event,
)
from tests.test_oauth_ops import OAUTH_ENV
from tests.test_serve_process import wait_for

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
    # One call per attempt (the request's, beside it, and the job's unless the lock was still taken), no
    # retries (the rotator's own client, so a refresh never outlives its lock); the answer went out with
    # the current token.
    assert 1 <= len(refreshes(fake_slack)) <= 2
    assert not any(c.args.get("_result", {}).get("ok") for c in refreshes(fake_slack))  # all 503s
    assert {str(c.args.get("token")) for c in fake_slack.calls_of("chat.postMessage")} == {token}
    assert bot.deps.installations is not None
    rotating_client = bot.deps.installations.rotator.client
    assert rotating_client.retry_handlers == [] and rotating_client.timeout == 5  # well under the lock TTL


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


async def test_a_request_does_not_wait_for_the_refresh_of_a_valid_token(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    token = await rotating_install(bot, 3_600)
    fake_slack.delay["oauth.v2.access"] = 2.0  # a slow Slack: the 3 s ack must not wait for it
    started = time.monotonic()
    assert await ask_from(bot, "no waiting?", "1700001050.000100") == 200
    assert time.monotonic() - started < 1.0
    await bot.settle()
    await wait_for(lambda: len(refreshes(fake_slack)) == 1 and "_result" in refreshes(fake_slack)[0].args)
    fake_slack.delay.clear()
    assert len(fake_slack.bodies(CHANNEL, "1700001050.000100")) == 1
    refreshed = refreshes(fake_slack)[0].args["_result"]["access_token"]
    # The answer went out with the token in hand, or with the refreshed one once stored.
    assert {str(c.args.get("token")) for c in fake_slack.calls_of("chat.postMessage")} <= {token, refreshed}
    assert bot.deps.installations is not None
    store = bot.deps.installations.store
    for _ in range(250):  # the refresh beside the request stores its token a moment after Slack's answer
        stored = await store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM)
        if stored is not None and stored.bot_token == refreshed:
            break
        await asyncio.sleep(0.02)
    assert stored is not None and stored.bot_token == refreshed


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


# ---- finding 4: uninstall complete, and not undone -----------------------------------------------------


def uninstall_event(team: str, kind: str = "app_uninstalled", *, age_s: float = 0) -> bytes:
    event: dict[str, Any] = {"type": kind, "event_ts": f"{time.time():.6f}"}
    if kind == "tokens_revoked":
        event["tokens"] = {"oauth": [], "bot": [SECOND_BOT_USER]}
    body = json.loads(team_event(team, event))
    body["event_time"] = int(time.time() - age_s)
    return json.dumps(body).encode()


async def test_a_request_settled_after_the_uninstall_records_nothing(
    make_bot: Callable[..., Any], redis_url: str
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID)
    assert (await bot.post(uninstall_event(SECOND_TEAM), "application/json"))[0] == 200
    # A request the uninstall cancelled settles now: it must not bring the team's usage back.
    counted = await bot.deps.usage.settle(
        SECOND_TEAM,
        "job-1:0",
        Usage(100, 20),
        5_000,
        user=ALICE,
        channel=CHANNEL,
        model="kimi-k2.6",
        answer_id="job-1",
    )
    assert counted is False
    raw = await asyncio.to_thread(build_redis, redis_url)
    try:
        assert await keys_of(raw, SECOND_TEAM) == {f"kimibot:usage:{{{SECOND_TEAM}}}:gone"}
        assert 0 < await raw.ttl(f"kimibot:usage:{{{SECOND_TEAM}}}:gone") <= 3_600
    finally:
        await raw.aclose()


async def test_uninstall_removes_the_teams_dead_letters_only(make_bot: Callable[..., Any]) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID)
    for team in (SECOND_TEAM, THIRD_TEAM, SECOND_TEAM):
        payload = {"thread": f"{team}:{CHANNEL}:1700000000.000100", "job": '{"text":"a question"}'}
        await bot.deps.redis.xadd(DEAD_LETTER_KEY, payload)  # type: ignore[arg-type]
    assert (await bot.post(uninstall_event(SECOND_TEAM), "application/json"))[0] == 200
    left = await bot.deps.redis.xrange(DEAD_LETTER_KEY)
    assert [fields["thread"].split(":")[0] for _, fields in left] == [THIRD_TEAM]


async def test_a_reinstall_between_the_two_uninstall_events_survives_the_second(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID)
    store = bot.deps.installations.store if bot.deps.installations else None
    assert store is not None
    first = await store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM)
    assert first is not None
    first.installed_at = time.time() - 60  # installed a minute ago, uninstalled 5 s ago
    await store.async_save_bot(first)
    uninstalled = uninstall_event(SECOND_TEAM, age_s=5)
    revoked = uninstall_event(SECOND_TEAM, "tokens_revoked", age_s=5)  # sent at the same time, late
    assert (await bot.post(uninstalled, "application/json"))[0] == 200
    assert not await bot.deps.redis.exists(f"kimibot:install:{{{SECOND_TEAM}}}:bot")
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID)  # installed again
    assert (await bot.post(revoked, "application/json"))[0] == 200
    assert await bot.deps.redis.exists(f"kimibot:install:{{{SECOND_TEAM}}}:bot") == 1
    assert await ask_from(bot, "back again?", "1700001300.000100") == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700001300.000100")) == 1
    usage = await bot.deps.usage.day(SECOND_TEAM, bot.deps.usage.now().date())
    assert usage.get("requests") == "1"  # recorded: the reinstall lifted the uninstall's mark


# ---- finding 6: org-wide uninstall and team_access_revoked ---------------------------------------------

ORG, IN_ORG, ALSO_IN_ORG = "E0ORG12345", "T0INORG999", "T0INORG888"


async def org_setup(bot: BotHarness) -> None:
    """An org-wide install that has served two workspaces, one of which also has its own install."""
    await install(bot, IN_ORG, "U0ORGBOT", "B0ORGBOT", enterprise_id=ORG, is_enterprise_install=True)
    await install(bot, IN_ORG, "U0OWNBOT", "B0OWNBOT", enterprise_id=ORG)  # its own, separate install
    for team in (IN_ORG, ALSO_IN_ORG):
        await bot.deps.redis.set(f"kimibot:install:{{{team}}}:org", ORG)  # served by the org's install
        await bot.deps.redis.hset(f"kimibot:settings:{{{team}}}:workspace", "followups", "all")  # type: ignore[misc]


def org_event(event: dict[str, Any], *, org_wide: bool) -> bytes:
    body = json.loads(team_event(IN_ORG, event, bot_user="U0ORGBOT"))
    body["enterprise_id"] = ORG
    body["authorizations"][0].update(enterprise_id=ORG, is_enterprise_install=org_wide)
    if org_wide:
        body.pop("team_id")
    return json.dumps(body).encode()


async def test_an_org_wide_uninstall_keeps_a_workspaces_own_install(make_bot: Callable[..., Any]) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await org_setup(bot)
    status, _ = await bot.post(org_event({"type": "app_uninstalled"}, org_wide=True), "application/json")
    assert status == 200
    redis = bot.deps.redis
    assert not await redis.exists(f"kimibot:install:{{{ORG}}}:bot")
    assert not await redis.exists(f"kimibot:install:{{{IN_ORG}}}:org")
    assert await redis.exists(f"kimibot:install:{{{IN_ORG}}}:bot") == 1  # its own install stays
    assert await redis.exists(f"kimibot:settings:{{{IN_ORG}}}:workspace") == 1  # and its data
    assert not await redis.exists(f"kimibot:settings:{{{ALSO_IN_ORG}}}:workspace")  # served by the org only
    assert bot.deps.installations is not None
    own = await bot.deps.installations.bot_for_team(IN_ORG)
    assert own is not None and own.bot_id == "B0OWNBOT"


async def test_team_access_revoked_forgets_those_workspaces_of_the_org(make_bot: Callable[..., Any]) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await org_setup(bot)
    event = {"type": "team_access_revoked", "team_ids": [ALSO_IN_ORG], "event_ts": f"{time.time():.6f}"}
    assert (await bot.post(org_event(event, org_wide=True), "application/json"))[0] == 200
    redis = bot.deps.redis
    assert not await redis.exists(f"kimibot:settings:{{{ALSO_IN_ORG}}}:workspace")
    assert not await redis.exists(f"kimibot:install:{{{ALSO_IN_ORG}}}:org")
    assert await redis.exists(f"kimibot:install:{{{ORG}}}:bot") == 1  # the org keeps its install
    assert await redis.exists(f"kimibot:settings:{{{IN_ORG}}}:workspace") == 1


# ---- finding 3: encryption keys rotate; a value that cannot be read is an error, not an uninstall ------


def test_the_encryption_key_setting_takes_several_keys() -> None:
    new, old = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings = load_settings(**base(kimibot_encryption_key=f"{new},{old}"))
    assert settings.kimibot_encryption_key == f"{new},{old}"
    with pytest.raises(SettingsError) as caught:
        load_settings(**base(kimibot_encryption_key=f"{new},nope"))
    [problem] = caught.value.problems
    assert problem.startswith("KIMIBOT_ENCRYPTION_KEY is not a Fernet key")


def base(**values: object) -> dict[str, object]:
    return {
        "_env_file": None,
        "slack_signing_secret": "s",
        "moonshot_api_key": "sk",
        **oauth_settings(),
        **values,
    }


async def raw_install_values(redis_url: str, ident: str) -> dict[str, str]:
    raw = await asyncio.to_thread(build_redis, redis_url)  # a cluster client on a cluster
    try:
        return {
            str(k): str(await raw.get(k))
            async for k in raw.scan_iter(match=f"kimibot:install:{{{ident}}}:*")
            if not str(k).endswith((":org", ":rotate-lock"))
        }
    finally:
        await raw.aclose()


async def test_a_new_key_first_and_the_old_one_after_reads_and_reseals(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, redis_url: str
) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    first: BotHarness = await make_bot(**oauth_settings(kimibot_encryption_key=old))
    await install(first, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID)
    await first.stop()
    bot: BotHarness = await make_bot(**oauth_settings(kimibot_encryption_key=f"{new},{old}"))
    assert await ask_from(bot, "rotated key?", "1700001400.000100") == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700001400.000100")) == 1
    # The bot's record (read for every request) is now sealed with the new key alone.
    bot_value = (await raw_install_values(redis_url, SECOND_TEAM))[f"kimibot:install:{{{SECOND_TEAM}}}:bot"]
    assert json.loads(Fernet(new.encode()).decrypt(bot_value.removeprefix("fernet:").encode()))


async def test_an_install_saved_unencrypted_is_encrypted_once_a_key_is_set(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    first: BotHarness = await make_bot(**oauth_settings())
    await install(first, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID)
    await first.stop()
    key = Fernet.generate_key().decode()
    env = {**OAUTH_ENV, "KIMIBOT_ENCRYPTION_KEY": key}
    code, lines, _ = await doctor(fake_slack, fake_kimi, redis_url, tmp_path, **env)
    assert code == 0
    [line] = [x for x in lines if "installations:" in x]
    # The bot's record and the installer's (latest, and by user).
    assert "except 3 record(s) saved before KIMIBOT_ENCRYPTION_KEY was set" in line
    bot: BotHarness = await make_bot(**oauth_settings(kimibot_encryption_key=key))
    assert bot.deps.installations is not None
    assert await bot.deps.installations.bot_for_team(SECOND_TEAM) is not None
    values = await raw_install_values(redis_url, SECOND_TEAM)
    assert values[f"kimibot:install:{{{SECOND_TEAM}}}:bot"].startswith("fernet:")
    code, lines, _ = await doctor(fake_slack, fake_kimi, redis_url, tmp_path, **env)
    [line] = [x for x in lines if "installations:" in x]
    assert "except 2 record(s)" in line  # the installer's records, read when someone installs again


@pytest.mark.parametrize("stored", ["another key", "no key on this replica", "garbled"])
async def test_an_installation_that_cannot_be_read_is_an_error_not_an_uninstall(
    make_bot: Callable[..., Any], fake_kimi: FakeKimi, stored: str
) -> None:
    key = "" if stored == "no key on this replica" else Fernet.generate_key().decode()
    bot: BotHarness = await make_bot(**oauth_settings(kimibot_encryption_key=key))
    value = (
        '{"bot_token": "xoxb-1", trunc'
        if stored == "garbled"
        else "fernet:" + Fernet(Fernet.generate_key()).encrypt(b'{"bot_token":"xoxb-1"}').decode()
    )
    await bot.deps.redis.set(f"kimibot:install:{{{SECOND_TEAM}}}:bot", value)
    assert await ask_from(bot, "there?", "1700001500.000100") == 503  # Slack redelivers; no silent drop
    assert fake_kimi.requests == []
    lease: Any = type("L", (), {"thread": type("T", (), {"team_id": SECOND_TEAM})()})()
    with pytest.raises(RunLater):
        await team_bot_for_job(bot.deps, lease)


# ---- finding 5: SLACK_BOT_TOKEN beside the app credentials --------------------------------------------


async def test_slack_bot_token_with_oauth_serves_its_own_workspace(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """Its workspace gets an installation from auth.test at start (when it has none) and is answered with
    that token beside the workspaces installed through OAuth."""
    bot: BotHarness = await make_bot(**oauth_settings(slack_bot_token=TOKEN))
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID)
    await _start_up(bot.deps, Health(checks={}), check_client(bot.settings), None, False)
    assert bot.deps.installations is not None
    seeded = await bot.deps.installations.bot_for_team(TEAM_ID)
    assert seeded is not None and (seeded.token, seeded.user_id) == (TOKEN, BOT_USER_ID)
    before = len(fake_slack.calls)
    assert await ask_from(bot, "my own workspace?", "1700001600.000100", TEAM_ID, BOT_USER_ID) == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700001600.000100")) == 1
    assert {str(c.args.get("token")) for c in fake_slack.calls[before:]} == {TOKEN}
    # An OAuth install of that workspace wins over the seed, at the next start too.
    await install(bot, TEAM_ID, BOT_USER_ID, BOT_ID)
    installed = fake_slack.calls_of("oauth.v2.access")[-1].args["_result"]["access_token"]
    await _start_up(bot.deps, Health(checks={}), check_client(bot.settings), None, False)
    latest = await bot.deps.installations.bot_for_team(TEAM_ID)
    assert latest is not None and latest.token == installed


async def test_doctor_with_slack_bot_token_and_oauth_checks_both(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    code, lines, err = await doctor(
        fake_slack, fake_kimi, redis_url, tmp_path, **{**OAUTH_ENV, "SLACK_BOT_TOKEN": TOKEN}
    )
    assert code == 0, (lines, err)
    text = "\n".join(lines)
    assert "✓ SLACK_CLIENT_ID and SLACK_CLIENT_SECRET: Slack accepts them" in text
    assert "✓ installations: 0 workspace(s)" in text
    assert f"✓ SLACK_BOT_TOKEN: bot @kimibot ({BOT_USER_ID}) in workspace Fake ({TEAM_ID})" in text


# ---- findings 7, 8, 10: state without a secret, odd states, the token out of reprs ---------------------


async def test_without_a_state_secret_an_install_begun_on_one_replica_finishes_on_another(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    one: BotHarness = await make_bot(**oauth_settings(slack_state_secret=""))
    other: BotHarness = await make_bot(**oauth_settings(slack_state_secret=""))
    _, state = await start_install(one)
    code = fake_slack.approve_install(SECOND_TEAM, bot_user_id=SECOND_BOT_USER, bot_id=SECOND_BOT_ID)
    assert await finish_install(other, code, state) == 200
    # Still one-time, and a state never issued is refused.
    again = fake_slack.approve_install(SECOND_TEAM, bot_user_id=SECOND_BOT_USER, bot_id=SECOND_BOT_ID)
    assert await finish_install(one, again, state) == 401
    assert await finish_install(one, again, "never-issued") == 401
    assert len(fake_slack.calls_of("oauth.v2.access")) == 1


async def test_a_state_with_non_ascii_characters_is_refused_not_an_error(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    code = fake_slack.approve_install(SECOND_TEAM, bot_user_id=SECOND_BOT_USER, bot_id=SECOND_BOT_ID)
    assert await finish_install(bot, code, "nonce.signatureé", cookie_state="nonce.signature%C3%A9") in (
        400,
        401,
    )
    assert await finish_install(bot, code, "nonce.signatureé") == 401
    assert fake_slack.calls_of("oauth.v2.access") == []


def test_a_team_bot_never_shows_its_token() -> None:
    team_bot = TeamBot(token="xoxb-secret-token", team_id=SECOND_TEAM, user_id="U1", bot_id="B1")
    assert "xoxb-secret-token" not in repr(team_bot) and "xoxb-secret-token" not in str(team_bot)
    assert team_bot.token == "xoxb-secret-token"


async def test_a_job_whose_token_cannot_be_had_runs_again_later(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """Queued while the token was valid; by the time the worker takes it, expired and not refreshable:
    the job stays queued (not dead-lettered as "not installed") and is answered once the refresh works."""
    bot: BotHarness = await make_bot(**oauth_settings(job_visibility_timeout=0.3), start_worker=False)
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID, rotating=True, expires_in=3_600)
    assert bot.deps.installations is not None
    store = bot.deps.installations.store
    fake_slack.fail("oauth.v2.access", "invalid_refresh_token")  # the request's refresh: current token used
    assert await ask_from(bot, "later?", "1700001700.000100") == 200
    stored = await store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM)
    assert stored is not None
    stored.bot_token_expires_at = int(time.time()) + 10  # as good as expired now
    await store.async_save_bot(stored)
    fake_slack.fail("oauth.v2.access", status=503, times=2)
    bot.run_worker()
    await wait_for(lambda: len(refreshes(fake_slack)) >= 3)  # the request's, then the job's two tries
    assert fake_slack.bodies(CHANNEL, "1700001700.000100") == []
    assert await bot.deps.queue.dead_letters() == []
    await bot.settle()  # the third try refreshes: answered with the new token
    assert len(fake_slack.bodies(CHANNEL, "1700001700.000100")) == 1
    new_token = refreshes(fake_slack)[-1].args["_result"]["access_token"]
    assert new_token in {str(c.args.get("token")) for c in fake_slack.calls_of("chat.postMessage")}
    assert await bot.deps.queue.dead_letters() == []
