"""What /healthz and /livez say: readiness (can this process answer?) and liveness (is it responsive?).

`readiness` is pure: it takes what the server observed (Redis's ping, the start-up checks, the Socket Mode
connection, the job loop, Kimi's last outcome) and names every part that keeps the bot from answering.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

LOOP_STALE_S = 10.0  # a job loop that has not gone round for this long is stuck
# Kimi outcomes an admin must fix before any question can be answered (bad key, no credit, no such model).
KIMI_BLOCKING = frozenset({"auth", "quota", "model"})


@dataclass
class Health:
    """State /healthz reports besides Redis, kept up to date by serve()."""

    checks: dict[str, str] = field(default_factory=dict)  # setting -> "checking" | "ok" | why not yet
    slack_connection: str = ""  # Socket Mode only: "connecting", "connected", "reconnecting: why"
    worker_task: asyncio.Task[None] | None = None  # the job loop, once started
    stopping: bool = False


def job_loop_state(health: Health, heartbeat: float | None, now: float) -> str:
    """ "ok", or why the job loop is not taking jobs (ended, or stuck: no turn for LOOP_STALE_S)."""
    task = health.worker_task
    if task is not None and task.done():
        return "ended"
    if task is None:  # not started yet: its heartbeat says nothing until it runs
        if any(state != "ok" for state in health.checks.values()) or health.slack_connection not in (
            "",
            "connected",
        ):
            return "waiting for start-up checks"
        return "ok"
    if heartbeat is not None and now - heartbeat > LOOP_STALE_S:
        return f"stuck: no turn for {now - heartbeat:.0f}s"
    return "ok"


def readiness(
    health: Health,
    *,
    redis: str,
    answers: bool,
    heartbeat: float | None,
    kimi_outcome: str,
    now: float,
) -> tuple[bool, dict[str, Any]]:
    """Whether the bot can answer, and a body naming each failing part (`failing`: part -> why)."""
    failing: dict[str, str] = {}
    if health.stopping:
        failing["process"] = "shutting down"
    if redis != "ok":
        failing["redis"] = redis
    for setting, state in health.checks.items():
        if state != "ok":
            failing[setting] = state
    if health.slack_connection and health.slack_connection != "connected":
        failing["slack_connection"] = health.slack_connection
    body: dict[str, Any] = {"redis": redis}
    if health.checks:
        body["checks"] = dict(health.checks)
    if health.slack_connection:
        body["slack_connection"] = health.slack_connection
    if answers:
        loop = job_loop_state(health, heartbeat, now)
        body["job_loop"] = loop
        if loop != "ok":
            failing["job_loop"] = loop
        body["kimi_last_outcome"] = kimi_outcome or "none yet"
        if kimi_outcome in KIMI_BLOCKING:
            failing["kimi"] = f"last call refused: {kimi_outcome}"
    ok = not failing
    return ok, {"ok": ok, **({"failing": failing} if failing else {}), **body}
