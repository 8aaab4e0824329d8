"""Message shortcuts: "Forget this thread" (`kimi_forget_thread`) deletes what kimibot keeps of the thread of
the message it is used on."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp

from bot.deps import Deps
from bot.turn import ThreadKey
from bot.work import forget_job

FORGET_THREAD = "kimi_forget_thread"


def register(app: AsyncApp, deps: Deps) -> None:
    async def on_forget_thread(ack: AsyncAck, body: dict[str, Any]) -> None:
        message = body.get("message") or {}
        team = str((body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id") or "")
        channel = str((body.get("channel") or {}).get("id") or "")
        user = str((body.get("user") or {}).get("id") or "")
        thread_ts = str(message.get("thread_ts") or message.get("ts") or body.get("message_ts") or "")
        if not (channel and thread_ts and user):
            await ack()
            return
        thread = ThreadKey(team, channel, thread_ts)
        action_ts = str(body.get("action_ts") or body.get("trigger_id") or "")
        # A job of the thread, so it runs after an answer in progress there, never in the middle of one;
        # one Redis call, deduplicated by the shortcut's action_ts. The worker confirms privately.
        await deps.queue.put(
            thread,
            "forget",
            forget_job(thread, user, action_ts, ephemeral=True),
            dedup_ts=f"forget.{action_ts}",
            dedup_ttl_s=deps.settings.dedup_ttl_seconds,
        )
        await ack()

    app.shortcut(FORGET_THREAD)(on_forget_thread)
