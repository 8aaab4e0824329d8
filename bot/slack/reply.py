"""ReplyWriter: the only code that writes into a thread (or, for /kimi off-channel, a response_url).

One writer per turn. Its life: `begin` posts a placeholder at once (the sign of life, with a Stop
button); `reasoning`/`text` only record what Kimi said and wake the flusher, so reading Kimi never
waits on Slack; the flusher shows the latest thought while Kimi thinks and streams the answer once
it comes (native chat.startStream/appendStream/stopStream), flushed by size and by time; `finish`
delivers the rest with the footer and buttons.

`sent` counts the answer characters Slack has confirmed. Every fallback resumes from it, so no text
is lost or repeated: a stream Slack closed (about 5 minutes, `message_not_in_streaming_state`)
continues in a new stream message; a stream that cannot start falls back to post-and-update
(chat.update, <= 4,000 characters a message); a message that fills up continues in the next one,
closing and reopening an open code fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.slack.blocks import (
    GREETING,
    SUGGESTED_PROMPTS,
    bare_card,
    latest_thought,
    status_line,
    task_card,
    thinking_view,
    thought_summary,
)
from bot.slack.pacing import Pacer
from bot.slack.render import (
    CHAT_UPDATE_TEXT_LIMIT,
    MARKDOWN_TEXT_LIMIT,
    SECTION_TEXT_LIMIT,
    STREAM_CHUNK_BLOCKS_LIMIT,
    BroadcastGuard,
    close_fence,
    cut_point,
    fitting_cut,
    neutralise_broadcasts,
    neutralise_fields,
    open_fence,
    split_markdown,
    whole_words,
)
from bot.turn import Turn

log = logging.getLogger(__name__)

# Errors that mean "the bot cannot post here": the /kimi path then answers through response_url.
CANNOT_POST_HERE = frozenset({"not_in_channel", "channel_not_found", "is_archived", "restricted_action"})
STREAM_GONE = frozenset({"message_not_in_streaming_state", "message_not_found", "streaming_state_conflict"})
STOPPED_BY_USER = "stopped_by_user"
POSTING_METHODS = frozenset({"chat.postMessage", "chat.startStream"})  # the calls that add a message
OPTIONAL_HEADROOM = 0.5  # below this share of a method's burst, optional calls wait for the final ones
STATUS_MESSAGE_LIMIT = 50  # assistant.threads.setStatus loading_messages: 1-10 strings of <= 50 characters
TITLE_LIMIT = 80
LOADING_MESSAGES = ("Reading the thread…", "Thinking it through…", "Checking the details…")


SIGN_OF_LIFE_WAIT_S = 1.0  # a placeholder further off than this: react to the question first
HEARD_REACTION = "eyes"
WORD_HOLD_MAX = 200  # a part-word longer than this (a URL, a blob) goes out without waiting for its end


@dataclass(frozen=True)
class Pace:
    """How the writer spaces its calls. Defaults follow Slack's limits; tests shrink the times."""

    first_flush_s: float = (
        1.0  # wait this long after the first text before streaming (short answers: 1 update)
    )
    max_latency_s: float = 1.5  # text waits at most this long before it is flushed
    min_call_interval_s: float = 1.0  # at most about one call per second per answer
    flush_chars: int = 600  # flush earlier when this much text is waiting
    thinking_update_s: float = 3.0  # how often the thinking view changes (chat.update is Tier 3)
    tick_s: float = 0.25
    stream_message_chars: int = 10_000  # start a new stream message beyond this (markdown limit 12,000)
    stream_max_age_s: float = 240.0  # Slack closes streams at about 5 minutes: roll over before that
    update_message_chars: int = CHAT_UPDATE_TEXT_LIMIT - 100  # post-and-update fallback, per message
    # Task cards per stream message (each card is a block; room is left for the text's own blocks).
    cards_per_message: int = STREAM_CHUNK_BLOCKS_LIMIT - 10
    cards_max_wait_s: float = 8.0  # card changes wait at most this long when Slack's budget runs low


# Slack errors that say "try again later", not "never": a search that failed with one of these may find the
# post later; any other error (not_in_channel, channel_not_found, missing_scope...) will not change.
TRANSIENT_SLACK_ERRORS = frozenset(
    {
        "ratelimited",
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
        "unknown_error",
    }
)


def is_transient(error: str) -> bool:
    """Whether a Slack error code (slack_error's) may go away by itself: rate limits, Slack's own faults,
    and a 5xx or unreadable page from something in front of it."""
    return error in TRANSIENT_SLACK_ERRORS or error.startswith("http_5") or error == "http_429"


def slack_error(exc: BaseException) -> str:
    """Slack's error code of a failed call, read without trusting the body: what answered may be a
    proxy or load balancer (an Envoy 503 in text, an HTML 403), which slack_sdk hands over as a str,
    bytes, {} or the raw aiohttp response. Those give `http_<status>`; nothing readable gives
    `unknown_error`. Called inside `except` blocks, so it must never raise."""
    response = getattr(exc, "response", None)
    data = getattr(response, "data", response)  # SlackResponse.data, or the body itself
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    status = getattr(response, "status_code", None) or getattr(response, "status", None)
    if isinstance(status, int) and status != 200:
        return f"http_{status}"
    return "unknown_error"


def describe(exc: BaseException) -> str:
    """Slack's error code for API errors, the exception's type otherwise (for logs)."""
    return slack_error(exc) if isinstance(exc, SlackApiError) else type(exc).__name__


# What slack_sdk itself raises on a page that is not Slack's JSON, instead of SlackApiError: an
# AttributeError for a 200 text/plain body (its validate() calls .get on the str), a ValueError for a
# binary one (formatting its own error message).
UNREADABLE_BODY_ERRORS = (AttributeError, ValueError)


def unreadable(method: str, cause: str) -> SlackApiError:
    """The SlackApiError for an answer that is not Slack's JSON; slack_error() reads it as
    `unreadable_response`."""
    error: SlackApiError = SlackApiError(  # type: ignore[no-untyped-call]
        f"{method}: unreadable answer ({cause})", {"ok": False, "error": "unreadable_response"}
    )
    return error


