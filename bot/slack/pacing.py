"""Pace Web API calls to Slack's rate tiers, per workspace and method, so answers don't draw 429s.

A token bucket per (workspace, method) for tiered methods, and per channel for chat.postMessage.
Callers that wait longer simply flush more text per call: under load, buffers grow by themselves.
`SharedPacer` keeps the buckets in Redis (GCRA), so every replica draws on the app's one budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# Calls per minute Slack documents as the floor of each tier ("20+", "50+", "100+"), used as both the
# refill rate and the burst size. (SLACK_ANCHORS.md section 6; slack-api-ref rate_limits.)
TIER_PER_MINUTE = {"t1": 1, "t2": 20, "t3": 50, "t4": 100}
METHOD_TIER = {
    "chat.startStream": "t2",
    "chat.stopStream": "t2",
    "chat.update": "t3",
    "chat.appendStream": "t4",
    "conversations.replies": "t3",
    "users.info": "t4",
    "views.open": "t4",
    "chat.postEphemeral": "t4",
    "assistant.threads.setSuggestedPrompts": "t4",
    "assistant.threads.setTitle": "t4",
    "reactions.add": "t3",
    "reactions.remove": "t2",  # Tier 2, unlike reactions.add (Slack's reference data)
}
POST_PER_CHANNEL_PER_S = 1.0  # chat.postMessage: about one message per second per channel, short bursts ok
POST_BURST = 3
MARGIN = 0.9  # refill 10% slower than documented: clocks and latency differ between us and Slack
BURST_SPARE = 1  # calls of each burst left unused (see Pacer._bucket)
PRUNE_FLOOR = 1_024  # buckets kept before idle ones are dropped (one per channel posted to, and per tier)


@dataclass
class TokenBucket:
    rate_per_s: float
    capacity: float
    tokens: float = -1.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def delay(self, now: float) -> float:
        """Seconds until a token is free (0 if one is), without taking it."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate_per_s

    def take(self) -> None:
        self.tokens -= 1

    def idle(self, now: float) -> bool:
        """Full again: indistinguishable from a new bucket, so it can be dropped and made afresh."""
        return self.tokens + (now - self.updated) * self.rate_per_s >= self.capacity


class Pacer:
    """Waits, when needed, before each Slack call so the app stays within its tiers."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale  # tests and benchmarks may loosen the pace; 1.0 is Slack's documented floor
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._prune_at = PRUNE_FLOOR  # doubles with the buckets still busy, so pruning stays amortised O(1)
        self.waited_s = 0.0

    def _bucket(self, method: str, team: str, channel: str) -> TokenBucket | None:
        if method == "chat.postMessage":
            key = ("post", channel)
            rate, burst = POST_PER_CHANNEL_PER_S, POST_BURST
        elif method in METHOD_TIER:
            tier = METHOD_TIER[method]
            key = (tier + ":" + method, team)
            rate, burst = TIER_PER_MINUTE[tier] / 60.0, TIER_PER_MINUTE[tier]
        else:
            return None
        if key not in self._buckets:
            if len(self._buckets) >= self._prune_at:
                self._prune()
            # One call of the burst is kept spare: a slot is taken when it is reserved, but the call reaches
            # Slack later (a sleep overshot, a loaded loop), and Slack's bucket counts its arrival.
            capacity = max(1.0, burst * max(self.scale, 1.0) - BURST_SPARE)
            self._buckets[key] = TokenBucket(rate * self.scale * MARGIN, capacity)
        return self._buckets[key]

    def _prune(self) -> None:
        """Drop the buckets that are full again (channels and workspaces gone quiet): a process that
        posts to ever new channels keeps only the buckets still pacing something."""
        now = time.monotonic()
        for key in [key for key, bucket in self._buckets.items() if bucket.idle(now)]:
            del self._buckets[key]
        self._prune_at = max(PRUNE_FLOOR, 2 * len(self._buckets))

    def headroom(self, method: str, team: str = "", channel: str = "") -> float:
        """The share of the method's burst still available (1.0 when unpaced or idle)."""
        bucket = self._bucket(method, team, channel)
        if bucket is None:
            return 1.0
        bucket.delay(time.monotonic())
        return bucket.tokens / bucket.capacity

    def wait_estimate(self, method: str, team: str = "", channel: str = "") -> float:
        bucket = self._bucket(method, team, channel)
        return bucket.delay(time.monotonic()) if bucket else 0.0

    async def reserve(self, method: str, team: str = "", channel: str = "") -> float:
        """Take the next slot for this call now; seconds until it comes (0: go at once). A caller that
        will wait can show a sign of life another way meanwhile (see ReplyWriter.begin)."""
        bucket = self._bucket(method, team, channel)
        if bucket is None:
            return 0.0
        wait = bucket.delay(time.monotonic())
        bucket.take()  # below zero while calls are queued: each later one waits one interval more
        return wait

    async def acquire(self, method: str, team: str = "", channel: str = "") -> None:
        wait = await self.reserve(method, team, channel)
        if wait > 0:
            self.waited_s += wait
            await asyncio.sleep(wait)


