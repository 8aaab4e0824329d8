"""Every Redis key kimibot uses lives here, and nowhere else.

Keys of one thread share a hash tag `{team:channel:thread_ts}` so that, on Redis Cluster, a thread's
history, metadata, dedup claims, waiting jobs and lease sit on one shard (and one Lua script may touch
them all). The few global keys (the `ready` index, the dead-letter stream) are touched one at a time.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bot.turn import ThreadKey
from bot.usage import RESERVATION_TTL_S, UsageKeys, forget_user_usage

log = logging.getLogger(__name__)

PREFIX = "kimibot"
USER_NAME_TTL_S = 86_400
USAGE_TTL_S = 400 * 86_400  # votes (and, in bot/usage.py, usage records) are kept this long
STOP_TTL_S = 86_400


# KEYS: meta, history. Metadata and the history from the first entry still in use (meta `start`), so a
# long thread is not read and decoded whole on every turn.
_LOAD = """
local meta = redis.call('HGETALL', KEYS[1])
local start = 0
for i = 1, #meta, 2 do if meta[i] == 'start' then start = tonumber(meta[i + 1]) or 0 end end
return {meta, redis.call('LRANGE', KEYS[2], start, -1), start}
"""

INBOX_PATTERN = f"{PREFIX}:thread:*:inbox"  # every thread's inbox, for the sweep
READY_KEY = f"{PREFIX}:ready"  # threads with waiting jobs: member str(ThreadKey), score = when to look (ms)
DEAD_LETTER_KEY = f"{PREFIX}:dead-letter"  # jobs given up on, for the admin (a capped stream)


def _thread_tag(thread: ThreadKey) -> str:
    return f"{PREFIX}:thread:{{{thread}}}"


def thread_from_member(member: str) -> ThreadKey:
    """The ThreadKey a `ready` member names (team and channel ids hold no colon; a thread_ts may)."""
    team, channel, thread_ts = member.split(":", 2)
    return ThreadKey(team, channel, thread_ts)


@dataclass(frozen=True)
class ThreadKeys:
    """Every key of one thread. They share one hash tag, so on Redis Cluster they sit in one slot and one
    Lua script may touch them all."""

    thread: ThreadKey

    @property
    def tag(self) -> str:
        return _thread_tag(self.thread)

    def seen(self, ts: str) -> str:
        return f"{self.tag}:seen:{ts}"

    @property
    def meta(self) -> str:
        return f"{self.tag}:meta"

    @property
    def history(self) -> str:
        return f"{self.tag}:history"

    @property
    def turns(self) -> str:
        """question ts -> the answer's details for its buttons (question text, reasoning, thinking time)."""
        return f"{self.tag}:turns"

    @property
    def inbox(self) -> str:
        """The thread's waiting jobs, oldest first: the head is the one being answered."""
        return f"{self.tag}:inbox"

    @property
    def lease(self) -> str:
        return f"{self.tag}:lease"

    @property
    def fence(self) -> str:
        return f"{self.tag}:fence"

    @property
    def attempts(self) -> str:
        return f"{self.tag}:attempts"

    def progress(self, job_id: str) -> str:
        return f"{self.tag}:job:{job_id}"

    @property
    def summaries(self) -> str:
        """Summaries of the earlier turns of a long thread (ThreadSummaries); expire with history and meta."""
        return f"{self.tag}:summaries"


def dump_entry(entry: dict[str, Any]) -> str:
    # Fixed key order and escaping: what we store is what we replay, byte for byte.
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


UNREADABLE_ENTRY = "(An earlier message of this thread could not be read.)"


def _entry(thread: ThreadKey, raw: str) -> dict[str, Any]:
    """One history entry; an unreadable one (corrupted, or written by something else) stands in as a note,
    so it costs the thread nothing but itself and the entries keep their places."""
    try:
        entry = json.loads(raw)
        if isinstance(entry, dict) and entry.get("role"):
            return entry
    except ValueError:
        pass
    log.warning("unreadable history entry skipped", extra={"thread_key": str(thread), "entry": raw[:80]})
    return {"role": "user", "content": UNREADABLE_ENTRY, "unreadable": True}


