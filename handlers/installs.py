"""OAuth mode: app_uninstalled, tokens_revoked (the bot's token) and team_access_revoked (workspaces taken
from an org-wide install) delete the installation and all of that workspace's data. Bolt runs these
listeners without authorize (the token is already gone)."""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.deps import Deps
from bot.store import forget_team

log = logging.getLogger(__name__)


async def _forget(deps: Deps, team: str, why: str) -> None:
    deleted = await forget_team(deps.redis, team)
    log.info("workspace data deleted", extra={"why": why, "team_id": team, "deleted": deleted})


async def remove_workspace(deps: Deps, body: dict[str, Any], why: str) -> None:
    """Delete the installation of the team (or org) the event comes from, once, then the data of every
    workspace it served. An event older than the installation (a reinstall came between app_uninstalled
    and tokens_revoked) deletes nothing; an org-wide uninstall keeps a workspace's own separate install."""
    installations = deps.installations
    assert installations is not None
    team_id = str(body.get("team_id") or "")
    enterprise_id = str(body.get("enterprise_id") or "") or None
    event_time = float(body.get("event_time") or 0)
    authorizations = body.get("authorizations") or [{}]
    org_wide = bool(isinstance(authorizations[0], dict) and authorizations[0].get("is_enterprise_install"))
    if org_wide and enterprise_id:
        if await installations.installed_after(enterprise_id, None, event_time):
            log.info("uninstall event older than the org's installation ignored", extra={"why": why})
            return
        teams = await installations.teams_of_org(enterprise_id) | ({team_id} if team_id else set())
        await installations.delete(enterprise_id, None)
        await remove_from_org(deps, teams, why)
        return
    if not team_id:
        return
    if await installations.installed_after(enterprise_id, team_id, event_time):
        log.info(
            "uninstall event older than the installation ignored", extra={"why": why, "team_id": team_id}
        )
        return
    await installations.delete(enterprise_id, team_id)
    await _forget(deps, team_id, why)


async def remove_from_org(deps: Deps, teams: set[str], why: str) -> None:
    """Workspaces no longer served by their org's install: their pointer to it goes, and their data unless
    they have an install of their own (which serves them still)."""
    assert deps.installations is not None
    for team in sorted(teams):
        await deps.redis.delete(deps.installations.store.org_key(team))
        if await deps.installations.has_own_install(team):
            log.info("workspace keeps its own installation", extra={"why": why, "team_id": team})
            continue
        await _forget(deps, team, why)


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

    @app.event("team_access_revoked")
    async def on_team_access_revoked(event: dict[str, Any]) -> None:
        raw = event.get("team_ids")
        teams = {t for t in (raw if isinstance(raw, list) else []) if isinstance(t, str) and t}
        await remove_from_org(deps, teams, "team_access_revoked")
