"""Message shortcuts: "Forget this thread" (`kimi_forget_thread`) deletes what kimibot keeps of the thread of
the message it is used on; "Ask Kimi about this" (`kimi_ask_about_message`) opens a modal for a question about
the message and answers it in the message's thread; "Summarize thread" (`kimi_summarize_thread`) answers in
the thread with a summary of it. Each listener only queues a job (or opens the modal) before its ack."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from redis.exceptions import RedisError
from slack_bolt.async_app import AsyncAck, AsyncApp

from bot.admission import NOT_ENABLED, Access
from bot.deps import Deps
from bot.shortcuts import (
    ASK,
    NOT_IN_CHANNEL,
    SHORTCUT_JOB,
    SUMMARY,
    shortcut_job,
    shortcut_thread,
    target_message,
)
from bot.slack.settings_view import notice_modal
from bot.store import ShortcutMessages
from bot.turn import ThreadKey
from bot.work import forget_job

log = logging.getLogger(__name__)

FORGET_THREAD = "kimi_forget_thread"
ASK_ABOUT_MESSAGE = "kimi_ask_about_message"
SUMMARIZE_THREAD = "kimi_summarize_thread"
ASK_VIEW = "kimi_ask_about_message_form"  # the modal's callback_id
QUESTION_BLOCK = QUESTION_ACTION = "question"
QUESTION_MAX_CHARS = 3_000  # a plain_text_input holds at most 3,000 characters
PREVIEW_CHARS = 280
# Slack waits 3 s for the ack, and the trigger_id for views.open lives as long: the access check (users.info
# when guests or user groups are restricted) and the membership check (conversations.info) get a second,
# side by side; the job checks both again in any case.
ACCESS_CHECK_S = 1.0
# The checks and the form's stash (Redis) run side by side within PREPARE_S, views.open by OPEN_DEADLINE_S;
# a submission's two Redis calls get SUBMIT_DEADLINE_S: whatever is slow, the ack goes out before 3 s.
PREPARE_S = 1.5
OPEN_DEADLINE_S = 2.5
SUBMIT_DEADLINE_S = 2.5
FORM_GONE = "This form is out of date: close it and use the shortcut on the message again."
EMPTY = "Type a question about the message."
FORM_UNAVAILABLE = "I couldn't open the question form just now. Please use the shortcut again in a moment."
NOT_TAKEN = "I couldn't take your question just now. Please press Ask again in a moment."


def _where(body: dict[str, Any]) -> tuple[str, str, str]:
    """(team, channel, user) of a shortcut or view payload ('' where the payload has none)."""
    team = str((body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id") or "")
    channel = str((body.get("channel") or {}).get("id") or "")
    user = str((body.get("user") or {}).get("id") or "")
    return team, channel, user


def ask_modal(token: str, preview: str) -> dict[str, Any]:
    """The question form; `token` names the stashed message (ShortcutMessages)."""
    if len(preview) > PREVIEW_CHARS:
        preview = preview[: PREVIEW_CHARS - 1] + "…"
    return {
        "type": "modal",
        "callback_id": ASK_VIEW,
        "private_metadata": token,
        "title": {"type": "plain_text", "text": "Ask Kimi"},
        "submit": {"type": "plain_text", "text": "Ask"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "context",
                "elements": [
                    {"type": "plain_text", "text": f"About: {preview or '(a message without text)'}"}
                ],
            },
            {
                "type": "input",
                "block_id": QUESTION_BLOCK,
                "label": {"type": "plain_text", "text": "Your question"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": QUESTION_ACTION,
                    "multiline": True,
                    "max_length": QUESTION_MAX_CHARS,
                    "placeholder": {"type": "plain_text", "text": "What would you like to know about it?"},
                },
                "hint": {
                    "type": "plain_text",
                    "text": "I answer in the message's thread, where everyone sees it.",
                },
            },
        ],
    }


def question_of(view: dict[str, Any]) -> str:
    values = ((view.get("state") or {}).get("values") or {}).get(QUESTION_BLOCK) or {}
    return str((values.get(QUESTION_ACTION) or {}).get("value") or "").strip()


async def _bot_absent(deps: Deps, channel: str) -> bool:
    """True when Slack says the bot is not a member of the channel (conversations.info `is_member`), so the
    form would be filled in for nothing. Anything less certain (a private channel or DM Slack hides from the
    bot, an error, a slow answer) is False: the job finds out when it posts, and says so then."""
    try:
        async with asyncio.timeout(ACCESS_CHECK_S):
            response = await deps.slack.conversations_info(channel=channel)
    except Exception:
        return False
    return (response.get("channel") or {}).get("is_member") is False


async def _refused(access: Access | None, team: str, user: str, channel: str) -> bool:
    """The access rule within ACCESS_CHECK_S; a slower or failed check lets the form open (the job checks
    again)."""
    if access is None or access.policy.open:
        return False
    try:
        async with asyncio.timeout(ACCESS_CHECK_S):
            return await access.refusal(team, user, channel) is not None
    except (TimeoutError, RedisError):
        return False


async def _stashed(stash: ShortcutMessages, token: str, form: dict[str, Any]) -> bool:
    """Keep the message for the form's submission; False when Redis fails (no form to open then)."""
    try:
        await stash.put(token, form)
    except RedisError as exc:
        log.warning("ask form not stashed", extra={"error": type(exc).__name__})
        return False
    return True


