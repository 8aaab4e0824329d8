"""Durable jobs with one owner per thread: a per-thread inbox and a lease with a fencing token.

One mechanism owns ordering and exactly-once for a thread:

- A question is queued at the end of its thread's *inbox* (a Redis list) in the same Lua call that
  deduplicates it, so an acked question is always queued and a redelivery never queues it twice.
- Threads with waiting jobs are listed in one sorted set (`ready`, score = when to look at it next, ms).
- A worker *claims* a thread by taking its *lease* (SET NX PX) with a new *fencing token*, then answers the
  thread's jobs one after the other, oldest first, renewing the lease as it goes. A waiting question holds
  no worker slot: only a thread's head job runs.
- Every Redis write a job makes to its thread checks the token, and Slack writes wait while the lease is not
  confirmed (`Lease.guard`), so a worker that was cut off and lost its lease stops instead of writing over
  its successor.
- A worker that dies leaves its lease to expire (`JOB_VISIBILITY_TIMEOUT`); the thread is due again by then,
  and the next claimant re-runs the head job, whose progress record says what the dead run already showed.
- Each start of a job counts an attempt; past the limit the job goes to a dead-letter stream and the user is
  told. Finishing a job (recording its answer) and removing it from the inbox are one atomic step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.redis_client import Script, is_cluster
from bot.store import DEAD_LETTER_KEY, INBOX_PATTERN, READY_KEY, ThreadKeys, dump_entry, thread_from_member
from bot.turn import ThreadKey

if TYPE_CHECKING:
    from bot.watch import Watcher

log = logging.getLogger(__name__)

DEAD_LETTER_MAXLEN = 10_000
PROGRESS_TTL_S = 2 * 86_400
LOST = -1  # what the fenced scripts return when the caller no longer holds the lease
TRUSTED_SHARE = 0.8  # of the lease time after a renewal was sent: writes go ahead without asking Redis

# KEYS: seen, meta, inbox (one thread's hash tag, so one slot). ARGV: dedup TTL, thread TTL, the job (JSON),
# '1' to mark the thread as one the bot answers in, '1' to claim `seen` (deduplicate) first, the job's order
# key (the message ts; '' for the end).
# Claim the message and queue its job in one step: a stall between the two can no longer leave a claimed
# question that was never queued (its redelivery would be dropped as a duplicate). Returns the inbox length,
# or -1 when the message was already claimed.
_ENQUEUE = """
if ARGV[5] == '1' and not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return -1 end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[2], 'answered', '1')
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
local n = 0
if ARGV[6] ~= '' then
  -- In the order the messages were sent (a redelivered earlier question goes before a later one), but
  -- never ahead of the head, which may be running.
  local waiting = redis.call('LRANGE', KEYS[3], 1, -1)
  for i = 1, #waiting do
    local ok, entry = pcall(cjson.decode, waiting[i])
    if ok and type(entry) == 'table' and type(entry['order']) == 'string' and entry['order'] > ARGV[6] then
      n = redis.call('LINSERT', KEYS[3], 'BEFORE', waiting[i], ARGV[3])
      break
    end
  end
end
if n <= 0 then n = redis.call('RPUSH', KEYS[3], ARGV[3]) end
redis.call('EXPIRE', KEYS[3], ARGV[2])
return n
"""

# The `ready` listing's 'now' (see _READY), timed by the Redis server's clock.
_LIST_NOW = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[4], 'LT', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[7])
"""

# _ENQUEUE, then list the thread for now (whether or not the message was a duplicate: a redelivery also
# repairs a listing an earlier failure left out), in one call: the intake's one round trip on a single
# Redis. KEYS: seen, meta, inbox, ready. ARGV: _ENQUEUE's, then the listing's member (the thread).
_ENQUEUE_AND_LIST = (
    "local function enqueue()\n" + _ENQUEUE + "\nend\nlocal n = enqueue()\n" + _LIST_NOW + "return n\n"
)

