"""Slack's requests go ahead of new job starts: one event loop does both, and an ack waits for every piece of
work queued ahead of it on that loop.

A job's start is a dozen Redis round trips and a Slack call or two; when a burst of mentions arrives, the
worker would start the first ones' answers while the later requests still wait for their acks. So the
worker's claim of new threads waits while any request is being handled (`quiet()`), up to `max_hold_s`: a
steady stream of requests cannot starve it. A request counts from the moment Bolt takes it (its signature is
the first thing checked, so a forged or trickled body holds nothing back) until Bolt has its response
(over Socket Mode, until the ack is sent). Only claims of new threads wait: a running thread's next job
does not.

Requests of a burst also start one per turn of the loop, in the order they came (`turn()`). Slack's burst
arrives in one read of the sockets, so without it every request ran its CPU-bound part (Bolt, admission, up
to its Redis call) in that one turn, and only then did the first Redis replies get read: every ack of a
30-request burst went out together, at the end (bench.load: p50 = max = 9-10 ms). Started one per turn, the
replies of the first requests are read between the later requests' starts, so acks go out one by one as each
is done (p50 7-7.5 ms, max 10-11.5). Nothing is held through a round trip (a gate that did that was tried and
dropped: with Redis a millisecond away a 30-burst acked 2-3x slower): the next request starts on the next
turn whatever the one before it is waiting for. On a busy loop a turn is longer, so a burst's starts are
further apart; bench.load's 300-in-flight round measures that case.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterator

MAX_HOLD_S = 0.05


class Intake:
    def __init__(self, max_hold_s: float = MAX_HOLD_S) -> None:
        self.max_hold_s = max_hold_s
        self.in_hand = 0  # Slack requests being handled now (not yet acked)
        self._quiet: asyncio.Event | None = None  # made on first use: inside the serving event loop
        # turn(): a request has started in this turn of the loop (or one handed the turn has yet to), and
        # the requests waiting to start after it, first come first.
        self._starting = False
        self._waiting: deque[asyncio.Future[None]] = deque()
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
        after the ones before it, one per turn (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new loop (tests run several): nothing of the last one carries over
            self._loop, self._starting, self._waiting = loop, False, deque()
        if self._starting:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed the turn, then cancelled: pass it on
                    self._pass_on(loop)
                raise
        else:
            self._starting = True
        self._pass_on(loop)

    def _pass_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """The request holding the turn starts now: wake the next one for the next turn of the loop, or, if
        none waits yet, look again then (the rest of a burst queues up behind it in this turn)."""
        if not self._wake_next():
            loop.call_soon(self._wake_or_free)

    def _wake_next(self) -> bool:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():  # a cancelled waiter is skipped
                waiter.set_result(None)
                return True
        return False

    def _wake_or_free(self) -> None:
        if not self._wake_next():
            self._starting = False
