"""`kimibot doctor`: check every setting and every service kimibot needs, one line per check.

It runs the start-up checks of `bot/startup.py` once each (no retrying), and a few more a running bot
cannot afford to repeat: the Redis at REDIS_URL (and whether it is a cluster, as REDIS_CLUSTER says), the
bot token's scopes against the manifest's (Slack lists a token's scopes in the `x-oauth-scopes` header of
every Web API answer), and each MCP server of MCP_CONFIG. Nothing is written anywhere; it works before the
first `kimibot serve`. Exit code 1 when a check fails, 0 when every one passes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bot.installations import ENCRYPTED, Sealer, Undecryptable
from bot.kimi.profiles import profile_for
from bot.redis_client import build_redis, is_cluster, probe_cluster
from bot.settings import Settings, SettingsError, _without_password
from bot.startup import NotYet, Rejected, check_client, check_kimi, open_socket_url, slack_call

# The bot scopes both manifests (manifests/manifest-*.yml) ask for. The manifests are not part of an
# installed kimibot, so they are listed here too; tests/test_manifests.py keeps the two the same.
BOT_SCOPES = (
    "app_mentions:read",
    "assistant:write",
    "channels:history",
    "groups:history",
    "im:history",
    "mpim:history",
    "chat:write",
    "commands",
    "users:read",
    "channels:read",
    "groups:read",
    "im:read",
    "mpim:read",
    "search:read.public",
    "usergroups:read",
    "reactions:write",
    "files:read",
)
REDIS_TIMEOUT_S = 3.0
SCOPES_WHERE = (
    "add them in Slack app settings > OAuth & Permissions > Scopes (or paste the manifest again), then "
    "reinstall the app and copy the new Bot User OAuth Token"
)


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str

    def line(self) -> str:
        return f"{'✓' if self.ok else '✗'} {self.what}"


Say = Callable[[Check], None]


def _about(problems: Sequence[str], *names: str) -> bool:
    """Is one of these settings among the problems already reported (so its check is skipped)?"""
    return any(problem.startswith(name) for problem in problems for name in names)


def _granted(headers: Any) -> set[str] | None:
    for key, value in dict(headers or {}).items():
        if str(key).lower() == "x-oauth-scopes":
            return {scope.strip() for scope in str(value).split(",") if scope.strip()}
    return None


def check_settings(settings: Settings, problems: Sequence[str], say: Say) -> None:
    for problem in problems:
        say(Check(False, problem))
    if not problems:
        mode = "Socket Mode" if settings.socket_mode else "HTTP mode"
        if settings.oauth:
            mode += ", OAuth installs"
        say(
            Check(
                True,
                f"settings: every setting is well formed ({mode}, role {settings.kimibot_role}, "
                f"model {settings.kimi_model})",
            )
        )


async def check_redis(settings: Settings, say: Say) -> None:
    where = _without_password(settings.redis_url)
    found = await asyncio.to_thread(probe_cluster, settings.redis_url)
    if settings.redis_cluster == "true" and found is False:
        say(Check(False, f"REDIS_CLUSTER is true, but REDIS_URL ({where}) is not a Redis Cluster node"))
        return
    if settings.redis_cluster == "false" and found is True:
        say(Check(False, f"REDIS_CLUSTER is false, but REDIS_URL ({where}) is a Redis Cluster node"))
        return
    try:
        client = await asyncio.to_thread(build_redis, settings.redis_url, settings.redis_cluster)
    except SettingsError as exc:
        say(Check(False, exc.problems[0]))
        return
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            await client.ping()
            if is_cluster(client):
                primaries = len(client.get_primaries())  # type: ignore[attr-defined]
                kind = f"a Redis Cluster node (cluster of {primaries} primaries)"
            else:
                info = await client.info("server")
                kind = f"Redis {info.get('redis_version', '?')} (a single Redis, not a cluster)"
    except Exception as exc:  # any failure to answer is the check failing, named by its type
        say(Check(False, f"REDIS_URL: Redis at {where} cannot be reached ({type(exc).__name__}: {exc})"))
        return
    finally:
        await client.aclose()
    say(Check(True, f"REDIS_URL: {where} answers: {kind}"))


async def check_slack(settings: Settings, problems: Sequence[str], say: Say) -> None:
    client = check_client(settings)
    headers: dict[str, Any] = {}

    async def auth_test() -> Any:
        response = await client.auth_test()
        headers.update(dict(response.headers or {}))
        return response

    try:
        data = await slack_call("SLACK_BOT_TOKEN", auth_test)
    except Rejected as exc:
        say(Check(False, exc.line()))
        return
    except NotYet as exc:
        say(
            Check(False, f"SLACK_BOT_TOKEN cannot be checked: {exc} (SLACK_API_URL {settings.slack_api_url})")
        )
        return
    say(
        Check(
            True,
            f"SLACK_BOT_TOKEN: bot @{data.get('user', '?')} ({data.get('user_id', '?')}) "
            f"in workspace {data.get('team', '?')} ({data.get('team_id', '?')})",
        )
    )
    granted = _granted(headers)
    if granted is None:
        say(Check(False, "SLACK_BOT_TOKEN's scopes cannot be checked: Slack sent no x-oauth-scopes header"))
    elif missing := [scope for scope in BOT_SCOPES if scope not in granted]:
        say(
            Check(
                False,
                f"SLACK_BOT_TOKEN lacks scopes the manifest asks for: {', '.join(missing)}; {SCOPES_WHERE}",
            )
        )
    else:
        say(Check(True, f"SLACK_BOT_TOKEN has every scope the manifest asks for ({len(BOT_SCOPES)})"))
    await check_app_token(settings, problems, client, say)


async def check_app_token(settings: Settings, problems: Sequence[str], client: Any, say: Say) -> None:
    if settings.slack_app_token and not _about(problems, "SLACK_APP_TOKEN"):
        try:
            await open_socket_url(settings, client)
        except Rejected as exc:
            say(Check(False, exc.line()))
        except NotYet as exc:
            say(Check(False, f"SLACK_APP_TOKEN cannot be checked: {exc}"))
        else:
            say(Check(True, "SLACK_APP_TOKEN: Slack opens Socket Mode connections for it"))


async def check_kimi_key(settings: Settings, say: Say) -> None:
    try:
        listed = await check_kimi(settings)
    except Rejected as exc:
        if exc.setting == "KIMI_MODEL":
            say(Check(True, f"MOONSHOT_API_KEY is accepted by {settings.kimi_base_url}"))
        say(Check(False, exc.line()))
        return
    except NotYet as exc:
        say(
            Check(
                False, f"MOONSHOT_API_KEY cannot be checked: {exc} (KIMI_BASE_URL {settings.kimi_base_url})"
            )
        )
        return
    if not listed:
        say(
            Check(
                True,
                f"MOONSHOT_API_KEY and KIMI_MODEL not checked: {settings.kimi_base_url} does not list its "
                "models (GET /models); the first answer will tell",
            )
        )
        return
    say(Check(True, f"MOONSHOT_API_KEY is accepted by {settings.kimi_base_url}"))
    known = (
        ""
        if profile_for(settings.kimi_model).known
        else " (not in kimibot's model table: a conservative profile)"
    )
    say(Check(True, f"KIMI_MODEL {settings.kimi_model!r} is offered{known}"))


class _Reasons(logging.Handler):
    """Why each MCP server is unavailable, from bot/tools/mcp.py's log lines."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        server = getattr(record, "server", None)
        error = getattr(record, "error", None)
        if server and error and record.getMessage().startswith("mcp server unavailable"):
            self.reasons.setdefault(str(server), str(error))


