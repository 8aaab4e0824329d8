"""app_mention and message events (channels, groups, mpim, im): admit, then answer as a job."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.admission import admit
from bot.deps import Deps
from bot.pipeline import answer


def register(app: AsyncApp, deps: Deps) -> None:
    async def on_message_event(body: dict[str, Any], event: dict[str, Any]) -> None:
        # Events are acked by Bolt before this runs; here we only decide and hand over.
        me = await deps.whoami()
        turn = await admit(
            body, event, threads=deps.threads, dedup=deps.dedup, bot_user_id=me.user_id, bot_id=me.bot_id
        )
        if turn is not None:
            deps.jobs.submit(
                answer(turn, deps), key=str(turn.thread), name=f"answer:{turn.channel}:{turn.ts}"
            )

    app.event("app_mention")(on_message_event)
    app.event("message")(on_message_event)
