"""The Slack tools: current_time, slack_user_info, slack_read_thread, slack_channel_history, slack_search.

Every tool that returns conversation content asks `access.Access.refusal` first (who may read what, and
to which audience); a refusal or a Slack error is a `ToolResult(ok=False)` with one plain sentence. The
parsing and formatting helpers (permalinks, mentions, times) are pure and unit-tested.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from slack_sdk.errors import SlackApiError

from bot.tools.access import Access, AccessError, Person, is_full_member, slack_error_sentence
from bot.tools.base import ToolContext, ToolResult
from bot.tools.registry import page_text

HISTORY_DEFAULT = 50
HISTORY_MAX = 200
THREAD_MAX = 1_000
SEARCH_DEFAULT = 10
SEARCH_MAX = 20  # assistant.search.context returns at most 20
NAMES_MAX = 50  # distinct authors whose names are looked up per call

_CHANNEL_ID = re.compile(r"^[CGD][A-Z0-9]{2,}$")
_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,}$")
_TS = re.compile(r"^\d{9,11}(\.\d{1,6})?$")
_PERMALINK_PATH = re.compile(r"/archives/([CGD][A-Z0-9]+)/p(\d{16})")
_USER_MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|([^>]*))?>")
_CHANNEL_MENTION = re.compile(r"<#([CGD][A-Z0-9]+)(?:\|([^>]*))?>")
_SPECIAL = re.compile(r"<!(here|channel|everyone)(?:\|[^>]*)?>|<!subteam\^[A-Z0-9]+(?:\|([^>]*))?>")
_LINK = re.compile(r"<((?:https?|mailto):[^|>]+)(?:\|([^>]*))?>")

_START_INDEX = {
    "type": "integer",
    "minimum": 0,
    "description": "Character offset to continue a long result from (given in the note at its end).",
}


# ---- pure helpers --------------------------------------------------------------------------------


def parse_permalink(url: str) -> tuple[str, str, str] | None:
    """(channel, message ts, thread root ts) from a Slack message link, or None. A reply's link carries
    `thread_ts`; a root's does not (its own ts is the root)."""
    parts = urlsplit(url.strip().strip("<>").split("|", 1)[0])
    match = _PERMALINK_PATH.search(parts.path)
    if match is None:
        return None
    channel, digits = match.group(1), match.group(2)
    ts = f"{digits[:10]}.{digits[10:]}"
    query = parse_qs(parts.query)
    thread_ts = (query.get("thread_ts") or [ts])[0]
    channel = (query.get("cid") or [channel])[0]
    return channel, ts, thread_ts


def parse_channel(value: str) -> str | None:
    """A channel id from `C0123`, `<#C0123|name>`, `#C0123` or a message link; None otherwise."""
    value = value.strip()
    if match := _CHANNEL_MENTION.fullmatch(value):
        return match.group(1)
    if value.startswith("http"):
        link = parse_permalink(value)
        return link[0] if link else None
    value = value.lstrip("#")
    return value if _CHANNEL_ID.match(value) else None


def parse_user(value: str) -> str | None:
    value = value.strip()
    if match := _USER_MENTION.fullmatch(value):
        return match.group(1)
    value = value.lstrip("@")
    return value if _USER_ID.match(value) else None


def channel_label(value: str) -> str:
    """A live-view label before the channel's name is known: `#name` from `<#C…|name>`, else "a channel"."""
    match = _CHANNEL_MENTION.fullmatch(value.strip())
    return f"#{match.group(2)}" if match and match.group(2) else "a channel"


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def parse_when(value: Any, tz: ZoneInfo) -> str | None:
    """A Slack timestamp ("1764400000.000000") from a Slack ts, Unix seconds, or an ISO 8601 date or
    date-time (read in the asker's time zone when it has none); None when unreadable."""
    text = str(value).strip()
    if not text:
        return None
    if _TS.match(text):
        return f"{float(text):.6f}"
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return f"{moment.timestamp():.6f}"


def format_time(ts: str, tz: ZoneInfo) -> str:
    try:
        moment = datetime.fromtimestamp(float(ts), tz)
    except (TypeError, ValueError, OverflowError):
        return ts
    return moment.strftime("%Y-%m-%d %H:%M %Z")