# Take the thread's lease and begin its head job (what _BEGIN does: one attempt counted), in one step: the
# worker's first job starts without a round trip of its own. With KEYS[5] (the `ready` listing: a single
# Redis only, it is in another slot) the listing is updated in the same call, as `JobQueue.claim` otherwise
# does in a second one: pushed to when the lease runs out (taken, or held by another worker), or, with no
# jobs, unlisted unless it was listed anew since the worker saw it at ARGV[4] (see _READY's 'forget'; no
# job can come in meanwhile: the inbox was seen empty in this same call).
# KEYS: lease, fence, inbox, attempts[, ready]. ARGV: owner, lease ms[, member, score seen].
# -> {1, token, head, attempt} | {0, lease ms left} | {-1} (nothing to do)
_CLAIM = """
local head = redis.call('LINDEX', KEYS[3], 0)
if not head then
  if KEYS[5] then
    local score = redis.call('ZSCORE', KEYS[5], ARGV[3])
    if score and tonumber(score) == tonumber(ARGV[4]) then redis.call('ZREM', KEYS[5], ARGV[3]) end
  end
  return {-1}
end
local left = redis.call('PTTL', KEYS[1])
local later = tonumber(ARGV[2])
local result
if left ~= -2 then
  later = (left >= 0 and left or later) + 50
  result = {0, left}
else
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
  local attempt = redis.call('HINCRBY', KEYS[4], head, 1)
  redis.call('EXPIRE', KEYS[4], 86400)
  result = {1, token, head, attempt}
end
if KEYS[5] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[5], 'XX', 'GT', now + later, ARGV[3])
end
return result
"""

# KEYS: lease. ARGV: holder, lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lease, inbox, attempts. ARGV: holder. -> {-1} lost | {0} empty | {1, job, attempt}
_BEGIN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local head = redis.call('LINDEX', KEYS[2], 0)
if not head then return {0} end
local attempt = redis.call('HINCRBY', KEYS[3], head, 1)
redis.call('EXPIRE', KEYS[3], 86400)
return {1, head, attempt}
"""

# KEYS: lease, progress. ARGV: holder, ttl s, field, value, field, value...
_SAVE_PROGRESS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# A waiting question's placeholder, noted only while the question still waits behind another: once it is
# the head its run may already have read its progress (and posted a placeholder of its own).
# KEYS: lease, inbox, progress. ARGV: holder, ttl s, job (inbox entry), placeholder ts.
# -> 1 noted | 0 not waiting (running, or gone) | -1 lost
_SAVE_WAITING = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local at = redis.call('LPOS', KEYS[2], ARGV[3])
if not at or at == 0 then return 0 end
redis.call('HSET', KEYS[3], 'placeholder_ts', ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[2])
return 1
"""

# KEYS: lease, history, meta, summaries (expiring with them).
# ARGV: holder, thread ttl s, n entries, entries..., meta field, value...
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local n = tonumber(ARGV[3])
for i = 4, 3 + n do redis.call('RPUSH', KEYS[2], ARGV[i]) end
for i = 4 + n, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[4], ARGV[2])
return 1
"""

# Record a job's outcome and take it off the inbox in one step, so a crash can never leave an answer
# recorded but its job still waiting (a re-run would answer again), nor the reverse. The newest message the
# job posted (progress `posted_ts`) becomes the thread's `posted_ts`: later runs leave everything up to it.
# KEYS: lease, inbox, attempts, progress, history, meta, turns, summaries (expiring with the meta).
# ARGV: holder, thread ttl s, job (inbox entry), details field ('' for none), details value,
#       n entries, entries..., meta field, value...   -> 1 taken off | 0 not the head (already done) | -1 lost
_COMPLETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[3] then return 0 end
local n = tonumber(ARGV[6])
for i = 7, 6 + n do redis.call('RPUSH', KEYS[5], ARGV[i]) end
for i = 7 + n, #ARGV, 2 do redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1]) end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[7], ARGV[4], ARGV[5])
  redis.call('EXPIRE', KEYS[7], ARGV[2])
end
if n > 0 then redis.call('EXPIRE', KEYS[5], ARGV[2]) end
if #ARGV > 6 + n then
  redis.call('EXPIRE', KEYS[6], ARGV[2])
  redis.call('EXPIRE', KEYS[8], ARGV[2])
end
local posted = redis.call('HGET', KEYS[4], 'posted_ts')
if posted then
  local before = redis.call('HGET', KEYS[6], 'posted_ts')
  if not before or tonumber(posted) > tonumber(before) then
    redis.call('HSET', KEYS[6], 'posted_ts', posted)
    redis.call('EXPIRE', KEYS[6], ARGV[2])
  end
end
redis.call('LPOP', KEYS[2])
redis.call('HDEL', KEYS[3], ARGV[3])
redis.call('DEL', KEYS[4])
return 1
"""

