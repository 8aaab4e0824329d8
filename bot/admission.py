"""The one place that says "answer this" or "ignore it", for every message event.

`decide` is pure: it gets the event and the facts it needs, and returns a Decision. `admit` adds the
Redis facts. The claim (channel + ts, under the thread's key) that makes sure one user message gets one
answer, whichever event brings it and however often, is taken when the turn is queued.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bot.store import AccessFacts, ThreadStore
from bot.turn import Source, ThreadKey, Turn, file_refs

if TYPE_CHECKING:
    from slack_sdk.web.async_client import AsyncWebClient

    from bot.settings import Settings

log = logging.getLogger(__name__)

# Subtypes that are still a person saying something; every other subtype (edits, deletions,
# joins, bot_message, message_changed ...) is ignored.
SPEAKING_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})

_MENTION = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")


@dataclass(frozen=True)
class Decision:
    answer: bool
    why: str
    source: Source | None = None
    refused: bool = False  # addressed to the bot, but the access rule says no: the asker is told


NOT_ENABLED = "kimibot isn't enabled for you here."


@dataclass(frozen=True)
class AccessPolicy:
    """ALLOWED_USERS, ALLOWED_CHANNELS and ALLOW_GUESTS, parsed. Empty lists: everyone, everywhere."""

    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()  # user-group ids (S…): their members are allowed
    channels: frozenset[str] = frozenset()  # channel ids, and `dm` for every DM with the bot
    allow_guests: bool = True

    @staticmethod
    def from_settings(settings: Settings) -> AccessPolicy:
        from bot.settings import split_ids

        people = split_ids(settings.allowed_users)
        return AccessPolicy(
            users=frozenset(p for p in people if not p.startswith("S")),
            groups=frozenset(p for p in people if p.startswith("S")),
            channels=frozenset(split_ids(settings.allowed_channels)),
            allow_guests=settings.allow_guests,
        )

    @property
    def open(self) -> bool:
        """Nothing to check: no fact is looked up, no Slack or Redis call made."""
        return not (self.users or self.groups or self.channels) and self.allow_guests


@dataclass(frozen=True)
class PersonFacts:
    """What the access rule knows about the asker, looked up only when a restriction needs it."""

    guest: bool | None = None  # None: Slack could not say; counted as not a guest (see access_refusal)
    groups: frozenset[str] = frozenset()  # the allowed user groups the asker is a member of


def access_refusal(policy: AccessPolicy, user: str, channel: str, facts: PersonFacts) -> str | None:
    """Why this person may not use kimibot in this channel, or None. Every surface (mentions, DMs, thread
    follow-ups, /kimi, Regenerate/Retry) comes through here, by way of decide() or Access.refusal().

    A guest whose status Slack could not tell us (users.info failing) is let through: the guest rule is on
    in every default install, and a Slack hiccup must not refuse everyone. An allowlist the admin set is
    strict: membership of a user group that could not be read does not count."""
    dm_allowed = channel.startswith("D") and "dm" in policy.channels
    if policy.channels and channel not in policy.channels and not dm_allowed:
        return "channel not allowed"
    if (policy.users or policy.groups) and user not in policy.users and not (facts.groups & policy.groups):
        return "user not allowed"
    if not policy.allow_guests and facts.guest:
        return "guest"
    return None


@dataclass
class Access:
    """The access policy with the I/O its facts need: users.info (guest or not) and usergroups.users.list
    (who is in an allowed group), cached through AccessFacts. Asked nothing when the policy is open."""

    policy: AccessPolicy
    facts: AccessFacts
    slack: AsyncWebClient

    async def facts_for(self, team_id: str, user: str, channel: str) -> PersonFacts:
        """What the policy needs to know about `user`, and no more: nothing when even the most favourable
        facts would not let them in here (or when they are in without any)."""
        best = PersonFacts(guest=False, groups=self.policy.groups)
        if access_refusal(self.policy, user, channel, best) is not None:
            return PersonFacts()
        guest = None if self.policy.allow_guests else await self._guest(team_id, user)
        groups: set[str] = set()
        if user not in self.policy.users:
            for group in sorted(self.policy.groups):
                if user in await self._members(team_id, group):
                    groups.add(group)
                    break
        return PersonFacts(guest=guest, groups=frozenset(groups))

    async def refusal(self, team_id: str, user: str, channel: str) -> str | None:
        """The access rule for surfaces that are not message events (/kimi, Regenerate/Retry)."""
        if self.policy.open:
            return None
        facts = await self.facts_for(team_id, user, channel)
        return access_refusal(self.policy, user, channel, facts)

    async def _guest(self, team_id: str, user: str) -> bool | None:
        known = await self.facts.guest(team_id, user)
        if known is not None:
            return known
        try:
            response = await self.slack.users_info(user=user)
        except Exception as exc:
            log.warning(
                "guest check skipped: users.info failed", extra={"user": user, "error": type(exc).__name__}
            )
            return None
        info = response.get("user") or {}
        guest = bool(info.get("is_restricted") or info.get("is_ultra_restricted"))
        await self.facts.put_guest(team_id, user, guest)
        return guest

    async def _members(self, team_id: str, group: str) -> frozenset[str]:
        known = await self.facts.group(team_id, group)
        if known is not None:
            return known
        try:
            response = await self.slack.usergroups_users_list(usergroup=group)
        except Exception as exc:
            log.warning(
                "user group not readable: its members are not let in",
                extra={"usergroup": group, "error": type(exc).__name__},
            )
            return frozenset()
        members = [str(u) for u in response.get("users") or []]
        await self.facts.put_group(team_id, group, members)
        return frozenset(members)


def ignore(why: str) -> Decision:
    return Decision(False, why)


def mentions(text: str, user_id: str) -> bool:
    return any(m == user_id for m in _MENTION.findall(text or ""))


def strip_mention(text: str, user_id: str) -> str:
    """The question without the bot's own `<@U…>` token(s)."""
    if not user_id:
        return (text or "").strip()
    return re.sub(rf"<@{re.escape(user_id)}(?:\|[^>]*)?>", "", text or "").strip()


