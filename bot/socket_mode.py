"""Socket Mode: one WebSocket to Slack, kept open by kimibot itself.

slack_sdk's client reconnects on its own in a loop that logs a traceback every few seconds forever, cannot
tell a revoked token from a network blip, and must be awaited to the end before anything else happens. Here
its automatic reconnection is off; `SocketConnection.run()` opens the connection (apps.connections.open,
then the WebSocket), notices when it drops, and opens a new one with backoff: one log line per attempt,
/healthz saying where it stands, a rejected SLACK_APP_TOKEN raised as `Rejected`, and cancellable at
any moment so a stop signal is obeyed whatever state the connection is in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from aiohttp import WSMessage
from slack_bolt.adapter.socket_mode.async_internals import run_async_bolt_app, send_async_response
from slack_bolt.async_app import AsyncApp
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.web.async_client import AsyncWebClient

from bot.health import Health
from bot.intake import Intake
from bot.settings import Settings
from bot.startup import NotYet, backoff_s, open_socket_url

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
WATCH_INTERVAL_S = 0.5  # how often the connection's state is looked at between drops
PING_INTERVAL_S = 10.0  # Bolt's default; a connection silent for 4 pings is taken as dead
CLOSE_TIMEOUT_S = 3.0


class _Client(SocketModeClient):
    """slack_sdk's aiohttp client with its reconnect loop off: each `connect_once` is one attempt."""

    def __init__(self, app_token: str, web_client: AsyncWebClient) -> None:
        super().__init__(
            app_token=app_token,
            logger=logging.getLogger("slack_sdk.socket_mode.kimibot"),
            web_client=web_client,
            auto_reconnect_enabled=False,
            ping_interval=PING_INTERVAL_S,
        )
        self.lost = asyncio.Event()  # the connection closed, or Slack asked for a new one
        self.on_close_listeners.append(self._closed)

    async def _closed(self, _: WSMessage) -> None:
        self.lost.set()

    async def connect_to_new_endpoint(self, force: bool = False) -> None:
        """Slack sent `disconnect` (e.g. a refresh): the supervisor opens the new connection."""
        self.lost.set()

    async def connect(self) -> None:
        """Never called by kimibot; the base class would loop here forever."""
        raise NotImplementedError("use connect_once")

    async def connect_once(self, url: str) -> None:
        """Replace the current WebSocket (if any) with a new one to `url`; raise if it cannot be opened."""
        for task in (self.message_receiver, self.current_session_monitor):
            if task is not None:
                task.cancel()
        self.message_receiver = self.current_session_monitor = None
        old = self.current_session
        if old is not None and not old.closed:
            with contextlib.suppress(Exception):
                await old.close()
        if self.aiohttp_client_session.closed:
            self.aiohttp_client_session = aiohttp.ClientSession()
        self.wss_uri = url
        self.current_session = await self.aiohttp_client_session.ws_connect(
            url,
            autoping=False,
            heartbeat=self.ping_interval,
            proxy=self.proxy,
            ssl=self.web_client.ssl if self.web_client.ssl is not None else True,
        )
        self.stale = False
        self.last_ping_pong_time = None
        await self.current_session.ping(f"sdk-ping-pong:{time.time()}".encode())
        self.current_session_monitor = asyncio.ensure_future(self.monitor_current_session())
        self.message_receiver = asyncio.ensure_future(self.receive_messages())


class SocketConnection:
    """Keeps one Socket Mode connection open for `bolt`, reconnecting after drops, until cancelled."""

    def __init__(
        self,
        bolt: AsyncApp,
        settings: Settings,
        web_client: AsyncWebClient,
        checks: AsyncWebClient,
        health: Health,
        intake: Intake | None = None,
    ) -> None:
        self.bolt = bolt
        self.intake = intake if intake is not None else Intake()
        self.settings = settings
        self.checks = checks
        self.health = health
        self.client = _Client(settings.slack_app_token, web_client)
        self.client.socket_mode_request_listeners.append(self._handle)
        self.connected_once = asyncio.Event()
        health.slack_connection = "connecting"

    async def _handle(self, client: AsyncBaseSocketModeClient, request: SocketModeRequest) -> None:
        started = time.time()
        with self.intake.request():  # new job starts wait until this is acked (bot/intake.py)
            await self.intake.turn()  # a burst's envelopes start one per turn of the loop, in order
            response = await run_async_bolt_app(self.bolt, request)
            await send_async_response(client, request, response, started)

    async def run(self) -> None:
        """Connect, watch, reconnect. Raises `Rejected` when Slack refuses SLACK_APP_TOKEN."""
        attempt = 0
        while True:
            if self.client.lost.is_set() or not await self.client.is_connected():
                self.client.lost.clear()
                again = self.connected_once.is_set()
                if again and attempt == 0:
                    log.warning("socket mode connection lost; reconnecting")
                    self.health.slack_connection = "reconnecting"
                try:
                    url = await open_socket_url(self.settings, self.checks)
                    async with asyncio.timeout(CONNECT_TIMEOUT_S):
                        await self.client.connect_once(url)
                except (NotYet, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    why = str(exc) if isinstance(exc, NotYet) else f"{type(exc).__name__}: {exc}"
                    delay = backoff_s(attempt)
                    attempt += 1
                    self.health.slack_connection = f"{'reconnecting' if again else 'connecting'}: {why}"
                    log.warning(
                        "socket mode connection failed; retrying",
                        extra={"attempt": attempt, "error": why, "retry_in_s": round(delay, 1)},
                    )
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                self.health.slack_connection = "connected"
                self.connected_once.set()
                log.info("socket mode " + ("reconnected" if again else "connected"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_INTERVAL_S):
                    await self.client.lost.wait()

    async def close(self) -> None:
        """Close the WebSocket and the client's tasks; bounded, so shutdown never waits on Slack."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.client.close()  # type: ignore[no-untyped-call]
