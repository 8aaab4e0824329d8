"""Jobs: per-key order, the concurrency bound, and shutdown draining."""

from __future__ import annotations

import asyncio

from bot.jobs import Jobs


async def test_jobs_with_one_key_run_in_submission_order() -> None:
    jobs = Jobs(concurrency=4)
    order: list[int] = []

    async def work(n: int, delay: float) -> None:
        await asyncio.sleep(delay)
        order.append(n)

    jobs.submit(work(1, 0.05), key="thread-a")
    jobs.submit(work(2, 0.0), key="thread-a")
    jobs.submit(work(3, 0.0), key="thread-b")  # another thread does not wait
    await jobs.idle()
    assert order == [3, 1, 2]


async def test_concurrency_is_bounded() -> None:
    jobs = Jobs(concurrency=2)
    running = 0
    peak = 0

    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    for i in range(6):
        jobs.submit(work(), key=f"t{i}")
    await jobs.idle()
    assert peak == 2


async def test_drain_cancels_what_outlives_the_grace_period() -> None:
    jobs = Jobs(concurrency=2)
    finished: list[str] = []

    async def quick() -> None:
        await asyncio.sleep(0.01)
        finished.append("quick")

    async def stuck() -> None:
        await asyncio.sleep(60)
        finished.append("stuck")

    jobs.submit(quick())
    jobs.submit(stuck())
    await jobs.drain(grace_s=0.2)
    assert finished == ["quick"] and jobs.running == 0


async def test_a_failing_job_does_not_stop_the_next_one_of_its_key() -> None:
    jobs = Jobs(concurrency=1)
    done: list[str] = []

    async def boom() -> None:
        raise RuntimeError("bug")

    async def fine() -> None:
        done.append("fine")

    jobs.submit(boom(), key="k")
    jobs.submit(fine(), key="k")
    await jobs.idle()
    assert done == ["fine"]
