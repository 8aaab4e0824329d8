"""OAuth mode: app_uninstalled and tokens_revoked (the bot's token) delete the installation and all of that
workspace's data. Bolt runs these listeners without authorize (the token is already gone)."""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.deps import Deps
from bot.store import forget_team

log = logging.getLogger(__name__)


async def remove_workspace(deps: Deps, body: dict[str, Any], why: str) -> None:
    """Delete the installation of the team (or org) the event comes from, and every team's data it served."""
    assert deps.installations is not None
    store = deps.installations.store
    team_id = str(body.get("team_id") or "")
    enterprise_id = str(body.get("enterprise_id") or "") or None
    authorizations = body.get("authorizations") or [{}]
    org_wide = bool(isinstance(authorizations[0], dict) and authorizations[0].get("is_enterprise_install"))
    teams = {team_id} if team_id else set()
    if org_wide and enterprise_id:
        teams |= await deps.installations.teams_of_org(enterprise_id)
        await store.async_delete_all(enterprise_id=enterprise_id, team_id=None)
        await deps.redis.delete(deps.installations.lock_key(enterprise_id))
    for team in sorted(teams):
        await store.async_delete_all(enterprise_id=enterprise_id, team_id=team)  # a workspace's own install
        deleted = await forget_team(deps.redis, team)
        log.info("workspace data deleted", extra={"why": why, "team_id": team, "deleted": deleted})


def register(app: AsyncApp, deps: Deps) -> None:
    if deps.installations is None:
        return  # single workspace: SLACK_BOT_TOKEN is the installation; nothing is deleted on our own

    @app.event("app_uninstalled")
    async def on_uninstalled(body: dict[str, Any]) -> None:
        await remove_workspace(deps, body, "app_uninstalled")

    @app.event("tokens_revoked")
    async def on_tokens_revoked(body: dict[str, Any], event: dict[str, Any]) -> None:
        tokens = event.get("tokens") if isinstance(event.get("tokens"), dict) else {}
        if tokens and tokens.get("bot"):  # user tokens alone: kimibot keeps none, nothing to delete
            await remove_workspace(deps, body, "tokens_revoked")
