"""/kimi <question>: post "@user asked: ..." and answer in its thread; /kimi help shows usage."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp

from bot.deps import Deps
from bot.work import command_thread

HELP_WORDS = frozenset({"", "help", "-h", "--help", "?"})
COMMAND_FIELDS = ("team_id", "channel_id", "user_id", "text", "response_url", "trigger_id")


def usage_text(command: str) -> str:
    return (
        "*Kimi in Slack*\n"
        f"• `{command} <question>`: I post your question here and answer in its thread.\n"
        "• Mention me in a channel (`@Kimi ...`) and I answer in the thread; keep talking there, no need "
        "to mention me again.\n"
        "• DM me for a private conversation; each DM thread is its own conversation.\n"
        f"• `{command} help`: this message."
    )


def register(app: AsyncApp, deps: Deps) -> None:
    command_name = deps.settings.slash_command

    async def on_command(ack: AsyncAck, command: dict[str, Any]) -> None:
        question = str(command.get("text") or "").strip()
        if question.lower() in HELP_WORDS:
            await ack(response_type="ephemeral", text=usage_text(command_name))
            return
        fields = {name: str(command.get(name) or "") for name in COMMAND_FIELDS}
        job = {"job_id": f"command:{fields['trigger_id']}", "command": fields}
        # Deduplicated by trigger id: a redelivered command is queued once.
        await deps.queue.put(command_thread(fields), "command", job, dedup_ts=fields["trigger_id"] or None)
        await ack()

    app.command(command_name)(on_command)
