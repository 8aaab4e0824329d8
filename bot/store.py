"""Every Redis key kimibot uses lives here, and nowhere else.

Keys of one thread share a hash tag `{team:channel:thread_ts}` so that, on Redis Cluster, a thread's
history, metadata, dedup claims and order sit on one shard (and one Lua script may touch them all).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bot.turn import ThreadKey

PREFIX = "kimibot"
USER_NAME_TTL_S = 86_400
USAGE_TTL_S = 400 * 86_400


# SET key to ARGV[1] only if that raises it (and refresh its expiry to ARGV[2] seconds).
_RAISE_TO = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return current
"""


# KEYS: seen, meta, seq (one thread's hash tag, so one slot). ARGV: dedup TTL, thread TTL.
_ADMIT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return -1 end
redis.call('HSET', KEYS[2], 'answered', '1')
redis.call('EXPIRE', KEYS[2], ARGV[2])
local seq = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return seq
"""


def _thread_tag(thread: ThreadKey) -> str:
    return f"{PREFIX}:thread:{{{thread}}}"


def _dumps(entry: dict[str, Any]) -> str:
    # Fixed key order and escaping: what we store is what we replay, byte for byte.
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class ThreadState:
    entries: list[dict[str, Any]]
    meta: dict[str, str]
    done: int  # the sequence number of the last question answered in the thread


class ThreadStore:
    """A thread's history (append-only list of JSON entries) and its metadata hash, with a TTL."""

    def __init__(self, redis: Redis, ttl_seconds: int) -> None:
        self.redis = redis
        self.ttl = ttl_seconds

    @staticmethod
    def history_key(thread: ThreadKey) -> str:
        return f"{_thread_tag(thread)}:history"

    @staticmethod
    def meta_key(thread: ThreadKey) -> str:
        return f"{_thread_tag(thread)}:meta"

    async def load(self, thread: ThreadKey) -> ThreadState:
        """History, metadata and how far the thread's questions are done, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(self.history_key(thread), 0, -1)
            pipe.hgetall(self.meta_key(thread))
            pipe.get(f"{_thread_tag(thread)}:done")
            raw, meta, done = await pipe.execute()
        return ThreadState([json.loads(item) for item in raw], dict(meta), int(done or 0))

    async def append(self, thread: ThreadKey, *entries: dict[str, Any], **meta: str | int | float) -> None:
        """Add entries (and set metadata) atomically, and push both keys' expiry out again."""
        async with self.redis.pipeline(transaction=True) as pipe:
            if entries:
                pipe.rpush(self.history_key(thread), *(_dumps(e) for e in entries))
            if meta:
                pipe.hset(self.meta_key(thread), mapping={k: str(v) for k, v in meta.items()})
            pipe.expire(self.history_key(thread), self.ttl)
            pipe.expire(self.meta_key(thread), self.ttl)
            await pipe.execute()

    async def admit(self, thread: ThreadKey, ts: str, dedup_ttl_s: int) -> int | None:
        """One round trip: claim message `ts` (None if already claimed: a twin event or a retry), mark the
        thread as one the bot answers in, and give the question its place in the thread's order."""
        result = await self.redis.eval(
            _ADMIT,
            3,
            f"{_thread_tag(thread)}:seen:{ts}",
            self.meta_key(thread),
            f"{_thread_tag(thread)}:seq",
            dedup_ttl_s,
            self.ttl,
        )
        return None if int(result) < 0 else int(result)

    async def engage(self, thread: ThreadKey) -> None:
        """Mark the thread as one the bot answers in, so follow-ups sent before the answer count too."""
        await self.append(thread, answered=1)

    async def is_engaged(self, thread: ThreadKey) -> bool:
        """Has the bot answered in this thread (within the TTL)?"""
        return bool(await self.redis.hexists(self.meta_key(thread), "answered"))

    async def start_assistant_thread(self, thread: ThreadKey) -> None:
        """A thread opened in Slack's assistant panel: answered with status and titles."""
        await self.append(thread, answered=1, assistant=1)

    async def is_assistant_thread(self, thread: ThreadKey) -> bool:
        return bool(await self.redis.hexists(self.meta_key(thread), "assistant"))

    async def next_seq(self, thread: ThreadKey) -> int:
        """The place of a new question in its thread: questions are answered in this order."""
        key = f"{_thread_tag(thread)}:seq"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, self.ttl)
            seq, _ = await pipe.execute()
        return int(seq)

    async def wait_turn(self, thread: ThreadKey, seq: int, limit_s: float, poll_s: float = 0.1) -> bool:
        """Wait until the question before `seq` is done (in any process); False if that took too long."""
        key = f"{_thread_tag(thread)}:done"
        deadline = asyncio.get_running_loop().time() + limit_s
        while int(await self.redis.get(key) or 0) < seq - 1:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def finish_turn(self, thread: ThreadKey, seq: int) -> None:
        """Mark question `seq` done (never moving the mark back), letting the next one go."""
        await self.redis.eval(_RAISE_TO, 1, f"{_thread_tag(thread)}:done", seq, self.ttl)