@dataclass(frozen=True)
class ThreadState:
    entries: list[dict[str, Any]]  # the history from `offset` on (what the window may still use)
    meta: dict[str, str]
    offset: int = 0  # index in the whole history of entries[0]


class ThreadStore:
    """A thread's history (append-only list of JSON entries) and its metadata hash, with a TTL."""

    def __init__(self, redis: Redis, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl = ttl_seconds

    @staticmethod
    def history_key(thread: ThreadKey) -> str:
        return ThreadKeys(thread).history

    @staticmethod
    def meta_key(thread: ThreadKey) -> str:
        return ThreadKeys(thread).meta

    async def load(self, thread: ThreadKey) -> ThreadState:
        """Metadata and the history still in the window, in one round trip."""
        keys = ThreadKeys(thread)
        meta_flat, raw, start = await self.redis.eval(_LOAD, 2, keys.meta, keys.history)  # type: ignore[misc]
        meta = {str(meta_flat[i]): str(meta_flat[i + 1]) for i in range(0, len(meta_flat), 2)}
        return ThreadState([_entry(thread, item) for item in raw], meta, int(start))

    async def append(self, thread: ThreadKey, *entries: dict[str, Any], **meta: str | int | float) -> None:
        """Add entries (and set metadata) atomically, and push their expiry out again, and the summaries'
        (the head summary lives as long as the thread it leads)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if entries:
                pipe.rpush(self.history_key(thread), *(dump_entry(e) for e in entries))
            if meta:
                pipe.hset(self.meta_key(thread), mapping={k: str(v) for k, v in meta.items()})
            pipe.expire(self.history_key(thread), self.ttl)
            pipe.expire(self.meta_key(thread), self.ttl)
            pipe.expire(ThreadKeys(thread).summaries, self.ttl)
            await pipe.execute()

    async def turn_details(self, thread: ThreadKey, question_ts: str) -> dict[str, Any] | None:
        """What the buttons under one answer need (question text, reasoning), without reading the thread."""
        raw = await self.redis.hget(ThreadKeys(thread).turns, question_ts)  # type: ignore[misc]
        return json.loads(raw) if raw else None

    async def is_engaged(self, thread: ThreadKey) -> bool:
        """Has the bot answered in this thread (within the TTL)?"""
        return bool(await self.redis.hexists(self.meta_key(thread), "answered"))  # type: ignore[misc]

    async def start_assistant_thread(self, thread: ThreadKey) -> None:
        """A thread opened in Slack's assistant panel: answered with status and titles."""
        await self.append(thread, answered=1, assistant=1)

    async def is_assistant_thread(self, thread: ThreadKey) -> bool:
        return bool(await self.redis.hexists(self.meta_key(thread), "assistant"))  # type: ignore[misc]


class UserNames:
    """Display names from users.info, cached for a day in Redis and for minutes in the process (the
    most recently used LOCAL_MAX of them: a big workspace must not grow the process without end)."""

    LOCAL_TTL_S = 600
    LOCAL_MAX = 10_000

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._local: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def _remember(self, team_id: str, user: str, name: str) -> None:
        self._local[(team_id, user)] = (name, time.monotonic() + self.LOCAL_TTL_S)
        self._local.move_to_end((team_id, user))
        while len(self._local) > self.LOCAL_MAX:
            self._local.popitem(last=False)  # the least recently used

    @staticmethod
    def key(team_id: str, user: str) -> str:
        return f"{PREFIX}:user:{team_id}:{user}"

    async def get(self, team_id: str, user: str) -> str | None:
        local = self._local.get((team_id, user))
        if local is not None:
            if local[1] > time.monotonic():
                self._local.move_to_end((team_id, user))
                return local[0]
            del self._local[(team_id, user)]
        value = await self.redis.get(self.key(team_id, user))
        if value is None:
            return None
        self._remember(team_id, user, str(value))
        return str(value)

    async def put(self, team_id: str, user: str, name: str) -> None:
        self._remember(team_id, user, name)
        await self.redis.set(self.key(team_id, user), name, ex=USER_NAME_TTL_S)

    def drop_local(self, team_id: str, user: str) -> None:
        """Forget this process's copy (`/kimi forget-me`; forget_user deletes the Redis one)."""
        self._local.pop((team_id, user), None)


class Stops:
    """Stop requests for answers in progress, visible to whichever process is writing the answer."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def key(channel: str, ts: str) -> str:
        return f"{PREFIX}:stop:{channel}:{ts}"

    async def request(self, channel: str, ts: str, user: str) -> None:
        # As long as a question may wait behind others in its thread (a stop must still hold when its turn
        # comes), a day.
        await self.redis.set(self.key(channel, ts), user, ex=STOP_TTL_S)

    async def requested_by(self, channel: str, ts: str) -> str | None:
        value = await self.redis.get(self.key(channel, ts))
        return str(value) if value is not None else None


# KEYS: approval. ARGV: user, decision ('approved' | 'declined'). The asker alone decides, once.
_DECIDE = """
local value = redis.call('GET', KEYS[1])
if not value then return 'gone' end
if value ~= 'pending:' .. ARGV[1] then
  if string.sub(value, 1, 8) == 'pending:' then return 'not_asker' end
  return 'decided'
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 'ok'
"""


SHORTCUT_MESSAGE_TTL_S = 86_400  # a modal may stay open a while; its form is refused after this


class ShortcutMessages:
    """The message an "Ask Kimi about this" modal is about, from the shortcut until the form is sent: a
    message (up to 40,000 characters, and its files) does not fit in the modal's private_metadata."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def key(token: str) -> str:
        return f"{PREFIX}:shortcut:{token}"

    async def put(self, token: str, message: dict[str, Any]) -> None:
        await self.redis.set(self.key(token), json.dumps(message), ex=SHORTCUT_MESSAGE_TTL_S)

    async def get(self, token: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self.key(token))
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class Approvals:
    """Approve/Deny for a tool call that changes things: opened by the answering job, decided by the
    asker's click (in whichever process receives it), read by the job while it waits."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def key(approval_id: str) -> str:
        return f"{PREFIX}:approval:{approval_id}"

    async def open(self, approval_id: str, asker: str, ttl_s: int) -> None:
        await self.redis.set(self.key(approval_id), f"pending:{asker}", ex=max(ttl_s, 1))

    async def asker(self, approval_id: str) -> str | None:
        value = await self.redis.get(self.key(approval_id))
        text = str(value) if value is not None else ""
        return text.removeprefix("pending:") if text.startswith("pending:") else None

    async def decide(self, approval_id: str, user: str, approved: bool) -> str:
        """'ok', 'not_asker' (someone else clicked), 'decided' (already) or 'gone' (expired)."""
        result = await self.redis.eval(  # type: ignore[misc]
            _DECIDE, 1, self.key(approval_id), user, "approved" if approved else "declined"
        )
        return str(result)

    async def decision(self, approval_id: str) -> bool | None:
        """True approved, False declined, None not yet."""
        value = await self.redis.get(self.key(approval_id))
        if value is None or str(value).startswith("pending:"):
            return None
        return str(value) == "approved"


class Feedback:
    """Thumbs up/down per answer message and user, with what the answer cost, for the admin.

    A vote and the team's log of votes are written in one MULTI, so both keys carry the hash tag
    `{team_id}` (one slot on Redis Cluster); both expire like usage does."""

    LOG_LENGTH = 10_000

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def _tag(team_id: str) -> str:
        return f"{{{team_id or '-'}}}"  # `{}` would be no tag at all: the two keys could part

    @classmethod
    def key(cls, team_id: str, channel: str, message_ts: str) -> str:
        return f"{PREFIX}:feedback:{cls._tag(team_id)}:{channel}:{message_ts}"

    @classmethod
    def log_key(cls, team_id: str) -> str:
        return f"{PREFIX}:feedback-log:{cls._tag(team_id)}"

    async def record(
        self,
        team_id: str,
        channel: str,
        message_ts: str,
        user: str,
        rating: str,
        details: dict[str, str | int | float],
    ) -> None:
        entry = {"user": user, "rating": rating, "channel": channel, "message_ts": message_ts, **details}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(team_id, channel, message_ts), user, json.dumps(entry, separators=(",", ":")))
            pipe.expire(self.key(team_id, channel, message_ts), USAGE_TTL_S)
            pipe.lpush(self.log_key(team_id), json.dumps(entry, separators=(",", ":")))
            pipe.ltrim(self.log_key(team_id), 0, self.LOG_LENGTH - 1)
            pipe.expire(self.log_key(team_id), USAGE_TTL_S)
            await pipe.execute()

    async def ratings(self, team_id: str, channel: str, message_ts: str) -> dict[str, dict[str, Any]]:
        raw = await self.redis.hgetall(self.key(team_id, channel, message_ts))
        return {str(k): json.loads(v) for k, v in raw.items()}


# --- Access control and forgetting (bot/admission.py, handlers/shortcuts.py, /kimi forget-me) ---

ACCESS_FACT_TTL_S = 3_600  # how long a user's guest flag and a user group's members are trusted
REFUSAL_NOTICE_TTL_S = 3_600  # "kimibot isn't enabled for you here" at most once per user per hour


class AccessFacts:
    """What the access rule needs to know about people (is a user a guest; who is in a user group), from
    users.info and usergroups.users.list, cached in Redis for an hour and in the process for minutes; and
    the once-an-hour mark of the refusal notice."""

    LOCAL_TTL_S = 300
    LOCAL_MAX = 10_000

    def __init__(self, redis: Redis, ttl_s: int = ACCESS_FACT_TTL_S) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._local: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @staticmethod
    def guest_key(team_id: str, user: str) -> str:
        return f"{PREFIX}:guest:{team_id}:{user}"

    @staticmethod
    def group_key(team_id: str, group: str) -> str:
        return f"{PREFIX}:usergroup:{team_id}:{group}"

    @staticmethod
    def notice_key(team_id: str, user: str) -> str:
        return f"{PREFIX}:refused:{team_id}:{user}"

    async def _get(self, key: str) -> str | None:
        local = self._local.get(key)
        if local is not None:
            if local[1] > time.monotonic():
                return local[0]
            del self._local[key]
        value = await self.redis.get(key)
        if value is not None:
            self._remember(key, str(value))
        return None if value is None else str(value)

    def _remember(self, key: str, value: str) -> None:
        self._local[key] = (value, time.monotonic() + min(self.LOCAL_TTL_S, self.ttl_s))
        self._local.move_to_end(key)
        while len(self._local) > self.LOCAL_MAX:
            self._local.popitem(last=False)

    async def _put(self, key: str, value: str) -> None:
        self._remember(key, value)
        await self.redis.set(key, value, ex=max(self.ttl_s, 1))

    async def guest(self, team_id: str, user: str) -> bool | None:
        """Is the user a guest (None: not known yet)?"""
        value = await self._get(self.guest_key(team_id, user))
        return None if value is None else value == "1"

    async def put_guest(self, team_id: str, user: str, guest: bool) -> None:
        await self._put(self.guest_key(team_id, user), "1" if guest else "0")

    async def group(self, team_id: str, group: str) -> frozenset[str] | None:
        """A user group's members (None: not known yet)."""
        value = await self._get(self.group_key(team_id, group))
        return None if value is None else frozenset(json.loads(value))

    async def put_group(self, team_id: str, group: str, members: list[str]) -> None:
        await self._put(self.group_key(team_id, group), json.dumps(sorted(set(members))))

    async def first_refusal(self, team_id: str, user: str) -> bool:
        """True once per user per hour: the refusal notice is due."""
        return bool(
            await self.redis.set(self.notice_key(team_id, user), "1", nx=True, ex=REFUSAL_NOTICE_TTL_S)
        )

    def drop_local(self, team_id: str, user: str) -> None:
        """Forget this process's copy of the user's facts (`/kimi forget-me`; forget_user deletes Redis's)."""
        self._local.pop(self.guest_key(team_id, user), None)


# KEYS: lease, meta, history, turns, summaries (one thread's tag). ARGV: holder, the forget message's ts,
# thread ttl s.
# Run by the worker holding the thread, so no answer of the thread is running meanwhile and none is
# half-recorded. Deletes the history, the answers' details, the summaries and the metadata, keeping only
# whether the bot answers in the thread (`answered`, `assistant`) and the newest message it posted there
# (`posted_ts`, which re-runs rely on), none of them content; `forgotten` then marks the thread so that the
# next question does not read the forgotten messages back from Slack (the backfill of a thread the bot is
# new to).
# -> keys deleted | -1 lost
_FORGET_THREAD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local names = {'answered', 'assistant', 'posted_ts'}
local keep = redis.call('HMGET', KEYS[2], unpack(names))
local n = redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
for i = 1, #names do if keep[i] then redis.call('HSET', KEYS[2], names[i], keep[i]) end end
redis.call('HSET', KEYS[2], 'forgotten', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return n
"""


async def forget_thread(redis: Redis, thread: ThreadKey, holder: str, forget_ts: str, ttl_s: int) -> int:
    """Delete a thread's stored context (history, metadata, answers' details, summaries) as the holder of
    its lease.
    Left alone: the inbox, lease, fencing token, attempts and progress of jobs (the questions still waiting,
    and what answering them needs) and the dedup claims (a message timestamp each, no content, expiring after
    DEDUP_TTL_SECONDS: without them a redelivered message would be answered, and stored, again). Returns
    how many keys were deleted; -1 when the lease was lost."""
    keys = ThreadKeys(thread)
    history = await redis.lrange(keys.history, 0, -1)  # type: ignore[misc]
    result = await redis.eval(  # type: ignore[misc]
        _FORGET_THREAD,
        5,
        keys.lease,
        keys.meta,
        keys.history,
        keys.turns,
        ThreadSummaries.key(thread),
        holder,
        forget_ts,
        ttl_s,
    )
    if int(result) >= 0:  # and what was read from the thread's files (bot/files)
        await FileCache(redis, ttl_s).forget(thread.team_id, [_entry(thread, str(raw)) for raw in history])
    return int(result)


async def forget_user(redis: Redis, team_id: str, user: str) -> dict[str, int]:
    """Delete what kimibot keeps about one person outside threads: their cached display name, access facts
    and refusal mark, their 👍/👎 votes (and their entries in the team's vote log), their Stop requests,
    their usage records (bot/usage.py; team and channel totals keep the numbers, without the user id).
    Their messages inside threads' histories stay (they are part of other people's conversations; `forget`
    in a thread deletes one). Returns counts per kind."""
    done = {"name": 0, "access": 0, "votes": 0, "stops": 0, "usage": 0}
    done["name"] = int(await redis.delete(UserNames.key(team_id, user)))
    done["access"] = int(
        await redis.delete(AccessFacts.guest_key(team_id, user), AccessFacts.notice_key(team_id, user))
    )
    pattern = f"{PREFIX}:feedback:{Feedback._tag(team_id)}:*"
    async for key in redis.scan_iter(match=pattern, count=500):
        done["votes"] += int(await redis.hdel(str(key), user))  # type: ignore[misc]
    log_key = Feedback.log_key(team_id)
    for raw in await redis.lrange(log_key, 0, -1):  # type: ignore[misc]
        try:
            voter = json.loads(raw).get("user")
        except (ValueError, AttributeError):
            continue
        if voter == user:
            await redis.lrem(log_key, 0, str(raw))  # type: ignore[misc]
    async for key in redis.scan_iter(match=f"{PREFIX}:stop:*", count=500):
        if str(await redis.get(key) or "") == user:
            done["stops"] += int(await redis.delete(key))
    done["usage"] = await forget_user_usage(redis, team_id, user)
    return done


async def _delete_matching(redis: Redis, pattern: str, keep: tuple[str, ...] = ()) -> int:
    """Delete every key matching `pattern` except those starting with one of `keep`, one at a time (on a
    cluster, scan_iter visits every master)."""
    deleted = 0
    async for key in redis.scan_iter(match=pattern, count=500):
        if not str(key).startswith(keep):
            deleted += int(await redis.delete(key))
    return deleted


def team_patterns(team_id: str) -> dict[str, str]:
    """Every key family holding a team's data, by kind: the hash-tagged families of the team layer
    (`kimibot:<kind>:{T}:...`: installation, settings, usage, feedback), the threads
    (`kimibot:thread:{T:channel:ts}:...`) and the per-person keys that carry the team id untagged."""
    return {
        "tagged": f"{PREFIX}:*{{{team_id}}}*",
        "threads": f"{PREFIX}:thread:{{{team_id}:*",
        "names": f"{PREFIX}:user:{team_id}:*",
        "usage": f"{PREFIX}:usage:{team_id}:*",
        "guests": f"{PREFIX}:guest:{team_id}:*",
        "usergroups": f"{PREFIX}:usergroup:{team_id}:*",
        "refusals": f"{PREFIX}:refused:{team_id}:*",
        "access": f"{PREFIX}:access:*:{team_id}:*",
    }


async def forget_team(redis: Redis, team_id: str) -> dict[str, int]:
    """Delete everything kimibot keeps about one workspace (it uninstalled kimibot or revoked its token):
    its settings, usage and budgets, threads and their jobs (dead-lettered ones too), names, votes and
    access facts. Not its installation: the caller deletes that first, once (a reinstall that comes
    between two uninstall events must survive the second). Other teams' keys are untouched (each pattern
    ends the team id with a delimiter). A `gone` mark (an hour, no data) stops a request still in flight
    from recording usage again. Left to expire: the few keys without a team id (Stop marks, tool
    approvals; a day at most). Returns counts per kind."""
    if not team_id or any(c in team_id for c in "*?[]{}:\\"):
        raise ValueError(f"not a team id: {team_id!r}")
    gone = UsageKeys(team_id).gone
    await redis.set(gone, "1", ex=RESERVATION_TTL_S)  # before the scan: no settlement recreates keys after
    keep = (f"{PREFIX}:install:", gone)
    done = {
        kind: await _delete_matching(redis, pattern, keep) for kind, pattern in team_patterns(team_id).items()
    }
    ready = 0
    async for member, _ in redis.zscan_iter(READY_KEY, match=f"{team_id}:*", count=500):
        ready += int(await redis.zrem(READY_KEY, member))
    done["ready"] = ready
    done["dead_letters"] = await _forget_dead_letters(redis, team_id)
    return done


async def _forget_dead_letters(redis: Redis, team_id: str) -> int:
    """Remove the team's jobs (their payloads hold questions) from the dead-letter stream."""
    deleted, start = 0, "-"
    while True:
        entries: Any = await redis.xrange(DEAD_LETTER_KEY, min=start, count=500)
        if not entries:
            return deleted
        mine = [
            entry_id
            for entry_id, fields in entries
            if str(fields.get("thread", "")).startswith(f"{team_id}:")
        ]
        if mine:
            deleted += int(await redis.xdel(DEAD_LETTER_KEY, *mine))
        last = str(entries[-1][0])
        start = "(" + last
        if len(entries) < 500:
            return deleted


