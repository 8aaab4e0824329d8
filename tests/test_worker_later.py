"""RunLater (a job that cannot run now: its workspace's token, a Slack search that may succeed later): handed
back without counting an attempt, after a pause that grows with the job's age, 5 s up to a minute, and given
up (dead-lettered, the asker told where possible) once 30 minutes old. A stub lease records the calls."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest

from bot.queue import Job
from bot.turn import ThreadKey
from bot.worker import LATER_GIVE_UP_S, RunLater, Worker


class StubLease:
    thread = ThreadKey("T1", "C1", "1.0")

    def __init__(self) -> None:
        self.handed_back: list[tuple[Job | None, int | None]] = []
        self.dead: list[str] = []

    async def hand_back(self, job: Job | None, after_ms: int | None = None) -> None:
        self.handed_back.append((job, after_ms))

    async def dead_letter(self, job: Job, why: str, reference: str = "") -> None:
        self.dead.append(why)


def job_aged(age_s: float) -> Job:
    return Job(
        ThreadKey("T1", "C1", "1.0"), "raw", "turn", {"job_id": "C1:1.0"}, queued_at=time.time() - age_s
    )


@pytest.mark.parametrize(("age_s", "pause_s"), [(0, 5.0), (8, 5.0), (100, 25.0), (600, 60.0), (1_700, 60.0)])
async def test_a_job_that_cannot_run_now_waits_longer_the_older_it_is(age_s: float, pause_s: float) -> None:
    told: list[str] = []

    async def report(job: Job, lease: Any, why: str, reference: str) -> None:
        told.append(why)

    worker = Worker(cast(Any, None), cast(Any, None), concurrency=1, visibility_s=10.0, report=report)
    lease = StubLease()
    await worker._run_later(cast(Any, lease), job_aged(age_s), RunLater("no token yet"))
    [(job, after_ms)] = lease.handed_back
    assert job is not None and after_ms is not None
    assert after_ms / 1000 == pytest.approx(pause_s, abs=0.5)
    assert lease.dead == [] and told == []


async def test_a_job_still_waiting_after_30_minutes_is_given_up_and_its_asker_told() -> None:
    told: list[str] = []

    async def report(job: Job, lease: Any, why: str, reference: str) -> None:
        told.append(why)

    worker = Worker(cast(Any, None), cast(Any, None), concurrency=1, visibility_s=10.0, report=report)
    lease = StubLease()
    await worker._run_later(cast(Any, lease), job_aged(LATER_GIVE_UP_S + 5), RunLater("still failing"))
    assert lease.dead == ["token"] and told == ["internal"]
    assert lease.handed_back == [(None, None)]  # the thread's next job runs in its turn
