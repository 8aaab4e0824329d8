"""What reaches /slack/events and /healthz: signatures, staleness, malformed bodies, verification."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.conftest import BotHarness
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import CHANNEL, envelope, json_body, mention, sign


async def test_forged_signature_is_refused_with_401(
    bot: BotHarness, fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    body = json_body(envelope(mention("hi", "1700000001.000100")))
    with caplog.at_level("WARNING"):
        status, _ = await bot.post(
            body, "application/json", sign(body, secret="not-the-secret"), signed=False
        )
    assert status == 401
    # An admin with a wrong secret sees why nothing is answered (once a minute, not once a request).
    assert sum("SLACK_SIGNING_SECRET" in r.getMessage() for r in caplog.records) == 1
    status, _ = await bot.post(
        body,
        "application/json",
        {"X-Slack-Request-Timestamp": "0", "X-Slack-Signature": "v0=invalid"},
        signed=False,
    )
    assert status == 401
    assert fake_slack.posts() == []


async def test_missing_signature_headers_are_refused(bot: BotHarness) -> None:
    status, _ = await bot.post(
        json_body(envelope(mention("hi", "1700000001.000200"))), "application/json", signed=False
    )
    assert status == 401


async def test_stale_timestamp_is_refused_even_with_a_valid_signature(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    body = json_body(envelope(mention("hi", "1700000001.000300")))
    status, _ = await bot.post(
        body, "application/json", sign(body, timestamp=int(time.time()) - 301), signed=False
    )
    assert status == 401
    await bot.settle()
    assert fake_slack.posts() == []


async def test_tampered_body_is_refused(bot: BotHarness) -> None:
    body = json_body(envelope(mention("hi", "1700000001.000400")))
    headers = sign(body)
    status, _ = await bot.post(body.replace(b"hi", b"yo"), "application/json", headers, signed=False)
    assert status == 401


async def test_url_verification_echoes_the_challenge(bot: BotHarness) -> None:
    body = json_body(
        {
            "token": "t",
            "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
            "type": "url_verification",
        }
    )
    status, text = await bot.post(body, "application/json")
    assert status == 200
    assert "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" in text


async def test_malformed_bodies_get_4xx_never_500(bot: BotHarness, fake_slack: FakeSlack) -> None:
    cases: list[tuple[bytes, str]] = [
        (b"{not json", "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"payload=" + quote("{broken").encode(), "application/x-www-form-urlencoded"),
        (json_body({"type": "event_callback", "team_id": "T1"}), "application/json"),  # no event
        (json_body({"type": "event_callback", "event": "not-an-object"}), "application/json"),
        (json_body({"type": "event_callback", "event": {"type": "message"}}), "application/json"),
        (
            b"payload=" + quote(json.dumps({"type": "block_actions"})).encode(),
            "application/x-www-form-urlencoded",
        ),
        (b"command=%2Fkimi", "application/x-www-form-urlencoded"),
        (b"", "application/json"),
    ]
    for body, content_type in cases:
        status, _ = await bot.post(body, content_type)
        assert 200 <= status < 500, (body, status)
    await bot.settle()
    assert fake_slack.posts() == []


async def test_oversized_body_is_refused(bot: BotHarness) -> None:
    body = json_body(envelope(mention("x" * 2_000_000, "1700000001.000500")))
    status, _ = await bot.post(body, "application/json")
    assert status == 413


async def test_healthz_is_200_when_redis_answers(bot: BotHarness) -> None:
    assert bot.session is not None
    async with bot.session.get(bot.url("/healthz")) as response:
        assert response.status == 200
        assert (await response.json())["redis"] == "ok"


async def test_healthz_is_503_when_redis_is_down(make_bot: Callable[..., Any]) -> None:
    down: BotHarness = await make_bot(redis_url="redis://127.0.0.1:1/0")
    assert down.session is not None
    async with down.session.get(down.url("/healthz")) as response:
        assert response.status == 503


async def test_event_while_redis_is_down_is_acked_without_crash(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    down: BotHarness = await make_bot(redis_url="redis://127.0.0.1:1/0")
    status, _ = await down.send_event(mention("hello?", "1700000001.000600"))
    assert status < 600 and status != 0
    await down.settle()
    assert all(
        p.get("channel") != CHANNEL or "Traceback" not in FakeSlack.body_of(p) for p in fake_slack.posts()
    )


async def test_events_and_clicks_nobody_handles_are_acked_so_slack_does_not_redeliver(
    bot: BotHarness,
) -> None:
    from tests.slack_requests import ALICE

    reaction = {
        "type": "reaction_added",
        "user": ALICE,
        "reaction": "thumbsup",
        "event_ts": "1700000001.000700",
        "item": {"type": "message", "channel": CHANNEL, "ts": "1700000001.000600"},
    }
    status, _ = await bot.send_event(reaction, seed=False)
    assert status == 200
    click = {
        "type": "block_actions",
        "user": {"id": ALICE},
        "team": {"id": "T05KQ2R7JNB"},
        "actions": [
            {
                "type": "button",
                "action_id": "something_else",
                "block_id": "b",
                "value": "v",
                "action_ts": "1700000001.000800",
            }
        ],
        "trigger_id": "1.2.3",
        "api_app_id": "A07F3M9XQ2L",
        "container": {"type": "message", "message_ts": "1700000001.000600", "channel_id": CHANNEL},
    }
    status, _ = await bot.post(
        b"payload=" + quote(json.dumps(click)).encode(), "application/x-www-form-urlencoded"
    )
    assert status == 200


async def _bot_with_a_listener_that_raises(
    make_settings: Callable[..., Any], error: Exception
) -> tuple[TestServer, Any]:
    """The real Bolt app and routes, plus our own code inside Bolt's dispatch (a global middleware, run
    before the listeners) that raises `error` on reaction_added events."""
    from bot.deps import build_deps
    from bot.server import build_bolt_app, build_web_app

    deps = build_deps(make_settings())
    bolt = build_bolt_app(deps)

    @bolt.middleware
    async def broken(body: dict[str, Any], next: Callable[[], Any]) -> None:
        if body.get("event", {}).get("type") == "reaction_added":
            raise error
        await next()

    server = TestServer(build_web_app(deps, bolt), host="127.0.0.1")
    await server.start_server()
    return server, deps


REACTION = {
    "type": "reaction_added",
    "user": "U04RZ8N2PQM",
    "reaction": "thumbsup",
    "event_ts": "1700000001.000900",
    "item": {"type": "message", "channel": CHANNEL, "ts": "1700000001.000600"},
}


@pytest.mark.parametrize(
    "bug", [AttributeError("'NoneType' object has no attribute 'ts'"), KeyError("channel"), TypeError("oops")]
)
async def test_our_own_bug_in_a_listener_is_500_with_a_reference_in_an_error_log(
    make_settings: Callable[..., Any], caplog: pytest.LogCaptureFixture, bug: Exception
) -> None:
    server, deps = await _bot_with_a_listener_that_raises(make_settings, bug)
    body = json_body(envelope(REACTION))
    try:
        with caplog.at_level(logging.ERROR):
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    server.make_url("/slack/events"),
                    data=body,
                    headers={"Content-Type": "application/json", **sign(body)},
                ) as response,
            ):
                assert response.status == 500
                reference = (await response.json())["ref"]
    finally:
        await server.close()
        await deps.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any(getattr(r, "reference", None) == reference and r.exc_info for r in errors)


@pytest.mark.parametrize("outage", [RedisConnectionError("refused"), RedisTimeoutError("Timeout reading")])
async def test_redis_failing_inside_a_listener_is_503_so_slack_delivers_again(
    make_settings: Callable[..., Any], outage: Exception
) -> None:
    server, deps = await _bot_with_a_listener_that_raises(make_settings, outage)
    body = json_body(envelope(REACTION))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                server.make_url("/slack/events"),
                data=body,
                headers={"Content-Type": "application/json", **sign(body)},
            ) as response,
        ):
            assert response.status == 503
    finally:
        await server.close()
        await deps.close()


async def test_livez_answers_while_redis_is_down(make_bot: Callable[..., Any]) -> None:
    down: BotHarness = await make_bot(redis_url="redis://127.0.0.1:1/0")
    assert down.session is not None
    async with down.session.get(down.url("/livez")) as response:
        assert response.status == 200
    async with down.session.get(down.url("/healthz")) as response:
        assert response.status == 503
        assert "redis" in (await response.json())["failing"]


async def test_healthz_names_kimi_while_kimi_refuses_the_key_and_recovers_after_an_answer(
    bot: BotHarness, fake_kimi: Any
) -> None:
    from tests.fakes.kimi_api import Reply

    assert bot.session is not None
    fake_kimi.script(Reply(status=401, error_type="invalid_authentication_error", error_message="Invalid"))
    await bot.send_event(mention("hello?", "1700000001.001000"))
    await bot.settle()
    async with bot.session.get(bot.url("/healthz")) as response:
        body = await response.json()
        assert response.status == 503, body
        assert body["failing"] == {"kimi": "last call refused: auth"}
    await bot.send_event(mention("and now?", "1700000001.001100"))  # the key works again (e.g. credit)
    await bot.settle()
    async with bot.session.get(bot.url("/healthz")) as response:
        body = await response.json()
        assert response.status == 200 and body["kimi_last_outcome"] == "ok", body


async def test_a_bot_token_revoked_while_running_turns_healthz_503_naming_it(
    bot: BotHarness, fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.fakes.slack_api import TOKEN

    assert bot.session is not None
    fake_slack.revoked[TOKEN] = "token_revoked"
    with caplog.at_level("ERROR"):
        await bot.send_event(mention("anyone there?", "1700000001.000900"))
        await bot.settle()
    async with bot.session.get(bot.url("/healthz")) as response:
        body = await response.json()
        assert response.status == 503
    assert "token_revoked" in body["failing"]["SLACK_BOT_TOKEN"]
    assert any("SLACK_BOT_TOKEN" in r.getMessage() for r in caplog.records)
    del fake_slack.revoked[TOKEN]  # a new token installed (and the process restarted, or Slack relents)
    await bot.send_event(mention("and now?", "1700000001.001000"))
    await bot.settle()
    async with bot.session.get(bot.url("/healthz")) as response:
        assert response.status == 200
