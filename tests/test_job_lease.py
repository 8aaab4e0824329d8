"""The job queue's one mechanism, piece by piece against a real Redis: per-thread inbox, lease with a
fencing token, attempts and dead letters, and the worker loop around them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from bot.queue import Job, JobQueue, Lease, LeaseLost
from bot.store import DEAD_LETTER_KEY, READY_KEY, ThreadKeys
from bot.turn import ThreadKey
from bot.worker import Worker

THREAD = ThreadKey("T1", "C1", "1700000000.000100")
OTHER = ThreadKey("T1", "C1", "1700000000.000200")


def queue_of(redis: Redis, name: str, lease_s: float = 5.0) -> JobQueue:
    return JobQueue(redis, consumer=name, visibility_s=lease_s)


async def claim(queue: JobQueue, thread: ThreadKey = THREAD) -> Lease | None:
    for found, score in await queue.due(10):
        if found == thread:
            return await queue.claim(found, score)
    return None


async def test_a_message_is_queued_once_and_its_thread_listed(redis: Redis) -> None:
    queue = queue_of(redis, "a")
    assert await queue.put(THREAD, "turn", {"job_id": "1"}, dedup_ts="1.1") is True
    assert await queue.put(THREAD, "turn", {"job_id": "1"}, dedup_ts="1.1") is False  # a redelivery
    assert len(await queue.waiting(THREAD)) == 1
    assert [t for t, _ in await queue.due(10)] == [THREAD]


async def test_only_one_of_two_workers_gets_a_thread_and_the_loser_looks_again_later(redis: Redis) -> None:
    one, two = queue_of(redis, "one"), queue_of(redis, "two")
    await one.put(THREAD, "turn", {"job_id": "1"})
    [(thread, score)] = await one.due(10)
    results = await asyncio.gather(one.claim(thread, score), two.claim(thread, score))
    assert sum(lease is not None for lease in results) == 1
    assert await two.due(10) == []  # listed for when the holder's lease would run out, not now


async def test_jobs_of_a_thread_come_oldest_first_and_attempts_are_counted(redis: Redis) -> None:
    queue = queue_of(redis, "a")
    for n in range(3):
        await queue.put(THREAD, "turn", {"job_id": str(n)})
    lease = await claim(queue)
    assert lease is not None
    seen = []
    while (job := await lease.next_job()) is not None:
        assert isinstance(job, Job) and job.attempt == 1
        seen.append(job.job_id)
        assert await lease.complete(job) is True
    assert seen == ["0", "1", "2"]
    assert await lease.release() is True
    assert await queue.length() == 0


async def test_a_job_queued_while_the_thread_is_released_keeps_it_listed(redis: Redis) -> None:
    queue = queue_of(redis, "a")
    await queue.put(THREAD, "turn", {"job_id": "1"})
    lease = await claim(queue)
    assert lease is not None
    job = await lease.next_job()
    assert isinstance(job, Job)
    await lease.complete(job)
    await queue.put(THREAD, "turn", {"job_id": "2"})  # arrives before the holder lets go
    assert await lease.release() is False  # more work: keep going
    job = await lease.next_job()
    assert isinstance(job, Job) and job.job_id == "2"
    await lease.complete(job)
    assert await lease.release() is True
    await queue.put(THREAD, "turn", {"job_id": "3"})  # arrives after: listed again, for now
    assert [t for t, _ in await queue.due(10)] == [THREAD]


async def test_a_stale_holder_is_fenced_off_once_the_thread_is_claimed_again(redis: Redis) -> None:
    old, new = queue_of(redis, "old", lease_s=0.2), queue_of(redis, "new", lease_s=0.2)
    await old.put(THREAD, "turn", {"job_id": "1"})
    stale = await claim(old)
    assert stale is not None
    job = await stale.next_job()
    assert isinstance(job, Job)
    await asyncio.sleep(0.4)  # cut off: its lease runs out
    fresh = await claim(new)
    assert fresh is not None and fresh.token > stale.token
    pipe = redis.pipeline(transaction=False)
    stale.queue_renewal(pipe)  # what its watcher sends
    [renewal] = await pipe.execute()
    assert stale.renewed(renewal, time.monotonic()) is False and stale.lost
    for write in (stale.append({"role": "user", "content": "x"}), stale.save_progress(job, a="1")):
        with pytest.raises(LeaseLost):
            await write
    with pytest.raises(LeaseLost):
        await stale.guard()  # Slack writes too
    again = await fresh.next_job()
    assert isinstance(again, Job) and again.attempt == 2  # the dead run counted


async def test_a_hand_back_at_shutdown_does_not_count_as_an_attempt(redis: Redis) -> None:
    queue = queue_of(redis, "a")
    await queue.put(THREAD, "turn", {"job_id": "1"})
    lease = await claim(queue)
    assert lease is not None
    job = await lease.next_job()
    assert isinstance(job, Job)
    await lease.hand_back(job)
    again = await claim(queue_of(redis, "b"))  # due at once, not after the lease time
    assert again is not None
    job = await again.next_job()
    assert isinstance(job, Job) and job.attempt == 1


async def test_a_lost_listing_is_found_by_the_sweep(redis: Redis) -> None:
    queue = queue_of(redis, "a")
    await queue.put(THREAD, "turn", {"job_id": "1"})
    await redis.zrem(READY_KEY, str(THREAD))  # as if the listing failed after the job was queued
    assert await queue.due(10) == []
    assert await queue.sweep() == 1
    assert [t for t, _ in await queue.due(10)] == [THREAD]


class Recorder:
    def __init__(self) -> None:
        self.ran: list[str] = []
        self.told: list[tuple[str, str]] = []
        self.block = asyncio.Event()

    async def run(self, job: Job, lease: Lease) -> None:
        self.ran.append(job.job_id)
        if job.data.get("crash"):
            raise KeyError("a bug")
        if job.data.get("hang"):
            await asyncio.Event().wait()
        await lease.complete(job, {"role": "assistant", "content": job.job_id})

    async def report(self, job: Job, lease: Lease, why: str, reference: str) -> None:
        self.told.append((job.job_id, why))


async def run_worker(worker: Worker, until: Any, limit_s: float = 5.0) -> None:
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(limit_s):
            while not await until():  # noqa: ASYNC110 - polling Redis, which has no event to wait on
                await asyncio.sleep(0.02)
    finally:
        await worker.drain(0)
        await task


async def test_the_worker_survives_a_malformed_entry_and_a_buggy_job_and_answers_the_rest(
    redis: Redis,
) -> None:
    queue = queue_of(redis, "w")
    recorder = Recorder()
    worker = Worker(queue, recorder.run, concurrency=2, visibility_s=5, block_ms=20, report=recorder.report)
    await redis.rpush(ThreadKeys(THREAD).inbox, "{not json")
    await queue.put(THREAD, "turn", {"job_id": "bug", "crash": True})
    await queue.put(THREAD, "turn", {"job_id": "fine"})
    await queue.put(OTHER, "turn", {"job_id": "other"})

    async def done() -> bool:
        return await queue.length() == 0

    await run_worker(worker, done)
    assert sorted(recorder.ran) == ["bug", "fine", "other"]
    assert recorder.told == [("bug", "internal")]
    assert [e["reason"] for e in await queue.dead_letters()] == ["malformed"]
    assert await queue.waiting(THREAD) == []


async def test_a_job_that_keeps_dying_is_dead_lettered_and_the_asker_told(redis: Redis) -> None:
    queue = queue_of(redis, "w")
    await queue.put(THREAD, "turn", {"job_id": "poison"})
    await queue.put(THREAD, "turn", {"job_id": "next"})
    for _ in range(3):  # three runs that die mid-job (their leases simply lapse)
        lease = await claim(queue)
        assert lease is not None
        assert isinstance(await lease.next_job(), Job)
        await redis.delete(ThreadKeys(THREAD).lease)
        await queue.notify(THREAD)
    recorder = Recorder()
    worker = Worker(queue, recorder.run, concurrency=1, visibility_s=5, block_ms=20, report=recorder.report)

    async def done() -> bool:
        return await queue.length() == 0

    await run_worker(worker, done)
    assert recorder.ran == ["next"]
    assert recorder.told == [("poison", "attempts")]
    [dead] = await queue.dead_letters()
    assert dead["reason"] == "attempts" and dead["attempts"] == "4" and dead["reference"]
    assert await redis.xlen(DEAD_LETTER_KEY) == 1


async def test_a_worker_whose_lease_is_taken_stops_its_job(redis: Redis) -> None:
    queue = queue_of(redis, "w", lease_s=0.3)
    recorder = Recorder()
    worker = Worker(queue, recorder.run, concurrency=1, visibility_s=0.3, block_ms=20)
    await queue.put(THREAD, "turn", {"job_id": "slow", "hang": True})
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(5):
            while not worker.running:  # noqa: ASYNC110 - waiting for the worker to claim it
                await asyncio.sleep(0.01)
            # Another worker takes the thread over (as after this one was cut off for too long).
            await redis.set(ThreadKeys(THREAD).lease, "usurper|999", px=10_000)
            while worker.running:  # noqa: ASYNC110 - the renewal finds the lease gone and stops the job
                await asyncio.sleep(0.01)
    finally:
        await worker.drain(0)
        await task
    assert len(await queue.waiting(THREAD)) == 1  # not completed by the worker that lost it
    assert await redis.get(ThreadKeys(THREAD).lease) == "usurper|999"  # and not handed back either


async def test_waiting_questions_keep_the_order_they_were_sent_in_even_when_redelivered_late(
    redis: Redis,
) -> None:
    queue = queue_of(redis, "a")
    await queue.put(THREAD, "turn", {"job_id": "q1"}, order="1700000000.000100")
    await queue.put(THREAD, "turn", {"job_id": "q3"}, order="1700000000.000300")
    await queue.put(THREAD, "turn", {"job_id": "q2"}, order="1700000000.000200")  # Slack's retry, late
    await queue.put(THREAD, "turn", {"job_id": "q0"}, order="1700000000.000050")  # never ahead of the head
    lease = await claim(queue)
    assert lease is not None
    seen = []
    while (job := await lease.next_job()) is not None:
        assert isinstance(job, Job)
        seen.append(job.job_id)
        await lease.complete(job)
    assert seen == ["q1", "q0", "q2", "q3"]


async def test_a_job_queued_just_before_an_empty_thread_is_unlisted_keeps_it_listed(redis: Redis) -> None:
    queue = queue_of(redis, "a")
    await queue.notify(THREAD)  # listed, due, but nothing in the inbox yet
    [(thread, score)] = await queue.due(10)
    await queue.put(THREAD, "turn", {"job_id": "1"})  # due already: its listing's score does not change
    await queue.forget(thread, score)  # what a claim that found the inbox empty a moment ago does
    assert [t for t, _ in await queue.due(10)] == [THREAD]


async def test_hosts_with_wrong_clocks_neither_hide_nor_strand_a_thread(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time as time_module

    real = time_module.time
    monkeypatch.setattr(time_module, "time", lambda: real() + 3600)  # this host is an hour fast
    queue = queue_of(redis, "fast", lease_s=0.3)
    await queue.put(THREAD, "turn", {"job_id": "1"})
    lease = await claim(queue)  # listed for "now" by Redis's clock, so it is due at once
    assert lease is not None
    monkeypatch.setattr(time_module, "time", lambda: real() - 3600)  # the next host is an hour slow
    await asyncio.sleep(0.5)  # the fast host died holding the thread; its lease runs out
    assert await claim(queue_of(redis, "slow")) is not None


async def test_shutdown_hands_back_the_running_job_and_the_ones_queued_behind_it_at_once(
    redis: Redis,
) -> None:
    queue = queue_of(redis, "w", lease_s=30)  # a long lease: only a hand-back makes the thread due now
    recorder = Recorder()
    worker = Worker(queue, recorder.run, concurrency=1, visibility_s=30, block_ms=20)
    await queue.put(THREAD, "turn", {"job_id": "slow", "hang": True})
    await queue.put(THREAD, "turn", {"job_id": "queued"})
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(5):
        while recorder.ran != ["slow"]:  # noqa: ASYNC110 - waiting for the worker to start the first job
            await asyncio.sleep(0.01)
    await worker.drain(0)  # SIGTERM with no grace left
    await task
    assert len(await queue.waiting(THREAD)) == 2  # nothing lost, nothing marked done
    other = await claim(queue_of(redis, "other"))  # due at once for another worker
    assert other is not None
    job = await other.next_job()
    assert isinstance(job, Job) and job.job_id == "slow" and job.attempt == 1  # not counted as an attempt
