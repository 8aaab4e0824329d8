"""The App Home tab and the settings forms' I/O: what the modal lists, saving a submitted form, and
publishing the Home view. The rules are in bot/channel_settings.py, the Block Kit in
bot/slack/settings_view.py; this module only reads and writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from bot.channel_settings import (
    ChannelConfig,
    Submitted,
    differences,
    env_config,
    overrides_to_save,
    resolve,
    validate,
)
from bot.deps import Deps
from bot.slack.settings_view import (
    HOME_CHANNELS_SHOWN,
    WORKSPACE,
    form_hidden_tools,
    form_tools,
    home_view,
    model_options,
    read_state,
    redrawn,
    settings_modal,
)
from bot.tools.base import ToolContext
from bot.usage import home_usage_blocks

log = logging.getLogger(__name__)

# A modal must open within Slack's 3 s trigger window, after the admin check: do not wait for MCP servers
# (a form that lists no tools leaves every tool as it is when saved).
TOOLS_WAIT_S = 0.5


async def tool_names(deps: Deps, team_id: str, user: str, channel: str) -> list[str]:
    """Every tool kimibot could offer (built-ins and MCP servers'), by name, for the tool checkboxes."""
    if deps.tools is None:
        return []
    ctx = ToolContext(team_id, user, channel, "", slack=deps.slack, redis=deps.redis)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(TOOLS_WAIT_S):
            return sorted({t.name for t in await deps.tools(ctx)})
    log.info("tools not ready: the settings form lists none", extra={"channel": channel})
    return []


async def current(deps: Deps, team_id: str, target: str) -> tuple[ChannelConfig, ChannelConfig]:
    """(what `target` inherits, what it has now): target is a channel id or WORKSPACE."""
    store = deps.channel_settings
    if target == WORKSPACE:
        workspace, _ = await store.layers(team_id, None)
        return env_config(deps.settings), resolve(deps.settings, workspace)
    workspace, own = await store.layers(team_id, target)
    return resolve(deps.settings, workspace), resolve(deps.settings, workspace, own)


async def modal_for(deps: Deps, team_id: str, user: str, target: str) -> dict[str, Any]:
    _, config = await current(deps, team_id, target)
    channel = "" if target == WORKSPACE else target
    return settings_modal(target, config, await tool_names(deps, team_id, user, channel), team=team_id)


async def redraw(deps: Deps, team_id: str, target: str, view: dict[str, Any], model: str) -> dict[str, Any]:
    """The form again for another model (its thinking and effort fields), keeping what was typed and the
    tools it listed (read from the form itself: no new listing)."""
    _, config = await current(deps, team_id, target)
    blocks = view.get("blocks") or []
    tools = form_tools(blocks)
    raw = {**read_state((view.get("state") or {}).get("values") or {}), "model": model}
    config = redrawn(config, raw, tools)
    return settings_modal(target, config, tools, team=team_id, hidden=form_hidden_tools(blocks))


async def submit(deps: Deps, team_id: str, user: str, target: str, view: dict[str, Any]) -> dict[str, str]:
    """Validate and save a submitted form; the errors to show by field name (empty: saved). The tools
    judged are those the form offered (its own checkboxes): a tool it did not list keeps its state."""
    inherited, now = await current(deps, team_id, target)
    offered = form_tools(view.get("blocks") or [])
    state = (view.get("state") or {}).get("values") or {}
    checked: Submitted = validate(
        read_state(state),
        offered_tools=offered,
        previous_off=now.tools_off,
        models=model_options(now.model),
        workspace=target == WORKSPACE,
    )
    if checked.errors:
        return checked.errors
    changes = overrides_to_save(inherited, checked.values)
    await deps.channel_settings.save(team_id, None if target == WORKSPACE else target, changes, user)
    log.info("settings saved", extra={"team": team_id, "target": target, "user": user})
    return {}


async def publish_home(deps: Deps, team_id: str, user: str) -> None:
    """Draw `user`'s Home tab: the workspace defaults, usage, and for admins the channels that differ
    (private channels, DMs and budgets are not everyone's to see; the list is capped)."""
    store = deps.channel_settings
    workspace, _ = await store.layers(team_id, None)
    defaults = resolve(deps.settings, workspace)
    admin = await deps.admins.is_admin(team_id, user)
    overrides: list[tuple[str, list[str]]] | None = None
    more = 0
    if admin:
        own, more = await store.overridden(team_id, limit=HOME_CHANNELS_SHOWN)
        overrides = [
            (channel, differences(defaults, resolve(deps.settings, workspace, fields)))
            for channel, fields in own.items()
        ]
    usage = await home_usage_blocks(deps, team_id, user)
    view = home_view(defaults, overrides, admin=admin, usage=usage, more=more)
    await deps.slack.views_publish(user_id=user, view=view)
