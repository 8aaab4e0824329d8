"""The worker: takes jobs off the durable queue and runs them, a bounded number at a time.

Jobs of one thread run one after another in this process (and, across processes, in the order their
thread sequence numbers say; see the pipeline). Running jobs are heartbeaten so no other worker takes
them; at shutdown the worker stops taking jobs, lets running ones finish within a grace period, and
puts the rest back on the queue. A Redis outage pauses the worker; it resumes when Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from bot.queue import Job, JobQueue

log = logging.getLogger(__name__)

Runner = Callable[[Job], Awaitable[None]]
REDIS_RETRY_S = 1.0


class Worker:
    def __init__(
        self, queue: JobQueue, run: Runner, *, concurrency: int, visibility_s: float, block_ms: int = 1_000
    ) -> None:
        self.queue = queue
        self.run_job = run
        self.concurrency = concurrency
        self.heartbeat_s = max(visibility_s / 3, 0.05)
        self.block_ms = block_ms
        self.running: dict[str, asyncio.Task[None]] = {}  # entry id -> task
        self._tails: dict[str, asyncio.Task[None]] = {}  # thread -> its last job's task
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()

    async def run(self) -> None:
        """Take and run jobs until `stop()`; survives Redis outages."""
        heartbeat = asyncio.create_task(self._heartbeat())
        with contextlib.suppress(RedisError):
            await self.queue.ensure_group()
        try:
            while not self._stopping.is_set():
                free = self.concurrency - len(self.running)
                if free <= 0:
                    self._slot_free.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1):
                            await self._slot_free.wait()
                    continue
                try:
                    jobs = await self.queue.take(free, self.block_ms)
                except RedisError as exc:
                    log.warning("job queue unavailable; retrying", extra={"error": str(exc)})
                    await asyncio.sleep(REDIS_RETRY_S)
                    with contextlib.suppress(RedisError):
                        await self.queue.ensure_group()  # a Redis that lost its data lost the group too
                    continue
                for job in jobs:
                    self._start(job)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    def _start(self, job: Job) -> None:
        key = str(job.data.get("thread") or "")
        previous = self._tails.get(key) if key else None
        task = asyncio.create_task(self._run(job, previous), name=f"job:{job.job_id}")
        self.running[job.entry_id] = task
        if key:
            self._tails[key] = task
        task.add_done_callback(lambda done: self._finished(job, key, done))

    def _finished(self, job: Job, key: str, task: asyncio.Task[None]) -> None:
        self.running.pop(job.entry_id, None)
        if key and self._tails.get(key) is task:
            del self._tails[key]
        self._slot_free.set()

    async def _run(self, job: Job, previous: asyncio.Task[None] | None) -> None:
        try:
            if previous is not None:
                await asyncio.wait({previous})
            await self.run_job(job)
        except asyncio.CancelledError:
            # Shutdown: another worker finishes it (the re-run replaces any partial answer).
            with contextlib.suppress(Exception):
                await asyncio.shield(self.queue.put_back(job))
            log.info("job handed back to the queue", extra={"job": job.job_id})
            raise
        except Exception:  # the pipeline reports its own failures; this is a bug, not a Kimi or Slack error
            log.exception("job failed", extra={"job": job.job_id})
        try:
            await self.queue.done(job)
        except RedisError as exc:  # it stays pending; a re-run finds it delivered and does nothing
            log.warning("job finished but could not be acked", extra={"job": job.job_id, "error": str(exc)})

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            with contextlib.suppress(RedisError):
                await self.queue.heartbeat(list(self.running))

    def stop(self) -> None:
        """Stop taking new jobs."""
        self._stopping.set()
        self._slot_free.set()

    async def idle(self) -> None:
        while self.running:
            await asyncio.wait(set(self.running.values()))

    async def drain(self, grace_s: float) -> None:
        """Let running jobs finish within `grace_s`; cancel the rest (they go back on the queue)."""
        self.stop()
        if not self.running:
            return
        _, pending = await asyncio.wait(set(self.running.values()), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("jobs handed back at shutdown", extra={"count": len(pending)})
            await asyncio.gather(*pending, return_exceptions=True)
