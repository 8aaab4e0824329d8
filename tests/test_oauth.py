"""OAuth mode: installing in a second workspace through /slack/install and /slack/oauth_redirect against the
fake Slack's oauth.v2.access, answering that workspace with its own token, refusing forged or replayed
states, ignoring workspaces without an installation, and tokens encrypted at rest."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Redis
from slack_sdk.errors import SlackApiError

from bot.deps import build_deps
from bot.redis_client import build_redis
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import APP_ID, CLIENT_ID, CLIENT_SECRET, TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, CHANNEL, command_body, json_body

SECOND_TEAM = "T0SECOND42"
SECOND_BOT_USER = "U0SECONDBOT"
SECOND_BOT_ID = "B0SECONDBOT"
STATE_SECRET = "a-long-random-state-secret-shared-by-replicas"


def oauth_settings(**extra: Any) -> dict[str, Any]:
    return {
        "slack_bot_token": "",
        "slack_client_id": CLIENT_ID,
        "slack_client_secret": CLIENT_SECRET,
        "slack_state_secret": STATE_SECRET,
        **extra,
    }


async def start_install(bot: BotHarness) -> tuple[str, str]:
    """GET /slack/install: Slack's consent URL and the state in it (also set as a cookie)."""
    assert bot.session is not None
    async with bot.session.get(bot.url("/slack/install"), allow_redirects=False) as response:
        assert response.status == 302
        location = response.headers["Location"]
        cookie = response.headers["Set-Cookie"]
    query = parse_qs(urlparse(location).query)
    state = query["state"][0]
    assert f"slack-app-oauth-state={state}" in cookie
    return location, state


async def finish_install(bot: BotHarness, code: str, state: str, *, cookie_state: str | None = None) -> int:
    """The browser comes back from Slack to /slack/oauth_redirect with the code and the state."""
    assert bot.session is not None
    headers = {"Cookie": f"slack-app-oauth-state={cookie_state or state}"}
    url = bot.url("/slack/oauth_redirect") + "?" + urlencode({"code": code, "state": state})
    async with bot.session.get(url, headers=headers, allow_redirects=False) as response:
        await response.read()
        return response.status


async def install_second(bot: BotHarness, fake_slack: FakeSlack, **grant: Any) -> None:
    _, state = await start_install(bot)
    code = fake_slack.approve_install(SECOND_TEAM, bot_user_id=SECOND_BOT_USER, bot_id=SECOND_BOT_ID, **grant)
    assert await finish_install(bot, code, state) == 200


async def ask_from(
    bot: BotHarness, text: str, ts: str, team: str = SECOND_TEAM, bot_user: str = SECOND_BOT_USER
) -> int:
    """@kimibot in another workspace, as Slack delivers it (the message also exists in the fake)."""
    bot.slack.messages[CHANNEL].append(
        {"type": "message", "user": ALICE, "text": f"<@{bot_user}> {text}", "ts": ts}
    )
    status, _ = await bot.post(second_team_mention(text, ts, team, bot_user), "application/json")
    return status


def second_team_mention(
    text: str, ts: str, team: str = SECOND_TEAM, bot_user: str = SECOND_BOT_USER
) -> bytes:
    event = {
        "type": "app_mention",
        "user": ALICE,
        "text": f"<@{bot_user}> {text}",
        "ts": ts,
        "channel": CHANNEL,
        "event_ts": ts,
        "team": team,
    }
    return json_body(
        {
            "token": "legacy-verification-token",
            "team_id": team,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": f"Ev{ts.replace('.', '')}",
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "enterprise_id": None,
                    "team_id": team,
                    "user_id": bot_user,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
        }
    )