# --- Summaries of long threads' earlier turns (bot/summaries.py) ---

# KEYS: lease, summaries, meta. ARGV: holder, field (the summary's end), value, ttl s. Written only while the
# thread is ours (a run that lost its lease must not write after a `forget`). The thread's window start
# (meta `start`, an index into the whole history) moves to the summary's end in the same step, never back:
# a turn that fails after paying for a summary leaves the next turn to begin where it ends, with it at the
# head, instead of planning a slightly different range and paying again. -> 1 | -1 lost
_PUT_SUMMARY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
if tonumber(ARGV[2]) > (tonumber(redis.call('HGET', KEYS[3], 'start') or '0') or 0) then
  redis.call('HSET', KEYS[3], 'start', ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
end
return 1
"""


class ThreadSummaries:
    """A thread's summaries of earlier turns: one hash (the thread's hash tag, so `forget_thread` deletes it
    with the rest), one field per summary, named by the end of the range it covers (where the window that
    follows it begins); the value holds the whole range and the text. Expires like the thread: every write
    to the thread's history or metadata pushes its expiry out too."""

    def __init__(self, redis: Redis, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl = ttl_seconds

    @staticmethod
    def key(thread: ThreadKey) -> str:
        return ThreadKeys(thread).summaries

    async def get(self, thread: ThreadKey, end: int) -> str | None:
        """The stored summary that ends where history entry `end` begins (its JSON), if any."""
        raw = await self.redis.hget(self.key(thread), str(end))  # type: ignore[misc]
        return None if raw is None else str(raw)

    async def put(self, thread: ThreadKey, lease_key: str, holder: str, end: int, value: str) -> bool:
        """Store a summary as the holder of the thread's lease, and move the thread's start to its `end`;
        False when the lease was lost."""
        result = await self.redis.eval(  # type: ignore[misc]
            _PUT_SUMMARY,
            3,
            lease_key,
            self.key(thread),
            ThreadKeys(thread).meta,
            holder,
            str(end),
            value,
            self.ttl,
        )
        return int(result) == 1


class FileCache:
    """What was read from a Slack file (its text, or its re-encoded image), by team and file id, for the
    thread's TTL: a file in a thread is downloaded and read once, and renders to the same bytes on every
    later turn (the prompt prefix stays cached). Keys are tagged by team, so forget_team removes them."""

    def __init__(self, redis: Redis, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds

    @staticmethod
    def key(team_id: str, file_id: str) -> str:
        return f"{PREFIX}:file:{{{team_id}}}:{file_id}"

    async def get(self, team_id: str, file_id: str) -> str | None:
        raw = await self.redis.get(self.key(team_id, file_id))
        return None if raw is None else str(raw)

    async def put(self, team_id: str, file_id: str, value: str, ttl_seconds: int | None = None) -> None:
        """Kept for the thread's TTL, or `ttl_seconds` (a transient failure, tried again after it)."""
        await self.redis.set(self.key(team_id, file_id), value, ex=ttl_seconds or self.ttl_seconds)

    async def touch(self, team_id: str, file_id: str) -> None:
        """A file read again lives as long as the thread that reads it (whose TTL each turn refreshes)."""
        await self.redis.expire(self.key(team_id, file_id), self.ttl_seconds)

    async def forget(self, team_id: str, entries: list[dict[str, Any]]) -> int:
        """Delete what was read from the files of these history entries (a forgotten thread's)."""
        ids = {
            str(f["id"]) for e in entries for f in e.get("files") or [] if isinstance(f, dict) and f.get("id")
        }
        deleted = 0
        for file_id in sorted(ids):  # one key at a time: the keys may sit in different cluster slots
            deleted += int(await self.redis.delete(self.key(team_id, file_id)))
        return deleted
