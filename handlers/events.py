"""app_mention and message events (channels, groups, mpim, im): admit, then answer as a job."""

from __future__ import annotations

from typing import Any

from slack_bolt.async_app import AsyncApp, AsyncBoltContext

from bot.admission import admit
from bot.deps import Deps
from bot.pipeline import answer


def remember_identity(deps: Deps, context: AsyncBoltContext) -> None:
    """Bolt's authorize step already called auth.test: keep who we are for backfill and filters."""
    deps.identity.user_id = context.bot_user_id or deps.identity.user_id
    deps.identity.bot_id = context.bot_id or deps.identity.bot_id
    deps.identity.team_id = context.team_id or deps.identity.team_id


def register(app: AsyncApp, deps: Deps) -> None:
    async def on_message_event(
        body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext
    ) -> None:
        # Events are acked by Bolt before this runs; here we only decide and hand over.
        remember_identity(deps, context)
        turn = await admit(
            body,
            event,
            threads=deps.threads,
            dedup=deps.dedup,
            bot_user_id=deps.identity.user_id,
            bot_id=deps.identity.bot_id,
        )
        if turn is not None:
            deps.jobs.submit(answer(turn, deps), name=f"answer:{turn.channel}:{turn.ts}")

    app.event("app_mention")(on_message_event)
    app.event("message")(on_message_event)
