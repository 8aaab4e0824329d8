"""The agent loop's I/O in Slack: its steps as the writer's task cards, and Approve/Deny for tools that
change things. Thin glue between bot/agent/loop.py (which knows nothing of Slack) and the ReplyWriter."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from bot.agent.loop import ArgumentsTooLong, CallRecord, Planned
from bot.slack.blocks import approval_blocks, approval_done_blocks, approval_fits
from bot.slack.reply import ReplyWriter
from bot.store import Approvals
from bot.tools.base import Tool
from bot.turn import Turn

APPROVAL_POLL_S = 0.25
ERROR_DETAIL_LIMIT = 200


class WriterView:
    """Each tool call is a task card: pending when the model asks for it, in progress while it runs (or
    waits for approval), complete or error when it is done. A card is keyed by step and call id."""

    def __init__(self, writer: ReplyWriter) -> None:
        self.writer = writer
        self.step = 0

    def _key(self, call_id: str) -> str:
        return f"{self.step}:{call_id}"

    def step_started(self, step: int) -> None:
        self.step = step
        self.writer.step()

    def call_planned(self, call: Planned) -> None:
        self.writer.task(self._key(call.id), call.title, "pending")

    def call_running(self, call: Planned) -> None:
        self.writer.task(self._key(call.id), call.title, "in_progress")

    def call_done(self, record: CallRecord, detail: str) -> None:
        status = "complete" if record.ok else "error"
        detail = " ".join(detail.split())
        if len(detail) > ERROR_DETAIL_LIMIT:
            detail = detail[: ERROR_DETAIL_LIMIT - 1] + "…"
        self.writer.task(self._key(record.id), record.title, status, details=detail, sources=record.sources)


async def ask_approval(
    writer: ReplyWriter, approvals: Approvals, turn: Turn, call: Planned, tool: Tool, timeout_s: float
) -> bool | None:
    """Post Approve/Deny for the asker and wait for the click (the loop bounds the wait with its own
    timeout). True approved, False declined; the prompt is updated to say how it ended."""
    arguments = call.arguments or "{}"
    if not approval_fits(turn.user, call.name, arguments):
        raise ArgumentsTooLong(call.name)  # not asked, not run: the model may retry with less
    approval_id = secrets.token_urlsafe(12)
    await approvals.open(approval_id, turn.user, int(timeout_s) + 60)
    text, blocks = approval_blocks(turn.user, call.name, arguments, approval_id)
    ts = await writer.post_prompt(text, blocks)
    outcome = "not approved in time; not run"
    try:
        # The click lands in whichever process Slack reached: Redis is the meeting point, polled.
        while (decision := await approvals.decision(approval_id)) is None:  # noqa: ASYNC110
            await asyncio.sleep(APPROVAL_POLL_S)
        outcome = f"approved by <@{turn.user}>" if decision else f"declined by <@{turn.user}>; not run"
        return decision
    except asyncio.CancelledError:
        if writer.stopped:
            outcome = "stopped; not run"
        raise
    finally:
        done_text, done_blocks = approval_done_blocks(call.name, outcome)
        with contextlib.suppress(Exception):
            await writer.update_prompt(ts, done_text, done_blocks)
