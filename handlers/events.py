"""app_mention and message events (channels, groups, mpim, im): admit, then queue the answer as a job."""

from __future__ import annotations

import logging
from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.admission import admit
from bot.deps import Deps
from bot.work import queue_turn

log = logging.getLogger(__name__)


def register(app: AsyncApp, deps: Deps) -> None:
    async def on_message_event(body: dict[str, Any], event: dict[str, Any]) -> None:
        # Bolt acks once this returns: decide, and queue the answer so an acked question is never lost.
        me = await deps.whoami()
        turn = await admit(body, event, threads=deps.threads, bot_user_id=me.user_id, bot_id=me.bot_id)
        if turn is not None and not await queue_turn(deps, turn):
            log.info(
                "duplicate delivery ignored",
                extra={"channel": turn.channel, "ts": turn.ts, "event_id": body.get("event_id")},
            )

    app.event("app_mention")(on_message_event)
    app.event("message")(on_message_event)
