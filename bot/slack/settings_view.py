"""The settings modal (`/kimi settings`, and the Home tab's "Edit workspace defaults"), reading it back,
and the Home tab view. Pure: Block Kit in, Block Kit out.

The modal has one input block per setting; a block's id is the setting's name (`tools_<n>` for the tool
checkbox groups), so `response_action: errors` can point at it. Thinking on/off is shown only for a model
that can switch it, reasoning effort only for one that takes it: picking another model redraws the form
(the model select dispatches its action; handlers/settings.py answers with views.update).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from bot.channel_settings import (
    EFFORTS,
    FOLLOWUPS,
    SYSTEM_PROMPT_LIMIT,
    ChannelConfig,
    name_list,
    parse_budget,
)
from bot.kimi.profiles import PROFILES, Thinking

CALLBACK_SETTINGS = "kimi_channel_settings"
# A form's private_metadata is "<team id>:<target>", the target a channel id or WORKSPACE (the workspace
# defaults): the team is the one the form was opened for, since a submission from an Enterprise Grid
# org-wide install carries no team (body.team is null; user.team_id is the user's home workspace).
WORKSPACE = "workspace"
TEAM_ID = re.compile(r"[TE][A-Z0-9]{2,}")
CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]{2,}")
ACTION_EDIT_DEFAULTS = "kimi_edit_workspace_defaults"  # the Home tab's button
# Slack's checkbox group holds at most 10 options; the modal shows up to 5 groups (50 tools). Tools past
# that are not listed and keep their state (the modal says how many).
CHECKBOXES_PER_GROUP = 10
TOOL_GROUPS = 5
SECTION_TEXT_LIMIT = 3_000
HOME_CHANNELS_SHOWN = 40  # one section per channel; the Home tab has 100 blocks in all


def _text(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text}


def _option(value: str, text: str | None = None) -> dict[str, Any]:
    return {"text": _text((text or value)[:75]), "value": value}


def model_options(current: str) -> list[str]:
    """The profile table's models, and the current one if it is an id the table does not know
    (KIMI_MODEL may name a model from a third-party host)."""
    models = list(PROFILES)
    return models if current in models else [current, *models]


def tool_groups(tools: list[str]) -> list[list[str]]:
    shown = sorted(set(tools))[: CHECKBOXES_PER_GROUP * TOOL_GROUPS]
    return [shown[i : i + CHECKBOXES_PER_GROUP] for i in range(0, len(shown), CHECKBOXES_PER_GROUP)]


def shown_tools(tools: list[str]) -> list[str]:
    return [name for group in tool_groups(tools) for name in group]


HIDDEN_TOOLS_BLOCK = "more_tools"  # the context block saying how many tools the form does not list
_HIDDEN_COUNT = re.compile(r"^(\d+) more tools")


def form_tools(blocks: list[dict[str, Any]]) -> list[str]:
    """The tools a form offered, read from its own checkbox groups (the `tools_<n>` input blocks of the
    view Slack hands back): saving or redrawing a form judges it by what the admin saw, never by a fresh
    listing (a slow MCP server, a tool added since, another window of a long list)."""
    names: list[str] = []
    for block in blocks:
        element = block.get("element") if isinstance(block, dict) else None
        if (
            block.get("type") != "input"
            or not str(block.get("block_id") or "").startswith("tools_")
            or not isinstance(element, dict)
            or element.get("action_id") != "tools"
        ):
            continue
        for option in element.get("options") or []:
            if isinstance(option, dict) and option.get("value"):
                names.append(str(option["value"]))
    return names


def form_hidden_tools(blocks: list[dict[str, Any]]) -> int:
    """How many tools a form said it does not list (its context note), 0 when none."""
    for block in blocks:
        if isinstance(block, dict) and block.get("block_id") == HIDDEN_TOOLS_BLOCK:
            for element in block.get("elements") or []:
                found = _HIDDEN_COUNT.match(str((element or {}).get("text") or ""))
                if found:
                    return int(found.group(1))
    return 0


def form_metadata(team: str, target: str) -> str:
    return f"{team}:{target}"


def form_target(metadata: str) -> tuple[str, str] | None:
    """(team, target) of a form's private_metadata; None for anything else (a forged or an old form)."""
    team, colon, target = metadata.partition(":")
    if not colon or not TEAM_ID.fullmatch(team):
        return None
    return (team, target) if target == WORKSPACE or CHANNEL_ID.fullmatch(target) else None