# KEYS: lease, inbox. ARGV: holder. -> 1 released | 0 more jobs came in (keep going) | -1 lost
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('LLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# Give the thread up at shutdown; the job being run (if any) does not count as an attempt.
# KEYS: lease, attempts. ARGV: holder, job ('' for none).
_HAND_BACK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if ARGV[2] ~= '' and tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], -1)
end
redis.call('DEL', KEYS[1])
return 1
"""

# The `ready` listing, always against the Redis server's clock (hosts' clocks may differ). KEYS: ready.
# ARGV: op, member, ms from now, score seen. Ops: 'now' (list for now, or pull forward: a new job), 'later'
# (push an existing listing to now + ms, never back: a claim or renewal), 'add' (list for now if absent),
# 'set' (list for now), 'after' (list for now + ms, whatever the listing was: a job that cannot run yet),
# 'due' (members due now, with scores; ARGV[2] = how many), 'forget' (unlist only if nobody listed it anew
# since we saw ARGV[4]), 'forget_later' (unlist if it is still ours: in the future).
_READY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]
if op == 'now' then return redis.call('ZADD', KEYS[1], 'LT', now, ARGV[2]) end
if op == 'later' then return redis.call('ZADD', KEYS[1], 'XX', 'GT', now + tonumber(ARGV[3]), ARGV[2]) end
if op == 'add' then return redis.call('ZADD', KEYS[1], 'NX', now, ARGV[2]) end
if op == 'set' then return redis.call('ZADD', KEYS[1], now, ARGV[2]) end
if op == 'after' then return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2]) end
if op == 'due' then
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
end
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score then return 0 end
local unlist = (op == 'forget' and tonumber(score) == tonumber(ARGV[4]))
unlist = unlist or (op == 'forget_later' and tonumber(score) > now)
if unlist then return redis.call('ZREM', KEYS[1], ARGV[2]) end
return 0
"""


# A single Redis only (the keys are in many slots): what a watcher's tick sends for all its leases at once.
# KEYS: leases. ARGV: lease ms, holders (one per lease). -> the (1-based) positions of the leases lost; the
# others were renewed (the answer is short: nearly always empty).
_RENEW_MANY = """
local lost = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

# The `ready` listing's 'later' (see _READY) for several threads (a single Redis only: their leases are in
# many slots). KEYS: ready, then each thread's lease. ARGV: (thread, ms, holder) for each. Only threads whose
# lease the holder still has are pushed: a lease released or handed back meanwhile (its listing set to now,
# or a new job listed) must not be pushed back by a renewal's late listing.
_LATER_MANY = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pushed = 0
for i = 2, #KEYS do
  local a = (i - 2) * 3
  if redis.call('GET', KEYS[i]) == ARGV[a + 3] then
    redis.call('ZADD', KEYS[1], 'XX', 'GT', now + tonumber(ARGV[a + 2]), ARGV[a + 1])
    pushed = pushed + 1
  end
end
return pushed
"""


class LeaseLost(Exception):
    """This worker no longer owns the thread: another one took it over. Stop, and write nothing more."""


