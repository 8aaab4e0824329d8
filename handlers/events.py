"""app_mention and message events (channels, groups, mpim, im): admit, then queue the answer as a job."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine
from typing import Any

from slack_bolt.async_app import AsyncApp

from bot.admission import NOT_ENABLED, Access, Refused, admit
from bot.deps import Deps
from bot.turn import Source, Turn
from bot.work import forget_job, queue_turn

log = logging.getLogger(__name__)
FORGET_WORDS = frozenset({"forget"})
FORGET_WHERE = "Say `forget` to me inside a thread to make me forget that thread."
MESSAGE_EVENTS = re.compile(r"\A(?:app_mention|message)\Z")  # the event types this module answers


# Notices to the asker run once the event is acked: a Slack call (or a wait on its rate limit) must not hold
# up the 200 (Slack redelivers after 3 s). Held here so they are not garbage collected mid-call.
_NOTICES: set[asyncio.Task[None]] = set()


def after_ack(notice: Coroutine[Any, Any, None]) -> None:
    """Tell the asker something without waiting for it: best effort, its failure only logged."""

    async def run() -> None:
        try:
            await notice
        except Exception as exc:  # Redis or Slack down: the notice is lost, the event was handled
            log.warning("notice to the asker failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    task = asyncio.create_task(run())
    _NOTICES.add(task)
    task.add_done_callback(_NOTICES.discard)


async def notices_sent() -> None:
    """Until every notice started so far has been sent (or has failed): tests wait for them here."""
    while _NOTICES:
        await asyncio.gather(*_NOTICES, return_exceptions=True)


def is_forget(turn: Turn) -> bool:
    """`@kimibot forget` (or `forget` in a DM): the text exactly "forget", any case."""
    return turn.source in (Source.MENTION, Source.DM) and turn.text.strip().lower() in FORGET_WORDS


async def tell_refused(deps: Deps, access: Access, refused: Refused) -> None:
    """ "kimibot isn't enabled for you here", privately, at most once per user per hour."""
    if await access.facts.first_refusal(refused.team_id, refused.user):
        await tell(deps, refused.channel, refused.user, NOT_ENABLED, refused.thread_ts)


async def tell(deps: Deps, channel: str, user: str, text: str, thread_ts: str = "") -> None:
    try:
        await deps.slack.chat_postEphemeral(
            channel=channel, user=user, thread_ts=thread_ts or None, text=text
        )
    except Exception as exc:  # the bot may not be in the channel; nothing else to do
        log.info("ephemeral reply failed", extra={"error": type(exc).__name__, "channel": channel})


async def queue_forget(deps: Deps, turn: Turn) -> bool:
    """Queue `forget` as a job of the thread (after any answer in progress); False when already queued."""
    return await deps.queue.put(
        turn.thread,
        "forget",
        forget_job(turn.thread, turn.user, turn.ts, ephemeral=False),
        dedup_ts=turn.ts,
        dedup_ttl_s=deps.settings.dedup_ttl_seconds,
        order=turn.ts,
    )


def register(app: AsyncApp, deps: Deps, access: Access | None = None) -> None:
    async def on_message_event(body: dict[str, Any], event: dict[str, Any]) -> None:
        # Bolt acks once this returns: decide, and queue the answer so an acked question is never lost.
        me = await deps.whoami()
        admitted = await admit(
            body,
            event,
            threads=deps.threads,
            bot_user_id=me.user_id,
            bot_id=me.bot_id,
            access=access,
            followups=deps.channel_settings.followups,
        )
        if isinstance(admitted, Refused):
            if access is not None:
                after_ack(tell_refused(deps, access, admitted))
            return
        turn = admitted
        if turn is not None and is_forget(turn):
            if turn.opens_thread:  # nothing to forget yet; hinted once (not again for a mention's twin)
                if event.get("type") == "app_mention" or turn.source is Source.DM:
                    after_ack(tell(deps, turn.channel, turn.user, FORGET_WHERE))
            elif not await queue_forget(deps, turn):
                log.info("duplicate forget ignored", extra={"channel": turn.channel, "ts": turn.ts})
            return
        if turn is not None and not await queue_turn(deps, turn):
            log.info(
                "duplicate delivery ignored",
                extra={"channel": turn.channel, "ts": turn.ts, "event_id": body.get("event_id")},
            )

    # One listener for both: the `message` twin of a mention is matched as early as the mention itself.
    app.event(MESSAGE_EVENTS)(on_message_event)