def plain_text(text: str, names: dict[str, str]) -> str:
    """Slack mrkdwn as a reader sees it: @names, #channels, link labels with their URLs, entities."""
    text = _USER_MENTION.sub(lambda m: "@" + (m.group(2) or names.get(m.group(1)) or m.group(1)), text)
    text = _CHANNEL_MENTION.sub(lambda m: "#" + (m.group(2) or m.group(1)), text)
    text = _SPECIAL.sub(lambda m: "@" + (m.group(1) or m.group(2) or "group"), text)
    text = _LINK.sub(lambda m: f"{m.group(2)} ({m.group(1)})" if m.group(2) else m.group(1), text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def authors(messages: Iterable[dict[str, Any]]) -> list[str]:
    """User ids worth a name: authors, then people mentioned (first seen first)."""
    seen: dict[str, None] = {}
    for message in messages:
        if message.get("user"):
            seen.setdefault(str(message["user"]), None)
        for match in _USER_MENTION.finditer(str(message.get("text") or "")):
            seen.setdefault(match.group(1), None)
    return list(seen)


def format_message(message: dict[str, Any], names: dict[str, str], tz: ZoneInfo) -> str:
    user = str(message.get("user") or "")
    who = names.get(user) or user or str(message.get("username") or message.get("bot_id") or "someone")
    line = f"[{format_time(str(message.get('ts', '')), tz)}, ts={message.get('ts', '')}] {who}: "
    line += plain_text(str(message.get("text") or ""), names)
    files = [str(f.get("name") or f.get("title") or "file") for f in message.get("files") or []]
    if files:
        line += " [files: " + ", ".join(files) + "]"
    replies = int(message.get("reply_count") or 0)
    if replies and message.get("thread_ts") == message.get("ts"):
        line += f" [thread: {replies} replies; slack_read_thread with this ts reads it]"
    return line


def format_messages(messages: Sequence[dict[str, Any]], names: dict[str, str], tz: ZoneInfo) -> str:
    return "\n".join(format_message(m, names, tz) for m in messages)


def _int_arg(args: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(args.get(name, default))
    except (TypeError, ValueError):
        value = default
    return max(low, min(high, value))


# ---- shared I/O ----------------------------------------------------------------------------------


class _SlackTool:
    read_only = True
    PARAMETERS: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}}

    def __init__(self, *, cache_s: int = 300, max_chars: int = 20_000) -> None:
        self.cache_s = cache_s
        self.max_chars = max_chars
        self.parameters: dict[str, Any] = copy.deepcopy(self.PARAMETERS)

    def access(self, ctx: ToolContext) -> Access:
        return Access(ctx.slack, ctx.redis, team_id=ctx.team_id, ttl_s=self.cache_s)

    async def names(self, access: Access, users: Sequence[str]) -> dict[str, str]:
        wanted = list(users)[:NAMES_MAX]

        async def one(user: str) -> tuple[str, str]:
            try:
                return user, (await access.person(user)).display
            except AccessError:
                return user, user

        return dict(await asyncio.gather(*(one(u) for u in wanted)))

    async def asker_zone(self, access: Access, ctx: ToolContext) -> ZoneInfo:
        try:
            return zone((await access.person(ctx.user)).tz)
        except AccessError:
            return zone("")

    async def permalink(self, ctx: ToolContext, channel: str, ts: str) -> tuple[str, ...]:
        try:
            response = await ctx.slack.chat_getPermalink(channel=channel, message_ts=ts)
        except SlackApiError:
            return ()
        link = str(response.get("permalink") or "")
        return (link,) if link else ()


def _refused(sentence: str, title: str) -> ToolResult:
    return ToolResult(text=sentence, ok=False, title=title)


# ---- the tools -----------------------------------------------------------------------------------