def settings_modal(
    target: str, config: ChannelConfig, tools: list[str], *, team: str, hidden: int | None = None
) -> dict[str, Any]:
    """The modal for `target` (a channel id, or WORKSPACE) of `team`, filled in with `config`. `hidden`:
    how many tools are not listed (default: those of `tools` past the form's checkboxes)."""
    workspace = target == WORKSPACE
    profile = config.profile
    models = model_options(config.model)
    thinking = "on" if config.thinking or profile.thinking is not Thinking.EXTRA_BODY else "off"
    where = "every channel without its own settings" if workspace else f"<#{target}>"
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"Settings for {where}. They apply from the next question."},
        },
        {
            "type": "input",
            "block_id": "model",
            "dispatch_action": True,  # another model redraws the thinking and effort fields
            "label": _text("Model"),
            "element": {
                "type": "static_select",
                "action_id": "model",
                "options": [_option(m) for m in models],
                "initial_option": _option(config.model),
            },
        },
    ]
    if profile.thinking is Thinking.EXTRA_BODY:
        blocks.append(
            {
                "type": "input",
                "block_id": "thinking",
                "label": _text("Thinking"),
                "hint": _text("Off: faster, cheaper answers without reasoning first."),
                "element": {
                    "type": "radio_buttons",
                    "action_id": "thinking",
                    "options": [_option("on", "On"), _option("off", "Off")],
                    "initial_option": _option(thinking, thinking.capitalize()),
                },
            }
        )
    if profile.thinking is Thinking.EFFORT:
        effort: dict[str, Any] = {
            "type": "static_select",
            "action_id": "effort",
            "options": [_option(e) for e in EFFORTS],
        }
        if config.effort in EFFORTS:
            effort["initial_option"] = _option(config.effort)
        blocks.append(
            {
                "type": "input",
                "block_id": "effort",
                "label": _text("Reasoning effort"),
                "hint": _text("How long the model thinks before it answers: low is fastest and cheapest."),
                "element": effort,
            }
        )
    prompt: dict[str, Any] = {
        "type": "plain_text_input",
        "action_id": "system_prompt",
        "multiline": True,
        "max_length": SYSTEM_PROMPT_LIMIT,
    }
    if config.system_prompt_addendum:
        prompt["initial_value"] = config.system_prompt_addendum
    blocks.append(
        {
            "type": "input",
            "block_id": "system_prompt",
            "optional": True,
            "label": _text("System prompt addendum"),
            "hint": _text(
                f"Added to kimibot's instructions for every question (up to {SYSTEM_PROMPT_LIMIT:,})."
            ),
            "element": prompt,
        }
    )
    groups = tool_groups(tools)
    for index, group in enumerate(groups):
        element: dict[str, Any] = {
            "type": "checkboxes",
            "action_id": "tools",
            "options": [_option(name) for name in group],
        }
        on = [_option(name) for name in group if name not in config.tools_off]
        if on:
            element["initial_options"] = on
        blocks.append(
            {
                "type": "input",
                "block_id": f"tools_{index}",
                "optional": True,
                "label": _text("Tools" if index == 0 else "More tools"),
                "element": element,
            }
        )
    if hidden is None:
        hidden = len(set(tools)) - sum(len(g) for g in groups)
    if hidden > 0:
        blocks.append(
            {
                "type": "context",
                "block_id": HIDDEN_TOOLS_BLOCK,
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"{hidden} more tools are not listed (the form shows "
                        f"{CHECKBOXES_PER_GROUP * TOOL_GROUPS}); they stay as they are.",
                    }
                ],
            }
        )
    blocks.append(
        {
            "type": "input",
            "block_id": "followups",
            "label": _text("Thread replies"),
            "element": {
                "type": "radio_buttons",
                "action_id": "followups",
                "options": [
                    _option("all", "Answer every reply in a thread I'm in"),
                    _option("mentions", "Answer only when mentioned"),
                ],
                "initial_option": _option(
                    config.followups,
                    "Answer every reply in a thread I'm in"
                    if config.followups == "all"
                    else "Answer only when mentioned",
                ),
            },
        }
    )
    if not workspace:
        budget: dict[str, Any] = {
            "type": "number_input",
            "action_id": "budget_usd",
            "is_decimal_allowed": True,
            "min_value": "0",
        }
        if config.budget_usd is not None:
            budget["initial_value"] = str(config.budget_usd)
        blocks.append(
            {
                "type": "input",
                "block_id": "budget_usd",
                "optional": True,
                "label": _text("Monthly budget (USD)"),
                "hint": _text("What this channel may spend on Kimi each month; empty for no budget."),
                "element": budget,
            }
        )
    return {
        "type": "modal",
        "callback_id": CALLBACK_SETTINGS,
        "private_metadata": form_metadata(team, target),
        "title": _text("Workspace defaults" if workspace else "Channel settings"),
        "submit": _text("Save"),
        "close": _text("Cancel"),
        "blocks": blocks,
    }