async def check_mcp(settings: Settings, say: Say) -> None:
    from bot.tools.mcp import McpConfigError, McpTools  # only when MCP servers are configured

    try:
        mcp = McpTools.from_file(settings.mcp_config)
    except McpConfigError as exc:
        say(Check(False, str(exc)))
        return
    reasons = _Reasons()
    logger = logging.getLogger("bot.tools.mcp")
    logger.addHandler(reasons)
    try:
        await mcp.start()
        tools: dict[str, int] = {}
        for tool in mcp.tools():
            server = str(getattr(tool, "server", ""))
            tools[server] = tools.get(server, 0) + 1
        status = mcp.status()
        if not status:
            say(Check(True, f"MCP_CONFIG ({settings.mcp_config}): no servers enabled"))
        for name, up in sorted(status.items()):
            if up:
                count = tools.get(name, 0)
                say(
                    Check(
                        True,
                        f"MCP_CONFIG server {name!r}: connected, {count} tool{'s' if count != 1 else ''}",
                    )
                )
            else:
                why = reasons.reasons.get(name, "did not connect in time")
                say(Check(False, f"MCP_CONFIG server {name!r}: not available ({why})"))
    finally:
        await mcp.close()
        logger.removeHandler(reasons)


async def check_oauth(settings: Settings, say: Say) -> None:
    """OAuth mode: Slack knows the app's client id and secret. An exchange of a made-up code is refused
    for the code when the credentials are right, and for the credentials when they are not."""
    client = check_client(settings)
    try:
        await slack_call(
            "SLACK_CLIENT_ID",
            lambda: client.oauth_v2_access(
                client_id=settings.slack_client_id,
                client_secret=settings.slack_client_secret,
                code="kimibot-doctor-check",
            ),
        )
    except Rejected as exc:
        if "invalid_code" in exc.said:
            say(Check(True, "SLACK_CLIENT_ID and SLACK_CLIENT_SECRET: Slack accepts them (OAuth mode)"))
            return
        setting = "SLACK_CLIENT_SECRET" if "bad_client_secret" in exc.said else "SLACK_CLIENT_ID"
        say(Check(False, Rejected(setting, exc.said).line()))
        return
    except NotYet as exc:
        say(
            Check(False, f"SLACK_CLIENT_ID cannot be checked: {exc} (SLACK_API_URL {settings.slack_api_url})")
        )
        return
    say(Check(False, "SLACK_CLIENT_ID: Slack exchanged a made-up code (is SLACK_API_URL really Slack?)"))


