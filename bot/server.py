"""The Bolt app and how it is served: aiohttp on PORT (/slack/events, /healthz, /livez) or Socket Mode."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.context.async_context import AsyncBoltContext
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.web.async_client import AsyncWebClient

import handlers
from bot.agent.toolbox import ToolBox
from bot.deps import BotIdentity, Deps, slack_client
from bot.errors import new_reference
from bot.health import Health, readiness
from bot.installations import InstallationUnavailable
from bot.metrics import CONTENT_TYPE
from bot.oauth import add_oauth_routes, build_oauth_flow
from bot.queue import Job, Lease
from bot.redis_client import warm_pool
from bot.slack import acting
from bot.slack.acting import TeamBot
from bot.socket_mode import SocketConnection
from bot.startup import (
    NotYet,
    Rejected,
    check_bot_token,
    check_client,
    check_installations,
    check_kimi,
    until_settled,
)
from bot.work import adopt_legacy_jobs, run_job, show_waiting, tell_not_answered
from bot.worker import RunLater, Worker

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 1.0
THREADS_PER_KIMI_SLOT = 4  # a worker may hold this many threads per Kimi request slot (most wait on Kimi)
MAX_BODY_BYTES = 1024 * 1024  # Slack's payloads are far smaller; anything bigger is refused (413)


NOT_INSTALLED = "not_installed"  # context flag: a request from a workspace with no installation


async def team_bot_for_job(deps: Deps, lease: Lease) -> TeamBot | None:
    """OAuth mode: the bot of the workspace a job's thread belongs to (jobs run outside any request, so
    they resolve the team the way `authorize` does for requests: through deps.installations). An
    installation without a usable token now is RunLater: the job runs again, never "not installed"."""
    assert deps.installations is not None
    try:
        return await deps.installations.bot_for_team(lease.thread.team_id)
    except InstallationUnavailable as exc:
        log.error(
            "a job's workspace has no usable token now; the job runs again later",
            extra={"team_id": lease.thread.team_id, "error": str(exc)},
        )
        raise RunLater(str(exc)) from exc


def build_bolt_app(deps: Deps) -> AsyncApp:
    settings = deps.settings

    async def authorize(
        context: AsyncBoltContext, enterprise_id: str | None, team_id: str | None
    ) -> AuthorizeResult:
        if deps.installations is not None:
            team_bot = await deps.installations.bot_for(enterprise_id, team_id, context.is_enterprise_install)
            acting.CURRENT.set(team_bot)  # this request's task (and what it spawns) acts for this team
            if team_bot is None:
                context[NOT_INSTALLED] = True
                return AuthorizeResult(enterprise_id=enterprise_id, team_id=team_id)
            return AuthorizeResult(
                enterprise_id=enterprise_id,
                team_id=team_id,
                bot_user_id=team_bot.user_id,
                bot_id=team_bot.bot_id,
                bot_token=team_bot.token,
            )
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

    async def not_installed(
        context: AsyncBoltContext, next: Callable[[], Awaitable[BoltResponse]]
    ) -> BoltResponse:
        """A workspace without an installation (uninstalled, or never installed): 200, one log line, no
        Slack or Kimi call (Slack would only retry an error)."""
        if context.get(NOT_INSTALLED):
            log.warning(
                "request from a workspace without an installation ignored",
                extra={"team_id": context.team_id, "enterprise_id": context.enterprise_id},
            )
            return BoltResponse(status=200, body="")
        return await next()

    bolt_logger = logging.getLogger("slack_bolt.kimibot")
    # Bolt warns that the client's token is ignored when authorize is given; it is the same token.
    previous_level, bolt_logger.level = bolt_logger.level, logging.ERROR
    app = AsyncApp(
        # Its own client, without the pooled session of deps.slack: Bolt deep-copies a request's client for
        # lazy listeners. The same token, URL and retry handlers; handlers call Slack through deps.slack.
        client=slack_client(settings, deps.metrics),
        authorize=authorize,
        signing_secret=settings.slack_signing_secret or None,
        request_verification_enabled=not settings.socket_mode,
        # Listeners only admit and hand over (a few ms); finishing them before the ack means a
        # turn is claimed and queued before Slack hears 200, and no ack-polling delay.
        process_before_response=True,
        # Bolt's assistant helpers (say/set_status/say_stream... as listener arguments): a middleware on
        # every event listener that builds them per event; no listener takes them (bot/slack/reply.py
        # calls Slack itself).
        attaching_conversation_kwargs_enabled=False,
        logger=bolt_logger,
    )
    bolt_logger.setLevel(previous_level)
    app.error(on_bolt_error)
    if deps.installations is not None:
        app.use(not_installed)
    handlers.register(app, deps)
    return app


async def on_bolt_error(error: Exception) -> BoltResponse:
    """Bolt answers 500 to any error; say what it really was, so Slack retries only what may pass later.

    A payload Slack would never send is refused before it reaches a listener (`payload_problem`), so an
    exception from a listener is ours: 500 with a reference id that is also in the ERROR log line.
    """
    if isinstance(error, RedisError | TimeoutError):  # redis' TimeoutError is a RedisError too
        log.warning("redis unavailable while admitting a request", extra={"error": str(error)})
        return BoltResponse(status=503, body='{"ok":false,"error":"storage unavailable"}')
    if isinstance(error, InstallationUnavailable):  # installed, no usable token now: Slack redelivers
        log.error("a workspace's installation cannot be used now", extra={"error": str(error)})
        return BoltResponse(status=503, body='{"ok":false,"error":"installation unavailable"}')
    reference = new_reference()
    log.error("request failed", exc_info=error, extra={"reference": reference})
    return BoltResponse(
        status=500, body=json.dumps({"ok": False, "error": "internal error", "ref": reference})
    )


def payload_problem(body: dict[str, Any]) -> str | None:
    """Why a parsed payload is not shaped like anything Slack sends (None when it is).

    Only the parts every listener relies on are checked: an event's `event` object and its `type`, a
    command's name, user and channel, an interaction's `type` (and a button click's actions and user).
    """
    if "command" in body:
        for name in ("command", "user_id", "channel_id"):
            if not isinstance(body.get(name), str) or not body.get(name):
                return f"slash command without {name}"
        return None
    kind = body.get("type")
    if kind == "event_callback":
        event = body.get("event")
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return "event_callback without an event object"
        return None
    if kind == "block_actions":
        actions = body.get("actions")
        if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
            return "block_actions without actions"
        if not isinstance(body.get("user"), dict):
            return "block_actions without a user"
        return None
    if "payload" in body or (kind is not None and not isinstance(kind, str)):
        return "unreadable payload"
    return None


def _bad_request(why: str, status: int = 400) -> web.Response:
    return web.json_response({"ok": False, "error": why}, status=status)


def build_web_app(
    deps: Deps, bolt: AsyncApp | None, worker: Worker | None = None, health: Health | None = None
) -> web.Application:
    """/healthz (ready: can answer), /livez (alive: responsive) and /metrics (Prometheus) always;
    /slack/events when this process receives Slack's requests over HTTP; /slack/install and
    /slack/oauth_redirect in OAuth mode (HTTP and Socket Mode alike)."""
    state = health if health is not None else Health()

    async def healthz(_: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(deps.redis.ping(), HEALTH_TIMEOUT_S)
            redis = "ok"
        except Exception as exc:  # any failure to answer a PING is "not ready", named by its type
            redis = f"unavailable: {type(exc).__name__}"
        heartbeat = getattr(worker, "loop_heartbeat", None) if worker is not None else None
        if deps.metrics.slack_token_rejected:
            state.checks["SLACK_BOT_TOKEN"] = f"rejected by Slack ({deps.metrics.slack_token_rejected})"
        elif state.checks.get("SLACK_BOT_TOKEN", "").startswith("rejected by Slack"):
            state.checks["SLACK_BOT_TOKEN"] = "ok"  # a later call got through: the token works again
        ok, body = readiness(
            state,
            redis=redis,
            answers=worker is not None,
            heartbeat=heartbeat if isinstance(heartbeat, int | float) else None,
            kimi_outcome=str(getattr(deps.kimi, "last_outcome", "") or ""),
            now=time.monotonic(),
        )
        body["running_jobs"] = len(worker.running) if worker is not None else 0
        body.update(deps.metrics.snapshot())
        return web.json_response(body, status=200 if ok else 503)

    async def livez(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def metrics(_: web.Request) -> web.Response:
        body = await deps.metrics.exposition(deps.queue, HEALTH_TIMEOUT_S)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

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
        problem = payload_problem(bolt_request.body)
        if problem is not None:
            log.warning("malformed payload refused", extra={"why": problem})
            return _bad_request("malformed payload")
        try:
            with deps.intake.request():  # new job starts wait until this is answered (bot/intake.py)
                await deps.intake.turn()  # a burst's requests start one per turn of the loop, in order
                bolt_response = await bolt.async_dispatch(bolt_request)
        except (RedisError, TimeoutError) as exc:
            log.warning("redis unavailable while admitting a request", extra={"error": str(exc)})
            return _bad_request("storage unavailable", status=503)
        except Exception:  # the payload was well formed: whatever broke is ours
            reference = new_reference()
            log.exception("request failed", extra={"reference": reference})
            return web.json_response({"ok": False, "error": "internal error", "ref": reference}, status=500)
        if bolt_response.status == 401:
            signature_refused()
        return await to_aiohttp_response(bolt_response)

    last_signature_warning = [0.0]

    def signature_refused() -> None:
        """A request whose signature does not check out: a forgery, or (when it keeps happening) a wrong
        SLACK_SIGNING_SECRET or a skewed clock. Say so, at most once a minute."""
        now = time.monotonic()
        if now - last_signature_warning[0] >= 60:
            last_signature_warning[0] = now
            log.warning(
                "request refused: its signature does not match SLACK_SIGNING_SECRET (a forgery; or, if "
                "Slack's own requests are refused, a wrong SLACK_SIGNING_SECRET or this host's clock is off)"
            )

    web_app = web.Application(client_max_size=MAX_BODY_BYTES)
    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_get("/livez", livez)
    web_app.router.add_get("/metrics", metrics)
    if bolt is not None:
        web_app.router.add_post("/slack/events", slack_events)
    if deps.installations is not None and deps.settings.kimibot_role != "worker":
        add_oauth_routes(web_app, build_oauth_flow(deps.settings, deps.installations))
    return web_app


def build_worker(deps: Deps, block_ms: int = 1_000) -> Worker:
    settings = deps.settings

    async def run(job: Job, lease: Lease) -> None:
        if deps.installations is None:
            await run_job(job, lease, deps)
            return
        team_bot = await team_bot_for_job(deps, lease)
        if team_bot is None:
            log.warning(
                "job of a workspace without an installation dropped",
                extra={"team_id": lease.thread.team_id, "job": job.job_id, "kind": job.kind},
            )
            await lease.dead_letter(job, "not installed")
            return
        with acting.acting_for(team_bot):
            await run_job(job, lease, deps)

    async def report(job: Job, lease: Lease, why: str, reference: str) -> None:
        team_bot = await team_bot_for_job(deps, lease) if deps.installations is not None else None
        if deps.installations is not None and team_bot is None:
            return  # no token to say it with
        with acting.acting_for(team_bot):
            await tell_not_answered(deps, job, lease, why, reference)

    async def waiting(lease: Lease) -> None:
        # Called only when the worker's watcher saw questions behind the running one (no token is read
        # while nothing waits).
        team_bot = await team_bot_for_job(deps, lease) if deps.installations is not None else None
        if deps.installations is not None and team_bot is None:
            return
        with acting.acting_for(team_bot):
            await show_waiting(deps, lease)

    return Worker(
        deps.queue,
        run,
        # Threads in hand at once; Kimi requests are limited to KIMI_CONCURRENCY inside the client.
        concurrency=settings.kimi_concurrency * THREADS_PER_KIMI_SLOT,
        visibility_s=settings.job_visibility_timeout,
        block_ms=block_ms,
        max_attempts=settings.job_max_attempts,
        report=report,
        housekeeping=lambda: adopt_legacy_jobs(deps),
        show_waiting=waiting,
        hold_starts=deps.intake.quiet,
    )


def _first_cause(error: BaseException | None) -> BaseException | None:
    """A rejection inside a TaskGroup's ExceptionGroup, or else the error itself."""
    if isinstance(error, BaseExceptionGroup):
        rejected = error.subgroup(Rejected)
        return rejected.exceptions[0] if rejected is not None else error
    return error


class Stopped(Exception):
    """serve() ended for a reason other than a stop signal (e.g. the job loop died)."""


async def _bounded(awaitable: Awaitable[object], seconds: float, what: str) -> None:
    """Await a shutdown step for at most `seconds`; a stuck step must not hold up the exit."""
    try:
        async with asyncio.timeout(seconds):
            await awaitable
    except TimeoutError:
        log.warning("shutdown step took too long; going on", extra={"step": what, "limit_s": seconds})
    except Exception as exc:  # shutting down: log and go on with the next step
        log.warning("shutdown step failed", extra={"step": what, "error": f"{type(exc).__name__}: {exc}"})


async def _drain(worker: Worker, grace_s: float, hurry: asyncio.Event) -> None:
    """Let running answers finish within the grace, or until a second stop signal; hand back the rest."""
    draining = asyncio.create_task(worker.drain(grace_s))
    hurried = asyncio.create_task(hurry.wait())
    await asyncio.wait([draining, hurried], timeout=grace_s + 2, return_when=asyncio.FIRST_COMPLETED)
    hurried.cancel()
    if draining.done():
        return
    if hurry.is_set():
        log.warning("second stop signal: handing running answers back now")
    draining.cancel()
    await asyncio.gather(draining, return_exceptions=True)
    await _bounded(worker.drain(0), 5.0, "hand back")


async def _start_up(
    deps: Deps, health: Health, checks: AsyncWebClient, socket: SocketConnection | None, works: bool
) -> None:
    """Every start-up check, concurrently; then wait for the first Socket Mode connection."""
    settings = deps.settings

    async def bot_token() -> None:
        if settings.oauth and not settings.slack_bot_token:
            # Many workspaces: each request and job finds its workspace's bot (bot/installations.py).
            count = await until_settled(
                "SLACK_CLIENT_ID", lambda: check_installations(deps.installations), health.checks
            )
            log.info("oauth mode: installations readable", extra={"installations": count})
            return
        try:
            data = await until_settled("SLACK_BOT_TOKEN", lambda: check_bot_token(checks), health.checks)
        except Rejected as exc:
            if deps.installations is None:
                raise
            # OAuth mode: a refused SLACK_BOT_TOKEN (its workspace uninstalled kimibot: Slack revoked it)
            # must not stop the bot for every other workspace.
            log.warning(
                "oauth mode: SLACK_BOT_TOKEN was refused by Slack; its workspace is not seeded (served only "
                "if installed through OAuth)",
                extra={"error": exc.line()},
            )
            await until_settled(
                "SLACK_BOT_TOKEN", lambda: check_installations(deps.installations), health.checks
            )
            return
        deps.identity = BotIdentity(
            user_id=str(data.get("user_id") or ""),
            bot_id=str(data.get("bot_id") or ""),
            team_id=str(data.get("team_id") or ""),
        )
        installations = deps.installations
        if installations is not None:
            # OAuth mode with SLACK_BOT_TOKEN too: that token's workspace is one of the installed ones.

            async def seed() -> bool:
                try:
                    return await installations.seed(settings.slack_bot_token, data)
                except (RedisError, OSError, TimeoutError) as exc:
                    raise NotYet(
                        f"SLACK_BOT_TOKEN's workspace cannot be saved as an installation ({exc!r})"
                    ) from None

            seeded = await until_settled("SLACK_BOT_TOKEN", seed, health.checks)
            log.info(
                "oauth mode: SLACK_BOT_TOKEN's workspace is served as an installation",
                extra={"team_id": data.get("team_id"), "installed_now": seeded},
            )

    async def kimi() -> None:
        await until_settled("MOONSHOT_API_KEY", lambda: check_kimi(settings), health.checks)

    async def warm_redis() -> None:
        try:
            opened = await warm_pool(deps.redis)
        except Exception as exc:  # best effort: connections are opened on first use instead
            log.debug("redis connections not opened ahead", extra={"error": repr(exc)})
            return
        log.debug("redis connections opened ahead", extra={"count": opened})

    async with asyncio.TaskGroup() as group:
        group.create_task(warm_redis())
        group.create_task(bot_token())
        if works:
            group.create_task(kimi())
        if socket is not None:
            group.create_task(socket.connected_once.wait())


async def serve(deps: Deps) -> None:
    """Run until SIGINT/SIGTERM, in every state: checking, connecting, reconnecting, idle or busy.

    Start-up checks run while /healthz and /livez already answer (503 naming what is not ready); a
    definitive rejection ends serve() with `Rejected`. On a stop signal: stop taking Slack requests and
    jobs, let running answers finish within SHUTDOWN_GRACE_SECONDS, hand the rest back to the queue, close.
    """
    settings = deps.settings
    receives = settings.kimibot_role in ("all", "receiver")
    works = settings.kimibot_role in ("all", "worker")
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second signal: hand running answers back now instead of waiting

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)

    health = Health(
        checks={
            "SLACK_CLIENT_ID"
            if settings.oauth and not settings.slack_bot_token
            else "SLACK_BOT_TOKEN": "checking"
        }
    )
    if works:
        health.checks["MOONSHOT_API_KEY"] = "checking"
    bolt = build_bolt_app(deps) if receives else None
    worker = build_worker(deps) if works else None
    checks = check_client(settings)
    socket = (
        SocketConnection(bolt, settings, deps.slack, checks, health, deps.intake)
        if bolt is not None and settings.socket_mode
        else None
    )
    web_app = build_web_app(deps, bolt if socket is None else None, worker, health)
    # What start-up built (every module, the apps, the clients: ~160k objects) lives as long as the process:
    # frozen, out of the collector's reach. Otherwise each full collection walks it all again, ~100 ms on a
    # busy 2-core host, and every request of a burst waits behind it. Collected once first, before serving.
    gc.collect()
    gc.freeze()
    runner = web.AppRunner(web_app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host="0.0.0.0", port=settings.port)
    await site.start()
    log.info(
        "kimibot starting: checking Slack and Kimi",
        extra={"role": settings.kimibot_role, "port": settings.port, "model": settings.kimi_model},
    )

    started = asyncio.Event()

    async def start_then_work() -> None:
        await _start_up(deps, health, checks, socket, works)
        if worker is not None and deps.tools is None and settings.tools_enabled:
            toolbox = ToolBox(settings)  # the built-ins, and the MCP servers connected (or retrying)
            await toolbox.start()
            deps.tools = toolbox
        if worker is not None:
            health.worker_task = asyncio.create_task(worker.run(), name="job-loop")
        started.set()
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
        if health.worker_task is not None:
            # asyncio.wait, not await: cancelling this task at shutdown must not cancel the job loop.
            await asyncio.wait([health.worker_task])
            if not health.worker_task.cancelled() and health.worker_task.exception() is not None:
                raise Stopped("the job loop failed") from health.worker_task.exception()
            raise Stopped("the job loop ended")  # it only ends after stop(); ending otherwise is a bug
        await asyncio.Event().wait()

    waiter = asyncio.create_task(stop.wait(), name="stop-signal")
    tasks = [asyncio.create_task(start_then_work(), name="start-up")]
    lag_watch = asyncio.create_task(deps.metrics.watch_loop(), name="loop-lag")
    if socket is not None:
        tasks.append(asyncio.create_task(socket.run(), name="socket-mode"))
    failure: BaseException | None = None
    try:
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter and not task.cancelled() and task.exception() is not None:
                failure = _first_cause(task.exception())
                break
    finally:
        health.stopping = True
        log.info("shutting down", extra={"running_jobs": len(worker.running) if worker else 0})
        for task in [waiter, lag_watch, *tasks]:
            task.cancel()
        await asyncio.gather(waiter, lag_watch, *tasks, return_exceptions=True)
        if socket is not None:
            await socket.close()
        await _bounded(site.stop(), 3.0, "stop receiving")
        if worker is not None and health.worker_task is not None:
            await _drain(worker, settings.shutdown_grace_seconds, hurry)
            await asyncio.wait([health.worker_task], timeout=3.0)
            health.worker_task.cancel()
        await _bounded(runner.cleanup(), 3.0, "http server")
        # Token refreshes in flight finish and store their new tokens first (Installations.close).
        refreshes_s = deps.installations.close_timeout_s if deps.installations is not None else 0.0
        await _bounded(deps.close(), 3.0 + refreshes_s, "connections")
    if isinstance(failure, Rejected):
        failure.after_start = started.is_set()
        raise failure
    if failure is not None:
        log.error("kimibot stopped by an unexpected error", exc_info=failure.__cause__ or failure)
        if isinstance(failure, Stopped):
            raise failure
        raise Stopped(f"{type(failure).__name__}: {failure}") from failure
