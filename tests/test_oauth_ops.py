"""OAuth mode around the flow: its settings, `kimibot doctor`, and `kimibot serve` serving the install
routes on PORT in Socket Mode as in HTTP mode."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import aiohttp
import pytest
from cryptography.fernet import Fernet

from bot.redis_client import build_redis
from bot.settings import SettingsError, load_settings
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import APP_TOKEN, CLIENT_ID, CLIENT_SECRET, FakeSlack
from tests.slack_requests import ALICE, CHANNEL, envelope
from tests.test_doctor import doctor, failing
from tests.test_serve_process import answered, wait_for
from tests.test_startup_checks import processes, serve_env, start, wait_health

__all__ = ["processes"]  # the fixture, used here

OAUTH_ENV = {
    "SLACK_BOT_TOKEN": "",
    "SLACK_CLIENT_ID": CLIENT_ID,
    "SLACK_CLIENT_SECRET": CLIENT_SECRET,
    "SLACK_STATE_SECRET": "state-secret-for-the-tests",
}


def base(**values: object) -> dict[str, object]:
    return {"_env_file": None, "slack_signing_secret": "s", "moonshot_api_key": "sk", **values}


def test_oauth_mode_needs_no_bot_token_but_both_app_credentials() -> None:
    settings = load_settings(**base(slack_client_id=CLIENT_ID, slack_client_secret=CLIENT_SECRET))
    assert settings.oauth and not settings.slack_bot_token
    with pytest.raises(SettingsError) as caught:
        load_settings(**base(slack_client_id=CLIENT_ID))
    assert [p.split(" ")[0] for p in caught.value.problems] == ["SLACK_CLIENT_SECRET", "SLACK_BOT_TOKEN"]
    assert "Client Secret" in caught.value.problems[0]
    with pytest.raises(SettingsError) as caught:
        load_settings(**base())  # neither: single workspace, which needs SLACK_BOT_TOKEN as before
    assert caught.value.problems[0].startswith("SLACK_BOT_TOKEN is not set")


def test_a_malformed_encryption_key_is_one_line_naming_it() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            **base(
                slack_client_id=CLIENT_ID, slack_client_secret=CLIENT_SECRET, kimibot_encryption_key="nope"
            )
        )
    [problem] = caught.value.problems
    assert problem.startswith("KIMIBOT_ENCRYPTION_KEY is not a Fernet key") and "generate_key" in problem
    good = Fernet.generate_key().decode()
    settings = load_settings(
        **base(slack_client_id=CLIENT_ID, slack_client_secret=CLIENT_SECRET, kimibot_encryption_key=good)
    )
    assert settings.kimibot_encryption_key == good


async def test_doctor_in_oauth_mode_checks_the_app_credentials_and_installations(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    code, lines, err = await doctor(fake_slack, fake_kimi, redis_url, tmp_path, **OAUTH_ENV)
    assert code == 0, (lines, err)
    text = "\n".join(lines)
    assert "✓ SLACK_CLIENT_ID and SLACK_CLIENT_SECRET: Slack accepts them" in text
    assert "✓ installations: 0 workspace(s)" in text
    assert "SLACK_BOT_TOKEN" not in text

    code, lines, _ = await doctor(
        fake_slack, fake_kimi, redis_url, tmp_path, **{**OAUTH_ENV, "SLACK_CLIENT_SECRET": "wrong"}
    )
    assert code == 1
    [bad] = failing(lines)
    assert bad.startswith("✗ SLACK_CLIENT_SECRET was rejected by Slack (bad_client_secret)")


async def test_doctor_names_installations_the_key_cannot_decrypt(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    stored_with = Fernet(Fernet.generate_key())
    raw = await asyncio.to_thread(build_redis, redis_url)  # a cluster client on a cluster
    try:
        await raw.set("kimibot:install:{T0ONE}:bot", b"fernet:" + stored_with.encrypt(b'{"bot_token":"x"}'))
    finally:
        await raw.aclose()
    other_key = Fernet.generate_key().decode()
    env = {**OAUTH_ENV, "KIMIBOT_ENCRYPTION_KEY": other_key}
    code, lines, _ = await doctor(fake_slack, fake_kimi, redis_url, tmp_path, **env)
    assert code == 1
    [bad] = failing(lines)
    assert bad.startswith("✗ KIMIBOT_ENCRYPTION_KEY cannot decrypt 1 installation record(s)")


@pytest.mark.parametrize("mode", ["http", "socket"])
async def test_serve_in_oauth_mode_is_ready_and_serves_the_install_route_on_port(
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    redis_url: str,
    tmp_path: Path,
    processes: list[object],
    mode: str,
) -> None:
    extra = {**OAUTH_ENV, "SLACK_APP_TOKEN": APP_TOKEN if mode == "socket" else ""}
    bot = start(processes, serve_env(fake_slack, fake_kimi, redis_url, tmp_path, **extra), tmp_path)  # type: ignore[arg-type]
    body = await wait_health(bot, 200)
    assert body["checks"].get("SLACK_CLIENT_ID") == "ok" and "SLACK_BOT_TOKEN" not in body["checks"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(bot.base + "/slack/install", allow_redirects=False) as response,
    ):
        assert response.status == 302
        assert response.headers["Location"].startswith("https://slack.com/oauth/v2/authorize?")
    assert fake_slack.calls_of("auth.test") == []  # no SLACK_BOT_TOKEN to check


async def test_socket_mode_install_then_an_event_from_that_workspace_is_answered_with_its_token(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[object]
) -> None:
    """`kimibot serve` in Socket Mode: installed through PORT, answering over the WebSocket with the new
    workspace's token; an envelope from a workspace without an installation is acked and nothing else."""
    env = serve_env(fake_slack, fake_kimi, redis_url, tmp_path, **{**OAUTH_ENV, "SLACK_APP_TOKEN": APP_TOKEN})
    bot = start(processes, env, tmp_path)  # type: ignore[arg-type]
    await wait_health(bot, 200)
    async with aiohttp.ClientSession() as session:
        async with session.get(bot.base + "/slack/install", allow_redirects=False) as response:
            state = parse_qs(urlparse(response.headers["Location"]).query)["state"][0]
        code = fake_slack.approve_install("T0SOCKET01", bot_user_id="U0SOCKBOT", bot_id="B0SOCKBOT")
        url = bot.base + "/slack/oauth_redirect?" + urlencode({"code": code, "state": state})
        headers = {"Cookie": f"slack-app-oauth-state={state}"}
        async with session.get(url, headers=headers, allow_redirects=False) as response:
            assert response.status == 200
    token = fake_slack.calls_of("oauth.v2.access")[0].args["_result"]["access_token"]
    await wait_for(lambda: bool(fake_slack.sockets))

    def payload(team: str, text: str, ts: str) -> dict[str, object]:
        body = envelope({"type": "app_mention", "user": ALICE, "text": text, "ts": ts, "channel": CHANNEL})
        body["team_id"] = team
        body["authorizations"] = [{"team_id": team, "user_id": "U0SOCKBOT", "is_bot": True}]
        return body

    before = len(fake_slack.calls)
    stranger = fake_slack.seed(CHANNEL, user=ALICE, text="<@U0OTHER> hi")
    await fake_slack.send_envelope("events_api", payload("T0STRANGER", "<@U0OTHER> hi", stranger), "env-x")
    root = fake_slack.seed(CHANNEL, user=ALICE, text="<@U0SOCKBOT> hello over sockets")
    await fake_slack.send_envelope("events_api", payload("T0SOCKET01", "<@U0SOCKBOT> hello", root), "env-1")
    await wait_for(lambda: answered(fake_slack, CHANNEL, root, 1))
    await wait_for(lambda: {a["envelope_id"] for a in fake_slack.socket_acks} >= {"env-x", "env-1"})
    assert fake_slack.bodies(CHANNEL, stranger) == []
    assert {str(c.args.get("token")) for c in fake_slack.calls[before:]} == {token}
    assert len(fake_kimi.requests) == 1
