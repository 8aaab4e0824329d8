"""answer(turn, deps): load context -> fit window -> think -> deliver -> record.

Every outcome ends with something in the thread: the answer, or one friendly sentence with a
reference id that is also in the log. The user's message is stored before the model is called, so
a failure never loses it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from bot.admission import mentions, strip_mention
from bot.agent.live import WriterView, ask_approval
from bot.agent.loop import CAP_NOTES, AgentLoop, Cap, Caps, Outcome, Planned, Step, replayed_outcome
from bot.channel_settings import ChannelConfig, pin, pinned
from bot.context import Fit, calibrate, estimate_tokens, user_entry
from bot.deps import Deps
from bot.errors import ADMIN_REASONS, RETRYABLE_REASONS, AnswerError, Reason
from bot.files.resolve import FileReader, with_files
from bot.kimi.client import ModelCall
from bot.kimi.events import Accumulator, Event, Text, Usage
from bot.kimi.profiles import parse_prices, profile_for
from bot.queue import Job, Lease, LeaseLost
from bot.slack import acting
from bot.slack.blocks import ACTION_STOP, AnswerRef, answer_blocks, failure_blocks
from bot.slack.render import footer
from bot.slack.reply import QUESTION_EVENT, ReplyWriter, describe
from bot.store import Approvals, FileCache, ThreadState
from bot.summaries import fit_thread
from bot.tools.base import Tool, ToolContext
from bot.tools.registry import offered, registry_for
from bot.turn import Source, Turn, file_refs
from bot.usage import Limits, Meter, OverBudget

log = logging.getLogger(__name__)
T = TypeVar("T")
FILE_ROOM_SHARE = 0.85  # of the window, the most one message's files may fill (see _think_and_deliver)
CATCH_UP_S = 2.0  # the most a mention waits to read the replies it missed ("mentions" channels)
# "Summarize thread" reads this many of the thread's messages at most: its parent and its newest (fit() then
# leaves out the oldest of those if the window is too small) ...
THREAD_READ_LIMIT = 2_000
THREAD_READ_PAGES = 100  # ... of the newest of its first 100 pages of 200 (a bound on conversations.replies)
SHORTCUT_EVENT = "kimibot_shortcut"  # message metadata on a shortcut's "asked" post (bot/shortcuts.py)
# Posts of ours in a thread that are not an answer: the "asked" lines of /kimi and of the message shortcuts,
# each marked with message metadata of these types (a dead run's re-run must not take them back).
ANNOUNCEMENT_EVENTS = frozenset({QUESTION_EVENT, SHORTCUT_EVENT})

EMPTY_QUESTION = "Hi! Ask me anything: mention me with a question, or reply in this thread."


def turn_log(turn: Turn, **extra: Any) -> dict[str, Any]:
    return {
        "team": turn.team_id,
        "channel": turn.channel,
        "thread_ts": turn.thread_ts,
        "ts": turn.ts,
        "event_id": turn.event_id,
        "source": str(turn.source),
        **extra,
    }


async def speaker_name(deps: Deps, team_id: str, user: str) -> str:
    """The name people see in Slack, so the model can tell speakers apart (cached in Redis)."""
    cached = await deps.names.get(team_id, user)
    if cached:
        return cached
    try:
        response = await deps.slack.users_info(user=user)
    except Exception as exc:  # a name is nice to have; the answer must not depend on it
        log.info("users.info failed; using the user id", extra={"user": user, "error": describe(exc)})
        return user
    info = response.get("user") or {}
    profile = info.get("profile") or {}
    name = (
        profile.get("display_name") or profile.get("real_name") or info.get("real_name") or info.get("name")
    )
    name = str(name or user)
    await deps.names.put(team_id, user, name)
    return name


async def backfill(
    deps: Deps, turn: Turn, *, oldest: str = "", questions: bool = True, limit: int | None = None
) -> list[dict[str, Any]]:
    """Entries for the thread's messages before this one, when the bot is first called into it (or, with
    `oldest`, only those newer than that ts: see catch_up). `questions=False` leaves out the messages that
    mention the bot: each is a question with a job of its own. `limit`: how many messages to read at most
    (BACKFILL_LIMIT when None)."""
    entries: list[dict[str, Any]] = []
    cursor: str | None = None
    fetched = 0
    limit = deps.settings.backfill_limit if limit is None else limit
    me = deps.current_identity().user_id  # OAuth mode: this workspace's bot
    try:
        while fetched < limit:
            response = await deps.slack.conversations_replies(
                channel=turn.channel,
                ts=turn.thread_ts,
                limit=min(200, limit - fetched),
                cursor=cursor,
                oldest=oldest or None,  # None: not sent (the SDK drops it)
                inclusive=False if oldest else None,
            )
            messages = response.get("messages") or []
            fetched += len(messages)
            for message in messages:
                if oldest and float(message.get("ts") or 0) <= float(oldest):
                    continue  # the thread's parent, which Slack sends whatever `oldest` says
                if not questions and mentions(str(message.get("text") or ""), me):
                    continue
                entry = await _history_entry(deps, turn, message)
                if entry is not None:
                    entries.append(entry)
            cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
            if not cursor or not messages:
                break
    except Exception as exc:  # earlier messages help; their absence must not cost the answer
        log.warning(
            "backfill failed; answering without earlier messages",
            extra=turn_log(turn, error=describe(exc)),
        )
        return []
    return entries


async def read_thread(deps: Deps, turn: Turn, *, limit: int) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """Entries for the whole thread before this turn, as Slack has it now ("Summarize thread"), and the
    footer's note when some of it was left out. Slack pages a thread oldest first: the pages are read
    through (THREAD_READ_PAGES at most) keeping the parent and the newest `limit` - 1 messages, so a long
    thread is summarised by its latest part. Unlike backfill a failed read raises (a summary of a thread
    that could not be read would be an answer that is wrong)."""
    parent: dict[str, Any] | None = None
    newest: deque[dict[str, Any]] = deque(maxlen=max(limit - 1, 1))
    read, cursor, pages = 0, None, 0
    while pages < THREAD_READ_PAGES:
        try:
            response = await deps.slack.conversations_replies(
                channel=turn.channel, ts=turn.thread_ts, limit=200, cursor=cursor
            )
        except Exception as exc:
            raise AnswerError(Reason.THREAD_UNREADABLE, describe(exc)) from exc
        pages += 1
        messages = [m for m in response.get("messages") or [] if isinstance(m, dict)]
        for message in messages:
            if float(message.get("ts") or 0) >= float(turn.ts):
                continue  # the question itself, and what came after it
            read += 1
            if parent is None and message.get("ts") == turn.thread_ts:
                parent = message
            else:
                newest.append(message)
        cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
        if not cursor or not messages:
            break
    kept = [parent] if parent is not None else []
    kept.extend(newest)
    entries = [e for e in [await _history_entry(deps, turn, m) for m in kept] if e is not None]
    notes: list[str] = []
    if read > len(kept):
        notes.append(f"{read - len(kept)} older messages of the thread left out")
    if cursor:
        notes.append(f"only the thread's first {read} messages read")
    return entries, tuple(notes)


async def catch_up(deps: Deps, turn: Turn, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The thread's replies since the last question the history holds, which the bot did not answer: a
    "mentions" channel ignores replies without a mention, so without this a mention would be answered
    blind to what was said in between. People's (and other bots') messages only: ours are in the history
    already, or were notices. Asked only in "mentions" channels (conversations.replies is rate limited;
    in "all" channels every reply is answered, so stored)."""
    since = max(
        (str(e["ts"]) for e in entries if e.get("role") == "user" and e.get("ts")), key=float, default=""
    )
    if not since or turn.source is Source.DM:  # in a DM every reply was a question, answered and stored
        return []
    known = {str(e.get("ts")) for e in entries}
    try:
        # Bounded: a rate-limited conversations.replies (retried after Retry-After) must not hold the
        # answer; without the catch-up it is answered as before.
        async with asyncio.timeout(CATCH_UP_S):
            caught = await backfill(deps, turn, oldest=since, questions=False)
    except TimeoutError:
        log.info("catch-up skipped: Slack was slow", extra=turn_log(turn))
        return []
    return [entry for entry in caught if entry.get("role") == "user" and entry.get("ts") not in known]


