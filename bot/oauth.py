"""GET /slack/install and GET /slack/oauth_redirect: Bolt's OAuth flow with our Redis stores.

Served by kimibot's own aiohttp app on PORT, in HTTP and Socket Mode alike (Socket Mode carries events,
not browsers). oauth.v2.access goes to SLACK_API_URL through our Web API client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.oauth.async_oauth_flow import AsyncOAuthFlow
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings
from slack_bolt.request.async_request import AsyncBoltRequest

from bot.installations import STATE_TTL_S, Installations, RedisOAuthStateStore
from bot.settings import Settings, split_ids

log = logging.getLogger(__name__)

INSTALL_PATH = "/slack/install"
REDIRECT_PATH = "/slack/oauth_redirect"


def install_scopes(settings: Settings) -> list[str]:
    """SLACK_INSTALL_SCOPES when set, else the bot scopes the manifests ask for."""
    from bot.doctor import BOT_SCOPES

    return split_ids(settings.slack_install_scopes) or list(BOT_SCOPES)


def build_oauth_flow(settings: Settings, installations: Installations) -> AsyncOAuthFlow:
    # Without SLACK_STATE_SECRET the states are not signed: one-time entries in Redis, bound to the
    # browser's cookie, which every replica can check (a secret made up per process could not be).
    state_secret = settings.slack_state_secret
    oauth_settings = AsyncOAuthSettings(
        client_id=settings.slack_client_id,
        client_secret=settings.slack_client_secret,
        scopes=install_scopes(settings),
        user_scopes=[],
        redirect_uri=settings.slack_redirect_uri or None,
        install_path=INSTALL_PATH,
        redirect_uri_path=REDIRECT_PATH,
        install_page_rendering_enabled=False,  # straight to Slack's consent page
        installation_store=installations.store,
        installation_store_bot_only=True,
        state_store=RedisOAuthStateStore(installations.redis, state_secret, STATE_TTL_S),
        state_expiration_seconds=STATE_TTL_S,
        logger=logging.getLogger("slack_bolt.kimibot.oauth"),
    )
    return AsyncOAuthFlow(client=installations.client, settings=oauth_settings)


def add_oauth_routes(web_app: web.Application, flow: AsyncOAuthFlow) -> None:
    async def install(request: web.Request) -> web.Response:
        bolt_request = AsyncBoltRequest(body="", query=request.query_string, headers=dict(request.headers))
        return await to_aiohttp_response(await flow.handle_installation(bolt_request))

    async def redirect(request: web.Request) -> web.Response:
        headers: dict[str, str | Sequence[str]] = {k.lower(): v for k, v in request.headers.items()}
        bolt_request = AsyncBoltRequest(body="", query=request.query_string, headers=headers)
        response = await flow.handle_callback(bolt_request)
        log.info("oauth redirect handled", extra={"status": response.status})
        return await to_aiohttp_response(response)

    web_app.router.add_get(INSTALL_PATH, install)
    web_app.router.add_get(REDIRECT_PATH, redirect)