def read_state(values: dict[str, Any]) -> dict[str, str | list[str] | None]:
    """A submitted modal's `view.state.values`, as validate() takes it."""

    def element(block: str, action: str) -> dict[str, Any]:
        found = (values.get(block) or {}).get(action)
        return found if isinstance(found, dict) else {}

    def selected(block: str) -> str | None:
        option = element(block, block).get("selected_option")
        return str(option.get("value")) if isinstance(option, dict) else None

    checked: list[str] = []
    for block, actions in values.items():
        if str(block).startswith("tools_") and isinstance(actions, dict):
            for option in (actions.get("tools") or {}).get("selected_options") or []:
                checked.append(str(option.get("value")))
    return {
        "model": selected("model"),
        "thinking": selected("thinking"),
        "effort": selected("effort"),
        "system_prompt": element("system_prompt", "system_prompt").get("value"),
        "tools_on": checked,
        "followups": selected("followups"),
        "budget_usd": element("budget_usd", "budget_usd").get("value"),
    }


def redrawn(base: ChannelConfig, raw: dict[str, str | list[str] | None], tools: list[str]) -> ChannelConfig:
    """What the form shows after the model changed: `base` with the values being edited, so nothing typed
    is lost when the fields for the new model are drawn."""
    shown = set(shown_tools(tools))
    on = set(raw.get("tools_on") or [])
    config = replace(
        base,
        model=str(raw.get("model") or base.model),
        system_prompt_addendum=str(raw.get("system_prompt") or ""),
        tools_off=frozenset(t for t in base.tools_off if t not in shown) | frozenset(shown - on),
    )
    if raw.get("thinking") in ("on", "off"):
        config = replace(config, thinking=raw.get("thinking") == "on")
    if raw.get("effort") in EFFORTS:
        config = replace(config, effort=str(raw.get("effort")))
    if raw.get("followups") in FOLLOWUPS:
        config = replace(config, followups=str(raw.get("followups")))
    budget = str(raw.get("budget_usd") or "").strip()
    return replace(config, budget_usd=parse_budget(budget) if budget else None)


def notice_modal(text: str) -> dict[str, Any]:
    """A modal with one sentence (where an ephemeral message has no channel: the Home tab)."""
    return {
        "type": "modal",
        "title": _text("kimibot"),
        "close": _text("OK"),
        "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}}],
    }


def describe(config: ChannelConfig) -> str:
    thinking = "on" if config.thinking or config.profile.thinking is not Thinking.EXTRA_BODY else "off"
    parts = [f"*Model:* {config.model}", f"*Thinking:* {thinking}"]
    if config.profile.thinking is Thinking.EFFORT:
        parts.append(f"*Reasoning effort:* {config.effort}")
    parts.append(
        "*Thread replies:* " + ("every reply" if config.followups == "all" else "only when mentioned")
    )
    parts.append("*Tools off:* " + (name_list(config.tools_off) or "none"))
    addendum = config.system_prompt_addendum
    parts.append("*System prompt addendum:* " + (f"{len(addendum):,} characters" if addendum else "none"))
    return "\n".join(parts)[:SECTION_TEXT_LIMIT]  # one section's text; a longer one fails views.publish


def _channel_blocks(overrides: list[tuple[str, list[str]]], more: int) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [
        {"type": "divider"},
        {"type": "header", "text": _text("Channels with their own settings")},
    ]
    if not overrides and not more:
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": "None: every channel uses the defaults above."}],
            }
        )
    for channel, changes in overrides[:HOME_CHANNELS_SHOWN]:
        text = f"<#{channel}>: " + ("; ".join(changes) or "same as the defaults")
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text[:SECTION_TEXT_LIMIT]}})
    more += max(len(overrides) - HOME_CHANNELS_SHOWN, 0)
    if more > 0:
        blocks.append(
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"…and {more} more channels."}]}
        )
    return blocks


def home_view(
    defaults: ChannelConfig,
    overrides: list[tuple[str, list[str]]] | None,
    *,
    admin: bool,
    usage: list[dict[str, Any]],
    more: int = 0,
) -> dict[str, Any]:
    """The Home tab: the workspace defaults, the channels that differ (and how; None: not shown, the
    viewer is not an admin), then `usage`. `more`: channels with settings not in `overrides`."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": _text("kimibot settings")},
        {"type": "section", "text": {"type": "mrkdwn", "text": describe(defaults)}},
    ]
    if admin:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "action_id": ACTION_EDIT_DEFAULTS,
                        "text": _text("Edit workspace defaults"),
                        "value": WORKSPACE,
                    }
                ],
            }
        )
    if overrides is not None:
        blocks.extend(_channel_blocks(overrides, more))
    blocks.append(
        {
            "type": "context",
            "elements": [
                {"type": "mrkdwn", "text": "Admins change a channel's settings with `/kimi settings` in it."}
            ],
        }
    )
    if usage:
        blocks.append({"type": "divider"})
        blocks.extend(usage)
    return {"type": "home", "blocks": blocks[:100]}