async def _history_entry(deps: Deps, turn: Turn, message: dict[str, Any]) -> dict[str, Any] | None:
    ts = str(message.get("ts", ""))
    text = str(message.get("text") or "")
    files = file_refs(message.get("files"))  # a message with only files is kept: they are read for it
    if not ts or float(ts) >= float(turn.ts) or not (text.strip() or files):
        return None
    if message.get("subtype") not in (None, "bot_message", "thread_broadcast", "file_share"):
        return None
    me = deps.current_identity()  # OAuth mode: this workspace's bot
    if (me.bot_id and message.get("bot_id") == me.bot_id) or (
        me.user_id and message.get("user") == me.user_id
    ):
        return {"role": "assistant", "content": text, "ts": ts}
    if message.get("bot_id") or message.get("subtype") == "bot_message":
        name = str((message.get("bot_profile") or {}).get("name") or message.get("username") or "a bot")
        return user_entry(f"{name} (bot)", text, ts=ts, user=str(message.get("bot_id", "")), files=files)
    user = str(message.get("user") or "")
    name = await speaker_name(deps, turn.team_id, user) if user else "someone"
    return user_entry(name, strip_mention(text, me.user_id), ts=ts, user=user, files=files)


def _ours(message: dict[str, Any], deps: Deps) -> bool:
    me = deps.current_identity()  # OAuth mode: this workspace's bot
    return bool(
        (me.bot_id and message.get("bot_id") == me.bot_id)
        or (me.user_id and message.get("user") == me.user_id)
    )


def _stop_values(message: dict[str, Any]) -> set[str]:
    """The turns whose Stop button the message carries (a placeholder carries its own question's)."""
    return {
        str(element.get("value"))
        for block in message.get("blocks") or []
        if block.get("type") == "actions"
        for element in block.get("elements") or []
        if element.get("action_id") == ACTION_STOP
    }


def _last_shown(state: ThreadState | None) -> str:
    """The ts of the newest message an earlier, finished job of the thread posted ("" when none): its
    recorded answers, and whatever else it posted (a failure sentence, a notice), which jobs note as
    `posted_ts` in the thread's metadata when they finish."""
    if state is None:
        return ""
    shown = [
        str(ts)
        for entry in state.entries
        if entry.get("role") == "assistant"
        for ts in entry.get("reply_ts") or []
        if ts
    ]
    if state.meta.get("posted_ts"):
        shown.append(state.meta["posted_ts"])
    return max(shown, key=float, default="")