async def api_call(client: AsyncWebClient, method: str, args: dict[str, Any]) -> Any:
    """One Web API call with broadcasts neutralised in the text it carries, and every answer that is
    not Slack's JSON raised as SlackApiError, so callers handle a proxy's page like any Slack error."""
    try:
        response = await client.api_call(method, json=neutralise_fields(args))
    except SlackApiError:
        raise
    except UNREADABLE_BODY_ERRORS as exc:
        raise unreadable(method, type(exc).__name__) from exc
    if not isinstance(response.data, dict):
        raise unreadable(method, type(response.data).__name__)
    return response


QUESTION_EVENT = "kimibot_question"  # message metadata on a /kimi question, to find it again after a crash
ANNOUNCEMENT_SEARCH_PAGES = 10  # of 200 messages: a channel's messages in the minutes since it was posted


async def announce_question(
    client: AsyncWebClient, channel: str, user: str, question: str, trigger_id: str = ""
) -> str | None:
    """Post "@user asked: …" for /kimi; its ts is the thread of the answer. None if we can't post here.
    The post carries the command's trigger id as message metadata, so a re-run can find it."""
    args: dict[str, Any] = {
        "channel": channel,
        "text": f"<@{user}> asked: {question}"[:MARKDOWN_TEXT_LIMIT],
        "unfurl_links": False,
    }
    if trigger_id:
        args["metadata"] = {"event_type": QUESTION_EVENT, "event_payload": {"trigger_id": trigger_id}}
    try:
        response = await api_call(client, "chat.postMessage", args)
    except SlackApiError as exc:
        # not_in_channel and friends are expected; anything else is logged, and both fall back.
        level = logging.INFO if slack_error(exc) in CANNOT_POST_HERE else logging.WARNING
        log.log(
            level,
            "cannot post the question in the channel",
            extra={"channel": channel, "error": slack_error(exc)},
        )
        return None
    return str(response["ts"])


async def find_announcement(
    client: AsyncWebClient, channel: str, trigger_id: str, oldest: str = ""
) -> str | None:
    """The ts of a /kimi question posted earlier for this trigger (a run that died before noting it): it
    is recent, so among the channel's messages since `oldest` (when the run was about to post), else among
    its newest 200. None when there is none; a failed search raises SlackApiError (unknown is not "never
    posted")."""
    args: dict[str, Any] = {"channel": channel, "limit": 200, "include_all_metadata": True}
    if oldest:
        args["oldest"] = oldest
    for _ in range(ANNOUNCEMENT_SEARCH_PAGES if oldest else 1):
        response = await api_call(client, "conversations.history", args)
        for message in response.get("messages") or []:
            metadata = message.get("metadata") or {} if isinstance(message, dict) else {}
            payload = metadata.get("event_payload") or {}
            if metadata.get("event_type") == QUESTION_EVENT and payload.get("trigger_id") == trigger_id:
                return str(message.get("ts") or "") or None
        args["cursor"] = (response.get("response_metadata") or {}).get("next_cursor") or ""
        if not args["cursor"]:
            break
    return None


async def greet_assistant_thread(client: AsyncWebClient, channel: str, thread_ts: str | None) -> None:
    """A new thread in Slack's assistant panel, or (no thread_ts) the Messages tab: say hello and offer a
    few prompts."""
    await client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=GREETING)
    await client.assistant_threads_setSuggestedPrompts(
        channel_id=channel, thread_ts=thread_ts, prompts=list(SUGGESTED_PROMPTS)
    )


def markdown_blocks(text: str) -> list[dict[str, Any]]:
    return [{"type": "markdown", "text": text}]


def fallback_text(text: str) -> str:
    """The plain `text` that goes with blocks (notifications, old clients), within chat.update's limit."""
    return text if len(text) <= SECTION_TEXT_LIMIT else text[: SECTION_TEXT_LIMIT - 1] + "…"