class CurrentTime(_SlackTool):
    name = "current_time"
    description = (
        "The current date and time in the asker's time zone (from their Slack profile). Use it for "
        "anything relative to now: today, yesterday, this week, how long ago."
    )
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "timezone": {
                "type": "string",
                "description": "Optional IANA time zone (e.g. Europe/Berlin) to show as well.",
            }
        },
    }

    def title(self, args: dict[str, Any]) -> str:
        return "Checking the time"

    async def run(self, args: dict[str, Any], ctx: ToolContext, *, now: datetime | None = None) -> ToolResult:
        access = self.access(ctx)
        try:
            person: Person | None = await access.person(ctx.user)
        except AccessError:
            person = None
        tz_name = person.tz if person and person.tz else "UTC"
        moment = (now or datetime.now(UTC)).astimezone(zone(tz_name))
        offset = moment.strftime("%z")
        lines = [
            f"Now, for the asker ({tz_name}): {moment.strftime('%A %d %B %Y, %H:%M:%S %Z')} "
            f"(UTC{offset[:3]}:{offset[3:]}); ISO {moment.isoformat(timespec='seconds')}",
            f"Unix time: {int(moment.timestamp())}",
        ]
        extra = str(args.get("timezone") or "").strip()
        if extra:
            try:
                other = moment.astimezone(ZoneInfo(extra))
                lines.append(f"In {extra}: {other.strftime('%A %d %B %Y, %H:%M %Z')}")
            except (ZoneInfoNotFoundError, ValueError):
                lines.append(f"Unknown time zone {extra!r}.")
        return ToolResult(text="\n".join(lines), title="Checked the time")


class SlackUserInfo(_SlackTool):
    name = "slack_user_info"
    description = (
        "A Slack user's profile: display and real name, title, time zone, status. Pass a user id (U...) "
        "as seen in messages, a <@U...> mention, or 'me' for the asker."
    )
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"user": {"type": "string", "description": "U... id, <@U...>, or 'me'."}},
        "required": ["user"],
    }

    def title(self, args: dict[str, Any]) -> str:
        return "Looking up a person"

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        raw = str(args.get("user") or "")
        user = ctx.user if raw.strip().lower() == "me" else parse_user(raw)
        if user is None:
            return _refused(f"not a Slack user id: {raw!r} (expected U... or <@U...>)", "Looking up a person")
        try:
            person = await self.access(ctx).person(user)
        except AccessError as exc:
            return _refused(exc.sentence, "Looking up a person")
        facts = [
            f"User {person.id}",
            f"display name: {person.name or '-'}",
            f"real name: {person.real_name or '-'}",
            f"title: {person.title or '-'}",
            f"time zone: {person.tz or '-'}" + (f" ({person.tz_label})" if person.tz_label else ""),
            f"status: {(person.status_emoji + ' ' + person.status_text).strip() or '-'}",
        ]
        if person.guest:
            facts.append("a guest of this workspace")
        if person.external:
            facts.append("from another organisation")
        if person.deleted:
            facts.append("deactivated")
        if person.bot:
            facts.append("a bot")
        return ToolResult(text="\n".join(facts), title=f"Looked up {person.display}")