async def placeholder_below_answers(
    deps: Deps, turn: Turn, lease: Lease, job: Job, progress: dict[str, str], state: ThreadState | None
) -> dict[str, str]:
    """A placeholder posted while the question waited sits above the answers given since, so its answer
    would show above theirs: take it back, and the run posts a new one below them."""
    placeholder = progress.get("placeholder_ts", "")
    shown = _last_shown(state)
    if not placeholder or not shown or float(placeholder) > float(shown):
        return progress
    await lease.save_progress(job, placeholder_ts="")
    await lease.guard()
    try:
        await deps.slack.chat_delete(channel=turn.channel, ts=placeholder)
    except Exception as exc:  # a stale "Waiting…" is a blemish; the answer still goes out below
        log.info("waiting placeholder not removed", extra=turn_log(turn, error=describe(exc)))
    return {**progress, "placeholder_ts": ""}


async def recover_orphans(
    deps: Deps, turn: Turn, progress: dict[str, str], state: ThreadState | None = None
) -> dict[str, str]:
    """A re-run of a job whose run died: find what that run put in the thread but had no time to note
    (it died between Slack's answer and the progress write). Its placeholder carries this turn's Stop
    button: adopt it. After its placeholder, nobody else writes in the thread (one job per thread at a
    time), so any later message of ours is that run's partial answer: take it back with the rest. Except
    the "asked" posts of message shortcuts (their jobs run in queues of their own) and of /kimi, which
    their message metadata marks."""
    placeholder = progress.get("placeholder_ts", "")
    answer_ts: list[str] = json.loads(progress.get("answer_ts") or "[]")
    # A waiting question's placeholder comes before the answers to the questions ahead of it: those
    # (recorded in the history) and other questions' placeholders are not this run's to take back.
    after = max([placeholder or turn.ts, _last_shown(state)], key=lambda ts: float(ts or 0))
    await deps.whoami()
    try:
        response = await deps.slack.conversations_replies(
            channel=turn.channel,
            ts=turn.thread_ts,
            oldest=after,
            inclusive=False,
            limit=200,
            include_all_metadata=True,
        )
        messages = [m for m in response.get("messages") or [] if isinstance(m, dict) and not _announced(m)]
    except Exception as exc:  # best effort: without it, at worst a stray message stays
        log.info("could not look for a dead run's messages", extra=turn_log(turn, error=describe(exc)))
        return progress
    found: dict[str, str] = {}
    for message in sorted(messages, key=lambda m: float(m.get("ts") or 0)):
        ts = str(message.get("ts") or "")
        if (
            not ts
            or float(ts) <= float(after)
            or ts in answer_ts
            or ts == placeholder
            or not _ours(message, deps)
            or bool(_stop_values(message) - {stop_value(turn)})  # another question's placeholder
        ):
            continue
        if not placeholder:
            if stop_value(turn) in _stop_values(message):
                placeholder = found["placeholder_ts"] = ts
            continue
        answer_ts.append(ts)
        found["answer_ts"] = json.dumps(answer_ts)
    if found:
        log.info("a dead run's messages found", extra=turn_log(turn, **found))
    return {**progress, **found}


def _announced(message: dict[str, Any]) -> bool:
    """A post of ours that says who asked what (/kimi, a message shortcut), not an answer."""
    metadata = message.get("metadata")
    return isinstance(metadata, dict) and metadata.get("event_type") in ANNOUNCEMENT_EVENTS


async def _given(value: T) -> T:
    """A value where a coroutine is expected (for gather)."""
    return value


def stop_value(turn: Turn) -> str:
    """What the Stop button carries: the channel and ts that identify this turn."""
    return f"{turn.channel}:{turn.ts}"


