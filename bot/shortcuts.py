"""The message shortcuts "Ask Kimi about this" and "Summarize thread", once their payload is a job.

The handler (handlers/shortcuts.py) only queues a job; the worker runs it here, like /kimi: post who asked
what in the message's thread (once, even if the job runs again), then queue the answer in that thread as an
ordinary turn. Where the bot cannot post, or the asker may not use it, the asker is told privately through
the shortcut's response_url.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.admission import NOT_ENABLED, Access, AccessPolicy
from bot.deps import Deps
from bot.pipeline import SHORTCUT_EVENT, speaker_name
from bot.queue import Job, Lease
from bot.slack.reply import CANNOT_POST_HERE, api_call, is_transient, slack_error
from bot.store import AccessFacts
from bot.turn import Source, ThreadKey, Turn, file_refs
from bot.worker import RunLater

log = logging.getLogger(__name__)

SHORTCUT_JOB = "shortcut"
ASK, SUMMARY = "ask", "summary"
ANNOUNCE_LIMIT = 3_000  # the "asked" post quotes the question; the full text goes to the model
# A run notes when it is about to post "asked" (progress `announcing`, a Unix time): a re-run looks for that
# post only among messages since then, less this much (our clock and Slack's may differ).
ANNOUNCE_SKEW_S = 300.0
QUOTE_LIMIT = 30_000  # a Slack message is at most 40,000 characters; this keeps the quote in one turn

NOT_IN_CHANNEL = (
    "I'm not a member of this conversation, so I can't answer in its thread. Add me to the channel "
    "(`/invite @Kimi`) and use the shortcut again."
)
SUMMARY_QUESTION = (
    "Summarize this thread for the people in it. Cover every message above, and give: the main points; "
    "who decided what (name each person with their decision); and the open questions nobody has settled "
    "yet, with who raised them. Keep it short, and say so if there is nothing to summarize."
)

# What a job keeps of the message a shortcut was used on.
MESSAGE_FIELDS = ("ts", "thread_ts", "user", "bot_id", "username", "text", "subtype")


def target_message(message: Any) -> dict[str, Any] | None:
    """The shortcut payload's `message`, trimmed to what the answer needs; None when it has no ts."""
    if not isinstance(message, dict) or not isinstance(message.get("ts"), str) or not message["ts"]:
        return None
    kept: dict[str, Any] = {k: message[k] for k in MESSAGE_FIELDS if isinstance(message.get(k), str)}
    bot_name = (
        (message.get("bot_profile") or {}).get("name") if isinstance(message.get("bot_profile"), dict) else ""
    )
    if bot_name:
        kept["bot_name"] = str(bot_name)
    files = file_refs(message.get("files"))
    if files:
        kept["files"] = list(files)
    return kept


def thread_of(message: dict[str, Any]) -> str:
    """The thread a message is in: its parent's ts, or its own for a top-level message."""
    return str(message.get("thread_ts") or message.get("ts") or "")


def shortcut_thread(team: str, channel: str, key: str) -> ThreadKey:
    """Where a shortcut job waits: a queue of one (like /kimi's), so the "asked" post goes out at once,
    not after an answer running in the message's thread."""
    return ThreadKey(team, channel, f"shortcut.{key}")


def shortcut_job(
    kind: str,
    *,
    key: str,
    team: str,
    channel: str,
    user: str,
    message: dict[str, Any],
    response_url: str,
    question: str = "",
) -> dict[str, Any]:
    """A shortcut's work: `key` (the shortcut's trigger or the modal's token) makes it one job however
    often Slack delivers it."""
    return {
        "job_id": f"shortcut:{key}",
        "shortcut": kind,
        "key": key,
        "team": team,
        "channel": channel,
        "user": user,
        "message": message,
        "question": question,
        "response_url": response_url,
    }


def announcement(kind: str, user: str, question: str) -> str:
    """The post in the thread that says who asked what (the answer is threaded under it)."""
    if kind == SUMMARY:
        return f"<@{user}> asked for a summary of this thread."
    if len(question) > ANNOUNCE_LIMIT:
        question = question[: ANNOUNCE_LIMIT - 1] + "…"
    return f"<@{user}> asked about this message: {question}"


