"""Hand-over between acking Slack and answering: each admitted turn runs as a bounded background job.

In-process for now: a semaphore bounds how many answers run at once (match the Kimi account's
concurrency tier), and shutdown waits for running jobs within a grace period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Jobs:
    def __init__(self, concurrency: int) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, job: Coroutine[Any, Any, None], *, name: str = "") -> None:
        """Start a job now (it waits for a free slot); keep a reference so it is not collected mid-way."""
        task = asyncio.create_task(self._run(job), name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Coroutine[Any, Any, None]) -> None:
        async with self._slots:
            try:
                await job
            except Exception:  # the pipeline handles its own errors; this is the last net
                log.exception("job failed")

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def idle(self) -> None:
        """Return once no job is running (jobs started meanwhile are waited for too)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def drain(self, grace_s: float) -> None:
        """Wait for running jobs up to `grace_s`, then cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("jobs cancelled at shutdown", extra={"count": len(pending)})
            await asyncio.gather(*pending, return_exceptions=True)