async def answer(turn: Turn, deps: Deps, lease: Lease, job: Job) -> None:
    """Answer one turn (the head job of its thread, under the thread's lease). Every outcome is recorded
    with the job's completion: the answer, or one sentence with a reference id telling the user why not."""
    kimi_task: list[asyncio.Task[Any]] = []  # the model request (or the agent loop) Stop cancels

    async def save_progress(**fields: str) -> None:
        await lease.save_progress(job, **fields)

    # Read with every tick of the worker's watcher (one pipeline for all answers), not once per answer
    # every half second; a lease used alone (no worker) asks Redis itself.
    stop_key = lease.watcher.watch(deps.stops.key(turn.channel, turn.ts)) if lease.watcher else None

    async def should_stop() -> bool:
        if stop_key is not None:
            return stop_key.value is not None
        return await deps.stops.requested_by(turn.channel, turn.ts) is not None

    def on_stop() -> None:
        for task in kimi_task:
            task.cancel()

    writer = ReplyWriter(
        deps.slack,
        turn,
        pacer=deps.pacer,
        pace=deps.pace,
        stop_value=stop_value(turn),
        should_stop=should_stop,
        on_stop=on_stop,
        on_progress=save_progress,
        fence=lease.guard,
    )
    details: dict[str, Any] = {"question": turn.text}
    if turn.reads_thread:  # Regenerate and Retry read the thread again too
        details["reads_thread"] = True
    try:
        progress, name, state, config, who = await asyncio.gather(  # what the job needs, fetched at once
            lease.progress(job),
            speaker_name(deps, turn.team_id, turn.user),
            deps.threads.load(turn.thread) if turn.in_slack_thread else _given(None),
            # The channel's settings (channel override > workspace default > env), read for each question.
            deps.channel_settings.resolve(turn.team_id, turn.channel),
            # A Stop pressed while the question waited; one pressed from now on is seen by the writer.
            deps.stops.requested_by(turn.channel, turn.ts),
        )
        ran_before = bool(progress.get("started")) or job.attempt > 1
        if ran_before and turn.in_slack_thread and not turn.assistant_thread:
            recovered = await recover_orphans(deps, turn, progress, state)
            if recovered != progress:
                await lease.save_progress(job, **{k: v for k, v in recovered.items() if progress.get(k) != v})
            progress = recovered
        if not progress.get("started"):  # from here on a run may post: a later re-run must look for it
            # The settings are pinned with it: a re-run resumes this run's steps with the same model.
            await lease.save_progress(job, started="1", settings=pin(config))
        elif progress.get("settings"):
            config = pinned(config, progress["settings"])
        if turn.in_slack_thread and not turn.assistant_thread:
            progress = await placeholder_below_answers(deps, turn, lease, job, progress, state)
        writer.resume = progress
        # Stopped while it waited for the answer before it; not a run that had Kimi's whole answer already
        # (the Stop came after it, while it was being shown): that answer is delivered below.
        if who is not None and finished_answer(progress) is None:
            writer.start()
            await writer.fail(f"_:black_square_for_stop: Stopped by <@{who}> before I began._")
            await lease.complete(job, details=(turn.ts, details))
            deps.metrics.answer("stopped")
            return
        if not turn.text.strip() and not turn.files:  # a message with only a file asks about the file
            await writer.notice(EMPTY_QUESTION)
            await lease.complete(job)
            return
        await _think_and_deliver(
            turn, deps, writer, kimi_task, lease, job, name=name, state=state, config=config
        )
        deps.metrics.answer("stopped" if writer.stopped else "answered")
    except OverBudget as exc:  # no Kimi request was made for it; the job is done (no retry)
        log.info("over budget", extra=turn_log(turn, scope=str(exc.scope), limit_nusd=exc.limit_nusd))
        try:
            await writer.fail(exc.sentence)
        except Exception:  # Slack refused the sentence: the job is still done (it would be refused again)
            log.exception("could not tell the user about a budget", extra=turn_log(turn))
        await lease.complete(job, details=(turn.ts, details))
        deps.metrics.answer("over_budget")
    except AnswerError as exc:
        await _report(turn, writer, exc)
        await lease.complete(job, details=(turn.ts, details))
        deps.metrics.answer(str(exc.reason))
    except (asyncio.CancelledError, LeaseLost, RedisError):
        raise  # the job goes back on the queue (or to its new owner); a re-run replaces what was shown
    except Exception as exc:  # a bug or an outage: the user still hears back, with a reference
        error = AnswerError(Reason.INTERNAL, f"{type(exc).__name__}: {exc}")
        log.exception("answer failed", extra=turn_log(turn, reference=error.reference))
        await _report(turn, writer, error, logged=True)
        await lease.complete(job, details=(turn.ts, details))
        deps.metrics.answer(str(error.reason))
    finally:
        if stop_key is not None:
            stop_key.close()
        await writer.close()


async def _report(turn: Turn, writer: ReplyWriter, error: AnswerError, *, logged: bool = False) -> None:
    if not logged:
        level = logging.ERROR if error.reason in ADMIN_REASONS else logging.WARNING
        log.log(
            level,
            "turn not answered",
            extra=turn_log(turn, reason=str(error.reason), reference=error.reference, detail=error.detail),
        )
    retry = AnswerRef(turn.thread_ts, turn.ts, "", 0, 0, 0) if error.reason in RETRYABLE_REASONS else None
    try:
        await writer.fail(
            error.user_text(), failure_blocks(error.user_text(), retry if turn.in_slack_thread else None)
        )
    except Exception:
        log.exception(
            "could not tell the user about a failure", extra=turn_log(turn, reference=error.reference)
        )


