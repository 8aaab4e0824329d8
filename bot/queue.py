"""Durable jobs on a Redis Stream with a consumer group.

The receiver adds a job (XADD) before it acks Slack, so an acked question is never lost. Workers read
new jobs (XREADGROUP), keep their running jobs alive (XCLAIM to themselves resets the idle time), and
take over jobs whose worker died (XAUTOCLAIM past the visibility timeout). A finished job is acked
and deleted; a job a worker gives up at shutdown goes back on the stream for another worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bot.store import PREFIX

log = logging.getLogger(__name__)

STREAM = f"{PREFIX}:jobs"
GROUP = "kimibot-workers"


@dataclass(frozen=True)
class Job:
    entry_id: str  # the stream entry (changes when a job is put back)
    kind: str  # "turn", "command", "greet"
    data: dict[str, Any]
    attempt: int = 1

    @property
    def job_id(self) -> str:
        """Stable across re-deliveries and re-queues: what the job's progress is keyed by."""
        return str(self.data.get("job_id") or self.entry_id)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class JobQueue:
    def __init__(self, redis: Redis, *, consumer: str, visibility_s: float, stream: str = STREAM) -> None:
        self.redis = redis
        self.consumer = consumer
        self.visibility_ms = int(visibility_s * 1000)
        self.stream = stream
        self._group_ready = False
        self._next_reclaim = 0.0

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (id 0: jobs added before it count too)."""
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def put(self, kind: str, data: dict[str, Any], attempt: int = 1) -> str:
        if not self._group_ready:
            await self.ensure_group()
        fields = {"kind": kind, "data": json.dumps(data, separators=(",", ":")), "attempt": str(attempt)}
        return str(await self.redis.xadd(self.stream, fields))  # type: ignore[arg-type]

    async def take(self, count: int, block_ms: int) -> list[Job]:
        """Jobs whose worker went silent first (looked for a few times per visibility timeout), then new
        ones; at most `count`."""
        jobs: list[Job] = []
        if time.monotonic() >= self._next_reclaim:
            self._next_reclaim = time.monotonic() + self.visibility_ms / 4000
            jobs = await self._reclaim(count)
        if len(jobs) < count:
            response: Any = await self.redis.xreadgroup(
                GROUP, self.consumer, {self.stream: ">"}, count=count - len(jobs), block=block_ms or None
            )
            for _, entries in response or []:
                jobs += [self._job(entry_id, fields) for entry_id, fields in entries if fields]
        return jobs

    async def _reclaim(self, count: int) -> list[Job]:
        result = await self.redis.xautoclaim(
            self.stream, GROUP, self.consumer, min_idle_time=self.visibility_ms, start_id="0-0", count=count
        )
        entries = result[1] if len(result) > 1 else []
        jobs = []
        for entry_id, fields in entries:
            if not fields:  # deleted meanwhile
                await self.redis.xack(self.stream, GROUP, entry_id)
                continue
            job = self._job(entry_id, fields)
            log.warning(
                "job reclaimed from a silent worker", extra={"job": job.job_id, "entry": job.entry_id}
            )
            jobs.append(job)
        return jobs

    async def heartbeat(self, entry_ids: list[str]) -> None:
        """Tell the group these jobs are still being worked on (resets their idle time)."""
        if entry_ids:
            ids: list[Any] = list(entry_ids)
            await self.redis.xclaim(self.stream, GROUP, self.consumer, 0, ids, justid=True)

    async def done(self, job: Job) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, job.entry_id)
            pipe.xdel(self.stream, job.entry_id)
            await pipe.execute()

    async def put_back(self, job: Job) -> None:
        """Hand an unfinished job to another worker now, rather than after the visibility timeout."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self.stream,
                {
                    "kind": job.kind,
                    "data": json.dumps(job.data, separators=(",", ":")),
                    "attempt": str(job.attempt + 1),
                },
            )
            pipe.xack(self.stream, GROUP, job.entry_id)
            pipe.xdel(self.stream, job.entry_id)
            await pipe.execute()

    async def pending(self) -> int:
        """Jobs handed out but not finished, across all workers."""
        info = await self.redis.xpending(self.stream, GROUP)
        return int(info.get("pending", 0) if isinstance(info, dict) else 0)

    async def length(self) -> int:
        return int(await self.redis.xlen(self.stream))

    @staticmethod
    def _job(entry_id: Any, fields: dict[str, Any]) -> Job:
        return Job(
            entry_id=str(entry_id),
            kind=str(fields.get("kind", "")),
            data=json.loads(fields.get("data") or "{}"),
            attempt=int(fields.get("attempt") or 1),
        )