def decide(
    event: dict[str, Any],
    *,
    bot_user_id: str,
    bot_id: str,
    thread_engaged: bool = False,
    access: AccessPolicy | None = None,
    facts: PersonFacts | None = None,
    followups: str = "all",
) -> Decision:
    """Should this `app_mention` or `message` event be answered, and as what kind of turn?

    `thread_engaged` says whether the bot has already answered in the event's thread (a Redis fact
    the caller looks up only for thread replies). With `access`, a message addressed to the bot from
    someone (or somewhere) the policy leaves out is refused (`refused`: the asker is told); `facts` are what
    the policy needs to know about the asker (admit() looks them up only when a restriction needs them).
    `followups` is the channel's follow-up mode (its settings): "all" answers every reply in a thread the
    bot is in, "mentions" only replies that mention it.
    """
    decision = _addressed(
        event, bot_user_id=bot_user_id, bot_id=bot_id, thread_engaged=thread_engaged, followups=followups
    )
    if decision.answer and access is not None and not access.open:
        why = access_refusal(access, str(event["user"]), str(event["channel"]), facts or PersonFacts())
        if why is not None:
            return Decision(False, f"not allowed: {why}", decision.source, refused=True)
    return decision


def _addressed(
    event: dict[str, Any], *, bot_user_id: str, bot_id: str, thread_engaged: bool, followups: str = "all"
) -> Decision:
    """Is the event a person's message addressed to the bot (and as what kind of turn)?"""
    if not isinstance(event, dict):
        return ignore("not an event")
    subtype = event.get("subtype")
    if subtype not in SPEAKING_SUBTYPES:
        return ignore(f"subtype {subtype}")
    if event.get("bot_id") or event.get("bot_profile"):
        return ignore("from a bot")
    user = event.get("user")
    if not isinstance(user, str) or not user:
        return ignore("no user")
    if user in (bot_user_id, bot_id):
        return ignore("from myself")
    if not isinstance(event.get("text", ""), str) or not isinstance(event.get("ts"), str):
        return ignore("malformed message")
    if not isinstance(event.get("channel"), str) or not event.get("channel"):
        return ignore("no channel")
    if event.get("edited"):
        return ignore("an edit")

    if event.get("type") == "app_mention":
        return Decision(True, "mentioned", Source.MENTION)
    if event.get("type") != "message":
        return ignore(f"event type {event.get('type')}")
    if event.get("channel_type") == "im":
        return Decision(True, "direct message", Source.DM)
    if mentions(event.get("text", ""), bot_user_id):
        # The `message` twin of an app_mention; dedup makes sure only one of the two is answered.
        return Decision(True, "mentioned", Source.MENTION)
    thread_ts = event.get("thread_ts")
    if thread_ts and thread_ts != event.get("ts"):
        if thread_engaged and followups == "mentions":
            return ignore("follow-up without a mention in a mentions-only channel")
        if thread_engaged:
            return Decision(True, "follow-up in my thread", Source.THREAD)
        return ignore("thread I am not part of")
    return ignore("not addressed to me")