async def test_install_page_redirects_to_slack_with_the_manifest_scopes(
    make_bot: Callable[..., Any],
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    location, state = await start_install(bot)
    parsed = urlparse(location)
    query = parse_qs(parsed.query)
    assert (parsed.netloc, parsed.path) == ("slack.com", "/oauth/v2/authorize")
    assert query["client_id"] == [CLIENT_ID]
    scopes = set(query["scope"][0].split(","))
    assert {"app_mentions:read", "chat:write", "commands", "users:read"} <= scopes
    assert await bot.deps.redis.exists(f"kimibot:oauth-state:{state}") == 1


async def test_second_workspace_installed_then_answered_with_its_own_token(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await install_second(bot, fake_slack)
    exchange = fake_slack.calls_of("oauth.v2.access")
    assert len(exchange) == 1 and exchange[0].basic == (CLIENT_ID, CLIENT_SECRET)  # app credentials
    installed = exchange[0].args["_result"]["access_token"]
    assert installed.startswith(f"xoxb-{SECOND_TEAM}-")
    assert bot.deps.installations is not None
    stored = await bot.deps.installations.store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM)
    assert stored is not None and stored.bot_token == installed and stored.bot_id == SECOND_BOT_ID

    before = len(fake_slack.calls)
    assert await ask_from(bot, "What is Redis?", "1700000100.000100") == 200
    await bot.settle()
    answer = fake_slack.bodies(CHANNEL, "1700000100.000100")
    assert len(answer) == 1 and "What is Redis?" in answer[0]
    assert len(fake_kimi.requests) == 1
    # Every Slack call made for that workspace carried its token (the Authorization header the fake saw).
    tokens = {str(call.args.get("token")) for call in fake_slack.calls[before:]}
    assert tokens == {installed}
    assert fake_slack.problems == []


async def test_event_from_a_workspace_without_installation_gets_200_and_nothing_else(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, caplog: pytest.LogCaptureFixture
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    assert await ask_from(bot, "anyone there?", "1700000200.000100", team="T0NOTHERE1") == 200
    await bot.settle()
    assert fake_slack.calls == [] and fake_kimi.requests == []
    lines = [r for r in caplog.records if "without an installation" in r.getMessage()]
    assert len(lines) == 1 and getattr(lines[0], "team_id", "") == "T0NOTHERE1"
    assert await bot.deps.queue.length() == 0


async def test_forged_replayed_and_missing_state_are_refused(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    code = fake_slack.approve_install(SECOND_TEAM, bot_user_id=SECOND_BOT_USER, bot_id=SECOND_BOT_ID)
    # A state we never issued (well-formed, wrong signature), and one we never issued at all.
    assert await finish_install(bot, code, "made-up.0123456789abcdef0123456789abcdef") == 401
    assert await finish_install(bot, code, "") in (400, 401)
    # A real state, but the browser's cookie holds another: not the browser that started.
    _, state = await start_install(bot)
    assert await finish_install(bot, code, state, cookie_state="someone-elses") == 400
    assert fake_slack.calls_of("oauth.v2.access") == []
    # The real one works once; replayed (another code, same state), it is refused.
    assert await finish_install(bot, code, state) == 200
    second_code = fake_slack.approve_install(SECOND_TEAM, bot_user_id=SECOND_BOT_USER, bot_id=SECOND_BOT_ID)
    assert await finish_install(bot, second_code, state) == 401
    assert len(fake_slack.calls_of("oauth.v2.access")) == 1


async def test_state_expires(make_bot: Callable[..., Any], fake_slack: FakeSlack) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    _, state = await start_install(bot)
    ttl = await bot.deps.redis.ttl(f"kimibot:oauth-state:{state}")
    assert 0 < ttl <= 600
    await bot.deps.redis.pexpire(f"kimibot:oauth-state:{state}", 1)
    await asyncio.sleep(0.01)
    code = fake_slack.approve_install(SECOND_TEAM, bot_user_id=SECOND_BOT_USER, bot_id=SECOND_BOT_ID)
    assert await finish_install(bot, code, state) == 401
    assert fake_slack.calls_of("oauth.v2.access") == []


async def test_tokens_are_encrypted_at_rest_when_a_key_is_set(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, redis_url: str
) -> None:
    key = Fernet.generate_key().decode()
    bot: BotHarness = await make_bot(**oauth_settings(kimibot_encryption_key=key))
    await install_second(bot, fake_slack)
    token = fake_slack.calls_of("oauth.v2.access")[0].args["_result"]["access_token"]
    raw = await asyncio.to_thread(build_redis, redis_url)  # a cluster client on a cluster
    try:
        keys = [k async for k in raw.scan_iter(match=f"kimibot:install:{{{SECOND_TEAM}}}:*")]
        assert keys
        for name in keys:
            value = await raw.get(name)
            assert value is not None and token not in value and "xoxb" not in value
            assert json.loads(Fernet(key.encode()).decrypt(value.removeprefix("fernet:").encode()))
    finally:
        await raw.aclose()
    # ...and still usable: the workspace is answered with it.
    assert await ask_from(bot, "hello", "1700000300.000100") == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700000300.000100")) == 1


async def test_single_workspace_mode_has_no_install_routes(bot: BotHarness) -> None:
    assert bot.session is not None and bot.deps.installations is None
    async with bot.session.get(bot.url("/slack/install"), allow_redirects=False) as response:
        assert response.status == 404


def test_team_id_of_first_workspace_differs() -> None:
    assert TEAM_ID != SECOND_TEAM  # the tests above rely on the default workspace not being installed


THIRD_TEAM = "T0THIRD777"


async def install(bot: BotHarness, team: str, bot_user: str, bot_id: str, **grant: Any) -> None:
    _, state = await start_install(bot)
    code = bot.slack.approve_install(team, bot_user_id=bot_user, bot_id=bot_id, **grant)
    assert await finish_install(bot, code, state) == 200


def team_event(team: str, event: dict[str, Any], *, bot_user: str = SECOND_BOT_USER) -> bytes:
    return json_body(
        {
            "token": "legacy-verification-token",
            "team_id": team,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": f"Ev{time.monotonic_ns()}",
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "enterprise_id": None,
                    "team_id": team,
                    "user_id": bot_user,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
        }
    )


async def keys_of(redis: Redis, team: str) -> set[str]:
    return {str(k) async for k in redis.scan_iter(match="kimibot:*") if team in str(k)}


@pytest.mark.parametrize(
    "event",
    [
        {"type": "app_uninstalled", "event_ts": "1700000500.000100"},
        {
            "type": "tokens_revoked",
            "tokens": {"oauth": [], "bot": [SECOND_BOT_USER]},
            "event_ts": "1700000500.000100",
        },
    ],
    ids=["app_uninstalled", "tokens_revoked"],
)
async def test_uninstall_deletes_that_workspace_and_nothing_of_the_other(
    make_bot: Callable[..., Any],
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    redis_url: str,
    event: dict[str, Any],
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID)
    await install(bot, THIRD_TEAM, "U0THIRDBOT", "B0THIRDBOT")
    assert await ask_from(bot, "second's question", "1700000400.000100") == 200
    assert await ask_from(bot, "third's question", "1700000400.000200", THIRD_TEAM, "U0THIRDBOT") == 200
    await bot.settle()
    raw = await asyncio.to_thread(build_redis, redis_url)  # a cluster client on a cluster
    try:
        for team in (SECOND_TEAM, THIRD_TEAM):  # the other parts' keys, as the key layout names them
            await raw.hset(f"kimibot:settings:{{{team}}}:channel:{CHANNEL}", mapping={"model": "kimi-k3"})
            await raw.hset(f"kimibot:settings:{{{team}}}:workspace", mapping={"followups": "all"})
            await raw.hset(f"kimibot:usage:{{{team}}}:day:2026-11-30", mapping={"cost": "0.1"})
            await bot.deps.names.put(team, ALICE, "alice")
        second_before = await keys_of(raw, SECOND_TEAM)
        third_before = await keys_of(raw, THIRD_TEAM)
        assert any(":thread:" in k for k in second_before) and any(":install:" in k for k in second_before)
        assert any(":thread:" in k for k in third_before)

        status, _ = await bot.post(team_event(SECOND_TEAM, event), "application/json")
        assert status == 200
        # Only the hour-long mark that stops a request in flight from recording usage again (no data).
        assert await keys_of(raw, SECOND_TEAM) == {f"kimibot:usage:{{{SECOND_TEAM}}}:gone"}
        assert await keys_of(raw, THIRD_TEAM) == third_before
    finally:
        await raw.aclose()
    # The uninstalled workspace is now unknown: ignored, no Slack or Kimi call.
    calls, asked = len(fake_slack.calls), len(fake_kimi.requests)
    assert await ask_from(bot, "still there?", "1700000600.000100") == 200
    await bot.settle()
    assert len(fake_slack.calls) == calls and len(fake_kimi.requests) == asked
    # ...and the other one is still answered.
    assert await ask_from(bot, "and me?", "1700000600.000200", THIRD_TEAM, "U0THIRDBOT") == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700000600.000200")) == 1


async def test_token_rotation_race_spends_the_refresh_token_once(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    # A rotating token seconds from expiry: every replica needs the refreshed one (with an hour left, those
    # that find the lock taken go on with the current token: test_oauth_review.py).
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID, rotating=True, expires_in=30)
    first = fake_slack.calls_of("oauth.v2.access")[0].args["_result"]
    assert first["access_token"].startswith("xoxe.xoxb-") and first["refresh_token"]
    other_replica = build_deps(bot.settings)  # its own clients and Redis connection, the same Redis
    try:
        fake_slack.delay["oauth.v2.access"] = 0.2  # a slow refresh: the replicas overlap for sure
        replicas = [bot.deps.installations, other_replica.installations] * 4
        bots = await asyncio.gather(*(r.bot_for_team(SECOND_TEAM) for r in replicas if r is not None))
    finally:
        fake_slack.delay.clear()
        await other_replica.close()
    refreshes = [
        c for c in fake_slack.calls_of("oauth.v2.access") if c.args.get("grant_type") == "refresh_token"
    ]
    assert len(refreshes) == 1 and refreshes[0].args["refresh_token"] == first["refresh_token"]
    refreshed = refreshes[0].args["_result"]
    assert refreshed["ok"] is True
    assert {b.token if b is not None else None for b in bots} == {refreshed["access_token"]}
    assert bot.deps.installations is not None
    stored = await bot.deps.installations.store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM)
    assert stored is not None and stored.bot_refresh_token == refreshed["refresh_token"]
    assert stored.bot_token_expires_at is not None and stored.bot_token_expires_at > time.time() + 3 * 3_600
    assert not await bot.deps.redis.exists(f"kimibot:install:{{{SECOND_TEAM}}}:rotate-lock")
    # The workspace is answered with the refreshed token.
    before = len(fake_slack.calls)
    assert await ask_from(bot, "after rotation", "1700000700.000100") == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700000700.000100")) == 1
    assert {str(c.args.get("token")) for c in fake_slack.calls[before:]} == {refreshed["access_token"]}


async def test_fake_slack_refuses_a_refresh_token_spent_before(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    """What the lock guards against: the second use of a refresh token fails, as on Slack."""
    bot: BotHarness = await make_bot(**oauth_settings())
    await install(bot, SECOND_TEAM, SECOND_BOT_USER, SECOND_BOT_ID, rotating=True, expires_in=3_600)
    refresh = fake_slack.calls_of("oauth.v2.access")[0].args["_result"]["refresh_token"]
    assert bot.deps.installations is not None
    client = bot.deps.installations.rotator.client
    ok = await client.oauth_v2_access(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, grant_type="refresh_token", refresh_token=refresh
    )
    assert ok["ok"] is True
    with pytest.raises(SlackApiError) as refused:
        await client.oauth_v2_access(
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            grant_type="refresh_token",
            refresh_token=refresh,
        )
    assert refused.value.response["error"] == "invalid_refresh_token"


async def test_org_wide_install_answers_each_workspace_of_the_org_with_the_org_token(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    org, workspace = "E0ORG12345", "T0INORG999"
    await install(bot, workspace, "U0ORGBOT", "B0ORGBOT", enterprise_id=org, is_enterprise_install=True)
    org_token = fake_slack.calls_of("oauth.v2.access")[0].args["_result"]["access_token"]
    assert await bot.deps.redis.exists(f"kimibot:install:{{{org}}}:bot") == 1  # keyed by the enterprise

    ts = "1700000800.000100"
    fake_slack.messages[CHANNEL].append(
        {"type": "message", "user": ALICE, "text": "<@U0ORGBOT> hi", "ts": ts}
    )
    body = json.loads(
        team_event(
            workspace,
            {"type": "app_mention", "user": ALICE, "text": "<@U0ORGBOT> hi", "ts": ts, "channel": CHANNEL},
            bot_user="U0ORGBOT",
        )
    )
    body["enterprise_id"] = org
    body["authorizations"][0].update(enterprise_id=org, is_enterprise_install=True)
    before = len(fake_slack.calls)
    status, _ = await bot.post(json.dumps(body).encode(), "application/json")
    assert status == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, ts)) == 1
    assert {str(c.args.get("token")) for c in fake_slack.calls[before:]} == {org_token}

    # Uninstalled org-wide: the org's installation and the data of the workspaces it served are deleted.
    body = json.loads(team_event(workspace, {"type": "app_uninstalled"}, bot_user="U0ORGBOT"))
    body["enterprise_id"] = org
    body["authorizations"][0].update(enterprise_id=org, is_enterprise_install=True)
    assert (await bot.post(json.dumps(body).encode(), "application/json"))[0] == 200
    assert [k async for k in bot.deps.redis.scan_iter(match=f"*{org}*")] == []
    assert [k async for k in bot.deps.redis.scan_iter(match=f"*{workspace}*")] == [
        f"kimibot:usage:{{{workspace}}}:gone"  # an hour's mark, no data (test_oauth_review.py)
    ]


async def test_backfill_knows_the_bot_of_the_workspace_it_acts_for(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """Joining an existing thread in the second workspace: that workspace's bot's replies are ours."""
    bot: BotHarness = await make_bot(**oauth_settings())
    await install_second(bot, fake_slack)
    root = fake_slack.seed(CHANNEL, user=ALICE, text="first question")
    fake_slack.seed(CHANNEL, user=SECOND_BOT_USER, bot_id=SECOND_BOT_ID, text="an old answer", thread_ts=root)
    ts = fake_slack.new_ts()
    event = {
        "type": "app_mention",
        "user": ALICE,
        "text": f"<@{SECOND_BOT_USER}> follow-up",
        "ts": ts,
        "thread_ts": root,
        "channel": CHANNEL,
    }
    fake_slack.messages[CHANNEL].append({k: v for k, v in event.items() if k != "channel"})
    assert (await bot.post(team_event(SECOND_TEAM, event), "application/json"))[0] == 200
    await bot.settle()
    roles = [(m["role"], m["content"]) for m in fake_kimi.requests[0]["messages"][1:]]
    assert roles == [
        ("user", "alice: first question"),
        ("assistant", "an old answer"),
        ("user", "alice: follow-up"),
    ]


async def test_slash_command_from_the_second_workspace_runs_with_its_token(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """/kimi: the announcement (a job of its own) and the answer (another job) both act for the workspace."""
    bot: BotHarness = await make_bot(**oauth_settings())
    await install_second(bot, fake_slack)
    installed = fake_slack.calls_of("oauth.v2.access")[0].args["_result"]["access_token"]
    body = parse_qs(command_body("What is Redis?", response_url=fake_slack.response_url()).decode())
    body["team_id"] = [SECOND_TEAM]
    before = len(fake_slack.calls)
    status, _ = await bot.post(urlencode(body, doseq=True).encode(), "application/x-www-form-urlencoded")
    assert status == 200
    await bot.settle()
    assert len(fake_kimi.requests) == 1
    posted = [c for c in fake_slack.calls[before:] if c.method == "chat.postMessage"]
    assert posted and {str(c.args.get("token")) for c in fake_slack.calls[before:]} == {installed}
    assert fake_slack.problems == []


async def test_store_keeps_the_latest_bot_and_merges_it_into_installations(redis_url: str) -> None:
    """FileInstallationStore's semantics: a reinstall replaces the bot; an installer's installation read
    later carries the latest bot token; deleting removes both."""
    from slack_sdk.oauth.installation_store.models.installation import Installation

    from bot.installations import RedisInstallationStore

    redis = await asyncio.to_thread(build_redis, redis_url)
    store = RedisInstallationStore(redis)
    try:
        first = Installation(
            app_id=APP_ID,
            team_id=SECOND_TEAM,
            user_id="U0FIRST",
            bot_token="xoxb-1",
            bot_id="B1",
            bot_user_id="U1",
        )
        await store.async_save(first)
        second = Installation(
            app_id=APP_ID,
            team_id=SECOND_TEAM,
            user_id="U0OTHER",
            bot_token="xoxb-2",
            bot_id="B1",
            bot_user_id="U1",
        )
        await store.async_save(second)
        bot = await store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM)
        assert bot is not None and bot.bot_token == "xoxb-2"
        by_first = await store.async_find_installation(
            enterprise_id=None, team_id=SECOND_TEAM, user_id="U0FIRST"
        )
        assert by_first is not None and by_first.user_id == "U0FIRST" and by_first.bot_token == "xoxb-2"
        latest = await store.async_find_installation(enterprise_id=None, team_id=SECOND_TEAM)
        assert latest is not None and latest.user_id == "U0OTHER"
        assert await store.async_find_bot(enterprise_id=None, team_id=THIRD_TEAM) is None
        await store.async_delete_all(enterprise_id=None, team_id=SECOND_TEAM)
        assert await store.async_find_bot(enterprise_id=None, team_id=SECOND_TEAM) is None
        assert (
            await store.async_find_installation(enterprise_id=None, team_id=SECOND_TEAM, user_id="U0FIRST")
            is None
        )
        assert await store.async_find_installation(enterprise_id=None, team_id=SECOND_TEAM) is None
    finally:
        await redis.aclose()


async def test_a_reinstall_replaces_the_token_the_workspace_is_answered_with(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(**oauth_settings())
    await install_second(bot, fake_slack)
    await install_second(bot, fake_slack)
    first, latest = (c.args["_result"]["access_token"] for c in fake_slack.calls_of("oauth.v2.access"))
    assert first != latest
    before = len(fake_slack.calls)
    assert await ask_from(bot, "which token?", "1700000900.000100") == 200
    await bot.settle()
    assert {str(c.args.get("token")) for c in fake_slack.calls[before:]} == {latest}


async def test_removing_one_workspace_of_an_org_keeps_the_org_wide_install(redis_url: str) -> None:
    from slack_sdk.oauth.installation_store.models.bot import Bot

    from bot.installations import RedisInstallationStore

    redis = await asyncio.to_thread(build_redis, redis_url)
    store = RedisInstallationStore(redis)
    try:
        org = Bot(
            enterprise_id="E0ORG",
            team_id=None,
            bot_token="xoxb-org",
            bot_id="B",
            bot_user_id="U",
            is_enterprise_install=True,
            installed_at=time.time(),
        )
        team = Bot(
            enterprise_id="E0ORG",
            team_id="T0INORG",
            bot_token="xoxb-team",
            bot_id="B",
            bot_user_id="U",
            installed_at=time.time(),
        )
        await store.async_save_bot(org)
        await store.async_save_bot(team)
        await store.async_delete_all(enterprise_id="E0ORG", team_id="T0INORG")
        assert await store.async_find_bot(enterprise_id="E0ORG", team_id="T0INORG") is None
        kept = await store.async_find_bot(
            enterprise_id="E0ORG", team_id="T0INORG", is_enterprise_install=True
        )
        assert kept is not None and kept.bot_token == "xoxb-org"
        await store.async_delete_all(enterprise_id="E0ORG", team_id=None)
        assert (
            await store.async_find_bot(enterprise_id="E0ORG", team_id=None, is_enterprise_install=True)
            is None
        )
    finally:
        await redis.aclose()


async def test_in_oauth_mode_a_question_waiting_behind_another_gets_its_placeholder_with_its_workspaces_token(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """The once-a-second check for waiting questions reads the workspace's token only when one waits (300
    running answers would otherwise read 300 installations a second): when one does, its placeholder is
    posted with that workspace's token."""
    from tests.fakes.kimi_api import Reply

    bot: BotHarness = await make_bot(**oauth_settings())
    await install_second(bot, fake_slack)
    installed = fake_slack.calls_of("oauth.v2.access")[0].args["_result"]["access_token"]
    fake_kimi.script(Reply(content="first answer", first_byte_delay=2.5), Reply(content="second answer"))
    root, follow = "1700000008.000900", "1700000008.000901"
    assert await ask_from(bot, "a slow one", root) == 200
    fake_slack.messages[CHANNEL].append({"type": "message", "user": ALICE, "text": "and this", "ts": follow})
    event = {
        "type": "message",
        "user": ALICE,
        "text": "and this",
        "ts": follow,
        "thread_ts": root,
        "channel": CHANNEL,
        "event_ts": follow,
        "channel_type": "channel",
        "team": SECOND_TEAM,
    }
    assert (await bot.post(team_event(SECOND_TEAM, event), "application/json"))[0] == 200

    def waiting() -> list[dict[str, Any]]:
        return [m for m in fake_slack.replies(CHANNEL, root) if "Waiting for the answer above" in str(m)]

    async with asyncio.timeout(2.0):  # well before the first answer is done
        while not waiting():  # noqa: ASYNC110 - effects on the fake server
            await asyncio.sleep(0.02)
    posts = [c for c in fake_slack.calls_of("chat.postMessage") if "Waiting" in json.dumps(c.args)]
    assert [c.args.get("token") for c in posts] == [installed]
    await bot.settle()
    assert [b.split("\n")[0] for b in fake_slack.bodies(CHANNEL, root)][:2] == [
        "first answer",
        "second answer",
    ]