async def check_installations(settings: Settings, say: Say) -> None:
    """OAuth mode: the installations in Redis can be read (and decrypted with KIMIBOT_ENCRYPTION_KEY)."""
    try:
        client = await asyncio.to_thread(build_redis, settings.redis_url, settings.redis_cluster)
    except SettingsError as exc:
        say(Check(False, exc.problems[0]))
        return
    sealer = Sealer(settings.kimibot_encryption_key)
    found = unreadable = plain = 0
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S * 10):
            async for key in client.scan_iter(match="kimibot:install:*", count=500):
                if str(key).endswith((":org", ":rotate-lock")):
                    continue  # an org pointer and a lock: no tokens
                raw = await client.get(key)
                if raw is None:
                    continue
                found += str(key).endswith(":bot")
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                plain += not text.startswith(ENCRYPTED)
                try:
                    sealer.open(raw)
                except Undecryptable:
                    unreadable += 1
    except Exception as exc:  # any failure to read is the check failing, named by its type
        say(Check(False, f"installations cannot be read from Redis ({type(exc).__name__}: {exc})"))
        return
    finally:
        await client.aclose()
    if unreadable:
        say(
            Check(
                False,
                f"KIMIBOT_ENCRYPTION_KEY cannot decrypt {unreadable} installation record(s) "
                "(set the key they were stored with; several keys: comma-separated, the new one first)",
            )
        )
        return
    if not settings.kimibot_encryption_key:
        encrypted = "not encrypted (KIMIBOT_ENCRYPTION_KEY unset)"
    elif plain:
        encrypted = (
            f"encrypted, except {plain} record(s) saved before KIMIBOT_ENCRYPTION_KEY was set (each is "
            "encrypted when kimibot next reads it)"
        )
    else:
        encrypted = "encrypted"
    say(Check(True, f"installations: {found} workspace(s) or org(s) installed, readable, tokens {encrypted}"))


async def run(settings: Settings, problems: Sequence[str], say: Say) -> bool:
    """Every check, in order; True when all of them passed."""
    failed = False

    def tell(check: Check) -> None:
        nonlocal failed
        failed = failed or not check.ok
        say(check)

    check_settings(settings, problems, tell)
    if not _about(problems, "REDIS_URL", "REDIS_CLUSTER"):
        await check_redis(settings, tell)
    if settings.oauth:
        if not _about(problems, "SLACK_CLIENT_ID", "SLACK_CLIENT_SECRET", "SLACK_API_URL"):
            await check_oauth(settings, tell)
        if not _about(problems, "REDIS_URL", "REDIS_CLUSTER", "KIMIBOT_ENCRYPTION_KEY"):
            await check_installations(settings, tell)
        if not settings.slack_bot_token:
            await check_app_token(settings, problems, check_client(settings), tell)
    if settings.slack_bot_token and not _about(problems, "SLACK_BOT_TOKEN", "SLACK_API_URL"):
        # With the app credentials too: its workspace is one of the installed ones (seeded at start).
        await check_slack(settings, problems, tell)
    if not _about(problems, "MOONSHOT_API_KEY", "KIMI_BASE_URL", "KIMI_MODEL"):
        await check_kimi_key(settings, tell)
    if settings.mcp_config and not _about(problems, "MCP_CONFIG"):
        await check_mcp(settings, tell)
    return not failed