def quoted(question: str, author: str, message: dict[str, Any]) -> str:
    """The question with the message it is about, quoted with its author's name: the model must see the
    message, and the thread's stored history may not hold it (the bot may never have read that thread)."""
    text = str(message.get("text") or "")
    if len(text) > QUOTE_LIMIT:
        text = text[:QUOTE_LIMIT] + " …(cut)"
    names = [str(f.get("name") or f.get("title") or f.get("id")) for f in message.get("files") or []]
    attached = f" (attached: {', '.join(names)})" if names else ""
    body = "\n".join(f"> {line}" for line in text.splitlines()) or "> (no text)"
    return f"{question}\n\nThe message I am asking about, from {author}{attached}:\n{body}"


async def author_of(deps: Deps, team: str, message: dict[str, Any]) -> str:
    """The name people see on the message: a person's display name, or a bot's."""
    if message.get("bot_id") or message.get("subtype") == "bot_message":
        return f"{message.get('bot_name') or message.get('username') or 'a bot'} (bot)"
    user = str(message.get("user") or "")
    return await speaker_name(deps, team, user) if user else "someone"


async def announce_in_thread(deps: Deps, channel: str, thread_ts: str, text: str, key: str) -> str | None:
    """Post "@user asked …" in the thread; its ts is the question the answer goes under. None when the bot
    cannot post there (not a member, an archived channel…); other errors raise. The post carries the job's
    key as metadata, so a re-run can find it."""
    args = {
        "channel": channel,
        "thread_ts": thread_ts,
        "text": text,
        "unfurl_links": False,
        "metadata": {"event_type": SHORTCUT_EVENT, "event_payload": {"key": key}},
    }
    try:
        response = await api_call(deps.slack, "chat.postMessage", args)
    except SlackApiError as exc:
        if slack_error(exc) not in CANNOT_POST_HERE:
            raise  # Slack failing, not refusing: the job runs again (and, given up, tells the asker)
        log.info(
            "cannot post in the shortcut's thread", extra={"channel": channel, "error": slack_error(exc)}
        )
        return None
    return str(response["ts"])


def announcing_now() -> str:
    """The progress value `announcing` (set just before an "asked" post): when, for a re-run's search."""
    return f"{time.time() - ANNOUNCE_SKEW_S:.6f}"


def search_from(announcing: str) -> str:
    """The `oldest` a re-run's search for its "asked" post starts at ('' for a job noted before this was
    kept: `announcing` was "1", and the search reads everything)."""
    try:
        since = float(announcing)
    except ValueError:
        return ""
    return f"{since:.6f}" if since > 1 else ""


async def find_earlier_post(
    announcing: str, find: Callable[[str], Awaitable[str | None]], what: str
) -> str | None:
    """The post an earlier run made after noting `announcing` and died before noting the post: `find` looks
    since then, then (our clock ahead of Slack's by more than the skew) everywhere it looks. A transient
    Slack error raises RunLater (posting again while it is unknown could post it twice); any other failed
    search raises its SlackApiError: unknown is not "never posted"."""
    try:
        since = search_from(announcing)
        ts = await find(since)
        if not ts and since:
            ts = await find("")
    except SlackApiError as exc:
        error = slack_error(exc)
        if is_transient(error):
            raise RunLater(f"could not look for an earlier {what}: {error}") from exc
        raise
    return ts


async def find_in_thread(deps: Deps, channel: str, thread_ts: str, key: str, oldest: str = "") -> str | None:
    """The ts of the "asked" post an earlier run of this job made and died before noting; None when there
    is none (since `oldest`). A failed search raises SlackApiError: unknown is not "never posted"."""
    cursor: str | None = None
    while True:
        response = await deps.slack.conversations_replies(
            channel=channel,
            ts=thread_ts,
            limit=200,
            cursor=cursor,
            oldest=oldest or None,  # None: not sent
            include_all_metadata=True,
        )
        for message in response.get("messages") or []:
            metadata = (message.get("metadata") or {}) if isinstance(message, dict) else {}
            if (
                metadata.get("event_type") == SHORTCUT_EVENT
                and (metadata.get("event_payload") or {}).get("key") == key
            ):
                return str(message.get("ts") or "") or None
        cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
        if not cursor:
            return None


