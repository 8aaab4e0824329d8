"""The one place that says "answer this" or "ignore it", for every message event.

`decide` is pure: it gets the event and the facts it needs, and returns a Decision. `admit` adds the
Redis facts. The claim (channel + ts, under the thread's key) that makes sure one user message gets one
answer, whichever event brings it and however often, is taken when the turn is queued.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from bot.store import ThreadStore
from bot.turn import Source, ThreadKey, Turn

log = logging.getLogger(__name__)

# Subtypes that are still a person saying something; every other subtype (edits, deletions,
# joins, bot_message, message_changed ...) is ignored.
SPEAKING_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})

_MENTION = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")


@dataclass(frozen=True)
class Decision:
    answer: bool
    why: str
    source: Source | None = None


def ignore(why: str) -> Decision:
    return Decision(False, why)


def mentions(text: str, user_id: str) -> bool:
    return any(m == user_id for m in _MENTION.findall(text or ""))


def strip_mention(text: str, user_id: str) -> str:
    """The question without the bot's own `<@U…>` token(s)."""
    if not user_id:
        return (text or "").strip()
    return re.sub(rf"<@{re.escape(user_id)}(?:\|[^>]*)?>", "", text or "").strip()


def decide(
    event: dict[str, Any],
    *,
    bot_user_id: str,
    bot_id: str,
    thread_engaged: bool = False,
) -> Decision:
    """Should this `app_mention` or `message` event be answered, and as what kind of turn?

    `thread_engaged` says whether the bot has already answered in the event's thread (a Redis fact
    the caller looks up only for thread replies).
    """
    if not isinstance(event, dict):
        return ignore("not an event")
    subtype = event.get("subtype")
    if subtype not in SPEAKING_SUBTYPES:
        return ignore(f"subtype {subtype}")
    if event.get("bot_id") or event.get("bot_profile"):
        return ignore("from a bot")
    user = event.get("user")
    if not isinstance(user, str) or not user:
        return ignore("no user")
    if user in (bot_user_id, bot_id):
        return ignore("from myself")
    if not isinstance(event.get("text", ""), str) or not isinstance(event.get("ts"), str):
        return ignore("malformed message")
    if not isinstance(event.get("channel"), str) or not event.get("channel"):
        return ignore("no channel")
    if event.get("edited"):
        return ignore("an edit")

    if event.get("type") == "app_mention":
        return Decision(True, "mentioned", Source.MENTION)
    if event.get("type") != "message":
        return ignore(f"event type {event.get('type')}")
    if event.get("channel_type") == "im":
        return Decision(True, "direct message", Source.DM)
    if mentions(event.get("text", ""), bot_user_id):
        # The `message` twin of an app_mention; dedup makes sure only one of the two is answered.
        return Decision(True, "mentioned", Source.MENTION)
    thread_ts = event.get("thread_ts")
    if thread_ts and thread_ts != event.get("ts"):
        if thread_engaged:
            return Decision(True, "follow-up in my thread", Source.THREAD)
        return ignore("thread I am not part of")
    return ignore("not addressed to me")


def is_thread_reply(event: dict[str, Any]) -> bool:
    thread_ts = event.get("thread_ts")
    return bool(thread_ts) and thread_ts != event.get("ts")


def event_team(body: dict[str, Any], event: dict[str, Any]) -> str:
    return str(body.get("team_id") or event.get("team") or "")


def turn_from_event(body: dict[str, Any], event: dict[str, Any], source: Source, bot_user_id: str) -> Turn:
    ts = str(event["ts"])
    return Turn(
        source=source,
        team_id=event_team(body, event),
        channel=str(event["channel"]),
        user=str(event["user"]),
        text=strip_mention(str(event.get("text") or ""), bot_user_id),
        ts=ts,
        thread_ts=str(event.get("thread_ts") or ts),
        event_id=str(body.get("event_id") or ""),
        action_token=str(
            event.get("action_token") or (event.get("assistant_thread") or {}).get("action_token") or ""
        ),
    )


async def admit(
    body: dict[str, Any],
    event: dict[str, Any],
    *,
    threads: ThreadStore,
    bot_user_id: str,
    bot_id: str,
) -> Turn | None:
    """decide() plus the Redis facts it needs: is the thread ours (thread replies only), and is it a thread
    of Slack's assistant panel (DMs only). The claim that makes one message one answer is taken where the
    turn is queued (bot/queue.py), in the same step."""
    engaged = False
    if (
        event.get("type") == "message"
        and event.get("channel_type") != "im"
        and is_thread_reply(event)
        and not mentions(str(event.get("text") or ""), bot_user_id)
        and isinstance(event.get("channel"), str)
    ):
        key = ThreadKey(event_team(body, event), str(event["channel"]), str(event["thread_ts"]))
        engaged = await threads.is_engaged(key)
    decision = decide(event, bot_user_id=bot_user_id, bot_id=bot_id, thread_engaged=engaged)
    if not decision.answer or decision.source is None:
        log.debug("ignored", extra={"why": decision.why, "event_id": body.get("event_id")})
        return None
    turn = turn_from_event(body, event, decision.source, bot_user_id)
    if (
        decision.source is Source.DM
        and not turn.opens_thread
        and await threads.is_assistant_thread(turn.thread)
    ):
        turn = replace(turn, assistant_thread=True)
    return turn