async def _think_and_deliver(
    turn: Turn,
    deps: Deps,
    writer: ReplyWriter,
    kimi_task: list[asyncio.Task[Any]],
    lease: Lease,
    job: Job,
    *,
    name: str,
    state: ThreadState | None,
    config: ChannelConfig,
) -> None:
    """`state` is the thread's history (None when the answer goes through response_url, without one);
    `config` the channel's settings (pinned for the job by its first run)."""
    settings = deps.settings
    history = state is not None
    question = user_entry(name, turn.text, ts=turn.ts, user=turn.user, files=turn.files)

    kimi = deps.kimi
    entries: list[dict[str, Any]] = []
    meta: dict[str, str] = {}
    offset = 0
    if state is not None:
        entries, meta, offset = state.entries, state.meta, state.offset
        new_entries: list[dict[str, Any]] = []
        # A re-run of this turn finds its question (and what came before it) already stored.
        stored = any(e.get("ts") == turn.ts and e.get("role") == "user" for e in entries)
        # A thread that was forgotten (`@kimibot forget`) is not read back from Slack.
        if not entries and not offset and not turn.opens_thread and "forgotten" not in meta:
            new_entries = await backfill(deps, turn)
        elif entries and not stored and config.followups == "mentions" and not turn.assistant_thread:
            new_entries = await catch_up(deps, turn, entries)
        if turn.assistant_thread and not offset and not any(e.get("role") == "user" for e in entries):
            writer.title(turn.text.strip() or ", ".join(str(f.get("name") or "a file") for f in turn.files))
        if not stored:
            new_entries.append(question)
        # Stored before Kimi is asked, so no failure loses it (fenced: only while the thread is ours).
        await lease.append(*new_entries, answered=1)
        entries = entries + new_entries
    else:
        entries = [question]

    # Priced as KIMI_PRICES says (the channel's model may not be KIMI_MODEL).
    profile = profile_for(config.model, parse_prices(settings.kimi_prices))
    call = ModelCall(config.model, profile, config.effort, config.thinking)
    budget = call.profile.context_window - kimi.budget_of(call)
    calibration = float(meta.get("calibration", "1.0"))
    # Kimi's whole answer, when an earlier run of this job got it and died before recording it: delivered
    # and recorded as it was, before anything that could ask Kimi (a summary) or read Slack again.
    saved = finished_answer(writer.resume)
    if saved is not None:
        await _replay_final(turn, deps, writer, lease, job, saved, call, history)
        return
    started = time.monotonic()  # the footer's time counts a summary request and the files' reading too
    start = max(int(meta.get("start", "0")) - offset, 0)
    summaries = history
    read_notes: tuple[str, ...] = ()
    if turn.reads_thread:
        # "Summarize thread": the model reads the thread as Slack has it now, not only what was stored (the
        # stored history keeps its question and answer, and its start; see _record).
        thread, read_notes = await read_thread(deps, turn, limit=THREAD_READ_LIMIT)
        entries, start, offset = [*thread, question], 0, 0
        summaries = False  # a fresh read: its indexes are not the stored history's, so no stored summary
    # The files of the messages being sent, read into them (and what could not be used, for the footer).
    # What one message may take, alone in the window: less the system prompt and a margin for the tools'
    # definitions and estimate error. The thread's calibration changes a little after every answer and the
    # cut must be the same on every turn (the prompt cache): it is taken in steps of a half, never below 1.
    system = {"role": "system", "content": config.system_prompt(settings.system_prompt)}
    room = int(budget * FILE_ROOM_SHARE) - estimate_tokens(system)
    cut_calibration = math.ceil(max(calibration, 1.0) * 2) / 2
    entries, notes = await _with_files(deps, turn, entries, start, call, room, cut_calibration)
    notes = (*read_notes, *notes)
    fitted = await fit_thread(  # bot/context.py fit, with the earlier turns summarised (bot/summaries.py)
        deps,
        turn,
        lease,
        job,
        call,
        system_prompt=config.system_prompt(settings.system_prompt),
        entries=entries,
        offset=offset,
        start=start,
        budget=budget,
        calibration=calibration,
        history=summaries,
        before_call=writer.start,
    )
    if fitted.too_long:
        raise AnswerError(Reason.TOO_LONG, f"question alone exceeds {budget} tokens")
    if notes:
        fitted = dataclasses.replace(fitted, notes=(*fitted.notes, *notes))  # summary notes follow "left out"

    async def on_event(event: Event) -> None:
        if isinstance(event, Text):
            writer.text(event.text)
        else:
            writer.reasoning(event.text)

    left_out = offset + fitted.start
    meter = Meter(
        deps.usage,
        deps.metrics,
        turn.team_id,
        turn.channel,
        turn.user,
        job.job_id,
        call.model,
        call.profile,
        kimi.budget_of(call),
        Limits.from_settings(settings),
        calibration,
        thinking=call.thinking,
    )
    ctx = tool_context(turn, deps)
    available = list(await deps.tools(ctx)) if deps.tools is not None else []
    tools, definitions = offer([t for t in available if t.name not in config.tools_off], ctx)
    if tools:
        await _agent_answer(
            turn,
            deps,
            writer,
            kimi_task,
            lease,
            job,
            fitted,
            tools,
            definitions,
            ctx,
            on_event,
            left_out,
            history,
            meter,
            calibration,
            call,
        )
        return
    if writer.stopped:  # Stop was pressed while the thread was summarised: Kimi is not asked for the answer
        acc = Accumulator(content=[writer.answer], finish_reason="stopped")
    else:
        log.info("asking kimi", extra=turn_log(turn, messages=len(fitted.messages), left_out=left_out))
        # The sign of life goes right behind the request to Kimi (on_send; a no-op if already shown): its
        # Slack call's work does not delay the request.
        task = asyncio.create_task(
            kimi.complete(
                fitted.messages,
                on_event=on_event,
                on_restart=writer.restarted,
                meter=meter,
                call=call,
                on_send=writer.start,
            )
        )
        kimi_task.append(task)
        try:
            acc = await task
        except asyncio.CancelledError:
            if not writer.stopped:
                raise
            acc = Accumulator(
                reasoning=[writer.reasoning_text], content=[writer.answer], finish_reason="stopped"
            )
        except Exception:
            # Refused before it was sent (a budget): the sentence that says so takes the place of the sign
            # of life, and of an earlier run's partial answer (which begin() takes back).
            writer.start()
            raise
        else:
            # Kimi's whole answer, kept with the job before its last Slack write: a run that dies between
            # that write and the record is replayed from it (never asked again: no second cost, no budget
            # refusal replacing an answer the thread already shows, no different text).
            await writer.text_complete()
            await _keep_finished(
                lease,
                job,
                dump_finished(
                    acc,
                    time.monotonic() - started,
                    writer.thinking_s,
                    left_out=left_out,
                    shown_left_out=left_out - fitted.summarised,
                    notes=fitted.notes,
                    estimated=fitted.estimated_tokens,
                ),
            )
    elapsed, thinking_s, reply_ts = await _deliver_final(
        turn,
        deps,
        writer,
        started,
        acc.usage,
        left_out - fitted.summarised,  # the rest is in the summary at the head
        acc.finish_reason,
        bool(acc.reasoning_text),
        extra=fitted.notes,
        model=call.model,
    )
    await _record(
        turn,
        deps,
        lease,
        job,
        acc,
        left_out,
        fitted.estimated_tokens,
        reply_ts,
        elapsed,
        history=history,
        thinking_s=thinking_s,
        call=call,
    )


