"""/kimi <question>: post "@user asked: ..." and answer in its thread; /kimi help shows usage."""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp

from bot.admission import NOT_ENABLED, Access
from bot.deps import Deps
from bot.work import command_thread
from handlers.settings import SETTINGS_WORDS, open_channel_settings

log = logging.getLogger(__name__)
FORGET_ME_WORDS = frozenset({"forget-me", "forget me"})
FORGETTING = "Deleting what I keep about you…"
USAGE_WORDS = frozenset({"usage", "cost", "costs"})

HELP_WORDS = frozenset({"", "help", "-h", "--help", "?"})
COMMAND_FIELDS = ("team_id", "channel_id", "user_id", "text", "response_url", "trigger_id")


def usage_text(command: str) -> str:
    return (
        "*Kimi in Slack*\n"
        f"• `{command} <question>`: I post your question here and answer in its thread.\n"
        "• Mention me in a channel (`@Kimi ...`) and I answer in the thread; keep talking there, no need "
        "to mention me again.\n"
        "• DM me for a private conversation; each DM thread is its own conversation.\n"
        "• On a message (its ⋮ menu): *Ask Kimi about this* and *Summarize thread* answer in its thread.\n"
        f"• `{command} help`: this message.\n"
        f"• `{command} usage`: what you used today and this month (tokens, cost, answers); admins also see "
        "this channel and the workspace.\n"
        f"• `{command} settings` in a channel (admins): its model, prompt, tools, follow-ups and budget.\n"
        "• `@Kimi forget` in a thread (or the message shortcut *Forget this thread*): I delete what I keep "
        f"of that thread. `{command} forget-me`: I delete what I keep about you (your messages inside "
        "threads stay until the thread expires or is forgotten)."
    )


def register(app: AsyncApp, deps: Deps, access: Access | None = None) -> None:
    command_name = deps.settings.slash_command

    async def on_command(ack: AsyncAck, command: dict[str, Any]) -> None:
        question = str(command.get("text") or "").strip()
        if question.lower() in HELP_WORDS:
            await ack(response_type="ephemeral", text=usage_text(command_name))
            return
        if question.lower() in SETTINGS_WORDS:  # admins only; checked again when the form is saved
            await open_channel_settings(deps, ack, command)
            return
        fields = {name: str(command.get(name) or "") for name in COMMAND_FIELDS}
        if question.lower() in FORGET_ME_WORDS:  # anyone may, allowed to ask or not
            # A job (finding a person's votes scans keys, which may take a moment); it answers privately.
            deps.names.drop_local(fields["team_id"], fields["user_id"])
            if access is not None:
                access.facts.drop_local(fields["team_id"], fields["user_id"])
            job = {"job_id": f"forget-me:{fields['trigger_id']}", "command": fields}
            await deps.queue.put(
                command_thread(fields), "forget_me", job, dedup_ts=fields["trigger_id"] or None
            )
            await ack(response_type="ephemeral", text=FORGETTING)
            return
        if question.lower() in USAGE_WORDS:  # anyone may see their own usage
            # A job (the admin check may ask users.info): it answers privately through response_url, so the
            # ack goes out at once, well within Slack's 3 seconds.
            job = {"job_id": f"usage:{fields['trigger_id']}", "command": fields}
            await deps.queue.put(command_thread(fields), "usage", job, dedup_ts=fields["trigger_id"] or None)
            await ack()
            return
        if access is not None:
            team, user = str(command.get("team_id") or ""), str(command.get("user_id") or "")
            if await access.refusal(team, user, str(command.get("channel_id") or "")) is not None:
                log.info("refused", extra={"user": user, "channel": command.get("channel_id")})
                await ack(response_type="ephemeral", text=NOT_ENABLED)
                return
        job = {"job_id": f"command:{fields['trigger_id']}", "command": fields}
        # Deduplicated by trigger id: a redelivered command is queued once.
        await deps.queue.put(command_thread(fields), "command", job, dedup_ts=fields["trigger_id"] or None)
        await ack()

    app.command(command_name)(on_command)
