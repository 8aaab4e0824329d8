"""Counting the event loop's turns: tests of what happens one per turn (bot/intake.py `turn()`)."""

from __future__ import annotations

import asyncio


class LoopTurns:
    """Counts the turns of the running event loop (a callback that schedules itself again each turn)."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()
