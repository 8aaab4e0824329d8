"""Start-up checks: ask Slack and Kimi whether the configured credentials work before answering anyone.

A definitive "no" (a rejected token, an unknown model) becomes `Rejected`: one sentence naming the setting
and what Slack or Kimi said, and kimibot stops with exit code 2. Anything that may pass later (no network,
a 5xx, a rate limit, a proxy's error page) becomes `NotYet`: retried with backoff, one log line per attempt,
while /healthz says what is not ready.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.kimi.profiles import learn_models
from bot.settings import WHERE_TO_GET, Settings

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 10.0  # one check's HTTP request; well under the 15 s a rejection may take to show
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 30.0
MODELS_SHOWN = 8  # model ids quoted when KIMI_MODEL is not among them

# Slack errors that say "not now" rather than "not this token" (the rest of the documented errors of
# auth.test and apps.connections.open are about the token or the app: invalid_auth, not_authed,
# account_inactive, token_revoked, token_expired, not_allowed_token_type, no_permission, missing_scope...).
SLACK_TRANSIENT_ERRORS = frozenset(
    {"ratelimited", "request_timeout", "service_unavailable", "fatal_error", "internal_error"}
)


class Rejected(Exception):
    """Slack or Kimi refused a setting: nothing will work until an admin changes it."""

    def __init__(self, setting: str, said: str) -> None:
        super().__init__(f"{setting} {said}")
        self.setting = setting
        self.said = said
        self.after_start = False  # refused while running (e.g. a token revoked, seen at a reconnect)

    def line(self) -> str:
        """The one line an admin reads: the setting, what the service said, where to get a good value."""
        hint = WHERE_TO_GET.get(self.setting)
        lead = "Expected" if self.setting == "KIMI_MODEL" else "Get it from"
        return f"{self.setting} {self.said}." + (f" {lead}: {hint}." if hint else "")


class NotYet(Exception):
    """The service could not be asked (network, 5xx, rate limit, a proxy's page): ask again later."""


def backoff_s(attempt: int) -> float:
    """1 s, 2 s, 4 s ... up to 30 s, each with up to half of it taken off at random."""
    step = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0**attempt)
    return step * random.uniform(0.5, 1.0)


def check_client(settings: Settings) -> AsyncWebClient:
    """A Web API client for the checks: short timeout, no retry handlers (the checks retry themselves)."""
    base_url = (
        settings.slack_api_url if settings.slack_api_url.endswith("/") else settings.slack_api_url + "/"
    )
    return AsyncWebClient(
        token=settings.slack_bot_token, base_url=base_url, timeout=int(CHECK_TIMEOUT_S), retry_handlers=[]
    )


async def slack_call(setting: str, call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    """Run one Web API call for a check and sort its failure into Rejected or NotYet."""
    try:
        response = await call()
    except SlackApiError as exc:
        answer = exc.response
        data = getattr(answer, "data", None)
        status = getattr(answer, "status_code", None) or getattr(answer, "status", None)
        error = data.get("error") if isinstance(data, dict) else None
        if not error:  # not Slack's JSON: a proxy's or load balancer's page
            raise NotYet(f"Slack answered HTTP {status} without a Slack error") from None
        if error in SLACK_TRANSIENT_ERRORS or status == 429 or (isinstance(status, int) and status >= 500):
            raise NotYet(f"Slack answered {error}") from None
        raise Rejected(setting, f"was rejected by Slack ({error})") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise NotYet(f"Slack is unreachable ({type(exc).__name__}: {exc})") from None
    return dict(response.data) if isinstance(response.data, dict) else {}


async def check_bot_token(client: AsyncWebClient) -> dict[str, Any]:
    """auth.test with SLACK_BOT_TOKEN (the client's token): who the bot is, or why Slack refuses it."""
    return await slack_call("SLACK_BOT_TOKEN", client.auth_test)


async def check_installations(installations: Any) -> int:
    """OAuth mode: the installations in Redis can be read (how many workspaces/orgs have kimibot)."""
    from redis.exceptions import RedisError

    try:
        return int(await installations.store.count())
    except (RedisError, OSError, TimeoutError) as exc:
        raise NotYet(f"the installations in Redis cannot be read ({type(exc).__name__}: {exc})") from None


async def open_socket_url(settings: Settings, client: AsyncWebClient) -> str:
    """apps.connections.open with SLACK_APP_TOKEN: a WebSocket URL for Socket Mode, or why not."""
    data = await slack_call(
        "SLACK_APP_TOKEN", lambda: client.apps_connections_open(app_token=settings.slack_app_token)
    )
    url = data.get("url")
    if not isinstance(url, str) or not url:
        raise NotYet("apps.connections.open gave no URL")
    return url


async def check_kimi(settings: Settings) -> bool:
    """GET /models with MOONSHOT_API_KEY: the key is accepted and KIMI_MODEL is offered.

    A host without /models (some OpenAI-compatible ones) cannot be asked; that is logged, not refused
    (False: nothing was checked).
    """
    url = settings.kimi_base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {settings.moonshot_api_key}"}
    timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=True) as session,  # HTTPS_PROXY, like the SDKs
            session.get(url, headers=headers) as response,
        ):
            status = response.status
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise NotYet(f"Kimi is unreachable ({type(exc).__name__}: {exc})") from None
    said = _kimi_message(body)
    from_kimi = isinstance(body, dict)  # Kimi answers JSON; a proxy, WAF or captive portal answers a page
    if status in (401, 403) and from_kimi:
        raise Rejected(
            "MOONSHOT_API_KEY", f"was rejected by Kimi (HTTP {status}: {said or 'no reason given'})"
        )
    if status in (401, 403, 407, 429) or status >= 500 or (status == 200 and not from_kimi):
        raise NotYet(
            f"Kimi answered HTTP {status}"
            + (f": {said}" if said else "" if from_kimi else " (a page, not Kimi's JSON)")
        )
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), list):
        log.warning(
            "cannot check KIMI_MODEL: the Kimi host does not list its models",
            extra={"url": url, "status": status},
        )
        return False
    offered = [str(m.get("id")) for m in body["data"] if isinstance(m, dict) and m.get("id")]
    learn_models(body["data"])  # which models read images, where the host says
    if settings.kimi_model not in offered:
        shown = ", ".join(offered[:MODELS_SHOWN]) + (", ..." if len(offered) > MODELS_SHOWN else "")
        raise Rejected(
            "KIMI_MODEL",
            f"{settings.kimi_model!r} is not offered by {settings.kimi_base_url} "
            f"(GET /models lists: {shown or 'nothing'})",
        )
    return True


def _kimi_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or "")
    return ""


async def until_settled(
    name: str,
    check: Callable[[], Awaitable[Any]],
    status: dict[str, str],
) -> Any:
    """Run `check` until it passes (returning its result) or is Rejected (raised); log each failed try.

    `status[name]` tells /healthz where the check stands: "checking", "ok", or why it is not yet.
    """
    attempt = 0
    while True:
        try:
            result = await check()
        except NotYet as exc:
            delay = backoff_s(attempt)
            attempt += 1
            status[name] = f"not ready: {exc}"
            log.warning(
                f"{name} cannot be checked yet; retrying",
                extra={"setting": name, "attempt": attempt, "error": str(exc), "retry_in_s": round(delay, 1)},
            )
            await asyncio.sleep(delay)
            continue
        status[name] = "ok"
        return result
