"""Slack's requests go ahead of new job starts: one event loop does both, and an ack waits for every piece of
work queued ahead of it on that loop.

A job's start is a dozen Redis round trips and a Slack call or two; when a burst of mentions arrives, the
worker would start the first ones' answers while the later requests still wait for their acks. So the
worker's claim of new threads waits while any request is being handled (`quiet()`), up to `max_hold_s`: a
steady stream of requests cannot starve it. A request counts from the moment Bolt takes it (its signature is
the first thing checked, so a forged or trickled body holds nothing back) until Bolt has its response
(over Socket Mode, until the ack is sent). Only claims of new threads wait: a running thread's next job
does not.

Requests of a burst also start one per turn of the loop, in the order they reach `turn()`. Slack's burst
arrives in one read of the sockets, so without it every request ran its CPU-bound part (Bolt, admission, up
to its Redis call) in that one turn, and only then were the first Redis replies read: every ack of a
30-request burst went out together, at the end (bench.load: p50 = max = 9-10 ms). Started one per turn, the
replies of the first requests are read between the later requests' starts (once the Redis connections are
open: `serve` opens them as it starts), so acks go out one by one as each is done (p50 7-8.4 ms in five of
six bench.load burst rounds, max 10-11 ms). Nothing is held through a round trip (a gate that did that was
tried and dropped: with Redis a millisecond away a 30-burst acked 2-3x slower): the next request starts on
the next turn whatever the one before it is waiting for. On a loop busy with other work a turn is longer
than a request's own work, and one start per turn would make a big burst's last acks much later than without
pacing: so no request waits longer than about `turn_cost_s` per request ahead of it plus `turn_grace_s` (or
than the one ahead of it: they leave the line in order; it is looked at once per turn); past that, it starts
in the next turn with every other overdue one, as they all would without pacing. A forged request takes its
turn too (the signature is checked by Bolt, after it): it costs the ones behind it that turn, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator

MAX_HOLD_S = 0.05
# A request waits for its turn about this long at most per request ahead of it (~3x what one costs the intake,
# bench.intake), plus the grace: then it starts, whatever the turns of a busy loop.
TURN_COST_S = 0.001
TURN_GRACE_S = 0.005


class Intake:
    def __init__(
        self,
        max_hold_s: float = MAX_HOLD_S,
        turn_cost_s: float = TURN_COST_S,
        turn_grace_s: float = TURN_GRACE_S,
    ) -> None:
        self.max_hold_s = max_hold_s
        self.turn_cost_s = turn_cost_s
        self.turn_grace_s = turn_grace_s
        self.in_hand = 0  # Slack requests being handled now (not yet acked)
        self._quiet: asyncio.Event | None = None  # made on first use: inside the serving event loop
        # turn(): a request has started in this turn of the loop (or one handed the turn has yet to), and
        # the requests waiting to start after it, first come first, each with the time it starts anyway.
        self._starting = False
        self._waiting: deque[tuple[float, asyncio.Future[bool]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around one request's handling, up to its ack: new job starts wait until it is done."""
        self.in_hand += 1
        if self._quiet is not None:
            self._quiet.clear()
        try:
            yield
        finally:
            self.in_hand -= 1
            if not self.in_hand and self._quiet is not None:
                self._quiet.set()

    async def quiet(self) -> None:
        """Until no request is in hand, or `max_hold_s` has passed (the worker's claims wait here)."""
        if not self.in_hand:
            return
        if self._quiet is None:
            self._quiet = asyncio.Event()
        self._quiet.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.max_hold_s):
                await self._quiet.wait()

    async def turn(self) -> None:
        """Until this request may start: at once when no other has started in this turn of the loop, else
        after the ones before it, one per turn, or when it is overdue (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests run several): nothing of the last one carries over
            self._loop, self._starting, self._waiting = loop, False, deque()
        if self._starting:
            waiter: asyncio.Future[bool] = loop.create_future()
            overdue_at = loop.time() + (len(self._waiting) + 1) * self.turn_cost_s + self.turn_grace_s
            if self._waiting:  # never before the one ahead of it: overdue ones leave the line in order
                overdue_at = max(overdue_at, self._waiting[-1][0])
            self._waiting.append((overdue_at, waiter))
            try:
                handed = await waiter  # True: handed the turn, to pass on; False: let through, overdue
            except BaseException:
                if loop.is_closed() or loop is not self._loop:
                    raise  # a coroutine collected after its loop: nothing of that loop is left to pass on
                if not waiter.done():
                    waiter.cancel()  # still in line (a closed coroutine): skipped when its turn comes
                elif not waiter.cancelled() and waiter.result():
                    self._pass_on(loop)  # handed the turn, then cancelled before it ran: pass it on
                raise
            if not handed:
                return
        else:
            self._starting = True
        self._pass_on(loop)

    def _pass_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """The request holding the turn starts now: wake the next one for the next turn of the loop (and let
        the overdue ones through with it), or, if none waits yet, look again then (the rest of a burst
        queues up behind it in this turn)."""
        if not self._wake_next(loop):
            loop.call_soon(self._wake_or_free, loop)

    def _wake_next(self, loop: asyncio.AbstractEventLoop) -> bool:
        handed = False
        now = loop.time()
        while self._waiting:
            overdue_at, waiter = self._waiting[0]
            if waiter.done():  # a cancelled waiter is skipped
                self._waiting.popleft()
            elif not handed or overdue_at <= now:
                self._waiting.popleft()
                waiter.set_result(not handed)
                handed = True
            else:
                break
        return handed

    def _wake_or_free(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._wake_next(loop):
            self._starting = False
