"""Buttons on kimibot's messages: Stop, Show reasoning, Regenerate (and Retry after a failure), 👍/👎, and
Approve/Deny for a tool call that changes things."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp

from bot.admission import NOT_ENABLED, Access
from bot.deps import Deps
from bot.slack.blocks import (
    ACTION_APPROVE,
    ACTION_DENY,
    ACTION_FEEDBACK_DOWN,
    ACTION_FEEDBACK_UP,
    ACTION_REASONING,
    ACTION_REGENERATE,
    ACTION_RETRY,
    ACTION_STOP,
    AnswerRef,
    reasoning_modal,
)
from bot.turn import Source, ThreadKey, Turn
from bot.work import queue_turn

log = logging.getLogger(__name__)
LazyWork = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]
GONE = "I no longer have that answer's details (threads are kept for a limited time)."


@dataclass(frozen=True)
class Clicked:
    ref: AnswerRef
    thread: ThreadKey
    user: str


def where(body: dict[str, Any]) -> tuple[str, str, str, str]:
    """(team, channel, user, message ts) of a click on a message."""
    team = str((body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id") or "")
    channel = str(
        (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id") or ""
    )
    message_ts = str(
        (body.get("container") or {}).get("message_ts") or (body.get("message") or {}).get("ts") or ""
    )
    return team, channel, str((body.get("user") or {}).get("id") or ""), message_ts


def register(app: AsyncApp, deps: Deps, access: Access | None = None) -> None:
    async def tell(channel: str, user: str, thread_ts: str, text: str) -> None:
        try:
            await deps.slack.chat_postEphemeral(channel=channel, user=user, thread_ts=thread_ts, text=text)
        except Exception as exc:
            log.info("ephemeral reply failed", extra={"error": type(exc).__name__, "channel": channel})

    async def on_stop(ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        channel, _, ts = str(action.get("value") or "").partition(":")
        _, _, user, _ = where(body)
        if channel and ts:
            await deps.stops.request(channel, ts, user)

    async def exchange(
        body: dict[str, Any], action: dict[str, Any]
    ) -> tuple[Clicked, dict[str, Any], dict[str, Any] | None] | None:
        """The click, and the question and answer its button is about (one small read, not the thread's
        history); None (after telling the user) when the thread has expired."""
        ref = AnswerRef.parse(str(action["value"]))
        team, channel, user, _ = where(body)
        thread = ThreadKey(team, channel, ref.thread_ts)
        details = await deps.threads.turn_details(thread, ref.question_ts)
        if details is None:
            await tell(channel, user, ref.thread_ts, GONE)
            return None
        question = {
            "text": str(details.get("question") or ""),
            "reads_thread": bool(details.get("reads_thread")),
        }
        reply = None
        if "reasoning" in details:
            reply = {"reasoning_content": details["reasoning"], "thinking_s": details.get("thinking_s") or 0}
        return Clicked(ref, thread, user), question, reply

    async def ack_at_once(ack: AsyncAck) -> None:
        """Slack hears back before any slow work: HTTP runs with process_before_response, so whatever
        an ack function awaits delays the response (and Slack shows an error after 3 s)."""
        await ack()

    def after_ack(work: LazyWork) -> LazyWork:
        """A Bolt lazy listener: runs once the click is acked, and logs its own failures fully."""

        async def lazy(body: dict[str, Any], action: dict[str, Any]) -> None:
            try:
                await work(body, action)
            except Exception:
                _, channel, user, _ = where(body)
                log.exception(
                    "button failed after its ack",
                    extra={"action": action.get("action_id"), "channel": channel, "user": user},
                )

        lazy.__name__ = lazy.__qualname__ = work.__name__  # Bolt tells lazy listeners apart by name
        return lazy

    async def on_reasoning(body: dict[str, Any], action: dict[str, Any]) -> None:
        found = await exchange(body, action)
        if found is None:
            return
        clicked, _, reply = found
        if reply is None:
            await tell(clicked.thread.channel, clicked.user, clicked.thread.thread_ts, GONE)
            return
        view = reasoning_modal(str(reply.get("reasoning_content") or ""), float(reply.get("thinking_s") or 0))
        await deps.slack.views_open(trigger_id=body["trigger_id"], view=view)

    async def on_regenerate(ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        found = await exchange(body, action)
        if found is None:
            return
        clicked, question, _ = found
        thread = clicked.thread
        if access is not None and await access.refusal(thread.team_id, clicked.user, thread.channel):
            if await access.facts.first_refusal(thread.team_id, clicked.user):
                await tell(thread.channel, clicked.user, thread.thread_ts, NOT_ENABLED)
            return
        clicked_at = str(action.get("action_ts") or "")
        text = str(question.get("text") or "")
        turn = Turn(
            Source.REGENERATE,
            thread.team_id,
            thread.channel,
            clicked.user,
            text,
            ts=clicked_at,
            thread_ts=thread.thread_ts,
            reads_thread=bool(question.get("reads_thread")),  # a summary is made again from the thread
        )
        await queue_turn(deps, turn)  # deduplicated by action_ts: a click delivered twice counts once

    async def on_feedback(body: dict[str, Any], action: dict[str, Any]) -> None:
        ref = AnswerRef.parse(str(action["value"]))
        team, channel, user, message_ts = where(body)
        rating = "up" if action.get("action_id") == ACTION_FEEDBACK_UP else "down"
        await deps.feedback.record(
            team,
            channel,
            message_ts,
            user,
            rating,
            {
                "model": ref.model,
                "latency_s": ref.latency_s,
                "prompt_tokens": ref.prompt_tokens,
                "completion_tokens": ref.completion_tokens,
                "thread_ts": ref.thread_ts,
                "question_ts": ref.question_ts,
            },
        )
        await tell(
            channel, user, ref.thread_ts, "Thanks for the feedback!" + (" :+1:" if rating == "up" else "")
        )

    async def on_approval(ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        """Only the asker decides; the waiting answer (in whichever worker) sees it in Redis."""
        await ack()
        _, channel, user, _ = where(body)
        approval_id = str(action.get("value") or "")
        approvals = deps.approvals
        if approvals is None or not approval_id:
            return
        approved = action.get("action_id") == ACTION_APPROVE
        result = await approvals.decide(approval_id, user, approved)
        if result == "not_asker":
            asker = await approvals.asker(approval_id)
            thread_ts = str((body.get("message") or {}).get("thread_ts") or "")
            await tell(channel, user, thread_ts, f"Only <@{asker}>, who asked, can approve or deny this.")
        elif result == "gone":
            thread_ts = str((body.get("message") or {}).get("thread_ts") or "")
            await tell(channel, user, thread_ts, "This request has expired.")

    app.action(ACTION_STOP)(on_stop)
    app.action(re.compile(f"^({ACTION_APPROVE}|{ACTION_DENY})$"))(on_approval)
    app.action(ACTION_REASONING)(ack=ack_at_once, lazy=[after_ack(on_reasoning)])
    app.action(re.compile(f"^({ACTION_REGENERATE}|{ACTION_RETRY})$"))(on_regenerate)
    app.action(re.compile(f"^({ACTION_FEEDBACK_UP}|{ACTION_FEEDBACK_DOWN})$"))(
        ack=ack_at_once, lazy=[after_ack(on_feedback)]
    )
