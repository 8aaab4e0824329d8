"""The worker: claims threads with waiting jobs and runs each thread's jobs in order, a bounded number of
threads at a time (a waiting question holds no slot; only a thread's head job runs).

Every job ends in exactly one of: answered (the runner recorded it), the user told why with a reference
(a bug, or too many attempts: then it is also dead-lettered), or back on the queue (shutdown, a lost lease,
or Redis gone: the lease lapses and another run picks the job up; its workspace's token cannot be had yet:
handed back, no attempt counted, run again after a backoff, dead-lettered once LATER_GIVE_UP_S old).
The loop itself survives Redis outages and malformed entries; `loop_heartbeat` says it is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from bot.errors import new_reference
from bot.queue import Job, JobQueue, Lease, LeaseLost
from bot.watch import Watcher

log = logging.getLogger(__name__)

Runner = Callable[[Job, Lease], Awaitable[None]]
# Tells the asker their question will not be answered: (job, its lease, why, reference). Best effort.
Reporter = Callable[[Job, Lease, str, str], Awaitable[None]]
REDIS_RETRY_S = 1.0
SWEEP_EVERY_S = 30.0


# A job that cannot run yet (RunLater) is handed back without counting an attempt and tried again after a
# pause that grows with its age (from LATER_FIRST_S, or the visibility timeout when shorter, up to
# LATER_MAX_S); one still not run LATER_GIVE_UP_S after it was queued is dead-lettered ("token").
LATER_FIRST_S = 5.0
LATER_MAX_S = 60.0
LATER_GIVE_UP_S = 30 * 60.0


class RunLater(Exception):
    """A job that cannot run now for a reason that passes (its workspace's token cannot be had yet): it is
    handed back without counting an attempt and runs again after a backoff, until it is too old."""


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        run: Runner,
        *,
        concurrency: int,
        visibility_s: float,
        block_ms: int = 1_000,
        max_attempts: int = 3,
        report: Reporter | None = None,
        housekeeping: Callable[[], Awaitable[object]] | None = None,
        show_waiting: Callable[[Lease], Awaitable[None]] | None = None,
        hold_starts: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.queue = queue
        self.run_job = run
        self.report = report
        self.housekeeping = housekeeping  # with every sweep (e.g. adopting an older version's jobs)
        self.show_waiting = show_waiting  # gives questions queued behind a running one their sign of life
        self.hold_starts = hold_starts  # returns when new threads may be claimed (Slack's requests go first)
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.visibility_s = visibility_s
        self.renew_s = max(visibility_s / 4, 0.05)
        self.poll_s = min(max(block_ms, 10), 250) / 1000  # how often an idle worker looks for due threads
        self.running: dict[str, asyncio.Task[None]] = {}  # thread -> the task running its jobs
        self.loop_heartbeat = time.monotonic()
        self._stopping = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._next_sweep = 0.0
        # Renews every lease this worker holds, reads its answers' Stop keys and spots the questions waiting
        # behind them: one pipeline per tick for all of them (bot/watch.py).
        self.watcher = Watcher(
            queue,
            renew_s=self.renew_s,
            show_waiting=self._show_waiting if show_waiting is not None else None,
        )

    async def run(self) -> None:
        """Claim threads and run their jobs until `stop()`; survives Redis outages and its own bugs."""
        while not self._stopping.is_set():
            self.loop_heartbeat = time.monotonic()
            try:
                if not await self._claim_some():
                    await self._idle()
            except RedisError as exc:
                log.warning("job queue unavailable; retrying", extra={"error": str(exc)})
                await self._pause(REDIS_RETRY_S)
            except Exception:
                log.exception("job loop error; carrying on")
                await self._pause(REDIS_RETRY_S)

    async def _claim_some(self) -> int:
        free = self.concurrency - len(self.running)
        if free <= 0:
            self._slot_free.clear()
            await self._pause(1.0, self._slot_free)
            return 1
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_EVERY_S
            await self.queue.sweep()
            if self.housekeeping is not None:
                await self.housekeeping()
        self.queue.wakeup.clear()
        if self.hold_starts is not None:
            await self.hold_starts()
            if self._stopping.is_set():
                return 0
            free = self.concurrency - len(self.running)  # answers may have finished meanwhile
        claimed = 0
        for thread, score in await self.queue.due(free, exclude=self.running):
            if self._stopping.is_set() or len(self.running) >= self.concurrency:
                break
            lease = await self.queue.claim(thread, score)
            if lease is not None:
                self._start(lease)
                claimed += 1
        return claimed

    async def _idle(self) -> None:
        await self._pause(self.poll_s, self.queue.wakeup)

    async def _pause(self, seconds: float, event: asyncio.Event | None = None) -> None:
        waiter = event if event is not None else self._stopping
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await waiter.wait()

    def _start(self, lease: Lease) -> None:
        key = str(lease.thread)
        task = asyncio.create_task(self._serve_thread(lease), name=f"thread:{key}")
        self.running[key] = task
        task.add_done_callback(lambda _: self._finished(key))

    def _finished(self, key: str) -> None:
        self.running.pop(key, None)
        self._slot_free.set()

    async def _serve_thread(self, lease: Lease) -> None:
        """Run the thread's jobs oldest first while we hold its lease; give it up when its inbox is empty."""
        current = asyncio.current_task()
        assert current is not None
        self.watcher.hold(lease, current)  # renewed (a lost lease cancels this task) until dropped below
        job: Job | None = None
        try:
            while True:
                if self._stopping.is_set():
                    await lease.hand_back(None)  # the thread's other jobs go to another worker now
                    return
                entry = await lease.next_job()
                if entry is None:
                    if await lease.release():
                        return
                    continue
                if isinstance(entry, str):
                    log.error("malformed job dead-lettered", extra={"thread_key": str(lease.thread)})
                    await lease.dead_letter(entry, "malformed")
                    continue
                job = entry
                await self._run_one(job, lease)
                job = None
        except LeaseLost:
            log.warning(
                "lease lost: another worker has the thread; stopped", extra={"thread_key": str(lease.thread)}
            )
        except asyncio.CancelledError:
            if (
                not lease.lost
            ):  # shutdown: another worker finishes it (its re-run replaces any partial answer)
                with contextlib.suppress(Exception):
                    await asyncio.shield(lease.hand_back(job))
                log.info("job handed back to the queue", extra={"job": job.job_id if job else ""})
                raise
            log.warning("lease lost mid-job: stopped writing", extra={"thread_key": str(lease.thread)})
        except RunLater as exc:
            try:
                await self._run_later(lease, job, exc)
            except (RedisError, LeaseLost) as err:  # the lease lapses; the job runs again after it
                log.warning(
                    "job cannot run now, nor be handed back",
                    extra={"thread_key": str(lease.thread), "error": repr(err)},
                )
        except RedisError as exc:
            # Nothing can be recorded now; the lease lapses and the job runs again once Redis is back.
            log.warning(
                "redis failed mid-job; it will run again",
                extra={"thread_key": str(lease.thread), "error": str(exc)},
            )
        except (
            Exception
        ):  # a bug in this loop: the lease lapses and the thread is tried again (attempts count)
            log.exception("thread runner failed", extra={"thread_key": str(lease.thread)})
        finally:
            self.watcher.drop(lease)

    async def _run_one(self, job: Job, lease: Lease) -> None:
        extra = {"job": job.job_id, "kind": job.kind, "attempt": job.attempt}
        if job.attempt > self.max_attempts:
            reference = new_reference()
            log.error("job failed too often; dead-lettered", extra={**extra, "reference": reference})
            await self._tell(job, lease, "attempts", reference)
            await lease.dead_letter(job, "attempts", reference)
            return
        try:
            await self.run_job(job, lease)
        except (LeaseLost, asyncio.CancelledError, RedisError, RunLater):
            raise
        except Exception:  # the pipeline reports Kimi and Slack failures itself: this is a bug
            reference = new_reference()
            log.exception("job failed", extra={**extra, "reference": reference})
            await self._tell(job, lease, "internal", reference)
        await lease.complete(job)  # a no-op when the runner already recorded it

    async def _run_later(self, lease: Lease, job: Job | None, exc: RunLater) -> None:
        """Hand the job back without counting an attempt, to run again after a pause that grows with its
        age; give it up once too old (dead-letter it, and tell the asker where that can be done)."""
        first = min(LATER_FIRST_S, self.visibility_s)
        age = max(time.time() - job.queued_at, 0.0) if job is not None and job.queued_at else 0.0
        extra = {"thread_key": str(lease.thread), "error": str(exc), "age_s": round(age, 1)}
        if job is not None and age > LATER_GIVE_UP_S:
            reference = new_reference()
            log.error(
                "job could not run for too long; dead-lettered",
                extra={**extra, "job": job.job_id, "reference": reference},
            )
            # Told where that can be done now (a Slack that kept failing may answer this once); a job that
            # waited for its workspace's token cannot tell anyone.
            with contextlib.suppress(RunLater):
                await self._tell(job, lease, "internal", reference)
            await lease.dead_letter(job, "token", reference)
            await lease.hand_back(None)  # the thread's next job, if any, runs (or waits) in its turn
            return
        pause = min(max(first, age / 4), LATER_MAX_S)
        log.warning("job cannot run now; it will run again", extra={**extra, "in_s": round(pause, 1)})
        await lease.hand_back(job, after_ms=int(pause * 1000))

    async def _tell(self, job: Job, lease: Lease, why: str, reference: str) -> None:
        """Best effort, except that a report that cannot be sent yet (RunLater: no token) is not given up:
        the job is handed back and told (or run) once the token can be had."""
        if self.report is None:
            return
        try:
            await self.report(job, lease, why, reference)
        except RunLater:
            raise
        except Exception:
            log.exception("could not tell the user about a failed job", extra={"reference": reference})

    async def _show_waiting(self, lease: Lease) -> None:
        assert self.show_waiting is not None
        try:
            await self.show_waiting(lease)
        except (RedisError, LeaseLost):
            pass
        except RunLater:
            pass  # no token now: the running job says so (once per try), not this once-a-second sign of life
        except Exception:
            log.exception("showing waiting questions failed", extra={"thread_key": str(lease.thread)})

    def stop(self) -> None:
        """Stop taking new threads; running ones finish their current job and hand the rest back."""
        self._stopping.set()
        self._slot_free.set()
        self.queue.wakeup.set()

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
