"""app_mention and message events (channels, groups, mpim, im): admit, then queue the answer as a job."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.admission import admit
from bot.deps import Deps
from bot.work import turn_job


def register(app: AsyncApp, deps: Deps) -> None:
    async def on_message_event(body: dict[str, Any], event: dict[str, Any]) -> None:
        # Bolt acks once this returns: decide, and queue the answer so an acked question is never lost.
        me = await deps.whoami()
        turn = await admit(
            body,
            event,
            threads=deps.threads,
            dedup_ttl_s=deps.settings.dedup_ttl_seconds,
            bot_user_id=me.user_id,
            bot_id=me.bot_id,
        )
        if turn is not None:
            await deps.queue.put("turn", turn_job(turn))

    app.event("app_mention")(on_message_event)
    app.event("message")(on_message_event)