def is_thread_reply(event: dict[str, Any]) -> bool:
    thread_ts = event.get("thread_ts")
    return bool(thread_ts) and thread_ts != event.get("ts")


def event_team(body: dict[str, Any], event: dict[str, Any]) -> str:
    return str(body.get("team_id") or event.get("team") or "")


def turn_from_event(body: dict[str, Any], event: dict[str, Any], source: Source, bot_user_id: str) -> Turn:
    ts = str(event["ts"])
    return Turn(
        source=source,
        team_id=event_team(body, event),
        channel=str(event["channel"]),
        user=str(event["user"]),
        text=strip_mention(str(event.get("text") or ""), bot_user_id),
        ts=ts,
        thread_ts=str(event.get("thread_ts") or ts),
        event_id=str(body.get("event_id") or ""),
        action_token=str(
            event.get("action_token") or (event.get("assistant_thread") or {}).get("action_token") or ""
        ),
        files=file_refs(event.get("files")),
    )


@dataclass(frozen=True)
class Refused:
    """A message addressed to the bot from someone, or somewhere, the access policy leaves out."""

    team_id: str
    channel: str
    user: str
    thread_ts: str  # the thread the message was in ('' for a top-level message)
    why: str


async def admit(
    body: dict[str, Any],
    event: dict[str, Any],
    *,
    threads: ThreadStore,
    bot_user_id: str,
    bot_id: str,
    access: Access | None = None,
    followups: Callable[[str, str], Awaitable[str]] | None = None,
) -> Turn | Refused | None:
    """decide() plus the Redis facts it needs: is the thread ours (thread replies only), and is it a thread
    of Slack's assistant panel (DMs only). The claim that makes one message one answer is taken where the
    turn is queued (bot/queue.py), in the same step. `followups(team, channel)` gives the channel's follow-up
    mode; it is asked only for a reply without a mention in a thread the bot is in."""
    engaged = False
    mode = "all"
    if (
        event.get("type") == "message"
        and event.get("channel_type") != "im"
        and is_thread_reply(event)
        and not mentions(str(event.get("text") or ""), bot_user_id)
        and isinstance(event.get("channel"), str)
    ):
        key = ThreadKey(event_team(body, event), str(event["channel"]), str(event["thread_ts"]))
        engaged = await threads.is_engaged(key)
        if engaged and followups is not None:
            mode = await followups(key.team_id, key.channel)
    decision = decide(event, bot_user_id=bot_user_id, bot_id=bot_id, thread_engaged=engaged, followups=mode)
    if decision.answer and access is not None and not access.policy.open:
        team, user, channel = event_team(body, event), str(event["user"]), str(event["channel"])
        facts = await access.facts_for(team, user, channel)
        decision = decide(
            event,
            bot_user_id=bot_user_id,
            bot_id=bot_id,
            thread_engaged=engaged,
            access=access.policy,
            facts=facts,
            followups=mode,
        )
        if decision.refused:
            log.info("refused", extra={"why": decision.why, "user": user, "channel": channel})
            thread_ts = str(event.get("thread_ts") or "") if is_thread_reply(event) else ""
            return Refused(team, channel, user, thread_ts, decision.why)
    if not decision.answer or decision.source is None:
        log.debug("ignored", extra={"why": decision.why, "event_id": body.get("event_id")})
        return None
    turn = turn_from_event(body, event, decision.source, bot_user_id)
    if (
        decision.source is Source.DM
        and not turn.opens_thread
        and await threads.is_assistant_thread(turn.thread)
    ):
        turn = replace(turn, assistant_thread=True)
    return turn
