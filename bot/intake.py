"""Slack's requests go ahead of new job starts: one event loop does both, and an ack waits for every piece of
work queued ahead of it on that loop.

A job's start is a dozen Redis round trips and a Slack call or two; when a burst of mentions arrives, the
worker would start the first ones' answers while the later requests still wait for their acks. So the
worker's claim of new threads waits while any request is being handled (`quiet()`), up to `max_hold_s`: a
steady stream of requests cannot starve it. A request counts from the moment Bolt takes it (its signature is
the first thing checked, so a forged or trickled body holds nothing back) until Bolt has its response
(over Socket Mode, until the ack is sent). Only claims of new threads wait: a running thread's next job
does not.

A gate letting requests through a few at a time was tried and measured (bench.load): a slightly lower
median ack under a 30-request burst on a loopback Redis, a much higher one once Redis is a millisecond away
(each slot is held through its round trip), so requests are not gated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

MAX_HOLD_S = 0.05


class Intake:
    def __init__(self, max_hold_s: float = MAX_HOLD_S) -> None:
        self.max_hold_s = max_hold_s
        self.in_hand = 0  # Slack requests being handled now (not yet acked)
        self._quiet: asyncio.Event | None = None  # made on first use: inside the serving event loop

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
