"""Slack's assistant panel: greet a new thread with suggested prompts; its messages arrive as DMs."""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.deps import Deps
from bot.turn import ThreadKey

log = logging.getLogger(__name__)


def register(app: AsyncApp, deps: Deps) -> None:
    async def on_thread_started(body: dict[str, Any], event: dict[str, Any]) -> None:
        thread = event.get("assistant_thread") or {}
        channel, thread_ts = str(thread.get("channel_id") or ""), str(thread.get("thread_ts") or "")
        if channel and thread_ts:
            team = str(body.get("team_id") or (thread.get("context") or {}).get("team_id") or "")
            job = {"job_id": f"greet:{channel}:{thread_ts}", "channel": channel, "thread_ts": thread_ts}
            # Deduplicated per thread: a redelivered assistant_thread_started greets once.
            await deps.queue.put(ThreadKey(team, channel, thread_ts), "greet", job, dedup_ts="greet")

    async def on_context_changed(event: dict[str, Any]) -> None:
        # The channel the user is looking at changed; nothing in kimibot depends on it yet.
        log.debug(
            "assistant context changed",
            extra={"context": (event.get("assistant_thread") or {}).get("context")},
        )

    app.event("assistant_thread_started")(on_thread_started)
    app.event("assistant_thread_context_changed")(on_context_changed)