async def tell_privately(deps: Deps, job: Job, text: str) -> None:
    """Only the asker sees it: through the shortcut's response_url (which works where the bot is not a
    member), else as an ephemeral message."""
    data = job.data
    response_url = str(data.get("response_url") or "")
    try:
        if response_url:
            await AsyncWebhookClient(response_url).send(
                text=text, response_type="ephemeral", replace_original=False
            )
        else:
            await deps.slack.chat_postEphemeral(
                channel=str(data.get("channel") or ""), user=str(data.get("user") or ""), text=text
            )
    except Exception as exc:  # nothing more to do: the asker sees no answer and may try again
        log.warning("shortcut notice not delivered", extra={"error": type(exc).__name__})


async def run_shortcut(
    deps: Deps, lease: Lease, job: Job, queue_turn: Callable[[Deps, Turn], Awaitable[bool]]
) -> None:
    """Check the asker, post who asked what in the message's thread (once), and queue its answer there."""
    data = job.data
    kind = str(data.get("shortcut") or "")
    team, channel, user = (str(data.get(k) or "") for k in ("team", "channel", "user"))
    key = str(data.get("key") or job.job_id)
    message = target_message(data.get("message"))
    question = str(data.get("question") or "").strip()
    if (
        kind not in (ASK, SUMMARY)
        or message is None
        or not (channel and user)
        or (kind == ASK and not question)
    ):
        log.warning("unreadable shortcut job dropped", extra={"job": job.job_id})
        await lease.complete(job)
        return
    thread_ts = thread_of(message)
    progress = await lease.progress(job)
    ts = progress.get("announce_ts")
    if not ts and progress.get("announcing"):  # an earlier run may have posted it and died before noting it
        try:
            ts = await find_earlier_post(
                progress["announcing"],
                lambda since: find_in_thread(deps, channel, thread_ts, key, since),
                "shortcut post",
            )
        except SlackApiError as exc:
            # It cannot be found (a missing scope...): not posted again (at worst an earlier post stays
            # unanswered, never twice); the asker hears why with a reference (the worker's failure path).
            error = slack_error(exc)
            raise RuntimeError(f"could not look for an earlier shortcut post: {error}") from exc
    if not ts:
        if not progress.get("announcing"):  # the access rule, as for a mention (once: a re-run has passed)
            access = Access(AccessPolicy.from_settings(deps.settings), AccessFacts(deps.redis), deps.slack)
            why = await access.refusal(team, user, channel)
            if why is not None:
                log.info("refused", extra={"why": why, "user": user, "channel": channel})
                await lease.complete(job)
                await tell_privately(deps, job, NOT_ENABLED)
                return
        await lease.save_progress(job, announcing=announcing_now())
        ts = await announce_in_thread(deps, channel, thread_ts, announcement(kind, user, question), key)
    if ts is None:
        await lease.complete(job)
        await tell_privately(deps, job, NOT_IN_CHANNEL)
        return
    await lease.save_progress(job, announce_ts=ts)
    if kind == SUMMARY:
        turn = Turn(
            Source.SHORTCUT,
            team,
            channel,
            user,
            SUMMARY_QUESTION,
            ts=ts,
            thread_ts=thread_ts,
            reads_thread=True,
        )
    else:
        text = quoted(question, await author_of(deps, team, message), message)
        files = file_refs(message.get("files"))
        turn = Turn(Source.SHORTCUT, team, channel, user, text, ts=ts, thread_ts=thread_ts, files=files)
    await queue_turn(deps, turn)  # deduplicated by the "asked" post's ts: once, even on a re-run
    await lease.complete(job)
