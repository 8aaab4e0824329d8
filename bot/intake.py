"""Slack's requests before the worker's job starts: one event loop does both, and an ack waits for every
piece of work queued ahead of it on that loop.

When 30 mentions arrive at once, each request's handler runs until its Redis call, then each resumes: every
ack waits for all 30 (p50 = max), and jobs the worker starts meanwhile (each a dozen Redis round trips)
wedge themselves between them. So requests are let through a few at a time, oldest first (an early ack does
not wait for the later requests' work), and the worker holds back new job starts while requests are in
hand, up to `max_hold_s`, so a steady stream of requests cannot starve it. A request that waited
`max_wait_s` for its turn goes ahead anyway: the ones ahead of it are stuck (Redis silent), and a queue
behind them would only make every later ack slower than Slack's 3 s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

# Requests handled at once: a few, so one request's Redis round trip overlaps another's work (bench.load's
# 30-mention burst: 2 to 8 measured, 4 best).
CONCURRENCY = 4
MAX_WAIT_S = 0.2
MAX_HOLD_S = 0.05


class Intake:
    def __init__(
        self, concurrency: int = CONCURRENCY, max_wait_s: float = MAX_WAIT_S, max_hold_s: float = MAX_HOLD_S
    ) -> None:
        self.concurrency = concurrency
        self.max_wait_s = max_wait_s
        self.max_hold_s = max_hold_s
        self.in_hand = 0  # requests received and not yet answered (waiting for their turn or in it)
        self._gate: asyncio.Semaphore | None = None  # made on first use: inside the serving event loop
        self._quiet: asyncio.Event | None = None

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[None]:
        """Around one request's handling: waits its turn, and holds back job starts until it is answered."""
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.concurrency)
        gate = self._gate
        self.in_hand += 1
        if self._quiet is not None:
            self._quiet.clear()
        turn = False
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.max_wait_s):
                    await gate.acquire()
                    turn = True
            yield
        finally:
            if turn:
                gate.release()
            self.in_hand -= 1
            if not self.in_hand and self._quiet is not None:
                self._quiet.set()

    async def quiet(self) -> None:
        """Until no request is in hand, or `max_hold_s` has passed (the worker's job starts wait here)."""
        if not self.in_hand:
            return
        if self._quiet is None:
            self._quiet = asyncio.Event()
        self._quiet.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.max_hold_s):
                await self._quiet.wait()
