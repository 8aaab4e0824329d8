"""Slack's assistant panel: greet a new thread with suggested prompts; its messages arrive as DMs."""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.deps import Deps
from bot.turn import ThreadKey

log = logging.getLogger(__name__)

GREETING = "Hi! I'm Kimi. Ask me anything: I think before I answer, and you can see my reasoning."
SUGGESTED_PROMPTS = (
    {
        "title": "Explain a concept",
        "message": "Explain how Redis Streams consumer groups work, with an example.",
    },
    {"title": "Review some code", "message": "Review this function for bugs and suggest improvements:"},
    {"title": "Plan a task", "message": "Help me break this project into steps with estimates:"},
    {"title": "Summarise", "message": "Summarise the key points of the following text:"},
)


def register(app: AsyncApp, deps: Deps) -> None:
    async def greet(team: str, channel: str, thread_ts: str) -> None:
        await deps.threads.start_assistant_thread(ThreadKey(team, channel, thread_ts))
        try:
            await deps.slack.chat_postMessage(channel=channel, thread_ts=thread_ts, text=GREETING)
            await deps.slack.assistant_threads_setSuggestedPrompts(
                channel_id=channel, thread_ts=thread_ts, prompts=list(SUGGESTED_PROMPTS)
            )
        except Exception as exc:
            log.warning(
                "assistant thread greeting failed", extra={"error": type(exc).__name__, "channel": channel}
            )

    async def on_thread_started(body: dict[str, Any], event: dict[str, Any]) -> None:
        thread = event.get("assistant_thread") or {}
        channel, thread_ts = str(thread.get("channel_id") or ""), str(thread.get("thread_ts") or "")
        if channel and thread_ts:
            team = str(body.get("team_id") or (thread.get("context") or {}).get("team_id") or "")
            deps.jobs.submit(greet(team, channel, thread_ts), name=f"greet:{channel}:{thread_ts}")

    async def on_context_changed(event: dict[str, Any]) -> None:
        # The channel the user is looking at changed; nothing in kimibot depends on it yet.
        log.debug(
            "assistant context changed",
            extra={"context": (event.get("assistant_thread") or {}).get("context")},
        )

    app.event("assistant_thread_started")(on_thread_started)
    app.event("assistant_thread_context_changed")(on_context_changed)
