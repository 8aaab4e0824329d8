"""Who may read what: the rule for every Slack-reading tool, pure, and a thin cached I/O part.

The rule has two halves.

1. **Reading.** Content of a conversation is returned only when the asker could read it in Slack: a
   public channel when the asker is a full member of the workspace (not a guest, not from another
   organisation) or is in it; a private channel, DM or group DM only when the asker is a member.
2. **Audience.** Content never moves to a wider audience. The answer goes to `ctx.channel` (the
   destination). Content of the destination itself is always fine. Public-channel content may go to any
   conversation of the workspace that is not shared with another organisation and whose every member is a
   full member of the workspace (a guest reads only the channels they were invited to, so a guest in the
   destination would see what they could not read; with more than MAX_MEMBERS members it is refused).
   Private-channel, DM and
   group-DM content may go only to a conversation that is not public and whose every member is a member
   of the source: in practice the same conversation, or a DM with the asker.

Refusals are plain sentences starting with "not allowed:", for a `ToolResult(ok=False)`. Facts come from
`conversations.info`, `conversations.members` and `users.info`, each cached in Redis for
`SLACK_ACCESS_CACHE_SECONDS` (keys `kimibot:access:*`, this module's only).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.store import PREFIX

log = logging.getLogger(__name__)

Kind = Literal["public", "private", "im", "mpim"]
MAX_MEMBERS = 5_000  # beyond this, a conversation's members are not listed (the audience check refuses)
_MEMBERS_PAGE = 1_000
_LOOKUPS_AT_ONCE = 16  # users.info calls in flight when a destination's members are checked


@dataclass(frozen=True)
class Conversation:
    id: str
    kind: Kind
    name: str = ""
    ext_shared: bool = False  # shared with another organisation (Slack Connect)
    im_user: str = ""  # the person in a 1:1 DM with the bot

    @property
    def label(self) -> str:
        if self.kind == "im":
            return f"a direct message with <@{self.im_user}>" if self.im_user else "a direct message"
        if self.kind == "mpim":
            return "a group direct message"
        return f"#{self.name}" if self.name else self.id


@dataclass(frozen=True)
class Person:
    id: str
    name: str = ""
    real_name: str = ""
    title: str = ""
    tz: str = ""
    tz_label: str = ""
    status_text: str = ""
    status_emoji: str = ""
    team_id: str = ""
    guest: bool = False  # multi- or single-channel guest (is_restricted / is_ultra_restricted)
    external: bool = False  # from another organisation (Slack Connect)
    deleted: bool = False
    bot: bool = False

    @property
    def display(self) -> str:
        return self.name or self.real_name or self.id


# ---- pure rules ----------------------------------------------------------------------------------


def conversation_from_info(channel: dict[str, Any]) -> Conversation:
    """A `conversations.info` channel object, reduced to what the rule needs."""
    if channel.get("is_im"):
        kind: Kind = "im"
    elif channel.get("is_mpim"):
        kind = "mpim"
    elif channel.get("is_private") or channel.get("is_group"):
        kind = "private"
    else:
        kind = "public"
    return Conversation(
        id=str(channel.get("id") or ""),
        kind=kind,
        name=str(channel.get("name") or ""),
        ext_shared=bool(channel.get("is_ext_shared") or channel.get("is_pending_ext_shared")),
        im_user=str(channel.get("user") or "") if kind == "im" else "",
    )


def person_from_info(user: dict[str, Any], team_id: str) -> Person:
    """A `users.info` user object, reduced; `external` when the user belongs to another organisation."""
    profile = user.get("profile") or {}
    enterprise = (user.get("enterprise_user") or {}).get("enterprise_id")
    home = str(user.get("team_id") or profile.get("team") or "")
    external = bool(user.get("is_stranger")) or bool(home and team_id and home != team_id and not enterprise)
    return Person(
        id=str(user.get("id") or ""),
        name=str(profile.get("display_name") or user.get("name") or ""),
        real_name=str(profile.get("real_name") or user.get("real_name") or ""),
        title=str(profile.get("title") or ""),
        tz=str(user.get("tz") or ""),
        tz_label=str(user.get("tz_label") or ""),
        status_text=str(profile.get("status_text") or ""),
        status_emoji=str(profile.get("status_emoji") or ""),
        team_id=home,
        guest=bool(user.get("is_restricted") or user.get("is_ultra_restricted")),
        external=external,
        deleted=bool(user.get("deleted")),
        bot=bool(user.get("is_bot")),
    )


def is_full_member(person: Person) -> bool:
    return not (person.guest or person.external or person.deleted or person.bot)


def read_refusal(conversation: Conversation, asker: Person, asker_is_member: bool) -> str | None:
    """Why the asker may not read this conversation, or None when they may."""
    if asker_is_member:
        return None
    if conversation.kind == "public":
        if is_full_member(asker):
            return None
        return (
            f"not allowed: {conversation.label} is public, but only to full members of this workspace, "
            "and the asker is a guest or from another organisation and not in it"
        )
    if conversation.kind == "private":
        return f"not allowed: {conversation.label} is a private channel the asker is not a member of"
    return f"not allowed: {conversation.label} is a conversation the asker is not part of"


def audience_refusal(
    source: Conversation,
    destination: Conversation,
    source_members: frozenset[str] | None,
    destination_members: frozenset[str] | None,
    *,
    outsiders_in_destination: bool | None = None,
) -> str | None:
    """Why content of `source` may not be used in an answer posted in `destination`, or None.
    `outsiders_in_destination`: whether a guest or someone from another organisation is among the
    destination's members (None: not known, e.g. too many members); it matters for public content."""
    if source.id == destination.id:
        return None
    if source.kind == "public":
        if destination.ext_shared:
            return (
                f"not allowed: content of {source.label} cannot be used in an answer in {destination.label}, "
                "which is shared with another organisation; ask in #"
                f"{source.name or source.id} or in a DM with the bot"
            )
        if outsiders_in_destination is not False:
            why = (
                "has guests or people from another organisation among its members"
                if outsiders_in_destination
                else "has too many members to check that all of them may read it"
            )
            return (
                f"not allowed: content of {source.label} cannot be used in an answer in {destination.label}, "
                f"which {why}; ask in #{source.name or source.id} or in a DM with the bot"
            )
        return None
    # A public channel's audience is the whole workspace, whoever its members are today.
    if (
        destination.kind != "public"
        and source_members is not None
        and destination_members is not None
        and destination_members <= source_members
    ):
        return None
    return (
        f"not allowed: {source.label} is private, and this answer goes to {destination.label}, where people "
        "who cannot read it would see it; ask there, or in a DM with the bot"
    )