class UserNames:
    """Display names from users.info, cached for a day in Redis and for minutes in the process."""

    LOCAL_TTL_S = 600

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._local: dict[tuple[str, str], tuple[str, float]] = {}

    @staticmethod
    def key(team_id: str, user: str) -> str:
        return f"{PREFIX}:user:{team_id}:{user}"

    async def get(self, team_id: str, user: str) -> str | None:
        local = self._local.get((team_id, user))
        if local is not None and local[1] > time.monotonic():
            return local[0]
        value = await self.redis.get(self.key(team_id, user))
        if value is None:
            return None
        self._local[(team_id, user)] = (str(value), time.monotonic() + self.LOCAL_TTL_S)
        return str(value)

    async def put(self, team_id: str, user: str, name: str) -> None:
        self._local[(team_id, user)] = (name, time.monotonic() + self.LOCAL_TTL_S)
        await self.redis.set(self.key(team_id, user), name, ex=USER_NAME_TTL_S)


class Usage:
    """Token counts per team and day, for the admin (and later quotas)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def key(team_id: str, day: dt.date) -> str:
        return f"{PREFIX}:usage:{team_id}:{day.isoformat()}"

    async def record(
        self, team_id: str, model: str, prompt: int, cached: int, completion: int, cost: float
    ) -> None:
        key = self.key(team_id, dt.datetime.now(dt.UTC).date())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "turns", 1)
            pipe.hincrby(key, "prompt_tokens", prompt)
            pipe.hincrby(key, "cached_tokens", cached)
            pipe.hincrby(key, "completion_tokens", completion)
            pipe.hincrbyfloat(key, "cost_usd", cost)
            pipe.hincrby(key, f"turns:{model}", 1)
            pipe.expire(key, USAGE_TTL_S)
            await pipe.execute()

    async def day(self, team_id: str, day: dt.date) -> dict[str, str]:
        raw = await self.redis.hgetall(self.key(team_id, day))
        return {str(k): str(v) for k, v in raw.items()}


class Stops:
    """Stop requests for answers in progress, visible to whichever process is writing the answer."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def key(channel: str, ts: str) -> str:
        return f"{PREFIX}:stop:{channel}:{ts}"

    async def request(self, channel: str, ts: str, user: str) -> None:
        await self.redis.set(self.key(channel, ts), user, ex=3_600)

    async def requested_by(self, channel: str, ts: str) -> str | None:
        value = await self.redis.get(self.key(channel, ts))
        return str(value) if value is not None else None


class Feedback:
    """Thumbs up/down per answer message and user, with what the answer cost, for the admin."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def key(team_id: str, channel: str, message_ts: str) -> str:
        return f"{PREFIX}:feedback:{team_id}:{channel}:{message_ts}"

    @staticmethod
    def log_key(team_id: str) -> str:
        return f"{PREFIX}:feedback-log:{team_id}"

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
            pipe.ltrim(self.log_key(team_id), 0, 9_999)
            await pipe.execute()

    async def ratings(self, team_id: str, channel: str, message_ts: str) -> dict[str, dict[str, Any]]:
        raw = await self.redis.hgetall(self.key(team_id, channel, message_ts))
        return {str(k): json.loads(v) for k, v in raw.items()}


class JobProgress:
    """What a job already put in Slack, so a re-run (after a crash) replaces it instead of repeating it."""

    TTL_S = 2 * 86_400

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    @staticmethod
    def key(job_id: str) -> str:
        return f"{PREFIX}:job:{{{job_id}}}"

    async def load(self, job_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(self.key(job_id))
        return {str(k): str(v) for k, v in raw.items()}

    async def save(self, job_id: str, **fields: str) -> None:
        mapping: dict[Any, Any] = dict(fields)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.key(job_id), mapping=mapping)
            pipe.expire(self.key(job_id), self.TTL_S)
            await pipe.execute()
