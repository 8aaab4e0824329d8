"""One watcher per worker process for everything its running answers must keep an eye on.

Every running thread used to keep its own timers: a lease renewal (two scripts) every few seconds, a look at
its inbox for waiting questions every second, and its answer's look at its Stop key every half second. With
300 answers in flight those ~35,000 single commands a round were the bot's biggest CPU cost (each one a
pool checkout, a timeout, a round trip). The watcher sends all of them, for every lease the process holds,
as ONE pipeline per tick and hands the answers back. On a single Redis the pipeline holds one command per
kind for all leases (scripts that renew every lease due, push their listings, read the inboxes' lengths
and the Stop keys, each answering only what is out of the ordinary: a lease lost, a question waiting, a
Stop): a few hundred replies to pack and parse each tick would hold the event loop for milliseconds at a
stretch. On a Redis Cluster the keys are in many slots, so it holds one command per key (redis-py sends
each node its share at once). What the answers say:

- a renewal that got through confirms the lease (`Lease.guard` lets writes go ahead); one that found the
  lease taken marks it lost and cancels its job, at once; one that failed (Redis unreachable: the whole tick
  fails) confirms nothing, so writes wait until a later tick gets through or the lease runs out;
- a renewed lease's `ready` listing is pushed back (to when the lease would run out) in the next tick, and
  only while the lease is still held: a lease found lost is not pushed, so its thread is due at once;
- a thread with questions waiting behind the running one gets them shown (`show_waiting`, in a task of its
  own, at most once a second and one at a time per thread), never in the renewals' way;
- an answer's Stop key read (`watch`): the answer asks the watcher's last reading, not Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from bot.queue import JobQueue, Lease
from bot.redis_client import is_cluster
from bot.store import READY_KEY

log = logging.getLogger(__name__)

# A single Redis only (the keys are in many slots); the answers are short, nearly always empty.
# KEYS: inboxes -> position, length, ... of those holding more than the running job.
_WAITING = """
local out = {}
for i = 1, #KEYS do
  local n = redis.call('LLEN', KEYS[i])
  if n > 1 then out[#out + 1] = i; out[#out + 1] = n end
end
return out
"""
# KEYS: keys -> position, value, ... of those set.
_SET = """
local out = {}
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then out[#out + 1] = i; out[#out + 1] = v end
end
return out
"""

TICK_S = 0.5  # at most; shorter when leases must be renewed more often (short visibility timeouts)
WAITING_EVERY_S = 1.0  # how often a running thread's inbox is looked at for questions waiting behind it


# What one kind of command was sent for: (kind, items, where each answer is: (pipe, position) per item, or
# the one command's (pipe, position) with how to read it for them all).
Sent = tuple[str, list[Any], list[tuple[Any, int]], Callable[[Any, int], list[Any]] | None]


class KeyWatch:
    """The watcher's last reading of one key (None: not set, or not read yet)."""

    def __init__(self, watcher: Watcher, key: str) -> None:
        self.watcher = watcher
        self.key = key
        self.value: str | None = None

    def close(self) -> None:
        self.watcher._watches.discard(self)


@dataclass(eq=False)
class _Held:
    lease: Lease
    task: asyncio.Task[None]  # cancelled when the lease is found lost
    unlisted_since: float | None = None  # a confirmed renewal's send time whose listing push is still due
    next_waiting: float = 0.0  # monotonic: when to look at the inbox again
    shower: asyncio.Task[None] | None = None


class Watcher:
    """Renews the leases, reads the Stop keys and spots the waiting questions of all the answers this
    process runs, in one pipeline per tick (see the module docstring)."""

    def __init__(
        self,
        queue: JobQueue,
        *,
        renew_s: float,
        show_waiting: Callable[[Lease], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.queue = queue  # its Redis (read when a tick is sent: a test's worker may have no queue)
        self.renew_s = renew_s
        self.tick_s = min(renew_s, TICK_S)
        self.show_waiting = show_waiting
        self.ticks = 0  # pipelines sent (tests count them)
        self._held: dict[int, _Held] = {}  # id(lease) -> what is kept for it
        self._watches: set[KeyWatch] = set()
        self._task: asyncio.Task[None] | None = None
        self._emptied = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}  # each node's pipeline still out, by node name

    def hold(self, lease: Lease, task: asyncio.Task[None]) -> None:
        """Keep `lease` (renewed, checked) until `drop`; `task` (its job) is cancelled if it is lost."""
        lease.watcher = self
        # Its waiting questions are first looked at a tick from now, once its own answer has begun.
        self._held[id(lease)] = _Held(lease, task, next_waiting=time.monotonic() + self.tick_s)
        self._emptied.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="watcher")

    def drop(self, lease: Lease) -> None:
        """Stop renewing `lease` (released, handed back, lost or finished with) and showing its waiting
        questions; an answer already in flight for it is ignored."""
        held = self._held.pop(id(lease), None)
        if held is not None and held.shower is not None:
            held.shower.cancel()
        if not self._held:
            self._emptied.set()  # the loop ends now rather than at its next tick

    def watch(self, key: str) -> KeyWatch:
        """Read `key` with every tick until the KeyWatch is closed (only while a lease is held)."""
        watch = KeyWatch(self, key)
        self._watches.add(watch)
        return watch

    @property
    def holding(self) -> int:
        return len(self._held)

    async def _run(self) -> None:
        """Tick while leases are held; a failed tick (Redis, or a bug) never ends the loop, and a node slow
        to answer never holds up the next tick (its pipeline is skipped while it is still out)."""
        started = time.monotonic()
        try:
            while self._held:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(self.tick_s - (time.monotonic() - started), 0.01)):
                        await self._emptied.wait()
                if not self._held:
                    break
                started = time.monotonic()
                try:
                    sent = self._dispatch()
                except Exception:
                    log.exception("watcher tick failed; carrying on")
                    continue
                if sent:
                    await asyncio.wait(sent, timeout=self.tick_s)
        finally:
            self._task = None
            if not self._held:  # nothing left to answer for
                for task in self._in_flight.values():
                    task.cancel()

    async def tick(self) -> None:
        """One tick, waiting for its answers (a node whose last pipeline is still out is skipped)."""
        sent = self._dispatch()
        if sent:
            await asyncio.wait(sent)

    def _dispatch(self) -> list[asyncio.Task[None]]:
        """One pipeline for everything due now; the answers handed back to their leases and answers."""
        now = time.monotonic()
        listings: list[tuple[_Held, float]] = []  # with the send time of the renewal to list
        renewals: list[_Held] = []
        looks: list[_Held] = []
        for held in list(self._held.values()):
            if held.lease.lost:
                continue
            if held.lease.ending:  # being released or handed back: its listing is the queue's now, and
                held.unlisted_since = None  # a renewal would find it gone (not lost to another worker)
                continue
            if held.unlisted_since is not None:
                listings.append((held, held.unlisted_since))
                held.unlisted_since = None
            if now - held.lease.renewed_at >= self.renew_s:
                renewals.append(held)
            if (
                self.show_waiting is not None
                and (held.shower is None or held.shower.done())
                and now >= held.next_waiting
            ):
                held.next_waiting = now + WAITING_EVERY_S
                looks.append(held)
        keys = sorted({watch.key for watch in self._watches})
        if not (listings or renewals or looks or keys):
            return []
        redis: Any = self.queue.redis
        # On a cluster each command is for one key, and each node gets a pipeline of its own: a node that
        # fails (a failover) fails only its own keys' commands, not every lease's renewal in the process.
        # A single Redis gets one pipeline with one command per kind for all of them (much less to pack
        # and parse for a few hundred answers).
        single = not is_cluster(redis)
        pipes: dict[str, Any] = {}

        def pipe_for(key: str) -> Any:
            name = "" if single else str(redis.get_node_from_key(key).name)
            if name not in pipes:
                pipes[name] = redis.pipeline(transaction=False)
            return pipes[name]

        sent_for: list[Sent] = []

        def send(
            kind: str,
            items: list[Any],
            key_of: Callable[[Any], str],
            one: Callable[[Any, Any], object],
            many: Callable[[Any], object],
            answered: Callable[[Any, int], list[Any]],
        ) -> None:
            if not items:
                return
            if single:
                pipe = pipe_for("")
                many(pipe)
                sent_for.append((kind, items, [(pipe, len(pipe) - 1)], answered))
                return
            places = []
            for item in items:
                pipe = pipe_for(key_of(item))
                one(pipe, item)
                places.append((pipe, len(pipe) - 1))
            sent_for.append((kind, items, places, None))

        send(
            "listed",
            listings,
            lambda _: READY_KEY,
            lambda pipe, pair: pair[0].lease.queue_listing(pipe, pair[1], now),
            lambda pipe: Lease.queue_listings(pipe, [(held.lease, since) for held, since in listings], now),
            lambda result, count: [result] * count,
        )
        send(
            "renew",
            renewals,
            lambda held: held.lease.keys.lease,
            lambda pipe, held: held.lease.queue_renewal(pipe),
            lambda pipe: Lease.queue_renewals(pipe, [held.lease for held in renewals]),
            Lease.renewals_answered,
        )
        inboxes = [held.lease.keys.inbox for held in looks]
        send(
            "waiting",
            looks,
            lambda held: held.lease.keys.inbox,
            lambda pipe, held: pipe.llen(held.lease.keys.inbox),
            lambda pipe: pipe.eval(_WAITING, len(inboxes), *inboxes),
            lambda result, count: _positions(result, count, 0),
        )
        send(
            "key",
            keys,
            lambda key: key,
            lambda pipe, key: pipe.get(key),
            lambda pipe: pipe.eval(_SET, len(keys), *keys),
            lambda result, count: _positions(result, count, None),
        )
        sent = time.monotonic()
        self.ticks += 1
        started = []
        for name, pipe in pipes.items():
            out = self._in_flight.get(name)
            if out is not None and not out.done():
                # That node has not answered the last tick yet: its keys wait for the next tick (renewals
                # stay due; listing pushes are kept for then), the other nodes' go now.
                for kind, items, places, answered in sent_for:
                    if kind != "listed":
                        continue
                    owners = [places[0][0]] * len(items) if answered is not None else [p for p, _ in places]
                    for (held, since), owner in zip(items, owners, strict=True):
                        if owner is pipe and held.unlisted_since is None:
                            held.unlisted_since = since
                continue
            task = asyncio.create_task(self._apply(pipe, sent_for, sent), name=f"watcher:{name}")
            self._in_flight[name] = task
            started.append(task)
        return started

    async def _apply(self, pipe: Any, sent_for: list[Sent], sent: float) -> None:
        """Send one pipeline and hand its answers to the leases and watches it was for (its own task)."""
        try:
            await self._send_and_hand_back(pipe, sent_for, sent)
        except Exception:  # a bug handling the answers: logged; the next tick carries on
            log.exception("watcher tick failed; carrying on")

    async def _send_and_hand_back(self, pipe: Any, sent_for: list[Sent], sent: float) -> None:
        try:
            outcome: Any = await pipe.execute(raise_on_error=False)
        except RedisError as exc:  # nothing of it confirmed: writes wait (Lease.guard) until one gets through
            log.info("watcher tick failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            outcome = exc
        except Exception as exc:  # a bug building a command: it fails this pipeline's keys, not the others'
            log.exception("watcher pipeline failed")
            outcome = RedisError(f"{type(exc).__name__}: {exc}")

        def answer_at(position: int) -> Any:
            return outcome if isinstance(outcome, Exception) else outcome[position]

        readings: dict[str, Any] = {}
        for kind, items, places, answered in sent_for:
            if answered is None:
                mine = [
                    (item, answer_at(at)) for item, (p, at) in zip(items, places, strict=True) if p is pipe
                ]
            elif places[0][0] is pipe:
                mine = list(zip(items, _spread(answer_at(places[0][1]), len(items), answered), strict=True))
            else:
                continue
            for item, result in mine:
                if isinstance(item, str):
                    readings[item] = result
                    continue
                owner: _Held = item[0] if isinstance(item, tuple) else item
                if self._held.get(id(owner.lease)) is owner:  # a dropped lease's answer is ignored
                    self._handle(kind, owner, result, sent)
        for watch in list(self._watches):
            value = readings.get(watch.key)
            if watch.key in readings and not isinstance(value, Exception):
                watch.value = None if value is None else str(value)

    def _handle(self, kind: str, held: _Held, result: Any, sent: float) -> None:
        if isinstance(result, Exception):
            return  # a renewal not confirmed, a listing not pushed (the next renewal's is), a look not had
        if kind == "renew":
            if held.lease.ending:  # sent before the release or hand-back began: its answer says nothing
                return
            renewed = held.lease.renewed(result, sent)
            if renewed:
                held.unlisted_since = sent
            elif not held.task.done():  # another worker has the thread: stop the job at once
                held.task.cancel()
            if not renewed:
                self.drop(held.lease)
        elif kind == "waiting" and self.show_waiting is not None and int(result) > 1:
            held.shower = asyncio.create_task(self.show_waiting(held.lease))


def _spread(result: Any, count: int, answered: Callable[[Any, int], list[Any]]) -> list[Any]:
    """One command's answer for `count` items: one answer each, or the command's error for each."""
    if not isinstance(result, Exception):
        try:
            answers = answered(result, count)
        except (TypeError, ValueError, IndexError) as exc:
            result = RedisError(f"unexpected answer: {exc}")
        else:
            if len(answers) == count:
                return answers
            result = RedisError("unexpected answer")
    return [result] * count


def _positions(result: Any, count: int, default: Any) -> list[Any]:
    """[position, value, ...] (1-based, the positions that do not have `default`) as one value each."""
    answers = [default] * count
    for i in range(0, len(result), 2):
        answers[int(result[i]) - 1] = result[i + 1]
    return answers
