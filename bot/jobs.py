"""Hand-over between acking Slack and answering: each admitted turn runs as a bounded background job.

In-process for now: a semaphore bounds how many answers run at once (match the Kimi account's
concurrency tier); jobs that share a key (a thread) run one after another in the order they were
submitted; shutdown waits for running jobs within a grace period.
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
        self._tails: dict[str, asyncio.Task[None]] = {}  # the last job submitted per key

    def submit(self, job: Coroutine[Any, Any, None], *, key: str = "", name: str = "") -> None:
        """Start a job now; it waits for the previous job of its key, then for a free slot."""
        previous = self._tails.get(key) if key else None
        task = asyncio.create_task(self._run(job, previous), name=name or None)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if key:
            self._tails[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))

    def _forget(self, key: str, task: asyncio.Task[None]) -> None:
        if self._tails.get(key) is task:
            del self._tails[key]

    async def _run(self, job: Coroutine[Any, Any, None], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait({previous})
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