def dump_finished(
    acc: Accumulator,
    elapsed_s: float,
    thinking_s: float | None,
    *,
    cap: Cap | None = None,
    left_out: int,
    shown_left_out: int,
    notes: tuple[str, ...],
    estimated: int,
    agent: bool = False,
) -> str:
    """Kimi's finished answer as a job keeps it (see finished_answer), with what its delivery and record need
    besides: the window's start (`left_out`), the footer's count and notes, the prompt's estimate (for the
    calibration), and for an agent turn (`agent`) the cap that ended its loop."""
    usage = acc.usage.__dict__ if acc.usage else None
    return json.dumps(
        {
            "message": acc.message(),
            "finish_reason": acc.finish_reason,
            "usage": usage,
            "elapsed_s": elapsed_s,
            "thinking_s": thinking_s,
            "cap": str(cap) if cap else None,
            "left_out": left_out,
            "shown_left_out": shown_left_out,
            "notes": list(notes),
            "estimated": estimated,
            "agent": agent,
        },
        ensure_ascii=False,
    )


def finished_answer(progress: dict[str, str]) -> dict[str, Any] | None:
    """The finished answer an earlier run of the job kept, or None (none kept, or not readable as one: then
    Kimi is asked again, as before answers were kept)."""
    raw = progress.get("final")
    if not raw:
        return None
    try:
        saved = json.loads(raw)
        message = saved["message"]
        usage = saved.get("usage")
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("content"), str)
            or not all(isinstance(saved.get(k), int) for k in ("left_out", "shown_left_out", "estimated"))
            or not isinstance(saved.get("notes"), list)
            or (saved.get("cap") is not None and saved["cap"] not in {str(c) for c in Cap})
            or (usage is not None and not isinstance(usage, dict))
        ):
            return None
        if usage is not None:
            Usage(**usage)  # readable as one (a TypeError otherwise)
        return dict(saved)
    except (ValueError, KeyError, TypeError):
        return None


def saved_accumulator(saved: dict[str, Any]) -> Accumulator:
    """The Accumulator of a kept finished answer (see dump_finished)."""
    message = saved["message"]
    usage = saved.get("usage")
    return Accumulator(
        reasoning=[str(message.get("reasoning_content") or "")],
        content=[message["content"]],
        usage=Usage(**usage) if isinstance(usage, dict) else None,
        finish_reason=saved.get("finish_reason"),
        saw_reasoning_field="reasoning_content" in message,
    )


async def _keep_finished(lease: Lease, job: Job, value: str) -> None:
    """Keep Kimi's finished answer with the job (fenced: a lost lease still stops the run). Best effort
    otherwise: a Redis that does not answer now must not cost the answer in hand (the run goes on to
    deliver it; only a crash in the next moments would ask Kimi again, as before answers were kept)."""
    try:
        await lease.save_progress(job, final=value)
    except RedisError as exc:
        log.warning("finished answer not kept; delivering it anyway", extra={"error": describe(exc)})


async def _replay_final(
    turn: Turn,
    deps: Deps,
    writer: ReplyWriter,
    lease: Lease,
    job: Job,
    saved: dict[str, Any],
    call: ModelCall,
    history: bool,
) -> None:
    """Deliver and record the answer an earlier run of this job got from Kimi, as it was (its window, footer
    and, for an agent turn, its checkpointed steps as cards), without asking Kimi or reading Slack again."""
    acc = saved_accumulator(saved)
    log.info("replaying the answer an earlier run got from kimi", extra=turn_log(turn))
    outcome: Outcome | None = None
    if saved.get("agent"):
        writer.timeline = True
        cap = Cap(saved["cap"]) if saved.get("cap") else None
        outcome = replayed_outcome(resumed_steps(writer.resume), acc, cap, WriterView(writer))
    writer.start()
    writer.reasoning(acc.reasoning_text)
    writer.text(acc.text)
    if isinstance(saved.get("thinking_s"), int | float):
        writer.thinking_s = float(saved["thinking_s"])
    started = time.monotonic() - float(saved.get("elapsed_s") or 0)  # the earlier run's time in the footer
    notes = tuple(str(note) for note in saved["notes"])
    elapsed, thinking_s, reply_ts = await _deliver_final(
        turn,
        deps,
        writer,
        started,
        outcome.usage if outcome is not None else acc.usage,
        saved["shown_left_out"],
        acc.finish_reason,
        bool(outcome.reasoning if outcome is not None else acc.reasoning_text),
        extra=notes + agent_notes(outcome) if outcome is not None else notes,
        model=call.model,
    )
    await _record(
        turn,
        deps,
        lease,
        job,
        acc,
        saved["left_out"],
        saved["estimated"],
        reply_ts,
        elapsed,
        history=history,
        thinking_s=thinking_s,
        call=call,
        agent=outcome,
    )