def register(app: AsyncApp, deps: Deps, access: Access | None = None) -> None:
    stash = ShortcutMessages(deps.redis)

    async def on_forget_thread(ack: AsyncAck, body: dict[str, Any]) -> None:
        message = body.get("message") or {}
        team, channel, user = _where(body)
        thread_ts = str(message.get("thread_ts") or message.get("ts") or body.get("message_ts") or "")
        if not (channel and thread_ts and user):
            await ack()
            return
        thread = ThreadKey(team, channel, thread_ts)
        action_ts = str(body.get("action_ts") or body.get("trigger_id") or "")
        # A job of the thread, so it runs after an answer in progress there, never in the middle of one;
        # one Redis call, deduplicated by the shortcut's action_ts. The worker confirms privately.
        await deps.queue.put(
            thread,
            "forget",
            forget_job(thread, user, action_ts, ephemeral=True),
            dedup_ts=f"forget.{action_ts}",
            dedup_ttl_s=deps.settings.dedup_ttl_seconds,
        )
        await ack()

    async def on_summarize(ack: AsyncAck, body: dict[str, Any]) -> None:
        team, channel, user = _where(body)
        message = target_message(body.get("message"))
        key = str(body.get("trigger_id") or body.get("action_ts") or "")
        if not (channel and user and key) or message is None:
            log.info("summarize shortcut without its message, channel or user", extra={"channel": channel})
            await ack()
            return
        job = shortcut_job(
            SUMMARY,
            key=key,
            team=team,
            channel=channel,
            user=user,
            message=message,
            response_url=str(body.get("response_url") or ""),
        )
        # The access rule and the "asked" post are the job's (users.info must not hold the ack); one Redis
        # call, deduplicated by the trigger: a redelivered shortcut is answered once.
        await deps.queue.put(
            shortcut_thread(team, channel, key),
            SHORTCUT_JOB,
            job,
            dedup_ts=f"shortcut.{key}",
            dedup_ttl_s=deps.settings.dedup_ttl_seconds,
        )
        await ack()

    async def on_ask(ack: AsyncAck, body: dict[str, Any]) -> None:
        team, channel, user = _where(body)
        message = target_message(body.get("message"))
        trigger = str(body.get("trigger_id") or "")
        if not (channel and user and trigger) or message is None:
            log.info("ask shortcut without its message, channel, user or trigger", extra={"channel": channel})
            await ack()
            return
        started = asyncio.get_running_loop().time()
        deadline = started + OPEN_DEADLINE_S  # the trigger_id's life
        token = secrets.token_hex(16)
        form = {"team": team, "channel": channel, "user": user, "message": message}
        form["response_url"] = str(body.get("response_url") or "")
        try:  # the stash is written while the checks run: a refused form's stash just expires
            async with asyncio.timeout_at(started + PREPARE_S):
                refused, absent, stashed = await asyncio.gather(
                    _refused(access, team, user, channel),
                    _bot_absent(deps, channel),
                    _stashed(stash, token, form),
                )
        except TimeoutError:
            log.warning("ask form not ready in time", extra={"channel": channel})
            refused, absent, stashed = False, False, False
        if refused or absent:
            view = notice_modal(NOT_ENABLED if refused else NOT_IN_CHANNEL)
        elif not stashed:  # Redis slow or failing: say so, rather than open nothing
            view = notice_modal(FORM_UNAVAILABLE)
        else:
            view = ask_modal(token, str(message.get("text") or ""))
        try:
            async with asyncio.timeout_at(deadline):
                await deps.slack.views_open(trigger_id=trigger, view=view)
        except Exception as exc:  # nothing was queued; the shortcut can be used again
            log.warning("ask form not opened", extra={"channel": channel, "error": type(exc).__name__})
        await ack()

    async def on_ask_submit(ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        _, _, submitter = _where(body)
        token = str(view.get("private_metadata") or "")
        question = question_of(view)
        if not question:
            await ack(response_action="errors", errors={QUESTION_BLOCK: EMPTY})
            return
        try:  # both Redis calls before the ack, bounded: a slow Redis gets the form a sentence, not silence
            async with asyncio.timeout(SUBMIT_DEADLINE_S):
                queued = await _queue_question(token, submitter, question)
        except (TimeoutError, RedisError) as exc:
            log.warning("ask form not taken", extra={"error": type(exc).__name__})
            await ack(response_action="errors", errors={QUESTION_BLOCK: NOT_TAKEN})
            return
        if not queued:
            await ack(response_action="errors", errors={QUESTION_BLOCK: FORM_GONE})
            return
        await ack()

    async def _queue_question(token: str, submitter: str, question: str) -> bool:
        """Queue the submitted question as a job; False when its form is gone (expired, or not theirs).
        Deduplicated by the form's token: a submission delivered twice (or sent again after a timeout
        whose write went through) is answered once."""
        form = await stash.get(token) if token else None
        message = target_message((form or {}).get("message"))
        if form is None or message is None or form.get("user") != submitter:
            return False
        team, channel = str(form.get("team") or ""), str(form.get("channel") or "")
        job = shortcut_job(
            ASK,
            key=token,
            team=team,
            channel=channel,
            user=submitter,
            message=message,
            response_url=str(form.get("response_url") or ""),
            question=question,
        )
        await deps.queue.put(
            shortcut_thread(team, channel, token),
            SHORTCUT_JOB,
            job,
            dedup_ts=f"shortcut.{token}",
            dedup_ttl_s=deps.settings.dedup_ttl_seconds,
        )
        return True

    app.shortcut(FORGET_THREAD)(on_forget_thread)
    app.shortcut(SUMMARIZE_THREAD)(on_summarize)
    app.shortcut(ASK_ABOUT_MESSAGE)(on_ask)
    app.view(ASK_VIEW)(on_ask_submit)