class SlackReadThread(_SlackTool):
    name = "slack_read_thread"
    description = (
        "Read every message of a Slack thread, by the link to any of its messages, or by channel id and "
        "the thread's ts. Only threads the asker can read are returned."
    )
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "permalink": {
                "type": "string",
                "description": "A Slack message link (https://...slack.com/archives/...).",
            },
            "channel": {
                "type": "string",
                "description": "Channel id (C..., G..., D...), when no link is given.",
            },
            "ts": {
                "type": "string",
                "description": "The thread's (or any of its messages') ts, with channel.",
            },
            "start_index": _START_INDEX,
        },
    }

    def title(self, args: dict[str, Any]) -> str:
        where = channel_label(str(args.get("channel") or ""))
        return "Reading a thread" if where == "a channel" else f"Reading a thread in {where}"

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        title = "Reading a thread"
        if args.get("permalink"):
            link = parse_permalink(str(args["permalink"]))
            if link is None:
                return _refused("not a Slack message link", title)
            channel, _ts, root = link
        else:
            channel = parse_channel(str(args.get("channel") or "")) or ""
            root = str(args.get("ts") or "").strip()
            if not channel or not _TS.match(root):
                return _refused("give a Slack message link, or a channel id and a ts", title)
        access = self.access(ctx)
        try:
            why = await access.refusal(source=channel, asker=ctx.user, destination=ctx.channel)
            conversation = await access.conversation(channel)
        except AccessError as exc:
            return _refused(exc.sentence, title)
        if why is not None:
            return _refused(why, title)
        title = f"Read a thread in {conversation.label}"
        messages: list[dict[str, Any]] = []
        cursor = ""
        try:
            while len(messages) < THREAD_MAX:
                response = await ctx.slack.conversations_replies(
                    channel=channel, ts=root, limit=200, cursor=cursor or None
                )
                messages.extend(response.get("messages") or [])
                cursor = str((response.get("response_metadata") or {}).get("next_cursor") or "")
                if not cursor:
                    break
        except SlackApiError as exc:
            return _refused(slack_error_sentence(str(exc.response.get("error")), "the thread"), title)
        if messages and messages[0].get("thread_ts") and messages[0]["ts"] != messages[0]["thread_ts"]:
            root = str(messages[0]["thread_ts"])  # a reply's ts gives the reply alone: read its thread
            return await self.run({**args, "permalink": "", "channel": channel, "ts": root}, ctx)
        tz = await self.asker_zone(access, ctx)
        names = await self.names(access, authors(messages))
        header = f"Thread in {conversation.label} ({len(messages)} messages, times in {tz.key}):\n"
        text = page_text(
            header + format_messages(messages, names, tz),
            start_index=_int_arg(args, "start_index", 0, 0, 10**9),
            max_length=self.max_chars,
            tool_name=self.name,
        )
        return ToolResult(text=text, title=title, sources=await self.permalink(ctx, channel, root))


class SlackChannelHistory(_SlackTool):
    name = "slack_channel_history"
    description = (
        "Recent messages of a Slack channel (top-level messages, oldest first), optionally only since "
        "and/or until a time. Threads show their reply count; read them with slack_read_thread. Only "
        "channels the asker can read are returned."
    )
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "channel": {"type": "string", "description": "Channel id (C...) or <#C...|name>."},
            "since": {
                "type": "string",
                "description": (
                    "Only messages after this: ISO 8601 date or date-time (the asker's time zone when it "
                    "has none), or a Slack ts."
                ),
            },
            "until": {"type": "string", "description": "Only messages before this; same forms as since."},
            "limit": {
                "type": "integer",
                "minimum": 1,
                "maximum": HISTORY_MAX,
                "description": f"Most messages to return (default {HISTORY_DEFAULT}); the newest are kept.",
            },
            "start_index": _START_INDEX,
        },
        "required": ["channel"],
    }

    def title(self, args: dict[str, Any]) -> str:
        return f"Reading {channel_label(str(args.get('channel') or ''))}"

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        title = "Reading a channel"
        channel = parse_channel(str(args.get("channel") or ""))
        if channel is None:
            return _refused("not a channel id (expected C... or <#C...|name>)", title)
        access = self.access(ctx)
        try:
            why = await access.refusal(source=channel, asker=ctx.user, destination=ctx.channel)
            conversation = await access.conversation(channel)
        except AccessError as exc:
            return _refused(exc.sentence, title)
        if why is not None:
            return _refused(why, title)
        title = f"Read {conversation.label}"
        tz = await self.asker_zone(access, ctx)
        request: dict[str, Any] = {
            "channel": channel,
            "limit": _int_arg(args, "limit", HISTORY_DEFAULT, 1, HISTORY_MAX),
        }
        for arg, field in (("since", "oldest"), ("until", "latest")):
            if args.get(arg):
                when = parse_when(args[arg], tz)
                if when is None:
                    return _refused(f"{arg} is not a date, date-time or Slack ts: {args[arg]!r}", title)
                request[field] = when
        try:
            response = await ctx.slack.conversations_history(**request)
        except SlackApiError as exc:
            return _refused(slack_error_sentence(str(exc.response.get("error")), conversation.label), title)
        messages = list(reversed(response.get("messages") or []))
        names = await self.names(access, authors(messages))
        more = " (older messages exist: narrow with since/until)" if response.get("has_more") else ""
        header = f"{conversation.label}: {len(messages)} messages{more}, times in {tz.key}:\n"
        text = page_text(
            header + (format_messages(messages, names, tz) or "(no messages)"),
            start_index=_int_arg(args, "start_index", 0, 0, 10**9),
            max_length=self.max_chars,
            tool_name=self.name,
        )
        sources = await self.permalink(ctx, channel, str(messages[-1]["ts"])) if messages else ()
        return ToolResult(text=text, title=title, sources=sources)


