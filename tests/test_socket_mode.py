"""Socket Mode: `kimibot serve` with SLACK_APP_TOKEN connects over WebSocket, acks, and answers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from slack_bolt.async_app import AsyncApp
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.web.async_client import AsyncWebClient

from bot import socket_mode
from bot.health import Health
from bot.intake import Intake
from bot.settings import Settings
from tests.fakes.kimi_api import API_KEY, FakeKimi
from tests.fakes.slack_api import APP_TOKEN, TOKEN, FakeSlack
from tests.loop_turns import LoopTurns
from tests.slack_requests import CHANNEL, command_body, envelope, mention
from tests.test_serve_process import ServeProcess, answered, free_port, wait_for


def socket_mode_env(fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, home: Path) -> dict[str, str]:
    """`kimibot serve` in Socket Mode against the fakes, with a port of its own for /healthz."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "SLACK_BOT_TOKEN": TOKEN,
        "SLACK_APP_TOKEN": APP_TOKEN,
        "SLACK_API_URL": fake_slack.api_url,
        "MOONSHOT_API_KEY": API_KEY,
        "KIMI_BASE_URL": fake_kimi.base_url,
        "REDIS_URL": redis_url,
        "PORT": str(free_port()),
    }


async def test_socket_mode_acks_envelopes_and_answers_once(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    bot = ServeProcess(socket_mode_env(fake_slack, fake_kimi, redis_url, tmp_path), tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            await bot.wait_healthy(session)  # /healthz is served in Socket Mode too
            # PORT serves only the probes and metrics there: Slack's events come over the socket.
            for path, status in (("/livez", 200), ("/metrics", 200)):
                async with session.get(f"{bot.base}{path}") as response:
                    assert response.status == status, path
            async with session.post(f"{bot.base}/slack/events", data=b"{}") as response:
                assert response.status == 404
        await wait_for(lambda: bool(fake_slack.sockets))
        root = fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="hello over sockets")
        payload = envelope(mention("hello over sockets", root))
        await fake_slack.send_envelope("events_api", payload, "env-1")
        await fake_slack.send_envelope("events_api", payload, "env-1-retry", retry_attempt=1)
        await wait_for(lambda: answered(fake_slack, CHANNEL, root, 1))
        await wait_for(lambda: {a["envelope_id"] for a in fake_slack.socket_acks} >= {"env-1", "env-1-retry"})

        fields = dict(urllib.parse.parse_qsl(command_body("help").decode()))
        await fake_slack.send_envelope("slash_commands", fields, "env-2")
        await wait_for(lambda: any(a["envelope_id"] == "env-2" for a in fake_slack.socket_acks))
        help_ack = next(a for a in fake_slack.socket_acks if a["envelope_id"] == "env-2")
        assert "/kimi <question>" in help_ack["payload"]["text"]
        await asyncio.sleep(0.2)
        assert len(fake_slack.bodies(CHANNEL, root)) == 1
        code, output = await bot.terminate()
        assert code == 0, output
    finally:
        if bot.process.poll() is None:
            bot.process.kill()
    assert fake_slack.problems == []


async def test_two_socket_mode_replicas_answer_each_event_once(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    replicas = [
        ServeProcess(socket_mode_env(fake_slack, fake_kimi, redis_url, tmp_path), tmp_path) for _ in range(2)
    ]
    try:
        async with aiohttp.ClientSession() as session:
            for replica in replicas:
                await replica.wait_healthy(session)
        await wait_for(lambda: len(fake_slack.sockets) == 2)
        roots = []
        for i in range(5):
            root = fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text=f"question {i}")
            roots.append(root)
            # Every connection gets the envelope (as when Slack retries on another connection).
            await fake_slack.send_envelope(
                "events_api", envelope(mention(f"question {i}", root)), f"env-r{i}"
            )
        for root in roots:
            await wait_for(lambda root=root: answered(fake_slack, CHANNEL, root, 1))
        await asyncio.sleep(0.3)
        assert all(len(fake_slack.bodies(CHANNEL, root)) == 1 for root in roots)
        assert len(fake_kimi.requests) == 5
        for replica in replicas:
            code, output = await replica.terminate()
            assert code == 0, output
    finally:
        for replica in replicas:
            if replica.process.poll() is None:
                replica.process.kill()


async def test_a_disconnect_message_from_slack_makes_kimibot_open_a_new_connection(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    bot = ServeProcess(socket_mode_env(fake_slack, fake_kimi, redis_url, tmp_path), tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            await bot.wait_healthy(session)
        await wait_for(lambda: len(fake_slack.sockets) == 1)
        old = fake_slack.sockets[0]
        # Slack asks for a fresh connection every few hours (and before restarting a server).
        await old.send_json(
            {"type": "disconnect", "reason": "refresh_requested", "debug_info": {"host": "fake"}}
        )
        await wait_for(lambda: len(fake_slack.calls_of("apps.connections.open")) == 2)
        await wait_for(lambda: len(fake_slack.sockets) == 1 and fake_slack.sockets[0] is not old)
        root = fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="after the refresh")
        await fake_slack.send_envelope(
            "events_api", envelope(mention("after the refresh", root)), "env-refresh"
        )
        await wait_for(lambda: answered(fake_slack, CHANNEL, root, 1))
        code, output = await bot.terminate()
        assert code == 0, output
        assert "Traceback" not in output
    finally:
        if bot.process.poll() is None:
            bot.process.kill()
    assert fake_slack.problems == []


async def test_a_socket_mode_request_is_in_hand_until_acked(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As over HTTP (bot/intake.py): an envelope counts as a request in hand while Bolt handles it and until
    its ack is sent, so the worker's new job starts wait for it."""
    in_hand: list[int] = []
    intake = Intake()

    async def run_app(_: Any, request: SocketModeRequest) -> str:
        in_hand.append(intake.in_hand)
        return "response"

    async def respond(*_: Any) -> None:
        in_hand.append(intake.in_hand)

    monkeypatch.setattr(socket_mode, "run_async_bolt_app", run_app)
    monkeypatch.setattr(socket_mode, "send_async_response", respond)
    settings = make_settings(slack_app_token=APP_TOKEN)
    connection = socket_mode.SocketConnection(
        cast(AsyncApp, None), settings, AsyncWebClient(), AsyncWebClient(), Health(), intake
    )
    request = SocketModeRequest(type="events_api", envelope_id="env-9", payload={})
    await connection._handle(cast(Any, None), request)
    assert in_hand == [1, 1] and intake.in_hand == 0
    with contextlib.suppress(Exception):
        await connection.client.close()  # type: ignore[no-untyped-call]


async def test_socket_mode_envelopes_of_a_burst_start_one_per_turn_of_the_loop(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As over HTTP (bot/intake.py `turn()`): envelopes read together are handed to Bolt in order, each in a
    turn of the loop of its own (slack_sdk runs each envelope's listener as a task of its own)."""
    intake = Intake(turn_cost_s=1.0, turn_grace_s=1.0)  # none overdue here
    turns = LoopTurns()
    started: list[tuple[str, int]] = []

    async def run_app(_: Any, request: SocketModeRequest) -> str:
        started.append((request.envelope_id, turns.count))
        return "response"

    async def respond(*_: Any) -> None:
        return None

    monkeypatch.setattr(socket_mode, "run_async_bolt_app", run_app)
    monkeypatch.setattr(socket_mode, "send_async_response", respond)
    settings = make_settings(slack_app_token=APP_TOKEN)
    connection = socket_mode.SocketConnection(
        cast(AsyncApp, None), settings, AsyncWebClient(), AsyncWebClient(), Health(), intake
    )
    envelopes = [SocketModeRequest(type="events_api", envelope_id=f"env-{n}", payload={}) for n in range(5)]
    async with asyncio.timeout(2):
        await asyncio.gather(*(connection._handle(cast(Any, None), envelope) for envelope in envelopes))
    turns.stop()
    assert [envelope for envelope, _ in started] == [f"env-{n}" for n in range(5)]
    at = [turn for _, turn in started]
    assert all(later > earlier for earlier, later in itertools.pairwise(at)), at
    with contextlib.suppress(Exception):
        await connection.client.close()  # type: ignore[no-untyped-call]