def consumer_name() -> str:
    """Unique per process run (a restarted container keeps its hostname and pid 1)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Job:
    thread: ThreadKey
    raw: str  # the inbox entry exactly as stored: it identifies the job in the fenced scripts
    kind: str  # "turn", "command", "greet"
    data: dict[str, Any]
    attempt: int = 1
    queued_at: float = 0.0  # epoch s when queued (its message's ts for a job queued before jobs had it)

    @property
    def job_id(self) -> str:
        """Stable across re-runs: what the job's progress is keyed by."""
        return str(self.data.get("job_id") or "")

    @staticmethod
    def encode(kind: str, data: dict[str, Any], order: str = "") -> str:
        """`order` (a message ts) places the job among its thread's waiting jobs; '' puts it last."""
        entry: dict[str, Any] = {"kind": kind, "data": data, "at": round(time.time(), 3)}  # when queued
        if order:
            entry["order"] = order
        return json.dumps(entry, separators=(",", ":"))

    @staticmethod
    def decode(thread: ThreadKey, raw: str, attempt: int) -> Job:
        """Raise ValueError (or a subclass) for an entry that is not a job we can run."""
        parsed = json.loads(raw)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("data"), dict):
            raise ValueError("not a job")
        try:
            queued_at = float(parsed.get("at") or parsed.get("order") or 0)
        except (TypeError, ValueError):
            queued_at = 0.0
        return Job(thread, raw, str(parsed.get("kind") or ""), parsed["data"], attempt, queued_at)


# Sent by SHA1 (bot/redis_client.py Script): the intake path and the claim send no script text.
ENQUEUE_SCRIPT = Script(_ENQUEUE)
ENQUEUE_AND_LIST_SCRIPT = Script(_ENQUEUE_AND_LIST)
READY_SCRIPT = Script(_READY)
CLAIM_SCRIPT = Script(_CLAIM)


def _listing_args(op: str, thread: ThreadKey | str, ms: int = 0, seen: float = 0.0) -> tuple[Any, ...]:
    """READY_SCRIPT's ARGV for one operation of the `ready` listing."""
    return (op, str(thread), ms, repr(seen))