# ---- cached I/O ----------------------------------------------------------------------------------


class AccessError(Exception):
    """A fact could not be learnt from Slack (channel_not_found, missing_scope...): `.sentence` says it."""

    def __init__(self, sentence: str) -> None:
        super().__init__(sentence)
        self.sentence = sentence


def slack_error_sentence(error: str, what: str) -> str:
    """One plain sentence for a Slack API error met while reading `what`."""
    match error:
        case "channel_not_found" | "not_in_channel":
            return (
                f"could not read {what}: the bot is not in that conversation or it does not exist "
                "(invite the bot with /invite to read a channel)"
            )
        case "thread_not_found" | "message_not_found":
            return f"could not read {what}: no such message or thread"
        case "user_not_found" | "user_not_visible":
            return f"could not read {what}: no such user"
        case "missing_scope" | "not_allowed_token_type" | "no_permission":
            return f"could not read {what}: the Slack app lacks a permission for it ({error})"
        case "ratelimited":
            return f"could not read {what}: Slack is rate limiting the bot; try again shortly"
        case _:
            return f"could not read {what}: Slack answered {error}"


class Access:
    """The facts the rule needs, from Slack, cached in Redis with a TTL (0: no cache)."""

    def __init__(self, slack: AsyncWebClient, redis: Redis, *, team_id: str, ttl_s: int) -> None:
        self.slack = slack
        self.redis = redis
        self.team_id = team_id
        self.ttl_s = ttl_s

    def _key(self, kind: str, ident: str) -> str:
        return f"{PREFIX}:access:{kind}:{self.team_id or '-'}:{ident}"

    async def _cached(self, kind: str, ident: str) -> Any:
        if self.ttl_s <= 0:
            return None
        try:
            raw = await self.redis.get(self._key(kind, ident))
        except RedisError:
            log.warning("access cache unavailable", exc_info=True)
            return None
        return json.loads(raw) if raw else None

    async def _store(self, kind: str, ident: str, value: Any) -> None:
        if self.ttl_s <= 0:
            return
        try:
            await self.redis.set(self._key(kind, ident), json.dumps(value), ex=self.ttl_s)
        except RedisError:
            log.warning("access cache unavailable", exc_info=True)

    async def conversation(self, channel: str) -> Conversation:
        cached = await self._cached("conv", channel)
        if cached is not None:
            return Conversation(**cached)
        try:
            response = await self.slack.conversations_info(channel=channel)
        except SlackApiError as exc:
            raise AccessError(slack_error_sentence(str(exc.response.get("error")), channel)) from exc
        conversation = conversation_from_info(dict(response.get("channel") or {}))
        await self._store("conv", channel, asdict(conversation))
        return conversation

    async def members(self, channel: str) -> frozenset[str] | None:
        """Every member's user id, or None when there are more than MAX_MEMBERS."""
        cached = await self._cached("members", channel)
        if cached is not None:
            return None if cached == "too-many" else frozenset(cached)
        found: list[str] = []
        cursor = ""
        while True:
            try:
                response = await self.slack.conversations_members(
                    channel=channel, limit=_MEMBERS_PAGE, cursor=cursor or None
                )
            except SlackApiError as exc:
                raise AccessError(slack_error_sentence(str(exc.response.get("error")), channel)) from exc
            found.extend(str(m) for m in response.get("members") or [])
            cursor = str((response.get("response_metadata") or {}).get("next_cursor") or "")
            if len(found) > MAX_MEMBERS:
                await self._store("members", channel, "too-many")
                return None
            if not cursor:
                break
        await self._store("members", channel, sorted(set(found)))
        return frozenset(found)

    async def person(self, user: str) -> Person:
        cached = await self._cached("user", user)
        if cached is not None:
            return Person(**cached)
        try:
            response = await self.slack.users_info(user=user)
        except SlackApiError as exc:
            raise AccessError(slack_error_sentence(str(exc.response.get("error")), user)) from exc
        person = person_from_info(dict(response.get("user") or {}), self.team_id)
        await self._store("user", user, asdict(person))
        return person

    async def has_outsiders(self, channel: str) -> bool | None:
        """Whether a guest or someone from another organisation is a member of `channel` (users.info,
        through the cached person lookups); None when it has more than MAX_MEMBERS members."""
        cached = await self._cached("outsiders", channel)
        if cached is not None:
            return bool(cached)
        members = await self.members(channel)
        if members is None:
            return None
        slots = asyncio.Semaphore(_LOOKUPS_AT_ONCE)

        async def outsider(user: str) -> bool:
            async with slots:
                person = await self.person(user)
            return person.guest or person.external

        found = any(await asyncio.gather(*(outsider(user) for user in sorted(members))))
        await self._store("outsiders", channel, found)
        return found

    async def is_member(self, channel: str, user: str) -> bool:
        members = await self.members(channel)
        return members is not None and user in members

    async def refusal(self, *, source: str, asker: str, destination: str) -> str | None:
        """Why the asker's answer in `destination` may not use content of `source`, or None.
        AccessError (with its sentence) when Slack would not say."""
        conversation = await self.conversation(source)
        person = await self.person(asker)
        needs_membership = conversation.kind != "public" or not is_full_member(person)
        if conversation.kind == "im" and conversation.im_user == asker:
            member = True  # the asker's own DM with the bot: no need to list its members
        else:
            member = await self.is_member(source, asker) if needs_membership else False
        why = read_refusal(conversation, person, member)
        if why is not None:
            return why
        if source == destination:
            return None
        target = await self.conversation(destination)
        if conversation.kind == "public":
            if target.ext_shared:
                return audience_refusal(conversation, target, None, None)
            outsiders = await self.has_outsiders(destination)
            return audience_refusal(conversation, target, None, None, outsiders_in_destination=outsiders)
        return audience_refusal(
            conversation, target, await self.members(source), await self.members(destination)
        )
