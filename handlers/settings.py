"""`/kimi settings` (the channel's settings modal), its submission, and the App Home tab with its "Edit
workspace defaults" button. Admins only (deps.admins), checked when a form opens AND when it is saved."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp

from bot.admins import ASK_AN_ADMIN
from bot.deps import Deps
from bot.home import modal_for, publish_home, redraw, submit
from bot.slack.settings_view import (
    ACTION_EDIT_DEFAULTS,
    CALLBACK_SETTINGS,
    WORKSPACE,
    form_target,
    notice_modal,
)

log = logging.getLogger(__name__)
SETTINGS_WORDS = frozenset({"settings", "setting", "config"})
NOT_THIS_FORM = "This form is out of date or not for this workspace: close it and open it again."
NOT_OPENED = "I couldn't open the settings form (Slack said `{error}`): try again."
SLOW = "Slack didn't answer in time, so I couldn't check who may change settings: try again."
SLOW_SAVE = "Slack didn't answer in time, so nothing was saved: press Save again."
# Slack waits 3 s for the ack of a command or a view submission, and a trigger_id lives as long: what
# happens before the ack is bounded. The admin check (users.info, retried on a 429) gets a second; the
# form (a Redis read, a tool listing of at most TOOLS_WAIT_S, views.open) what is left of OPEN_DEADLINE_S.
ADMIN_CHECK_S = 1.0
OPEN_DEADLINE_S = 2.5


def _error_of(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("error")) if response is not None else type(exc).__name__


async def _is_admin(deps: Deps, team: str, user: str) -> bool | None:
    """deps.admins.is_admin within ADMIN_CHECK_S; None when Slack did not say in time."""
    try:
        async with asyncio.timeout(ADMIN_CHECK_S):
            return await deps.admins.is_admin(team, user)
    except TimeoutError:
        log.warning("admin check timed out", extra={"user": user})
        return None


async def open_channel_settings(deps: Deps, ack: AsyncAck, command: dict[str, Any]) -> None:
    """`/kimi settings` in a channel: the modal for that channel, or "ask an admin"."""
    deadline = asyncio.get_running_loop().time() + OPEN_DEADLINE_S
    team, user = str(command.get("team_id") or ""), str(command.get("user_id") or "")
    channel = str(command.get("channel_id") or "")
    admin = await _is_admin(deps, team, user)
    if not admin:
        await ack(response_type="ephemeral", text=ASK_AN_ADMIN if admin is False else SLOW)
        return
    try:
        async with asyncio.timeout_at(deadline):
            view = await modal_for(deps, team, user, channel)
            await deps.slack.views_open(trigger_id=str(command.get("trigger_id") or ""), view=view)
    except Exception as exc:
        log.warning("settings form not opened", extra={"channel": channel, "error": _error_of(exc)})
        await ack(response_type="ephemeral", text=NOT_OPENED.format(error=_error_of(exc)))
        return
    await ack()


def _form_of(body: dict[str, Any], view: dict[str, Any]) -> tuple[str, str] | None:
    """(team, target) a settings form was opened for, from its private_metadata; None when that is not a
    form of ours or names another team than the payload (which has none on an org-wide install)."""
    form = form_target(str(view.get("private_metadata") or ""))
    sent = str((body.get("team") or {}).get("id") or "")
    if form is None or (sent and sent != form[0]):
        log.info("settings form refused", extra={"metadata": view.get("private_metadata"), "team": sent})
        return None
    return form


def register(app: AsyncApp, deps: Deps) -> None:
    async def on_submit(ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        user = str((body.get("user") or {}).get("id") or "")
        form = _form_of(body, view)
        if form is None:
            await ack(response_action="errors", errors={"model": NOT_THIS_FORM})
            return
        team, target = form
        admin = await _is_admin(deps, team, user)
        if not admin:
            log.info("settings refused: not an admin", extra={"user": user, "target": target})
            await ack(
                response_action="errors", errors={"model": ASK_AN_ADMIN if admin is False else SLOW_SAVE}
            )
            return
        errors = await submit(deps, team, user, target, view)
        if errors:
            blocks = {str(b.get("block_id")) for b in view.get("blocks") or []}
            shown = {k: v for k, v in errors.items() if k in blocks} or {"model": next(iter(errors.values()))}
            await ack(response_action="errors", errors=shown)
            return
        await ack()
        try:
            await publish_home(deps, team, user)
        except Exception as exc:  # the settings are saved; the Home tab catches up when next opened
            log.info("home tab not refreshed", extra={"user": user, "error": _error_of(exc)})

    async def in_home_tab(event: dict[str, Any]) -> bool:
        return event.get("tab") == "home"

    async def on_home_opened(body: dict[str, Any], event: dict[str, Any]) -> None:
        user, team = str(event.get("user") or ""), str(body.get("team_id") or "")
        if user:
            try:
                await publish_home(deps, team, user)
            except Exception as exc:
                log.warning("home tab not published", extra={"user": user, "error": _error_of(exc)})

    async def on_edit_defaults(ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        user = str((body.get("user") or {}).get("id") or "")
        team = str(
            (body.get("team") or {}).get("id")  # null on an org-wide install: the Home view's own team
            or (body.get("view") or {}).get("team_id")
            or (body.get("user") or {}).get("team_id")
            or ""
        )
        trigger = str(body.get("trigger_id") or "")
        deadline = asyncio.get_running_loop().time() + OPEN_DEADLINE_S  # the trigger_id's life
        admin = await _is_admin(deps, team, user)
        try:
            async with asyncio.timeout_at(deadline):
                if admin:
                    view = await modal_for(deps, team, user, WORKSPACE)
                else:
                    view = notice_modal(ASK_AN_ADMIN if admin is False else SLOW)
                await deps.slack.views_open(trigger_id=trigger, view=view)
        except Exception as exc:
            log.warning("workspace settings form not opened", extra={"error": _error_of(exc)})

    async def on_model_picked(ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Another model picked in the form: redraw it with that model's thinking and effort fields."""
        await ack()
        view = body.get("view") or {}
        model = str((action.get("selected_option") or {}).get("value") or "")
        form = _form_of(body, view)
        if view.get("callback_id") != CALLBACK_SETTINGS or not model or form is None:
            return
        team, target = form
        try:
            new = await redraw(deps, team, target, view, model)
            await deps.slack.views_update(view_id=str(view.get("id") or ""), hash=view.get("hash"), view=new)
        except Exception as exc:  # the form stays as it was; saving still checks every value
            log.info("settings form not redrawn", extra={"error": _error_of(exc)})

    app.view(CALLBACK_SETTINGS)(on_submit)
    app.action("model")(on_model_picked)
    app.event("app_home_opened", matchers=[in_home_tab])(on_home_opened)
    app.action(ACTION_EDIT_DEFAULTS)(on_edit_defaults)
