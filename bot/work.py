"""What a worker does with each kind of job. Handlers only describe the work (and queue it); this does it."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from redis.exceptions import ResponseError
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.budgets import report_text
from bot.deps import Deps
from bot.errors import USER_MESSAGES, Reason
from bot.pipeline import answer, stop_value
from bot.queue import Job, Lease, LeaseLost
from bot.shortcuts import SHORTCUT_JOB, announcing_now, find_earlier_post, run_shortcut
from bot.slack.blocks import waiting_view
from bot.slack.reply import (
    announce_question,
    find_announcement,
    greet_assistant_thread,
    slack_error,
)
from bot.store import forget_thread, forget_user
from bot.turn import Source, ThreadKey, Turn
from bot.usage import usage_report

log = logging.getLogger(__name__)

GAVE_UP = {
    "attempts": "I tried to answer this several times and failed each time, so I have given up on it.",
    "internal": USER_MESSAGES[Reason.INTERNAL],
}


def turn_job(turn: Turn) -> dict[str, Any]:
    return {"job_id": turn.job_id, "turn": turn.to_dict()}


async def queue_turn(deps: Deps, turn: Turn, *, dedup: bool = True) -> bool:
    """Queue the answer to `turn` in its thread, once per message (False: already queued before)."""
    return await deps.queue.put(
        turn.thread,
        "turn",
        turn_job(turn),
        dedup_ts=turn.ts if dedup else None,
        dedup_ttl_s=deps.settings.dedup_ttl_seconds,
        engage=True,
        order=turn.ts,
    )


def command_thread(command: dict[str, Any]) -> ThreadKey:
    """Where a /kimi job waits before it has a thread of its own: a queue of one, keyed by its trigger."""
    return ThreadKey(
        str(command.get("team_id") or ""),
        str(command.get("channel_id") or ""),
        f"command.{command.get('trigger_id') or ''}",
    )


async def run_job(job: Job, lease: Lease, deps: Deps) -> None:
    if job.kind == "turn":
        await answer(Turn.from_dict(job.data["turn"]), deps, lease, job)
    elif job.kind == "command":
        await answer_command(deps, job.data["command"], lease, job)
    elif job.kind == "greet":
        await greet(deps, lease, job)
    elif job.kind == "forget":
        await forget(deps, lease, job)
    elif job.kind == "forget_me":
        await forget_me(deps, lease, job)
    elif job.kind == "usage":
        await show_usage(deps, lease, job)
    elif job.kind == SHORTCUT_JOB:
        await run_shortcut(deps, lease, job, queue_turn)
    else:
        log.warning("unknown job kind dropped", extra={"kind": job.kind, "job": job.job_id})
        await lease.dead_letter(job, "unknown kind")


NOT_POSTED = "-"  # announce_ts of a /kimi question that could not be posted (answered through response_url)


async def answer_command(deps: Deps, command: dict[str, Any], lease: Lease, job: Job) -> None:
    """/kimi: post the question in the channel (once, even if the job runs again) and queue its answer in
    that new thread; where the bot is not a member, answer privately through response_url."""
    channel = str(command.get("channel_id") or "")
    user = str(command.get("user_id") or "")
    team = str(command.get("team_id") or "")
    question = str(command.get("text") or "").strip()
    trigger = str(command.get("trigger_id") or job.job_id)
    progress = await lease.progress(job)
    ts = progress.get("announce_ts")
    private = ts == NOT_POSTED  # an earlier run could not post it and answers privately: so does this one
    if private:
        ts = None
    elif not ts and progress.get("announcing"):  # an earlier run may have posted it and died before noting it
        try:
            ts = await find_earlier_post(
                progress["announcing"],
                lambda since: find_announcement(deps.slack, channel, trigger, since),
                "/kimi question",
            )
        except SlackApiError as exc:
            error = slack_error(exc)
            # It cannot be found there (not a member, a missing scope...): answered privately, never posted
            # again (an earlier run may have posted it: at worst that post stays unanswered, never twice).
            log.info("earlier /kimi question not searchable", extra={"job": job.job_id, "error": error})
            private = True
            await lease.save_progress(job, announce_ts=NOT_POSTED)
    if not ts and not private:
        await lease.save_progress(job, announcing=announcing_now())
        ts = await announce_question(deps.slack, channel, user, question, trigger)
        if ts is None:  # not a member: answered privately, and a re-run must not search or post again
            await lease.save_progress(job, announce_ts=NOT_POSTED)
    if ts is not None:
        await lease.save_progress(job, announce_ts=ts)
        turn = Turn(Source.COMMAND, team, channel, user, question, ts=ts, thread_ts=ts)
        await queue_turn(deps, turn)  # deduplicated by the posted question's ts: once, even on a re-run
        await lease.complete(job)
        return
    turn = Turn(
        Source.COMMAND,
        team,
        channel,
        user,
        question,
        ts=trigger,
        thread_ts=trigger,
        response_url=str(command.get("response_url") or ""),
    )
    await answer(turn, deps, lease, job)


FORGOTTEN = (
    "Done: I have forgotten this thread. Its earlier messages and my answers are deleted from what I keep, "
    "and I won't read them back; ask me something here and I start afresh."
)


def forget_job(thread: ThreadKey, user: str, ts: str, *, ephemeral: bool) -> dict[str, Any]:
    """`@kimibot forget` (ts: that message; confirmed in the thread) or the Forget shortcut (ts: the
    shortcut's action, confirmed privately)."""
    return {
        "job_id": f"forget:{ts}",
        "user": user,
        "ts": ts,
        "ephemeral": ephemeral,
        "thread_ts": thread.thread_ts,
    }


async def forget(deps: Deps, lease: Lease, job: Job) -> None:
    """Delete a thread's stored context. It runs as a job of the thread, so after an answer in progress
    there (whose exchange it deletes too), never in the middle of one."""
    thread, user = job.thread, str(job.data.get("user") or "")
    ts = str(job.data.get("ts") or "")
    if await forget_thread(deps.redis, thread, lease.holder, ts, deps.settings.thread_ttl_seconds) < 0:
        raise LeaseLost(str(thread))
    await lease.complete(job)
    log.info("thread forgotten", extra={"thread_key": str(thread), "user": user})
    try:
        await lease.guard()
        if job.data.get("ephemeral"):
            await deps.slack.chat_postEphemeral(
                channel=thread.channel, user=user, thread_ts=thread.thread_ts, text=FORGOTTEN
            )
        else:
            await deps.slack.chat_postMessage(
                channel=thread.channel, thread_ts=thread.thread_ts, text=FORGOTTEN
            )
    except LeaseLost:
        raise
    except Exception as exc:  # forgotten all the same; only the confirmation is missing
        log.warning(
            "forget confirmation failed", extra={"error": type(exc).__name__, "channel": thread.channel}
        )


def forgotten_text(done: dict[str, int]) -> str:
    return (
        "Done. I deleted what I keep about you outside threads: your cached display name and access checks, "
        f"{done.get('votes', 0)} 👍/👎 vote(s), {done.get('stops', 0)} Stop request(s) and your usage "
        "records (the workspace's and channels' totals keep their numbers, without your name). Your messages "
        "inside threads stay, as part of those conversations, until the thread expires; say `@Kimi forget` "
        "in a thread to delete that thread."
    )


async def forget_me(deps: Deps, lease: Lease, job: Job) -> None:
    """/kimi forget-me: delete what kimibot keeps about the asker, and tell them privately."""
    command = job.data.get("command") or {}
    team, user = str(command.get("team_id") or ""), str(command.get("user_id") or "")
    deps.names.drop_local(team, user)
    done = await forget_user(deps.redis, team, user)
    await lease.complete(job)
    log.info("user forgotten", extra={"team": team, "user": user, **done})
    response_url = str(command.get("response_url") or "")
    if response_url:
        try:
            await AsyncWebhookClient(response_url).send(
                text=forgotten_text(done), response_type="ephemeral", replace_original=False
            )
        except Exception as exc:  # deleted all the same; only the confirmation is missing
            log.warning("forget-me confirmation failed", extra={"error": type(exc).__name__})


async def show_usage(deps: Deps, lease: Lease, job: Job) -> None:
    """/kimi usage: the asker's usage (an admin's: the channel's and the workspace's too), privately."""
    command = job.data.get("command") or {}
    team, user = str(command.get("team_id") or ""), str(command.get("user_id") or "")
    snapshot = await usage_report(deps, team, user, str(command.get("channel_id") or ""))
    await lease.complete(job)
    response_url = str(command.get("response_url") or "")
    if response_url:
        try:
            await AsyncWebhookClient(response_url).send(
                text=report_text(snapshot), response_type="ephemeral", replace_original=False
            )
        except Exception as exc:  # nothing lost: asking again shows it
            log.warning("usage report not delivered", extra={"error": type(exc).__name__})


async def greet(deps: Deps, lease: Lease, job: Job) -> None:
    channel, thread_ts = str(job.data["channel"]), str(job.data["thread_ts"])
    if thread_ts:  # an assistant-panel thread; the Messages tab (no thread_ts) is greeted in the DM itself
        await lease.append(answered=1, assistant=1)
    try:
        await greet_assistant_thread(deps.slack, channel, thread_ts or None)
    except Exception as exc:
        log.warning(
            "assistant thread greeting failed", extra={"error": type(exc).__name__, "channel": channel}
        )


async def tell_not_answered(deps: Deps, job: Job, lease: Lease, why: str, reference: str) -> None:
    """One sentence saying the question is given up: in place of the placeholder an earlier run left, else
    in the thread (or privately, for /kimi off-channel)."""
    sentence = f":warning: {GAVE_UP.get(why, GAVE_UP['internal'])} (ref `{reference}`)"
    if job.kind == "turn":
        # Read what is needed without Turn.from_dict: a turn that cannot be read is one reason to be here,
        # and the thread whose inbox held the job says where to tell.
        turn_data = job.data.get("turn")
        data: dict[str, Any] = turn_data if isinstance(turn_data, dict) else {}
        channel = str(data.get("channel") or job.thread.channel)
        thread_ts = str(data.get("thread_ts") or job.thread.thread_ts)
        response_url = str(data.get("response_url") or "")
    elif job.kind == "command":
        command = job.data.get("command") or {}
        channel, thread_ts = str(command.get("channel_id") or ""), ""
        response_url = str(command.get("response_url") or "")
    elif job.kind == SHORTCUT_JOB and job.data.get("response_url"):  # its turn was not queued: privately
        channel, thread_ts, response_url = "", "", str(job.data["response_url"])
    else:
        return  # a greeting nobody asked for: nobody to tell
    deps.metrics.answer("gave_up" if why == "attempts" else "internal")
    await lease.guard()
    if response_url and job.kind in ("command", "turn", SHORTCUT_JOB):
        await AsyncWebhookClient(response_url).send(text=sentence, response_type="ephemeral")
        return
    progress = await lease.progress(job)
    placeholder = progress.get("placeholder_ts")
    if placeholder:
        await deps.slack.chat_update(channel=channel, ts=placeholder, text=sentence, blocks=[])
    else:
        await deps.slack.chat_postMessage(channel=channel, thread_ts=thread_ts or None, text=sentence)
    if progress.get("reaction") and job.kind == "turn" and data.get("ts"):
        # An earlier run marked the question heard while it waited to post: the sentence replaces that.
        with contextlib.suppress(Exception):
            await deps.slack.reactions_remove(
                channel=channel, timestamp=str(data["ts"]), name=progress["reaction"]
            )


LEGACY_STREAM = "kimibot:jobs"  # where kimibot before the per-thread inboxes kept its jobs
LEGACY_GROUP = "kimibot-workers"
LEGACY_BUSY_MS = 120_000  # a job an old worker took less than this ago is left to it (rolling upgrade)


async def adopt_legacy_jobs(deps: Deps) -> int:
    """An upgrade must not lose the questions the previous version had queued: move each job of its Redis
    Stream into its thread's inbox, once (deduplicated by entry id, so two workers adopting at once or a
    crash between queueing and deleting adopt nothing twice), skipping jobs an old worker is still on and
    jobs it already delivered. Runs with every sweep until the stream is gone."""
    if not await deps.redis.exists(LEGACY_STREAM):
        return 0
    busy: set[str] = set()
    with contextlib.suppress(ResponseError):  # no consumer group: nothing in progress
        pending: Any = await deps.redis.xpending_range(
            LEGACY_STREAM, LEGACY_GROUP, min="-", max="+", count=10_000
        )
        busy = {str(p["message_id"]) for p in pending if int(p["time_since_delivered"]) < LEGACY_BUSY_MS}
    moved, start = 0, "-"
    while True:
        entries: Any = await deps.redis.xrange(LEGACY_STREAM, min=start, count=500)
        for entry_id, fields in entries:
            if str(entry_id) in busy:
                continue
            moved += await _adopt_one(deps, str(entry_id), fields)
            with contextlib.suppress(ResponseError):
                await deps.redis.xack(LEGACY_STREAM, LEGACY_GROUP, entry_id)
            await deps.redis.xdel(LEGACY_STREAM, entry_id)
        if len(entries) < 500:
            break
        start = f"({entries[-1][0]}"
    if moved:
        log.warning("jobs of the previous version moved to their threads", extra={"count": moved})
    if not busy and not await deps.redis.xlen(LEGACY_STREAM):
        await deps.redis.delete(LEGACY_STREAM)
    return moved


async def _adopt_one(deps: Deps, entry_id: str, fields: dict[str, Any]) -> int:
    try:
        kind, data = str(fields.get("kind") or ""), json.loads(fields.get("data") or "{}")
        order = ""
        if kind == "turn":
            turn = Turn.from_dict(data["turn"])
            thread, order = turn.thread, turn.ts
        elif kind == "command":
            thread = command_thread(data["command"])
        elif kind == "greet":
            thread = ThreadKey(str(data["team"]), str(data["channel"]), str(data["thread_ts"]))
        else:
            raise ValueError(kind)
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable job of the previous version dropped", extra={"entry": entry_id})
        return 0
    if await deps.redis.hget(f"kimibot:job:{{{data.get('job_id')}}}", "delivered"):  # type: ignore[misc]
        return 0  # the old worker answered it and died before acking
    await deps.queue.put(thread, kind, data, dedup_ts=f"legacy:{entry_id}", order=order)
    return 1


async def show_waiting(deps: Deps, lease: Lease) -> None:
    """Questions queued behind the running one in a thread get a placeholder with a Stop button at once
    (their run reuses it), so nobody wonders whether they were heard, and Stop works while they wait."""
    for job in await lease.waiting_jobs():
        if job.kind != "turn":
            continue
        try:
            turn = Turn.from_dict(job.data["turn"])
        except (KeyError, TypeError, ValueError):
            continue  # its own run tells the thread; the questions after it still get their sign of life
        if not turn.in_slack_thread or turn.assistant_thread:
            continue  # the assistant panel shows its status instead; response_url has no thread
        if (await lease.progress(job)).get("placeholder_ts"):
            continue
        text, blocks = waiting_view(stop_value(turn))
        await lease.guard()
        await deps.pacer.acquire("chat.postMessage", turn.team_id, turn.channel)
        response = await deps.slack.chat_postMessage(
            channel=turn.channel, thread_ts=turn.thread_ts, text=text, blocks=blocks
        )
        if not await lease.save_waiting(job, str(response["ts"])):  # it started meanwhile (or is gone)
            await deps.slack.chat_delete(channel=turn.channel, ts=str(response["ts"]))