# GCRA over Redis's clock: one key per (workspace, method) — per channel for chat.postMessage — holding the
# theoretical arrival time (ms). Each call reserves the next slot and learns how long to wait for it, in one
# round trip, so every replica spends one shared budget. ARGV: interval (ms per call), burst (calls).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local delay = tat - tolerance - now
if delay < 0 then delay = 0 end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return {string.format('%.3f', delay), string.format('%.3f', new_tat - now)}
"""
SHARED_FALLBACK_LOG_S = 60.0  # "pacing per process" is logged at most this often while Redis fails
SHARED_TIMEOUT_S = 0.25  # a Slack call waits at most this long for Redis's answer about its slot
SHARED_COOL_OFF_S = 10.0  # after a failure, pace per process this long before asking Redis again


class SharedPacer(Pacer):
    """The same tiers, with the buckets in Redis: Slack's limits are per app and workspace, so all
    replicas draw on one budget. One Lua call per paced Slack call. The local buckets stay as a mirror
    (refreshed by each reservation) for the cheap, optional questions (`headroom`, `wait_estimate`),
    and as the fallback while Redis does not answer: answers keep flowing, paced per process."""

    def __init__(self, redis: Any, scale: float = 1.0, prefix: str = "kimibot:pace") -> None:
        super().__init__(scale)
        self.redis = redis
        self.prefix = prefix
        self._failed_logged_at = -SHARED_FALLBACK_LOG_S
        self._local_until = 0.0  # Redis failed lately: the local buckets pace alone until then
        self._in_flight: dict[str, int] = {}  # reservations sent to Redis, not answered yet, per key

    def key(self, method: str, team: str, channel: str) -> str | None:
        if method == "chat.postMessage":
            return f"{self.prefix}:{{{team}}}:post:{channel}"
        if method in METHOD_TIER:
            return f"{self.prefix}:{{{team}}}:{method}"
        return None

    async def reserve(self, method: str, team: str = "", channel: str = "") -> float:
        shared = await self.reserve_shared(method, team, channel)
        return await super().reserve(method, team, channel) if shared is None else shared

    async def reserve_shared(self, method: str, team: str = "", channel: str = "") -> float | None:
        """Take the next shared slot for this call; seconds to wait for it. None: not paced, or Redis
        failed (then the local bucket paces this call)."""
        key = self.key(method, team, channel)
        bucket = self._bucket(method, team, channel)
        if key is None or bucket is None:
            return None
        interval_ms = 1000.0 / bucket.rate_per_s
        if time.monotonic() < self._local_until:
            return None
        # The mirror counts this call at once: answers deciding meanwhile (stream or not, flush or wait)
        # must see the budget as it will be, not as it was before the round trip. Its wait is this
        # process's own count: after a spell of local pacing (Redis failed), Redis's bucket has not seen
        # the calls made meanwhile and would grant a fresh burst on top of them.
        local_wait = bucket.delay(time.monotonic())
        bucket.take()
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            async with asyncio.timeout(SHARED_TIMEOUT_S):
                delay_ms, backlog_ms = await self.redis.eval(_RESERVE, 1, key, interval_ms, bucket.capacity)
        except Exception as exc:  # RedisError, a timeout: pace locally rather than hold every Slack call
            bucket.tokens += 1  # the local bucket takes it again (Pacer.reserve)
            now = time.monotonic()
            self._local_until = now + SHARED_COOL_OFF_S
            if now - self._failed_logged_at >= SHARED_FALLBACK_LOG_S:
                self._failed_logged_at = now
                log.warning("shared pacing unavailable; pacing per process", extra={"error": str(exc)})
            return None
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
        # The mirror: as many calls left as the shared backlog leaves room for, less this process's calls
        # whose reservations are still on their way; never more than it already counts (replies come back
        # in any order: an older one knows less).
        bucket.delay(time.monotonic())
        shared = bucket.capacity - float(backlog_ms) / interval_ms - self._in_flight.get(key, 0)
        bucket.tokens = min(bucket.tokens, shared)
        return max(float(delay_ms) / 1000.0, local_wait)
