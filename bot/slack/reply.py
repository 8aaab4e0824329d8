"""ReplyWriter: the only code that writes into a thread (or, for /kimi off-channel, a response_url)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.slack.render import MARKDOWN_TEXT_LIMIT, split_markdown
from bot.turn import Source, Turn

log = logging.getLogger(__name__)

# Errors that mean "the bot cannot post here": the /kimi path then answers through response_url.
CANNOT_POST_HERE = frozenset({"not_in_channel", "channel_not_found", "is_archived", "restricted_action"})


def slack_error(exc: SlackApiError) -> str:
    return str(exc.response.get("error", "unknown_error")) if exc.response is not None else "unknown_error"


def describe(exc: Exception) -> str:
    """Slack's error code for API errors, the exception's type otherwise (for logs)."""
    return slack_error(exc) if isinstance(exc, SlackApiError) else type(exc).__name__


async def announce_question(client: AsyncWebClient, channel: str, user: str, question: str) -> str | None:
    """Post "@user asked: …" for /kimi; its ts is the thread of the answer. None if we can't post here."""
    try:
        response = await client.chat_postMessage(
            channel=channel, text=f"<@{user}> asked: {question}"[:MARKDOWN_TEXT_LIMIT], unfurl_links=False
        )
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


class ReplyWriter:
    """Writes one turn's sign of life, answer pieces and notices, at a pace Slack accepts."""

    def __init__(
        self, client: AsyncWebClient, turn: Turn, *, reaction: str = "eyes", post_interval: float = 1.0
    ) -> None:
        self.client = client
        self.turn = turn
        self.reaction = reaction
        self.post_interval = post_interval
        self._reacted = False
        self._posts = 0

    async def started(self) -> None:
        """Show the asker at once that work has begun: a reaction on their message."""
        if not self.turn.in_slack_thread or not self.reaction or self.turn.source is Source.COMMAND:
            return
        try:
            await self.client.reactions_add(
                channel=self.turn.channel, name=self.reaction, timestamp=self.turn.ts
            )
            self._reacted = True
        except Exception as exc:  # a missing reaction must never cost the answer
            log.info("reaction not added", extra={"error": describe(exc), "channel": self.turn.channel})

    async def finished(self) -> None:
        """Take the working reaction off again, whatever the outcome."""
        if not self._reacted:
            return
        try:
            await self.client.reactions_remove(
                channel=self.turn.channel, name=self.reaction, timestamp=self.turn.ts
            )
        except Exception as exc:
            log.info("reaction not removed", extra={"error": describe(exc), "channel": self.turn.channel})
        self._reacted = False

    async def deliver(self, markdown: str, footer: str = "") -> list[str]:
        """Post the answer as one or more threaded messages; return their timestamps."""
        pieces = split_markdown(markdown)
        if footer:
            pieces[-1] = f"{pieces[-1]}\n\n{footer}" if pieces[-1] else footer
        return [ts for piece in pieces if (ts := await self._post(piece, markdown=True))]

    async def notice(self, text: str) -> str | None:
        """A short plain message in the thread: errors, help, refusals."""
        return await self._post(text, markdown=False)

    async def _pace(self) -> None:
        # chat.postMessage allows about one message per second per channel.
        if self._posts and self.post_interval:
            await asyncio.sleep(self.post_interval)
        self._posts += 1

    async def _post(self, text: str, *, markdown: bool) -> str | None:
        await self._pace()
        if not self.turn.in_slack_thread:
            await self._respond(text, markdown=markdown)
            return None
        body: dict[str, Any] = {"markdown_text": text} if markdown else {"text": text}
        response = await self.client.chat_postMessage(
            channel=self.turn.channel, thread_ts=self.turn.thread_ts, unfurl_links=False, **body
        )
        return str(response["ts"])

    async def _respond(self, text: str, *, markdown: bool) -> None:
        """/kimi where the bot is not a member: an ephemeral reply through response_url."""
        webhook = AsyncWebhookClient(self.turn.response_url)
        blocks = [{"type": "markdown", "text": text}] if markdown else None
        response = await webhook.send(
            text=text[:MARKDOWN_TEXT_LIMIT], blocks=blocks, response_type="ephemeral", replace_original=False
        )
        if response.status_code >= 400:
            log.warning("response_url refused the answer", extra={"status": response.status_code})
