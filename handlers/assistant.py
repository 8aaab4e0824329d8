"""Slack's agent experience: greet with suggested prompts; its messages arrive as DMs.

`agent_view` (the manifests' feature since Bolt 1.30) puts the chat in the app's Messages tab:
`app_home_opened` with `tab == "messages"` greets there, once per person per THREAD_TTL_DAYS (the greeting
is deduplicated in Redis like a message, so opening the tab again does not greet again). A thread started in
the legacy assistant panel (`assistant_thread_started`) is greeted once per thread, as before.
"""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.deps import Deps
from bot.turn import ThreadKey

log = logging.getLogger(__name__)

# The "thread" a Messages-tab greeting is queued in (the Messages tab has no thread of its own).
MESSAGES_TAB = "messages-tab"


def register(app: AsyncApp, deps: Deps) -> None:
    async def on_thread_started(body: dict[str, Any], event: dict[str, Any]) -> None:
        thread = event.get("assistant_thread") or {}
        channel, thread_ts = str(thread.get("channel_id") or ""), str(thread.get("thread_ts") or "")
        if channel and thread_ts:
            team = str(body.get("team_id") or (thread.get("context") or {}).get("team_id") or "")
            job = {"job_id": f"greet:{channel}:{thread_ts}", "channel": channel, "thread_ts": thread_ts}
            # Deduplicated per thread: a redelivered assistant_thread_started greets once.
            await deps.queue.put(ThreadKey(team, channel, thread_ts), "greet", job, dedup_ts="greet")

    async def in_messages_tab(event: dict[str, Any]) -> bool:
        return event.get("tab") == "messages"

    async def on_messages_tab_opened(body: dict[str, Any], event: dict[str, Any]) -> None:
        channel, user = str(event.get("channel") or ""), str(event.get("user") or "")
        if channel and user:
            team = str(body.get("team_id") or "")
            job = {"job_id": f"greet:{channel}:{MESSAGES_TAB}", "channel": channel, "thread_ts": ""}
            await deps.queue.put(
                ThreadKey(team, channel, MESSAGES_TAB),
                "greet",
                job,
                dedup_ts=f"greet:{user}",
                dedup_ttl_s=deps.settings.thread_ttl_seconds,
            )

    async def on_context_changed(event: dict[str, Any]) -> None:
        # The channel the user is looking at changed; nothing in kimibot depends on it yet.
        log.debug(
            "assistant context changed",
            extra={"context": (event.get("assistant_thread") or {}).get("context")},
        )

    app.event("assistant_thread_started")(on_thread_started)
    # Only the Messages tab: the Home tab is drawn by handlers/settings.py.
    app.event("app_home_opened", matchers=[in_messages_tab])(on_messages_tab_opened)
    app.event("assistant_thread_context_changed")(on_context_changed)
