"""/kimi <question>: post "@user asked: ..." and answer in its thread; /kimi help shows usage."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp

from bot.deps import Deps
from bot.pipeline import answer
from bot.slack.reply import announce_question
from bot.turn import Source, Turn

HELP_WORDS = frozenset({"", "help", "-h", "--help", "?"})


def usage_text(command: str) -> str:
    return (
        "*Kimi in Slack*\n"
        f"• `{command} <question>`: I post your question here and answer in its thread.\n"
        "• Mention me in a channel (`@Kimi ...`) and I answer in the thread; keep talking there, no need "
        "to mention me again.\n"
        "• DM me for a private conversation; each DM thread is its own conversation.\n"
        f"• `{command} help`: this message."
    )


async def ask_from_command(deps: Deps, command: dict[str, Any], question: str) -> None:
    """Post the question in the channel and answer in its thread; off-channel, answer via response_url."""
    channel = str(command.get("channel_id") or "")
    user = str(command.get("user_id") or "")
    team = str(command.get("team_id") or "")
    ts = await announce_question(deps.slack, channel, user, question)
    if ts is not None:
        turn = Turn(Source.COMMAND, team, channel, user, question, ts=ts, thread_ts=ts)
    else:
        trigger = str(command.get("trigger_id") or "")
        turn = Turn(
            Source.COMMAND,
            team,
            channel,
            user,
            question,
            ts=trigger,
            thread_ts=trigger,
            response_url=str(command.get("response_url") or ""),
        )
    await answer(turn, deps)


def register(app: AsyncApp, deps: Deps) -> None:
    command_name = deps.settings.slash_command

    async def on_command(ack: AsyncAck, command: dict[str, Any]) -> None:
        question = str(command.get("text") or "").strip()
        if question.lower() in HELP_WORDS:
            await ack(response_type="ephemeral", text=usage_text(command_name))
            return
        await ack()
        deps.jobs.submit(
            ask_from_command(deps, command, question),
            name=f"command:{command.get('channel_id')}:{command.get('trigger_id')}",
        )

    app.command(command_name)(on_command)
