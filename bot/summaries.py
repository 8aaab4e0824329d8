"""The window of a long thread, with the summary of its earlier turns at the head: the I/O around
bot/compaction.py (the summary request to Kimi, metered like any other; its cache in Redis).

A summary is made once per range: storing it moves the thread's window start to where it ends, so neither a
re-run of the turn (after a crash, or a lost lease) nor the next turn after a failed answer pays for it
again. A summary that cannot be had (Kimi fails, a budget is reached) never costs the answer: the turns are
left out as before, the summary already at the head (if any) is kept, with a line saying which messages it
does not hold, and the footer says they could not be summarised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from redis.exceptions import RedisError

from bot.compaction import (
    SUMMARY_FAILED_NOTE,
    Compaction,
    Summary,
    kept_summary,
    plan,
    summary_output_cap,
    summary_request,
    summary_text,
    window,
)
from bot.context import Fit
from bot.deps import Deps
from bot.kimi.client import ModelCall
from bot.kimi.events import Accumulator
from bot.queue import Job, Lease, LeaseLost
from bot.store import ThreadSummaries
from bot.turn import Turn
from bot.usage import Limits, Meter

log = logging.getLogger(__name__)


def quick_call(call: ModelCall) -> ModelCall:
    """`call`'s model for a quick side request: thinking off where the profile allows it, else its lowest
    reasoning effort (profile data: Thinking and quick_effort; an always-thinking model takes neither)."""
    return ModelCall(call.model, call.profile, call.profile.quick_effort, thinking=False)


@dataclass
class CappedMeter:
    """The turn's budgets around the summary request, with its output held to `cap` tokens."""

    inner: Meter
    cap: int

    async def before(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int | None:
        granted = await self.inner.before(messages, tools)
        return min(granted, self.cap) if granted is not None else self.cap

    async def after(self, acc: Accumulator, *, cancelled: bool) -> None:
        await self.inner.after(acc, cancelled=cancelled)


async def summarise(
    deps: Deps,
    turn: Turn,
    job: Job,
    call: ModelCall,
    compaction: Compaction,
    *,
    budget: int,
    calibration: float,
) -> Summary:
    """One Kimi request for the summary of `compaction`'s range, metered and budgeted with the turn's
    requests (same answer id). Raises whatever the request raised (AnswerError, OverBudget)."""
    quick = quick_call(call)
    cap = min(summary_output_cap(budget), deps.kimi.budget_of(quick))
    room = quick.profile.context_window - cap
    messages = summary_request(compaction, budget_tokens=budget, input_tokens=room, calibration=calibration)
    meter = Meter(
        deps.usage,
        deps.metrics,
        turn.team_id,
        turn.channel,
        turn.user,
        job.job_id,
        quick.model,
        quick.profile,
        cap,
        Limits.from_settings(deps.settings),
        calibration,
        thinking=quick.thinking,
    )
    acc = await deps.kimi.complete(messages, meter=CappedMeter(meter, cap), call=quick)
    text = summary_text(acc.text, budget_tokens=budget, calibration=calibration)
    if not text:
        raise ValueError("the summary came back empty")
    missing = compaction.previous.missing if compaction.previous is not None else 0
    return Summary(compaction.first, compaction.end, text, missing)


async def fit_thread(
    deps: Deps,
    turn: Turn,
    lease: Lease,
    job: Job,
    call: ModelCall,
    *,
    system_prompt: str,
    entries: list[dict[str, Any]],
    offset: int,
    start: int,
    budget: int,
    calibration: float,
    history: bool,
    before_call: Callable[[], None] = lambda: None,
) -> Fit:
    """The window for this turn (bot/context.py fit, with summaries): the summary in place, or a new one
    made (or found in the cache) when the thread outgrew the window. `start` indexes `entries` (the history
    from `offset` on); `history` False (no stored thread) never looks for summaries. `before_call` runs just
    before a summary request (the sign of life: the request takes a while)."""
    store = ThreadSummaries(deps.redis, deps.threads.ttl)
    head = None
    if history and offset + start > 0:
        head = Summary.load(await store.get(turn.thread, offset + start) or "")
    chosen = plan(
        system_prompt,
        entries,
        start=start,
        offset=offset,
        head=head,
        budget_tokens=budget,
        calibration=calibration,
        replays_reasoning=call.profile.replays_reasoning,
    )
    summary: Summary | None = chosen.head
    notes: tuple[str, ...] = ()
    compaction = chosen.compaction if history else None
    if compaction is not None:
        cached = Summary.load(await store.get(turn.thread, compaction.end) or "")
        summary = cached if cached is not None and cached.first == compaction.first else None
        if summary is None:
            summary, notes = await _new_summary(
                deps, turn, lease, job, call, compaction, store, budget, calibration, before_call
            )
    fitted = window(
        system_prompt,
        entries,
        start=chosen.start,
        summary=summary,
        budget_tokens=budget,
        calibration=calibration,
        replays_reasoning=call.profile.replays_reasoning,
    )
    return replace(fitted, notes=(*notes, *fitted.notes)) if notes else fitted  # "they" are the left out


async def _new_summary(
    deps: Deps,
    turn: Turn,
    lease: Lease,
    job: Job,
    call: ModelCall,
    compaction: Compaction,
    store: ThreadSummaries,
    budget: int,
    calibration: float,
    before_call: Callable[[], None],
) -> tuple[Summary | None, tuple[str, ...]]:
    """A summary made now and stored (fenced: only while the thread is ours; the thread's start moves to its
    end), or, when it cannot be made, the footer's note that the turns were left out unsummarised and the
    summary at the head so far, kept and stored under the new end (None when there was none)."""
    before_call()
    context = {"thread_key": str(turn.thread), "first": compaction.first, "end": compaction.end}
    notes: tuple[str, ...] = ()
    try:
        summary = await summarise(deps, turn, job, call, compaction, budget=budget, calibration=calibration)
    except (asyncio.CancelledError, LeaseLost, RedisError):
        raise
    except Exception as exc:  # the answer goes on without it: the turns are left out, as before summaries
        log.warning("thread summary failed; earlier turns left out", extra={**context, "error": repr(exc)})
        kept = kept_summary(compaction, budget_tokens=budget, calibration=calibration)
        if kept is None:
            return None, (SUMMARY_FAILED_NOTE,)
        summary, notes = kept, (SUMMARY_FAILED_NOTE,)
    await lease.guard()
    if not await store.put(turn.thread, lease.keys.lease, lease.holder, summary.end, summary.dump()):
        raise LeaseLost(str(turn.thread))
    if not notes:
        log.info("earlier turns summarised", extra={**context, "chars": len(summary.text)})
    return summary, notes