class ReplyWriter:
    """Writes one turn's placeholder, thinking view, streamed answer and notices."""

    def __init__(
        self,
        client: AsyncWebClient,
        turn: Turn,
        *,
        pacer: Pacer | None = None,
        pace: Pace | None = None,
        stop_value: str = "",
        should_stop: Callable[[], Awaitable[bool]] | None = None,
        on_stop: Callable[[], None] | None = None,
        resume: dict[str, str] | None = None,
        on_progress: Callable[..., Awaitable[None]] | None = None,
        fence: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.client = client
        self.turn = turn
        self.pacer = pacer or Pacer()
        self.pace = pace or Pace()
        self.stop_value = stop_value
        self.should_stop = should_stop
        self.on_stop = on_stop
        self.resume = resume or {}  # what an earlier run of this job put in Slack (placeholder_ts, answer_ts)
        self.reaction = self.resume.get("reaction", "")  # on the question while its placeholder waited
        self.on_progress = on_progress
        self.fence = fence  # awaited before every write: raises once this run no longer owns the thread
        self.started_at = time.monotonic()
        self.placeholder_ts: str | None = None
        self.placeholder_free = False  # still showing "Thinking…", so the answer may replace it
        self.status_mode = False  # assistant panel: the thread status is the sign of life
        self.reasoning_text = ""
        self.answer = ""
        self.sent = 0
        self.first_text_at: float | None = None
        self.thinking_s: float | None = None
        self.stopped = False
        self.mode: str | None = None  # None (not started), "stream" or "update"
        self.message_ts: str | None = None  # the message the answer currently goes into
        self.message_started_at = 0.0
        self.message_text = ""  # what the current message holds (for chat.update and caps)
        self.answer_ts: list[str] = []  # every message that holds part of the answer
        self._last_call = 0.0
        self._last_view = 0.0
        self._last_stop_check = 0.0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._begun: asyncio.Task[None] | None = None
        self._side_tasks: list[asyncio.Task[None]] = []
        self._title = ""
        self._broadcasts = BroadcastGuard()  # the answer never pings a channel, even across chunks
        # The agent loop's live view: one task card per tool call (task_update chunks, timeline mode).
        self.timeline = False  # tools are offered: streams start in timeline mode
        self.cards: dict[str, dict[str, Any]] = {}  # card id -> its latest task_update chunk
        self._card_ids: dict[str, str] = {}  # tool call id -> card id
        self._dirty_cards: list[str] = []  # cards whose latest state is not in Slack yet
        self._message_cards: set[str] = set()  # cards in the current stream message
        self._status_due = ""  # assistant panel: the status line for the tool now running
        self._card_marks: dict[str, int] = {}  # card -> how much answer text came before it
        self._cards_waiting_since = 0.0  # when the oldest card change not yet in Slack was made
        self._text_limit: int | None = None  # while cards wait: text beyond this waits too
        self._final = False  # Kimi is done: the last part-word may go out too
        self._complete_to = 0  # the answer up to here is a finished step's: no part-word to hold back
        self._separator_due = False  # a new model step: its text starts a new paragraph
        self._step_start = 0  # where the current step's text begins in `answer`

    # ---- what the pipeline calls ------------------------------------------------------------
    def start(self) -> None:
        """Begin (placeholder or status) without waiting for it: Kimi is asked meanwhile. Once only."""
        if self._begun is None:
            self._begun = asyncio.create_task(self.begin())

    async def _after_begin(self) -> None:
        """Until the sign of life is out (or has failed). Waited for, not awaited: a waiter cancelled
        meanwhile (Stop cancels the Kimi task that may wait here) must not cancel the placeholder mid-post
        with it, or the posted placeholder would stay in the thread, unrecorded, "Thinking…" for good."""
        if self._begun is None:
            return
        if not self._begun.done():  # a finished one is read at once, without a turn of the loop
            await asyncio.wait({self._begun})
        if not self._begun.cancelled():  # cancelled: only by close(), when the answer ended first
            with contextlib.suppress(Exception):
                self._begun.result()

    async def begin(self) -> None:
        """The sign of life, right away (started as Kimi's request goes out: bot/kimi/client.py on_send): in
        Slack's assistant panel the thread status ("is thinking…"), elsewhere a placeholder message with a
        Stop button. A re-run of an interrupted job first takes back the partial answer the earlier run
        left, and reuses its placeholder."""
        if not self.turn.in_slack_thread:
            return
        earlier = self.resume.get("placeholder_ts")
        await self._take_back(earlier, json.loads(self.resume.get("answer_ts") or "[]"))
        if self.turn.assistant_thread and await self._set_status(list(LOADING_MESSAGES)):
            self.status_mode = True
            if self._title:
                self._side_tasks.append(asyncio.create_task(self._set_title(self._title)))
        else:
            text, blocks = thinking_view(0, "", self.stop_value)
            try:
                if earlier:
                    await self._call(
                        "chat.update", channel=self.turn.channel, ts=earlier, text=text, blocks=blocks
                    )
                    self.placeholder_ts = earlier
                else:
                    await self._wait_to_post()
                    response = await self._call(
                        "chat.postMessage",
                        paced=False,
                        channel=self.turn.channel,
                        thread_ts=self.turn.thread_ts,
                        text=text,
                        blocks=blocks,
                    )
                    self.placeholder_ts = str(response["ts"])
                    await self._report(placeholder_ts=self.placeholder_ts)
                self.placeholder_free = True
            except Exception as exc:  # the answer can still come without a placeholder
                log.warning(
                    "placeholder not posted", extra={"error": describe(exc), "channel": self.turn.channel}
                )
        self._last_view = time.monotonic()
        self._flusher = asyncio.create_task(self._flush_loop())

    async def _wait_to_post(self) -> None:
        """Take the channel's next posting slot (about one message a second per channel). When it is
        more than a moment away (a burst of questions in one channel), a reaction on the question shows
        it was heard meanwhile (reactions are paced per workspace, not per channel); it goes when the
        answer lands."""
        self.reaction = self.reaction or self.resume.get("reaction", "")  # an earlier run's, to remove
        wait = await self.pacer.reserve("chat.postMessage", self.turn.team_id, self.turn.channel)
        team = self.turn.team_id
        if (
            wait > SIGN_OF_LIFE_WAIT_S
            and not self.reaction
            and self.pacer.wait_estimate("reactions.add", team) < wait / 2  # a sign that comes sooner
        ):
            started = time.monotonic()
            try:
                await self._call(
                    "reactions.add", channel=self.turn.channel, timestamp=self.turn.ts, name=HEARD_REACTION
                )
                self.reaction = HEARD_REACTION
            except SlackApiError as exc:
                if slack_error(exc) == "already_reacted":  # an earlier run's, not noted before it died
                    self.reaction = HEARD_REACTION
            except Exception as exc:
                log.info("reaction not added", extra={"error": describe(exc)})
            if self.reaction:
                await self._report(reaction=self.reaction)
            wait = max(0.0, wait - (time.monotonic() - started))
        if wait > 0:
            self.pacer.waited_s += wait
            await asyncio.sleep(wait)

    async def _remove_reaction(self) -> None:
        """The answer (or the failure's sentence) landed: the "heard you" reaction goes — beside the
        job's completion, not before it (its budget may be spent for a while)."""
        self.reaction = self.reaction or self.resume.get("reaction", "")
        if not self.reaction or not self.turn.in_slack_thread:
            return
        name, self.reaction = self.reaction, ""

        async def remove() -> None:
            # Not fenced: the job may be complete (its lease gone) by now, and removing twice is harmless.
            with contextlib.suppress(Exception):
                await self._call(
                    "reactions.remove",
                    fenced=False,
                    channel=self.turn.channel,
                    timestamp=self.turn.ts,
                    name=name,
                )

        self._side_tasks.append(asyncio.create_task(remove()))

    async def _take_back(self, placeholder: str | None, answer_ts: list[str]) -> None:
        """A re-run after a crash: remove the partial answer the earlier run left (not its placeholder)."""
        for ts in answer_ts:
            if ts == placeholder:
                continue
            with contextlib.suppress(Exception):
                await self._call("chat.stopStream", channel=self.turn.channel, ts=ts)
            with contextlib.suppress(Exception):
                await self._call("chat.delete", channel=self.turn.channel, ts=ts)
        if answer_ts:
            log.info(
                "partial answer of an interrupted run removed",
                extra={"channel": self.turn.channel, "messages": len(answer_ts)},
            )

    async def _report(self, **fields: str) -> None:
        if self.on_progress is not None:
            with contextlib.suppress(Exception):
                await self.on_progress(**fields)

    async def _remember(self, ts: str) -> None:
        """A message now holds part of the answer: remember it, here and for a re-run of the job."""
        self.answer_ts.append(ts)
        await self._report(answer_ts=json.dumps(self.answer_ts))

    def reasoning(self, text: str) -> None:
        self.reasoning_text += text

    def step(self) -> None:
        """The agent loop asks Kimi again (after tool calls): its text starts a new paragraph."""
        self._separator_due = bool(self.answer)
        self._step_start = len(self.answer)
        self._complete_to = len(self.answer)

    def task(
        self, call_id: str, title: str, status: str, *, details: str = "", sources: tuple[str, ...] = ()
    ) -> None:
        """A tool call's card: pending, in_progress, complete or error. Only recorded here; the flusher
        shows it (the latest state of each card, so quick changes cost one call)."""
        card_id = self._card_ids.setdefault(call_id, f"task_{len(self._card_ids) + 1}")
        self._complete_to = len(self.answer)  # the step's text ended where its tool calls began
        self.cards[card_id] = task_card(card_id, title, status, details=details, sources=sources)
        if card_id not in self._dirty_cards:
            if not self._dirty_cards:
                self._cards_waiting_since = time.monotonic()
            self._dirty_cards.append(card_id)
            self._card_marks[card_id] = len(self.answer)  # text written before the card goes before it
        if status == "in_progress":
            self._status_due = status_line(title)
        self._wake.set()

    def steps(self) -> list[tuple[str, str]]:
        """(title, status) of every card so far, for the thinking view without task cards."""
        return [(str(card["title"]), str(card["status"])) for card in self.cards.values()]

    def text(self, text: str) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.monotonic()
            self.thinking_s = self.first_text_at - self.started_at
        if self._separator_due:
            self._separator_due = False
            if not self.answer.endswith("\n\n"):
                text = ("\n" if self.answer.endswith("\n") else "\n\n") + text
        self.answer += self._broadcasts.feed(text)  # what Kimi wrote, minus a tail that may still ping
        if len(self.answer) - self.sent >= self.pace.flush_chars:
            self._wake.set()

    async def restarted(self) -> None:
        """Before Kimi's retry: text already shown is replaced by a note, and the answer starts over."""
        await self._after_begin()
        async with self._lock:
            if self.cards:
                # An agent turn: earlier steps (cards, text) stay. The dropped step's unshown text goes;
                # any of it already shown stays, followed by a note, and the step's new text follows.
                shown_of_step = self.sent > self._step_start
                self.answer = self.answer[: max(self.sent, self._step_start)]
                self._broadcasts = BroadcastGuard()
                if shown_of_step:
                    self.answer += "\n\n_(The connection to Kimi dropped; this step starts again.)_\n\n"
                return
            self.answer = self.answer[: self.sent]  # what was not shown yet is simply dropped
            self._broadcasts = BroadcastGuard()
            self.reasoning_text = ""
            if not self.sent:
                return
            await self._end_stream()
            note = "_(The connection to Kimi dropped mid-answer; the answer starts again below.)_"
            for index, ts in enumerate(self.answer_ts):
                with contextlib.suppress(Exception):
                    if index == 0:
                        await self._set_message(ts, note)
                    else:
                        await self._call("chat.delete", channel=self.turn.channel, ts=ts)
            self.answer, self.sent, self.mode, self.message_ts, self.message_text = "", 0, None, None, ""
            self.answer_ts = []
            await self._report(answer_ts="[]")

    async def text_complete(self) -> None:
        """Kimi has finished: from here nothing goes out on time or size, so a pause before finish() (the
        answer kept with the job) does not start a stream for a short answer that finish() would simply put
        in the placeholder. finish() does this too."""
        await self._after_begin()
        await self._stop_flusher()

    async def finish(self, closing_blocks: list[dict[str, Any]], *, note: str = "") -> list[str]:
        """Deliver whatever is left, end the answer with its footer and buttons; return the message ts."""
        try:
            return await self._finish(closing_blocks, note=note)
        finally:
            await self._remove_reaction()

    async def _finish(self, closing_blocks: list[dict[str, Any]], *, note: str) -> list[str]:
        await self.text_complete()
        self.answer += self._broadcasts.flush()  # the answer is complete: nothing more is held back
        self._final = True
        if not self.turn.in_slack_thread:
            await self._respond(self.answer + (f"\n\n{note}" if note else ""), markdown=True)
            return []
        async with self._lock:
            if note:
                self.answer += f"\n\n{note}"
            while self._dirty_cards and self.mode != "update" and not self.stopped:
                waiting = list(self._dirty_cards)
                await self._flush_text_and_cards()
                if self._dirty_cards == waiting:
                    break
            if (
                self.mode is None
                and self.placeholder_free
                and not self.answer_ts  # nothing shown below it yet (a stream Slack's stop ended, cards)
                and len(self.answer) <= self.pace.update_message_chars
            ):
                # A short answer that came at once: it simply replaces the placeholder.
                text = self.answer or "_(no answer)_"
                await self._set_message(str(self.placeholder_ts), text, closing_blocks)
                self.placeholder_free = False
                self.sent = len(self.answer)
                await self._remember(str(self.placeholder_ts))
                return self.answer_ts
            while self.sent < len(self.answer):
                await self._flush_some()
            # The last two writes don't depend on each other: one round trip instead of two.
            await asyncio.gather(self._close_message(closing_blocks), self._summarise_placeholder())
        return self.answer_ts

    async def fail(self, sentence: str, blocks: list[dict[str, Any]] | None = None) -> None:
        """End the turn with one sentence: it replaces the placeholder, or follows the partial answer."""
        try:
            await self._fail(sentence, blocks)
        finally:
            await self._remove_reaction()

    async def _fail(self, sentence: str, blocks: list[dict[str, Any]] | None) -> None:
        await self._after_begin()
        await self._stop_flusher()
        if not self.turn.in_slack_thread:
            await self._respond(sentence, markdown=False)
            return
        async with self._lock:
            with contextlib.suppress(Exception):
                await self._end_stream()
            blocks = blocks or [{"type": "section", "text": {"type": "mrkdwn", "text": sentence}}]
            if self.placeholder_free and self.placeholder_ts:
                await self._call(
                    "chat.update",
                    channel=self.turn.channel,
                    ts=self.placeholder_ts,
                    text=sentence,
                    blocks=blocks,
                )
                self.placeholder_free = False
                return
            await self._summarise_placeholder()
            await self._call(
                "chat.postMessage",
                channel=self.turn.channel,
                thread_ts=self.turn.thread_ts,
                text=sentence,
                blocks=blocks,
            )

    def title(self, question: str) -> None:
        """Name an assistant-panel thread after its first question, once begin() knows it is one."""
        self._title = question
        if self._begun is not None and self._begun.done():
            self._side_tasks.append(asyncio.create_task(self._set_title(question)))

    async def _set_title(self, question: str) -> None:
        if not self.status_mode:
            return
        title = " ".join(question.split())
        with contextlib.suppress(Exception):
            await self._call(
                "assistant.threads.setTitle",
                channel_id=self.turn.channel,
                thread_ts=self.turn.thread_ts,
                title=title if len(title) <= TITLE_LIMIT else title[: TITLE_LIMIT - 1] + "…",
            )

    async def _set_status(self, loading_messages: list[str], status: str = "is thinking…") -> bool:
        try:
            await self._call(
                "assistant.threads.setStatus",
                channel_id=self.turn.channel,
                thread_ts=self.turn.thread_ts,
                status=status,
                loading_messages=[m[:STATUS_MESSAGE_LIMIT] for m in loading_messages[:10]],
            )
            return True
        except Exception as exc:
            log.info("thread status not set", extra={"error": describe(exc), "channel": self.turn.channel})
            return False

    async def notice(self, text: str) -> None:
        """A short plain message in the thread, outside any answer (help, greetings)."""
        if not self.turn.in_slack_thread:
            await self._respond(text, markdown=False)
            return
        await self._call(
            "chat.postMessage", channel=self.turn.channel, thread_ts=self.turn.thread_ts, text=text
        )

    async def post_prompt(self, text: str, blocks: list[dict[str, Any]]) -> str:
        """A message in the thread that asks the asker something (Approve/Deny); its ts. Below the sign of
        life, which goes out behind Kimi's first request and may still be on its way."""
        await self._after_begin()
        response = await self._call(
            "chat.postMessage",
            channel=self.turn.channel,
            thread_ts=self.turn.thread_ts,
            text=text,
            blocks=blocks,
        )
        return str(response["ts"])

    async def update_prompt(self, ts: str, text: str, blocks: list[dict[str, Any]]) -> None:
        await self._call("chat.update", channel=self.turn.channel, ts=ts, text=text, blocks=blocks)

    # ---- the flusher --------------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        try:
            while not self._closed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.pace.tick_s):
                        await self._wake.wait()
                self._wake.clear()
                if self._closed:
                    return
                await self._check_stop()
                async with self._lock:
                    if self._closed:
                        return
                    if self._status_due and self.status_mode:
                        line, self._status_due = self._status_due, ""
                        await self._set_status([line], status=line)
                    if self._cards_outliving_stream():
                        await self._continue_cards()
                    elif self._dirty_cards:  # cards first: text written after them must wait for them
                        if self._cards_due():
                            await self._flush_text_and_cards()
                    elif self.first_text_at is None:
                        await self._update_thinking_view()
                    elif self._flush_due():
                        await self._flush_some()
        except Exception:
            log.exception(
                "flusher failed; the rest of the answer goes out when it ends",
                extra={"channel": self.turn.channel},
            )

    async def _check_stop(self) -> None:
        now = time.monotonic()
        if self.should_stop is None or self.stopped or now - self._last_stop_check < 0.5:
            return
        self._last_stop_check = now
        with contextlib.suppress(Exception):
            if await self.should_stop():
                self.request_stop()

    def request_stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            if self.on_stop is not None:
                self.on_stop()

    def _next_method(self) -> str:
        if self.mode == "stream":
            return "chat.appendStream"
        if self.mode is None and not self._streams_busy():
            return "chat.startStream"
        return "chat.update"

    def _flush_due(self) -> bool:
        now = time.monotonic()
        pending = len(self.answer) - self.sent
        if pending <= 0 or now - self._last_call < self.pace.min_call_interval_s:
            return False
        if self.pacer.headroom(self._next_method(), self.turn.team_id, self.turn.channel) < OPTIONAL_HEADROOM:
            # Slack's budget for this call is running low: keep the text (it goes out in bigger pieces, or
            # all at once at the end) rather than queue behind other answers or draw 429s.
            return pending >= self.pace.stream_message_chars
        assert self.first_text_at is not None
        if self.mode is None and now - self.first_text_at < self.pace.first_flush_s:
            return False
        waited = now - max(self._last_call, self.first_text_at)
        return pending >= self.pace.flush_chars or waited >= self.pace.max_latency_s

    async def _update_thinking_view(self) -> None:
        now = time.monotonic()
        if now - self._last_view < self.pace.thinking_update_s:
            return
        if self.status_mode:
            self._last_view = now
            thought = latest_thought(self.reasoning_text, limit=STATUS_MESSAGE_LIMIT)
            await self._set_status([thought] if thought else list(LOADING_MESSAGES))
            return
        if not self.placeholder_free:
            return
        if self.pacer.headroom("chat.update", self.turn.team_id) < OPTIONAL_HEADROOM:
            return  # a nicety; the answer's own edits need the budget more
        self._last_view = now
        text, blocks = thinking_view(
            now - self.started_at,
            latest_thought(self.reasoning_text),
            self.stop_value,
            steps=self.steps() if self.mode == "update" else None,  # no task cards: the steps show here
        )
        with contextlib.suppress(Exception):
            await self._call(
                "chat.update", channel=self.turn.channel, ts=self.placeholder_ts, text=text, blocks=blocks
            )

    async def close(self) -> None:
        """Stop the flusher whatever happened (finish and fail do this too)."""
        if self._begun is not None and not self._begun.done():
            self._begun.cancel()
            # Its CancelledError is not ours: an answer ending in an error (a RedisError before Kimi was
            # asked) must end with that error, not look like a shutdown (the job handed back at once, no
            # attempt counted, run again and again). Ours is raised again.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._begun
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise asyncio.CancelledError
        await self._after_begin()
        await self._stop_flusher()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)

    async def _stop_flusher(self) -> None:
        self._closed = True
        self._wake.set()
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
            self._flusher = None

    # ---- moving text into Slack ---------------------------------------------------------------
    def _streams_busy(self) -> bool:
        """Slack's Tier 2 budget for starting and stopping streams is spent: post-and-update instead."""
        team = self.turn.team_id
        return any(self.pacer.wait_estimate(m, team) > 0 for m in ("chat.startStream", "chat.stopStream"))

    async def _flush_some(self) -> None:
        """Move the waiting text (or as much as the current message takes) into Slack."""
        if not self._pending():
            return  # only a part-word waits: it goes out with the rest of the word
        if self.mode is None and self._streams_busy():
            self.mode = "update"
        if self.mode != "update":
            try:
                await self._stream_some()
                return
            except SlackApiError as exc:
                error = slack_error(exc)
                if error == STOPPED_BY_USER:  # the user pressed Slack's own stop on the stream
                    self.request_stop()
                    self.mode, self.message_ts, self.message_text = None, None, ""
                    self.answer = self.answer[: self.sent]
                    return
                log.info(
                    "streaming unavailable; posting and updating instead",
                    extra={"error": error, "channel": self.turn.channel},
                )
                await self._end_stream()
                self.mode = "update"
        await self._update_some()

    async def _stream_some(self) -> None:
        """One stream call: start a stream, append what fits, or roll over to a new stream message."""
        pending = self._pending()
        if self.mode is None:
            await self._start_stream(pending)
            return
        room = self.pace.stream_message_chars - len(self.message_text)
        too_old = time.monotonic() - self.message_started_at > self.pace.stream_max_age_s
        cut = fitting_cut(pending, room)
        if too_old or cut == 0:
            await self._roll_over()
            return
        piece = pending[:cut]
        try:
            await self._call(
                "chat.appendStream", channel=self.turn.channel, ts=self.message_ts, markdown_text=piece
            )
        except SlackApiError as exc:
            if slack_error(exc) not in STREAM_GONE:
                raise
            # Slack closed the stream (about 5 minutes): the same text goes into a new stream message.
            log.info(
                "stream closed by Slack; continuing in a new message", extra={"channel": self.turn.channel}
            )
            self.mode, self.message_ts, self.message_text = None, None, ""
            await self._start_stream(pending)
            return
        self.message_text += piece
        self.sent += len(piece)

    async def _start_stream(self, pending: str) -> None:
        """A new stream message with as much of `pending` as one message takes (reopening an open fence)."""
        prefix = self._reopen_prefix()
        piece = pending[: cut_point(pending, self.pace.stream_message_chars - len(prefix))]
        response = await self._call(
            "chat.startStream",
            channel=self.turn.channel,
            thread_ts=self.turn.thread_ts,
            recipient_user_id=self.turn.user,
            recipient_team_id=self.turn.team_id,
            markdown_text=prefix + piece,
            task_display_mode="timeline" if self.timeline else None,
        )
        self.mode = "stream"
        self.message_ts = str(response["ts"])
        self.message_started_at = time.monotonic()
        self._message_cards = set()
        await self._remember(self.message_ts)
        self.message_text = prefix + piece
        self.sent += len(piece)

    async def _roll_over(self) -> None:
        """The stream message is full or old: close it (and an open fence) and continue in a new one."""
        await self._end_stream()
        await self._start_stream(self._pending())

    def _reopen_prefix(self) -> str:
        """What opens a continuation message: the open code fence of the answer so far, reopened."""
        fence = open_fence(self.answer[: self.sent]) if self.sent else None
        return f"{fence.fence}{fence.info}\n" if fence else ""

    async def _end_stream(self, why: str = "", *, carried: bool = False) -> None:
        """Close a live stream quietly (fallbacks and failures), closing an open code fence in it, and its
        open cards (saying `why`). `carried`: the running cards go on in the next message, so only this
        message's copy of them is closed; here they keep running."""
        if self.mode == "stream" and self.message_ts:
            fence = open_fence(self.message_text)
            before = {i: self.cards[i] for i in self._message_cards}
            closing = self._closing_cards(why)
            if await self._stop_stream(
                self.message_ts, closing, markdown_text=f"\n{fence.fence}" if fence else None
            ):
                self._settle_cards(before, closing, keep_running=carried)
            self.mode, self.message_ts, self.message_text = None, None, ""
            self._message_cards = set()

    async def _stop_stream(self, ts: str, closing: list[dict[str, Any]], **args: Any) -> bool:
        """chat.stopStream with the closing cards; whether Slack took it. A card Slack refuses (its
        details, its sources) must not keep the stream open: once refused, the cards go again bare (id,
        title, state). A stream Slack already ended counts as stopped."""
        for chunks in (closing, [bare_card(card) for card in closing]):
            try:
                await self._call(
                    "chat.stopStream", channel=self.turn.channel, ts=ts, chunks=chunks or None, **args
                )
                return True
            except SlackApiError as exc:
                error = slack_error(exc)
                if not chunks or error in STREAM_GONE:
                    log.info("stream not stopped", extra={"error": error, "channel": self.turn.channel})
                    return False
                log.info("closing cards refused; sent bare", extra={"error": error})
        return False

    def _settle_cards(
        self, before: dict[str, dict[str, Any]], closing: list[dict[str, Any]], *, keep_running: bool
    ) -> None:
        """After a stop Slack took: each card it showed as it still is here is settled — a closed one
        keeps its closed state (unless `keep_running`), a shown one is no longer due. A card that changed
        while the call was out keeps its newer state, still due."""
        for card in closing:
            card_id = str(card["id"])
            if self.cards.get(card_id) is not before.get(card_id):
                continue
            if card is not before[card_id] and not keep_running:
                self.cards[card_id] = card
            if card_id in self._dirty_cards and not (keep_running and card is not before[card_id]):
                self._dirty_cards.remove(card_id)

    # ---- task cards -----------------------------------------------------------------------------
    def _cards_outliving_stream(self) -> bool:
        """Cards still running in a stream that Slack will soon end (about 5 minutes after its start)."""
        return (
            self.mode == "stream"
            and time.monotonic() - self.message_started_at > self.pace.stream_max_age_s
            and any(self.cards[i]["status"] in ("pending", "in_progress") for i in self._message_cards)
        )

    async def _continue_cards(self) -> None:
        """Before Slack ends the stream under a long call (or a wait for approval), close it — its open
        cards say "Continued below" — and show them again, still running, in a new stream message."""
        await self._carry_running_cards(len(self.answer))
        await self._flush_cards()

    async def _carry_running_cards(self, mark: int | None) -> None:
        """End this stream message, its running cards saying "Continued below", and queue them (first,
        in their order) for the next message. `mark`: the text they follow (None: keep their own)."""
        running = [
            i
            for i, card in self.cards.items()
            if i in self._message_cards and card["status"] in ("pending", "in_progress")
        ]
        await self._end_stream("Continued below", carried=True)
        if running and not self._dirty_cards:
            self._cards_waiting_since = time.monotonic()
        for card_id in reversed(running):  # running still, or changed since: its newest state goes first
            if card_id in self._dirty_cards:
                self._dirty_cards.remove(card_id)
            self._dirty_cards.insert(0, card_id)
            if mark is not None or card_id not in self._card_marks:
                self._card_marks[card_id] = len(self.answer) if mark is None else mark

    def _cards_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_call < self.pace.min_call_interval_s:
            return False
        if self.mode == "update":
            return True  # no call: the thinking view shows them at its own pace
        method = "chat.appendStream" if self.mode == "stream" else "chat.startStream"
        if self.pacer.headroom(method, self.turn.team_id, self.turn.channel) >= OPTIONAL_HEADROOM:
            return True
        # Slack's budget for this call runs low (many answers at work): the cards wait and gather more
        # changes per call, up to a limit, rather than queue behind other answers or draw 429s.
        return now - self._cards_waiting_since >= self.pace.cards_max_wait_s

    def _closing_cards(self, why: str = "") -> list[dict[str, Any]]:
        """What a stop of the current stream message shows of its cards: each one still open, closed
        (saying `why`), and each one whose newest state (a call that finished while its last change was
        out) has not gone out yet, as it is. A stream never stops with a card spinning (Stop, a failure,
        a roll-over). Changes nothing: `_settle_cards` does, once Slack took the stop."""
        closing = []
        why = why or ("Stopped" if self.stopped else "Not finished")
        for card_id in sorted(self._message_cards):
            card = self.cards[card_id]
            if card["status"] in ("pending", "in_progress"):
                closing.append({**card, "status": "error", "details": why})
            elif card_id in self._dirty_cards:
                closing.append(card)
        return closing

    def _pending(self) -> str:
        """The answer text that may go out now: while cards wait, only what was written before them;
        while Kimi is still writing, only whole words (a message boundary never splits one)."""
        text = self.answer[self.sent : self._text_limit]
        if self._final or self._text_limit is not None:
            return text
        # Text of a step that ended (tool calls came, or Kimi is asked again) is whole as it is.
        return text[: max(whole_words(text, WORD_HOLD_MAX), self._complete_to - self.sent)]

    async def _flush_text_and_cards(self) -> None:
        """Cards go out after the text written before them, and before the text written after them (in
        order, as the timeline shows them)."""
        while self._dirty_cards and not self.stopped:
            waiting = list(self._dirty_cards)
            limit = min(self._card_marks.get(i, len(self.answer)) for i in waiting)
            if self.mode != "update":
                self._text_limit = limit
                try:
                    while self.sent < limit and self.mode != "update" and not self.stopped:
                        before = self.sent
                        await self._flush_some()
                        if self.sent == before:
                            break
                finally:
                    self._text_limit = None
                if self.sent < limit and self.mode != "update":
                    return  # the text before these cards could not go yet: both wait
            # Only the cards whose earlier text is out; cards written after more text wait for it.
            await self._flush_cards(lambda card_id: self._card_marks.get(card_id, 0) <= self.sent)
            if self._dirty_cards == waiting:
                return

    async def _flush_cards(self, ready: Callable[[str], bool] | None = None) -> None:
        """Send the cards whose state changed (those `ready` says may go): in the stream (starting one, or
        rolling over to a new message when this one holds as many cards as a message may), or, without
        streaming, into the thinking view's list of steps."""
        if self.mode is None and (self._streams_busy() or not self.turn.in_slack_thread):
            self.mode = "update"
        if self.mode == "update":
            self._dirty_cards.clear()
            self._last_view = 0.0  # the steps show at the next thinking-view update
            return
        limit = self.pace.cards_per_message
        full = self.mode == "stream" and len(self._message_cards) >= limit
        if full and any(i not in self._message_cards for i in self._dirty_cards):
            # This message holds all the cards it may: the next one takes the new cards, and the running
            # ones carry on there (here they say "Continued below"), unless they alone would fill it.
            running = sum(
                1 for i in self._message_cards if self.cards[i]["status"] in ("pending", "in_progress")
            )
            if running < limit:
                await self._carry_running_cards(None)
            else:
                await self._end_stream()
        room = limit - len(self._message_cards)
        ids = []
        for card_id in self._dirty_cards:
            if ready is not None and not ready(card_id):
                continue
            if card_id in self._message_cards:
                ids.append(card_id)
            elif room > 0:
                ids.append(card_id)
                room -= 1
        if not ids:
            return
        sent = {i: self.cards[i] for i in ids}
        chunks = list(sent.values())
        try:
            if self.mode is None:
                response = await self._call(
                    "chat.startStream",
                    channel=self.turn.channel,
                    thread_ts=self.turn.thread_ts,
                    recipient_user_id=self.turn.user,
                    recipient_team_id=self.turn.team_id,
                    task_display_mode="timeline",
                    chunks=chunks,
                )
                self.mode = "stream"
                self.message_ts = str(response["ts"])
                self.message_started_at = time.monotonic()
                self.message_text = ""
                self._message_cards = set()
                await self._remember(self.message_ts)
            else:
                await self._call(
                    "chat.appendStream", channel=self.turn.channel, ts=self.message_ts, chunks=chunks
                )
        except SlackApiError as exc:
            error = slack_error(exc)
            if error == STOPPED_BY_USER:
                self.request_stop()
                self.mode, self.message_ts, self.message_text = None, None, ""
                self._dirty_cards.clear()
                return
            if error in STREAM_GONE and self.mode == "stream":
                # Slack closed the stream: the cards go into a new stream message next time.
                self.mode, self.message_ts, self.message_text = None, None, ""
                self._message_cards = set()
                return
            log.info(
                "task cards unavailable; the thinking view lists the steps instead",
                extra={"error": error, "channel": self.turn.channel},
            )
            await self._end_stream()
            self.mode = "update"
            self._dirty_cards.clear()
            return
        self._message_cards.update(ids)
        # A card that changed again while the call was out stays due.
        self._dirty_cards = [i for i in self._dirty_cards if self.cards[i] is not sent.get(i)]

    async def _update_some(self) -> None:
        """Post-and-update: the answer fills messages of at most ~4,000 characters via chat.update."""
        limit = self.pace.update_message_chars
        pending = self._pending()
        if self.message_ts is not None:
            cut = fitting_cut(pending, limit - len(self.message_text))
            if cut:
                await self._set_message(self.message_ts, self.message_text + pending[:cut])
                self.sent += cut
                return
            if fence := open_fence(self.message_text):  # full: close its open fence before moving on
                await self._set_message(
                    self.message_ts, self.message_text + close_fence(self.message_text, fence.fence)
                )
        prefix = self._reopen_prefix()
        piece = pending[: cut_point(pending, limit - len(prefix))]
        body = prefix + piece
        if self.placeholder_free and self.placeholder_ts:
            self.placeholder_free = False
            self.message_ts = self.placeholder_ts
            await self._set_message(self.message_ts, body)
        else:
            response = await self._call(
                "chat.postMessage",
                channel=self.turn.channel,
                thread_ts=self.turn.thread_ts,
                text=fallback_text(body),
                blocks=markdown_blocks(body),
            )
            self.message_ts, self.message_text = str(response["ts"]), body
        await self._remember(self.message_ts)
        self.sent += len(piece)

    async def _set_message(
        self, ts: str, text: str, extra_blocks: list[dict[str, Any]] | None = None
    ) -> None:
        await self._call(
            "chat.update",
            channel=self.turn.channel,
            ts=ts,
            text=fallback_text(text),
            blocks=markdown_blocks(text) + (extra_blocks or []),
        )
        if ts == self.message_ts:
            self.message_text = text

    async def _close_message(self, closing_blocks: list[dict[str, Any]]) -> None:
        """Put the footer and buttons under the last piece of the answer."""
        if self.mode == "stream" and self.message_ts:
            self.mode = None
            if await self._stop_stream(self.message_ts, self._closing_cards(), blocks=closing_blocks):
                return
            log.info("stream could not be closed with its footer", extra={"channel": self.turn.channel})
        elif self.mode == "update" and self.message_ts:
            await self._set_message(self.message_ts, self.message_text, closing_blocks)
            return
        elif not self.answer_ts and self.placeholder_free and self.placeholder_ts:  # no text (stopped early)
            await self._set_message(self.placeholder_ts, self.answer or "_(no answer)_", closing_blocks)
            self.placeholder_free = False
            return
        await self._call(
            "chat.postMessage",
            channel=self.turn.channel,
            thread_ts=self.turn.thread_ts,
            text="Answer details",
            blocks=closing_blocks,
        )

    async def _summarise_placeholder(self) -> None:
        """The placeholder stays above the answer as a one-line "Thought for Ns"."""
        if not self.placeholder_free or not self.placeholder_ts:
            return
        text, blocks = thought_summary(
            self.thinking_s if self.thinking_s is not None else time.monotonic() - self.started_at
        )
        with contextlib.suppress(Exception):
            await self._call(
                "chat.update", channel=self.turn.channel, ts=self.placeholder_ts, text=text, blocks=blocks
            )
        self.placeholder_free = False

    # ---- the wire -----------------------------------------------------------------------------
    async def _call(self, method: str, *, paced: bool = True, fenced: bool = True, **args: Any) -> Any:
        # Paced first, fenced last: a wait for Slack's budget must not stand between the lease check and
        # the write (another worker may have taken the thread over meanwhile). `paced=False`: the
        # caller reserved the call's slot and waited for it already. `fenced=False`: a call that may
        # follow the job's end and is harmless twice.
        if paced:
            await self.pacer.acquire(method, self.turn.team_id, self.turn.channel)
        if fenced and self.fence is not None:
            await self.fence()
        self._last_call = time.monotonic()
        response = await api_call(self.client, method, {k: v for k, v in args.items() if v is not None})
        if method in POSTING_METHODS and response.get("ts"):
            # Noted for the thread once the job ends, so a later question's re-run knows this message is
            # not its own to take back.
            await self._report(posted_ts=str(response["ts"]))
        return response

    async def _respond(self, text: str, *, markdown: bool) -> None:
        """/kimi where the bot is not a member: ephemeral replies through response_url."""
        if self.fence is not None:
            await self.fence()
        webhook = AsyncWebhookClient(self.turn.response_url)
        text = neutralise_broadcasts(text)
        for piece in split_markdown(text) if markdown else [text]:
            blocks = markdown_blocks(piece) if markdown else None
            response = await webhook.send(
                text=fallback_text(piece), blocks=blocks, response_type="ephemeral", replace_original=False
            )
            if response.status_code >= 400:
                log.warning("response_url refused the answer", extra={"status": response.status_code})