class JobQueue:
    """Queues jobs into threads' inboxes and hands threads to workers (see the module docstring)."""

    def __init__(
        self, redis: Redis, *, consumer: str, visibility_s: float, thread_ttl_s: int = 30 * 86_400
    ) -> None:
        self.redis = redis
        self.consumer = consumer
        self.lease_ms = max(int(visibility_s * 1000), 100)
        self.thread_ttl_s = thread_ttl_s
        self.wakeup = asyncio.Event()  # a job was queued by this process: look now, not at the next poll

    async def put(
        self,
        thread: ThreadKey,
        kind: str,
        data: dict[str, Any],
        *,
        dedup_ts: str | None = None,
        dedup_ttl_s: int = 86_400,
        engage: bool = False,
        order: str = "",
    ) -> bool:
        """Queue a job at the end of its thread's inbox; with `dedup_ts`, only if that message was not
        claimed before (False then). Either way the thread is (again) listed as ready, so a redelivery also
        repairs a listing that an earlier failure left out."""
        keys = ThreadKeys(thread)
        args = (
            dedup_ttl_s,
            self.thread_ttl_s,
            Job.encode(kind, data, order),
            "1" if engage else "0",
            "1" if dedup_ts else "0",
            order,
        )
        seen = keys.seen(dedup_ts or "-")
        if is_cluster(self.redis):  # the listing lives in another slot: two calls
            result = await ENQUEUE_SCRIPT(self.redis, (seen, keys.meta, keys.inbox), args)
            await self.notify(thread)
            return int(result) >= 0
        # One round trip on the intake path: queue (deduplicated) and list, in one script.
        result = await ENQUEUE_AND_LIST_SCRIPT(
            self.redis, (seen, keys.meta, keys.inbox, READY_KEY), (*args, str(thread))
        )
        self.wakeup.set()
        return int(result) >= 0

    async def notify(self, thread: ThreadKey) -> None:
        # LT: a thread listed for later (being worked on) is pulled forward to now; a new one is added.
        await self.listing("now", thread)
        self.wakeup.set()

    async def listing(self, op: str, thread: ThreadKey | str, ms: int = 0, seen: float = 0.0) -> Any:
        """One change to (or look at) the `ready` listing, timed by the Redis server's clock."""
        return await READY_SCRIPT(self.redis, (READY_KEY,), _listing_args(op, thread, ms, seen))

    async def due(self, count: int, exclude: Iterable[str] = ()) -> list[tuple[ThreadKey, float]]:
        """Threads whose time to look has come, oldest first."""
        skip = set(exclude)
        flat: Any = await READY_SCRIPT(self.redis, (READY_KEY,), ("due", str(count + len(skip)), 0, 0))
        found = [(str(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]
        threads = []
        for member, score in found:
            if str(member) in skip:
                continue
            try:
                threads.append((thread_from_member(str(member)), float(score)))
            except ValueError:
                log.warning("malformed ready entry dropped", extra={"member": str(member)})
                await self.redis.zrem(READY_KEY, member)
        return threads[:count]

    async def claim(self, thread: ThreadKey, seen_score: float) -> Lease | None:
        """Take the thread's lease if it is free and has jobs, and begin its head job (counting an attempt:
        the lease's first `next_job` returns it without asking Redis); else push its listing to when to look
        again. One round trip on a single Redis (the listing in the same script); two on a cluster."""
        keys = ThreadKeys(thread)
        lease_keys = (keys.lease, keys.fence, keys.inbox, keys.attempts)
        cluster = is_cluster(self.redis)  # the listing lives in another slot: its own call
        if cluster:
            result: Any = await CLAIM_SCRIPT(self.redis, lease_keys, (self.consumer, self.lease_ms))
        else:
            result = await CLAIM_SCRIPT(
                self.redis,
                (*lease_keys, READY_KEY),
                (self.consumer, self.lease_ms, str(thread), repr(seen_score)),
            )
        outcome = int(result[0])
        if outcome == 1:
            lease = Lease(self, thread, f"{self.consumer}|{int(result[1])}")
            lease.first = _job_or_raw(thread, str(result[2]), int(result[3]))
            if cluster:
                # Best effort: the lease and the job's attempt are taken; failing here would leave both
                # with nobody (the job unrun until the lease ran out, an attempt spent). A thread still
                # listed as due is only looked at again: a claim that finds the lease held pushes it later.
                with contextlib.suppress(RedisError):
                    await self.listing("later", thread, self.lease_ms)
            return lease
        if not cluster:
            return None
        if outcome == 0:  # another worker has it; look again when its lease would run out
            left = max(int(result[1]), 0) if int(result[1]) >= 0 else self.lease_ms
            await self.listing("later", thread, left + 50)
            return None
        await self.forget(thread, seen_score)
        return None

    async def forget(self, thread: ThreadKey, seen_score: float, *, op: str = "forget") -> None:
        """Unlist a thread that has no jobs; list it again at once if one came in meanwhile (a job queued
        while the listing was already due does not change its score, so the score alone cannot tell)."""
        if int(await self.listing(op, thread, 0, seen_score)) and await self.redis.llen(  # type: ignore[misc]
            ThreadKeys(thread).inbox
        ):
            await self.listing("add", thread)

    async def sweep(self) -> int:
        """List every thread that has waiting jobs but no listing (its listing was lost to a failure between
        the queueing and the listing, and Slack never redelivered). Returns how many were listed again."""
        listed = 0
        async for key in self.redis.scan_iter(match=INBOX_PATTERN, count=500):
            name = str(key)
            member = name[name.index("{") + 1 : name.rindex("}")]
            if await self.redis.llen(name) and int(await self.listing("add", member)):  # type: ignore[misc]
                listed += 1
        if listed:
            log.warning("threads with waiting jobs listed again", extra={"count": listed})
        return listed

    async def length(self) -> int:
        """Threads with jobs waiting or running."""
        return int(await self.redis.zcard(READY_KEY))

    async def oldest_age_s(self, limit: int = 1_000) -> float:
        """Seconds since the oldest job at the head of a listed thread's inbox was queued (0 when none),
        looking at up to `limit` threads. A job queued before jobs carried their time counts from its
        message's ts."""
        members: Any = await self.redis.zrange(READY_KEY, 0, limit - 1)
        oldest = 0.0
        now = time.time()
        for member in members:
            try:
                head = await self.redis.lindex(ThreadKeys(thread_from_member(str(member))).inbox, 0)  # type: ignore[misc]
                entry = json.loads(head) if head else {}
                queued = float(entry.get("at") or entry.get("order") or 0)
            except (ValueError, TypeError, AttributeError):
                continue
            if queued:
                oldest = max(oldest, now - queued)
        return oldest

    async def waiting(self, thread: ThreadKey) -> list[str]:
        return [str(x) for x in await self.redis.lrange(ThreadKeys(thread).inbox, 0, -1)]  # type: ignore[misc]

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        entries: Any = await self.redis.xrevrange(DEAD_LETTER_KEY, count=count)
        return [{str(k): str(v) for k, v in fields.items()} for _, fields in entries]


def _job_or_raw(thread: ThreadKey, raw: str, attempt: int) -> Job | str:
    """The job of an inbox entry, or the raw entry when it is not a job at all."""
    try:
        return Job.decode(thread, raw, attempt)
    except (ValueError, TypeError):
        return raw


@dataclass
class Lease:
    """The right to run and write for one thread, until it is lost or released."""

    queue: JobQueue
    thread: ThreadKey
    holder: str  # "consumer|token": the fencing token every write checks
    lost: bool = False
    # Being released or handed back: its watcher pushes its listing no more (on a cluster that push cannot
    # check the lease in the same script; a late one would delay the thread's next job by a lease's time).
    ending: bool = False
    renewed_at: float = field(init=False)  # monotonic, when the last successful renewal (or claim) was sent
    valid_until: float = field(init=False)  # monotonic; Slack writes wait past it
    # The worker's watcher while it holds the lease (renewals, Stop keys); None for a lease used alone.
    watcher: Watcher | None = field(default=None, init=False, repr=False, compare=False)
    # The head job the claim began (its attempt counted), until `next_job` hands it out.
    first: Job | str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.keys = ThreadKeys(self.thread)
        self.redis = self.queue.redis
        self.lease_s = self.queue.lease_ms / 1000
        self._confirmed(time.monotonic())

    def _confirmed(self, sent: float) -> None:
        """The lease was ours when `sent`: trust it for a safe share of its time from then."""
        self.renewed_at = sent
        self.valid_until = sent + self.lease_s * TRUSTED_SHARE

    @property
    def token(self) -> int:
        return int(self.holder.rsplit("|", 1)[1])

    def _check(self, result: Any) -> int:
        value = int(result[0] if isinstance(result, list) else result)
        if value == LOST:
            self.lost = True
            raise LeaseLost(str(self.thread))
        return value

    def queue_renewal(self, pipe: Any) -> None:
        """Add this lease's renewal to a pipeline (its answer goes to `renewed`). A worker's leases are
        renewed by its watcher (bot/watch.py), all in one pipeline, their listings pushed with
        `queue_listing`."""
        pipe.eval(_RENEW, 1, self.keys.lease, self.holder, self.queue.lease_ms)

    def renewed(self, result: Any, sent: float) -> bool:
        """A renewal sent at `sent` (monotonic) answered `result`: confirm the lease, or mark it lost."""
        if int(result) == LOST:
            self.lost = True
            return False
        self._confirmed(sent)
        return True

    def queue_listing(self, pipe: Any, sent: float, now: float) -> None:
        """Add to a pipeline what `renew` does after a renewal sent at `sent` got through: push the thread's
        listing back to when the lease would run out (so another worker looks at it once it has)."""
        pipe.eval(_READY, 1, READY_KEY, *_listing_args("later", self.thread, self._left_ms(sent, now)))

    def _left_ms(self, sent: float, now: float) -> int:
        return max(self.queue.lease_ms - int((now - sent) * 1000), 0)

    @staticmethod
    def queue_renewals(pipe: Any, leases: list[Lease]) -> None:
        """`queue_renewal` for several leases of one queue in one command (a single Redis only: their
        keys are in many slots); `renewals_answered` makes its answer one `renewed` result per lease."""
        holders = [lease.holder for lease in leases]
        keys = [lease.keys.lease for lease in leases]
        pipe.eval(_RENEW_MANY, len(keys), *keys, leases[0].queue.lease_ms, *holders)

    @staticmethod
    def renewals_answered(result: Any, count: int) -> list[int]:
        """The answer to `queue_renewals` for `count` leases: 1 (renewed) or LOST for each."""
        lost = {int(i) - 1 for i in result}
        return [LOST if i in lost else 1 for i in range(count)]

    @staticmethod
    def queue_listings(pipe: Any, renewed: list[tuple[Lease, float]], now: float) -> None:
        """`queue_listing` for several (lease, sent) in one command."""
        keys = [lease.keys.lease for lease, _ in renewed]
        args = [
            x for lease, sent in renewed for x in (str(lease.thread), lease._left_ms(sent, now), lease.holder)
        ]
        pipe.eval(_LATER_MANY, 1 + len(keys), READY_KEY, *keys, *args)

    async def guard(self) -> None:
        """Wait until the lease is known to be ours (renewed recently); raise LeaseLost once it is not."""
        while time.monotonic() > self.valid_until:
            if self.lost:
                raise LeaseLost(str(self.thread))
            await asyncio.sleep(0.05)
        if self.lost:
            raise LeaseLost(str(self.thread))

    async def next_job(self) -> Job | str | None:
        """The thread's head job (counting an attempt), None when the inbox is empty, or the raw entry when
        it is not a job at all. The first one is the job the claim began."""
        if self.first is not None:
            first, self.first = self.first, None
            return first
        result: Any = await self.redis.eval(  # type: ignore[misc]
            _BEGIN, 3, self.keys.lease, self.keys.inbox, self.keys.attempts, self.holder
        )
        if self._check(result) == 0:
            return None
        return _job_or_raw(self.thread, str(result[1]), int(result[2]))

    async def waiting_jobs(self, limit: int = 20) -> list[Job]:
        """The jobs queued behind the head (the one running), oldest first; unreadable ones skipped."""
        raw: Any = await self.redis.lrange(self.keys.inbox, 1, limit)  # type: ignore[misc]
        jobs = []
        for entry in raw:
            with contextlib.suppress(ValueError, TypeError):
                jobs.append(Job.decode(self.thread, str(entry), 0))
        return jobs

    async def progress(self, job: Job) -> dict[str, str]:
        raw = await self.redis.hgetall(self.keys.progress(job.job_id))  # type: ignore[misc]
        return {str(k): str(v) for k, v in raw.items()}

    async def save_progress(self, job: Job, **fields: str) -> None:
        args = [x for pair in fields.items() for x in pair]
        result = await self.redis.eval(  # type: ignore[misc]
            _SAVE_PROGRESS,
            2,
            self.keys.lease,
            self.keys.progress(job.job_id),
            self.holder,
            PROGRESS_TTL_S,
            *args,
        )
        self._check(result)

    async def save_waiting(self, job: Job, placeholder_ts: str) -> bool:
        """Note a waiting question's placeholder for its run; False when the question no longer waits (it
        runs now, or is gone): its run does not know this placeholder, so the caller takes it back."""
        result = await self.redis.eval(  # type: ignore[misc]
            _SAVE_WAITING,
            3,
            self.keys.lease,
            self.keys.inbox,
            self.keys.progress(job.job_id),
            self.holder,
            PROGRESS_TTL_S,
            job.raw,
            placeholder_ts,
        )
        return self._check(result) == 1

    async def append(self, *entries: dict[str, Any], **meta: str | int | float) -> None:
        """Add history entries and metadata to the thread, if we still own it."""
        args = [x for pair in meta.items() for x in (pair[0], str(pair[1]))]
        result = await self.redis.eval(  # type: ignore[misc]
            _APPEND,
            4,
            self.keys.lease,
            self.keys.history,
            self.keys.meta,
            self.keys.summaries,
            self.holder,
            self.queue.thread_ttl_s,
            len(entries),
            *(dump_entry(e) for e in entries),
            *args,
        )
        self._check(result)

    async def complete(
        self,
        job: Job | str,
        *entries: dict[str, Any],
        details: tuple[str, dict[str, Any]] | None = None,
        **meta: str | int | float,
    ) -> bool:
        """Record the job's outcome (history entries, metadata, the answer's details for its buttons) and
        take it off the inbox, atomically. False when it was no longer the head (already completed)."""
        raw = job.raw if isinstance(job, Job) else job
        job_id = job.job_id if isinstance(job, Job) else "-"
        args = [x for pair in meta.items() for x in (pair[0], str(pair[1]))]
        result = await self.redis.eval(  # type: ignore[misc]
            _COMPLETE,
            8,
            self.keys.lease,
            self.keys.inbox,
            self.keys.attempts,
            self.keys.progress(job_id),
            self.keys.history,
            self.keys.meta,
            self.keys.turns,
            self.keys.summaries,
            self.holder,
            self.queue.thread_ttl_s,
            raw,
            details[0] if details else "",
            dump_entry(details[1]) if details else "",
            len(entries),
            *(dump_entry(e) for e in entries),
            *args,
        )
        return self._check(result) == 1

    async def dead_letter(self, job: Job | str, reason: str, reference: str = "") -> None:
        """Set a job aside for the admin, and take it off the inbox."""
        raw = job.raw if isinstance(job, Job) else job
        await self.redis.xadd(  # type: ignore[misc]
            DEAD_LETTER_KEY,
            {
                "thread": str(self.thread),
                "job": raw,
                "reason": reason,
                "reference": reference,
                "attempts": str(job.attempt if isinstance(job, Job) else 0),
                "at": str(int(time.time() * 1000)),
            },
            maxlen=DEAD_LETTER_MAXLEN,
            approximate=True,
        )
        await self.complete(job)

    async def release(self) -> bool:
        """Give the thread up when its inbox is empty; False when jobs came in meanwhile (keep going)."""
        self.ending = True
        result = await self.redis.eval(  # type: ignore[misc]
            _RELEASE, 2, self.keys.lease, self.keys.inbox, self.holder
        )
        if self._check(result) == 0:
            self.ending = False
            return False
        # Unlist the thread, unless a job was queued since (its listing then says "now", not our future time).
        await self.queue.forget(self.thread, 0.0, op="forget_later")
        return True

    async def hand_back(self, job: Job | None, *, after_ms: int = 0) -> None:
        """Let another worker have the thread (now, or in `after_ms`: a job that cannot run yet); the
        interrupted job (or the one the claim began and nobody ran yet) is not an attempt."""
        self.ending = True
        unrun, self.first = self.first, None
        raw = job.raw if job else (unrun.raw if isinstance(unrun, Job) else unrun or "")
        result = await self.redis.eval(  # type: ignore[misc]
            _HAND_BACK, 2, self.keys.lease, self.keys.attempts, self.holder, raw
        )
        if int(result) != LOST:
            if after_ms > 0:
                await self.queue.listing("after", self.thread, after_ms)
            else:
                await self.queue.listing("set", self.thread)