class SlackSearch(_SlackTool):
    name = "slack_search"
    description = (
        "Search the workspace's public channels for messages (Slack's own semantic and keyword search). "
        "Returns matching messages with channel, author, time and link."
    )
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "description": "What to search for, in natural language or keywords.",
            },
            "limit": {
                "type": "integer",
                "minimum": 1,
                "maximum": SEARCH_MAX,
                "description": "Most results (default 10).",
            },
            "after": {
                "type": "string",
                "description": "Only messages after this date or date-time (ISO 8601).",
            },
            "before": {
                "type": "string",
                "description": "Only messages before this date or date-time (ISO 8601).",
            },
        },
        "required": ["query"],
    }

    def usable(self, ctx: ToolContext) -> bool:
        """A bot token can search only with the event's action_token."""
        return bool(ctx.action_token)

    def title(self, args: dict[str, Any]) -> str:
        query = str(args.get("query") or "").strip()
        return f"Searching Slack for “{query[:60]}”" if query else "Searching Slack"

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        title = self.title(args)
        query = str(args.get("query") or "").strip()
        if not query:
            return _refused("give a query", title)
        if not ctx.action_token:
            return _refused("Slack search is not available for this message (no action token)", title)
        access = self.access(ctx)
        try:
            asker = await access.person(ctx.user)
            destination = await access.conversation(ctx.channel)
        except AccessError as exc:
            return _refused(exc.sentence, title)
        if not is_full_member(asker):
            return _refused(
                "not allowed: search covers every public channel, and the asker is a guest or from another "
                "organisation",
                title,
            )
        if destination.ext_shared:
            return _refused(
                f"not allowed: search results from this workspace cannot be used in {destination.label}, "
                "which is shared with another organisation",
                title,
            )
        tz = await self.asker_zone(access, ctx)
        request: dict[str, Any] = {
            "query": query,
            "action_token": ctx.action_token,
            "channel_types": ["public_channel"],  # what a bot token may search
            "content_types": ["messages"],
            "limit": _int_arg(args, "limit", SEARCH_DEFAULT, 1, SEARCH_MAX),
        }
        for arg in ("after", "before"):
            if args.get(arg):
                when = parse_when(args[arg], tz)
                if when is None:
                    return _refused(f"{arg} is not a date or date-time: {args[arg]!r}", title)
                request[arg] = int(float(when))
        try:
            response = await ctx.slack.assistant_search_context(**request)
        except SlackApiError as exc:
            return _refused(slack_error_sentence(str(exc.response.get("error")), "Slack search"), title)
        found = list((response.get("results") or {}).get("messages") or [])
        lines = []
        for item in found:
            when = format_time(str(item.get("message_ts") or ""), tz)
            content = plain_text(str(item.get("content") or ""), {})
            lines.append(
                f"- #{item.get('channel_name', '?')} ({item.get('channel_id', '')}), {when}, "
                f"ts={item.get('message_ts', '')}, {item.get('author_name', '?')}: {content}\n"
                f"  link: {item.get('permalink', '')}"
            )
        text = (
            f"{len(found)} results for {query!r} (public channels):\n" + "\n".join(lines)
            if found
            else (f"No results for {query!r} in public channels.")
        )
        sources = tuple(str(i["permalink"]) for i in found if i.get("permalink"))
        return ToolResult(
            text=page_text(text, max_length=self.max_chars, tool_name=self.name),
            title=f"Searched Slack for “{query[:60]}”",
            sources=sources,
        )