async def _with_files(
    deps: Deps,
    turn: Turn,
    entries: list[dict[str, Any]],
    first: int,
    call: ModelCall,
    room: int,
    calibration: float,
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The entries to send with their files read in (bot/files; cached per file, so every turn sends the
    same bytes), and footer notes naming the files of the unanswered messages that could not be used. A
    message's file texts are cut (the same way every turn) so it fits `room` tokens on its own. Files are
    fetched with the bot token of the workspace this job acts for."""
    if not any(e.get("files") for e in entries[first:]):
        return entries, ()
    team_bot = acting.current()
    token = team_bot.token if team_bot is not None else str(deps.slack.token or "")
    cache = FileCache(deps.redis, deps.settings.thread_ttl_seconds)
    reader = FileReader(deps.settings, cache, turn.team_id, token)
    try:
        return await with_files(
            reader,
            entries,
            first,
            images=call.profile.supports_image_in,
            model=call.model,
            max_message_tokens=room,
            calibration=calibration,
        )
    finally:
        await reader.close()


async def _deliver_final(
    turn: Turn,
    deps: Deps,
    writer: ReplyWriter,
    started: float,
    usage: Usage | None,
    left_out: int,
    finish_reason: str | None,
    has_reasoning: bool,
    *,
    extra: tuple[str, ...] = (),
    model: str,
) -> tuple[float, float, list[str]]:
    """The rest of the answer with its footer and buttons (and who stopped it); returns the elapsed and
    thinking seconds and the answer's messages."""
    elapsed = time.monotonic() - started
    thinking_s = writer.thinking_s if writer.thinking_s is not None else elapsed
    prompt_tokens = usage.prompt_tokens if usage else 0
    completion_tokens = usage.completion_tokens if usage else 0
    line = footer(
        model,
        elapsed,
        prompt_tokens,
        completion_tokens,
        left_out=left_out,
        truncated=finish_reason == "length",
        thinking_s=thinking_s,
        extra=extra,
    )
    ref = AnswerRef(turn.thread_ts, turn.ts, model, elapsed, prompt_tokens, completion_tokens)
    note = ""
    if writer.stopped:
        who = await deps.stops.requested_by(turn.channel, turn.ts)
        note = f"_:black_square_for_stop: Stopped{f' by <@{who}>' if who else ''}._"
    reply_ts = await writer.finish(answer_blocks(line, ref, has_reasoning=has_reasoning), note=note)
    return elapsed, thinking_s, reply_ts


async def _record(
    turn: Turn,
    deps: Deps,
    lease: Lease,
    job: Job,
    acc: Accumulator,
    start: int,
    estimated: int,
    reply_ts: list[str],
    elapsed: float,
    *,
    history: bool,
    thinking_s: float,
    call: ModelCall,
    agent: Outcome | None = None,
) -> None:
    """The answer and the job's completion in one step. Usage was recorded per request as it was paid for
    (the Meter); an agent turn's history entry is the final answer only, with a compact record of the tool
    calls (not replayed to the model)."""
    usage = acc.usage
    calibration_usage = usage
    if agent is not None:
        usage = agent.usage
        calibration_usage = agent.steps[0].usage if agent.steps else acc.usage  # the prompt `fit` estimated
    reasoning = agent.reasoning if agent is not None else acc.reasoning_text
    details = {"question": turn.text, "reasoning": reasoning, "thinking_s": round(thinking_s, 3)}
    if turn.reads_thread:  # Regenerate reads the thread again too
        details["reads_thread"] = True
    entries: list[dict[str, Any]] = []
    meta: dict[str, str | int | float] = {}
    if history:
        message = acc.message()
        if not call.profile.replays_reasoning and not message.get("tool_calls"):
            # This model ignores earlier turns' reasoning: keep it out of the history (Show reasoning reads
            # it from the turn's details), so every later turn reads and sends less.
            message.pop("reasoning_content", None)
        entries.append(
            {
                **message,
                "ts": reply_ts[0] if reply_ts else "",
                "reply_ts": reply_ts,
                "model": call.model,
                "usage": usage.__dict__ if usage else None,
                "thinking_s": round(thinking_s, 3),
                "elapsed_s": round(elapsed, 3),
                **({"tools": tool_record(agent)} if agent is not None and agent.steps else {}),
            }
        )
        if not turn.reads_thread:  # its `start` counted the thread read from Slack, not the stored history
            meta["start"] = start
        if calibration_usage and calibration_usage.prompt_tokens:
            meta["calibration"] = round(calibrate(estimated, calibration_usage.prompt_tokens), 4)
    await lease.complete(job, *entries, details=(turn.ts, details), **meta)
    log.info(
        "answered",
        extra=turn_log(
            turn,
            elapsed_s=round(elapsed, 3),
            thinking_s=round(thinking_s, 3),
            pieces=len(reply_ts),
            prompt_tokens=usage.prompt_tokens if usage else None,
            cached_tokens=usage.cached_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        ),
    )


# ---- the agent loop (tools offered) ---------------------------------------------------------------
def tool_context(turn: Turn, deps: Deps) -> ToolContext:
    return ToolContext(
        team_id=turn.team_id,
        user=turn.user,
        channel=turn.channel,
        thread_ts=turn.thread_ts,
        slack=deps.slack,
        redis=deps.redis,
        action_token=turn.action_token,
    )


def offer(tools: list[Tool], ctx: ToolContext) -> tuple[list[Tool], list[dict[str, Any]]]:
    """The tools usable for this turn and their definitions, from the registry: valid names, sanitised
    schemas (a tool that cannot be fixed is dropped and logged), at most 127 (read_more is the 128th),
    sorted by name, byte-stable on every request of the turn (the prefix cache)."""
    registry = registry_for(offered(tools, ctx))  # built once for the same tools, then reused
    return list(registry.tools), registry.definitions_list()


def resumed_steps(progress: dict[str, str]) -> list[Step]:
    """The steps an earlier run of this job finished (its checkpoint), in order."""
    steps = []
    index = 0
    while (raw := progress.get(f"step:{index}")) is not None:
        try:
            steps.append(Step.load(raw))
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable agent checkpoint; the turn resumes before it", extra={"step": index})
            break
        index += 1
    return steps


def tool_record(outcome: Outcome) -> list[dict[str, Any]]:
    """What the history keeps of a turn's tool calls: names, titles, outcomes and sources, no results."""
    return [
        {"name": c.name, "title": c.title, "ok": c.ok, **({"sources": list(c.sources)} if c.sources else {})}
        for step in outcome.steps
        for c in step.calls
    ]


def agent_notes(outcome: Outcome) -> tuple[str, ...]:
    notes = []
    if outcome.calls:
        steps = len(outcome.steps)
        calls = f"{outcome.calls} tool call{'s' if outcome.calls != 1 else ''}"
        notes.append(f"{calls} in {steps} step{'s' if steps != 1 else ''}")
    if outcome.cap is not None:
        notes.append(f"stopped using tools: {CAP_NOTES[outcome.cap]}")
    return tuple(notes)


async def _agent_answer(
    turn: Turn,
    deps: Deps,
    writer: ReplyWriter,
    kimi_task: list[asyncio.Task[Any]],
    lease: Lease,
    job: Job,
    fitted: Fit,
    tools: list[Tool],
    definitions: list[dict[str, Any]],
    ctx: ToolContext,
    on_event: Callable[[Event], Awaitable[None]],
    left_out: int,
    history: bool,
    meter: Meter,
    calibration: float,
    call: ModelCall,
) -> None:
    """The answer with tools: the agent loop asks Kimi, runs the calls it makes and asks again until it
    answers; each call shows as a task card. Every finished step is checkpointed (fenced) in the job's
    progress, so a re-run after a crash resumes after it; Stop cancels the loop (the model request and
    any running call) and what was done so far is delivered."""
    settings = deps.settings
    kimi = deps.kimi
    approvals = deps.approvals or Approvals(deps.redis)
    caps = Caps.from_settings(settings, call.profile.context_window - kimi.budget_of(call))
    resume = resumed_steps(writer.resume)

    async def complete(
        messages: list[dict[str, Any]], definitions: list[dict[str, Any]], tool_choice: str | None
    ) -> Accumulator:
        return await kimi.complete(
            messages,
            on_event=on_event,
            on_restart=writer.restarted,
            tools=definitions,
            tool_choice=tool_choice,
            meter=meter,  # each step reserved before it is asked and recorded after (Stop's cut one too)
            call=call,
            on_send=writer.start,  # the sign of life right behind the first request (see the plain path)
        )

    async def checkpoint(index: int, step: Step) -> None:
        deps.metrics.tools_ran(step.calls)  # each finished step once (a resumed run replays, not reruns)
        await lease.save_progress(job, **{f"step:{index}": step.dump()})

    async def approve(call: Planned, tool: Tool) -> bool | None:
        return await ask_approval(writer, approvals, turn, call, tool, caps.approval_timeout_s)

    loop = AgentLoop(
        tools,
        complete=complete,
        ctx=ctx,
        caps=caps,
        definitions=definitions,
        view=WriterView(writer),
        approve=approve,
        checkpoint=checkpoint,
        guard=lease.guard,  # before any tool that changes things: only while the turn is still ours
        calibration=calibration,
    )
    writer.timeline = True
    started = time.monotonic()
    log.info(
        "asking kimi with tools",
        extra=turn_log(turn, messages=len(fitted.messages), tools=len(tools), resumed_steps=len(resume)),
    )
    if writer.stopped:  # Stop was pressed while the thread was summarised: Kimi is not asked for the answer
        outcome = loop.partial("", writer.answer)
    else:
        task = asyncio.create_task(loop.run(fitted.messages, resume))
        kimi_task.append(task)
        try:
            outcome = await task
        except asyncio.CancelledError:
            if not writer.stopped:
                raise
            outcome = loop.partial("", writer.answer)
        except Exception:
            writer.start()  # refused before its first request was sent (see the plain path)
            raise
        else:  # kept before the last Slack write: a run that dies after it is replayed (see the plain path)
            await writer.text_complete()
            await _keep_finished(
                lease,
                job,
                dump_finished(
                    outcome.final,
                    time.monotonic() - started,
                    writer.thinking_s,
                    cap=outcome.cap,
                    left_out=left_out,
                    shown_left_out=left_out - fitted.summarised,
                    notes=fitted.notes,
                    estimated=fitted.estimated_tokens,
                    agent=True,
                ),
            )
    elapsed, thinking_s, reply_ts = await _deliver_final(
        turn,
        deps,
        writer,
        started,
        outcome.usage,
        left_out - fitted.summarised,  # the rest is in the summary at the head
        outcome.final.finish_reason,
        bool(outcome.reasoning),
        extra=(*fitted.notes, *agent_notes(outcome)),
        model=call.model,
    )
    log.info(
        "agent loop done",
        extra=turn_log(
            turn,
            steps=len(outcome.steps),
            calls=outcome.calls,
            cap=str(outcome.cap) if outcome.cap else None,
            stopped=writer.stopped,
        ),
    )
    await _record(
        turn,
        deps,
        lease,
        job,
        outcome.final,
        left_out,
        fitted.estimated_tokens,
        reply_ts,
        elapsed,
        history=history,
        thinking_s=thinking_s,
        call=call,
        agent=outcome,
    )
