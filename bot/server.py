"""The Bolt app and how it is served: aiohttp on PORT (/slack/events, /healthz) or Socket Mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal

from aiohttp import web
from redis.exceptions import RedisError
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse

import handlers
from bot.deps import Deps
from bot.queue import Job
from bot.work import run_job
from bot.worker import Worker

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 1.0
MAX_BODY_BYTES = 1024 * 1024  # Slack's payloads are far smaller; anything bigger is refused (413)


def build_bolt_app(deps: Deps) -> AsyncApp:
    settings = deps.settings

    async def authorize(enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
        # Our own authorize (instead of Bolt's single-team one) calls auth.test once, through our
        # client, without the team_id parameter Bolt's per-request client would add to it.
        me = await deps.whoami()
        return AuthorizeResult(
            enterprise_id=enterprise_id,
            team_id=team_id or me.team_id,
            bot_user_id=me.user_id,
            bot_id=me.bot_id,
            bot_token=settings.slack_bot_token,
        )

    bolt_logger = logging.getLogger("slack_bolt.kimibot")
    # Bolt warns that the client's token is ignored when authorize is given; it is the same token.
    previous_level, bolt_logger.level = bolt_logger.level, logging.ERROR
    app = AsyncApp(
        client=deps.slack,
        authorize=authorize,
        signing_secret=settings.slack_signing_secret or None,
        request_verification_enabled=not settings.socket_mode,
        # Listeners only admit and hand over (a few ms); finishing them before the ack means a
        # turn is claimed and queued before Slack hears 200, and no ack-polling delay.
        process_before_response=True,
        logger=bolt_logger,
    )
    bolt_logger.setLevel(previous_level)
    app.error(on_bolt_error)
    handlers.register(app, deps)
    return app


# Errors raised while Bolt reads a payload whose shape is not what Slack sends.
MALFORMED_PAYLOAD_ERRORS = (AttributeError, KeyError, TypeError, ValueError, IndexError)


async def on_bolt_error(error: Exception) -> BoltResponse:
    """Bolt answers 500 to any error; say what it really was, so Slack retries only what may pass later."""
    if isinstance(error, RedisError):
        log.warning("redis unavailable while admitting a request", extra={"error": str(error)})
        return BoltResponse(status=503, body='{"ok":false,"error":"storage unavailable"}')
    if isinstance(error, MALFORMED_PAYLOAD_ERRORS):
        log.warning("malformed payload refused", exc_info=error)
        return BoltResponse(status=400, body='{"ok":false,"error":"malformed payload"}')
    log.error("request failed", exc_info=error)
    return BoltResponse(status=500, body='{"ok":false,"error":"internal error"}')


def _bad_request(why: str, status: int = 400) -> web.Response:
    return web.json_response({"ok": False, "error": why}, status=status)


def build_web_app(deps: Deps, bolt: AsyncApp | None, worker: Worker | None = None) -> web.Application:
    """/healthz always; /slack/events when this process receives Slack's requests over HTTP."""

    async def healthz(_: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(deps.redis.ping(), HEALTH_TIMEOUT_S)
        except Exception as exc:
            return web.json_response({"ok": False, "redis": type(exc).__name__}, status=503)
        running = len(worker.running) if worker is not None else 0
        return web.json_response(
            {"ok": True, "redis": "ok", "running_jobs": running, **deps.metrics.snapshot()}
        )

    async def slack_events(request: web.Request) -> web.Response:
        assert bolt is not None
        raw = await request.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _bad_request("body is not UTF-8")
        try:
            bolt_request = AsyncBoltRequest(
                body=text, query=request.query_string, headers=dict(request.headers)
            )
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):
            # Bolt parses the body while building the request; a body it can't parse is the sender's fault.
            return _bad_request("malformed body")
        if not isinstance(bolt_request.body, dict):
            return _bad_request("malformed body")
        try:
            bolt_response = await bolt.async_dispatch(bolt_request)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, json.JSONDecodeError):
            log.warning("malformed payload refused", exc_info=True)
            return _bad_request("malformed payload")
        return await to_aiohttp_response(bolt_response)

    web_app = web.Application(client_max_size=MAX_BODY_BYTES)
    web_app.router.add_get("/healthz", healthz)
    if bolt is not None:
        web_app.router.add_post("/slack/events", slack_events)
    return web_app


def build_worker(deps: Deps, block_ms: int = 1_000) -> Worker:
    settings = deps.settings

    async def run(job: Job) -> None:
        await run_job(job, deps)

    return Worker(
        deps.queue,
        run,
        concurrency=settings.kimi_concurrency,
        visibility_s=settings.job_visibility_timeout,
        block_ms=block_ms,
    )


async def serve(deps: Deps) -> None:
    """Run until SIGINT/SIGTERM. Then stop taking Slack requests and jobs, let running answers finish
    within the grace period, hand the rest back to the queue, and close."""
    settings = deps.settings
    receives = settings.kimibot_role in ("all", "receiver")
    works = settings.kimibot_role in ("all", "worker")
    bolt = build_bolt_app(deps) if receives else None
    worker = build_worker(deps) if works else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    socket_handler = None
    web_app = build_web_app(deps, bolt if receives and not settings.socket_mode else None, worker)
    runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host="0.0.0.0", port=settings.port)
    await site.start()
    if bolt is not None and settings.socket_mode:
        from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

        socket_handler = AsyncSocketModeHandler(bolt, settings.slack_app_token, web_client=deps.slack)
        await socket_handler.connect_async()  # type: ignore[no-untyped-call]
    worker_task = asyncio.create_task(worker.run()) if worker is not None else None
    log.info(
        "kimibot running",
        extra={
            "role": settings.kimibot_role,
            "port": settings.port,
            "mode": "socket" if settings.socket_mode else "http",
            "model": settings.kimi_model,
            "consumer": deps.queue.consumer,
        },
    )
    try:
        await stop.wait()
    finally:
        log.info("shutting down", extra={"running_jobs": len(worker.running) if worker else 0})
        if socket_handler is not None:
            await socket_handler.close_async()  # type: ignore[no-untyped-call]
        await site.stop()
        if worker is not None and worker_task is not None:
            await worker.drain(settings.shutdown_grace_seconds)
            await worker_task
        await runner.cleanup()
        await deps.close()
