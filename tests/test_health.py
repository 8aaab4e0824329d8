"""Readiness as /healthz reports it: every part that keeps the bot from answering is named."""

from __future__ import annotations

import asyncio

from bot.health import LOOP_STALE_S, Health, readiness


def ready(health: Health, **kwargs: object) -> tuple[bool, dict[str, object]]:
    values: dict[str, object] = {
        "redis": "ok",
        "answers": True,
        "heartbeat": 100.0,
        "kimi_outcome": "ok",
        "now": 101.0,
        **kwargs,
    }
    return readiness(health, **values)  # type: ignore[arg-type]


def test_all_parts_well_is_ready() -> None:
    ok, body = ready(Health(checks={"SLACK_BOT_TOKEN": "ok"}, slack_connection="connected"))
    assert ok and "failing" not in body and body["job_loop"] == "ok"


def test_each_failing_part_is_named() -> None:
    health = Health(
        checks={"SLACK_BOT_TOKEN": "not ready: Slack is unreachable", "MOONSHOT_API_KEY": "ok"},
        slack_connection="reconnecting: Slack answered HTTP 503",
    )
    ok, body = ready(health, redis="unavailable: ConnectionError", kimi_outcome="auth")
    assert not ok
    assert {"SLACK_BOT_TOKEN", "slack_connection", "redis", "kimi"} <= set(body["failing"])  # type: ignore[arg-type]


async def test_a_stuck_job_loop_is_not_ready() -> None:
    running = asyncio.create_task(asyncio.Event().wait())
    try:
        ok, body = ready(Health(worker_task=running), heartbeat=100.0, now=100.0 + LOOP_STALE_S + 1)
        assert not ok and str(body["failing"]["job_loop"]).startswith("stuck")  # type: ignore[index]
    finally:
        running.cancel()


def test_a_job_loop_not_started_yet_is_not_called_stuck() -> None:
    # Before the start-up checks pass, the loop has not run: its heartbeat says nothing.
    health = Health(checks={"MOONSHOT_API_KEY": "not ready: Kimi is unreachable"})
    ok, body = ready(health, heartbeat=100.0, now=100.0 + LOOP_STALE_S + 5)
    assert not ok and body["failing"]["job_loop"] == "waiting for start-up checks"  # type: ignore[index]
    connecting = Health(slack_connection="connecting")
    assert (
        ready(connecting, heartbeat=100.0, now=200.0)[1]["failing"]["job_loop"]
        == "waiting for start-up checks"
    )  # type: ignore[index]


async def test_an_ended_job_loop_is_not_ready() -> None:
    async def ends() -> None:
        return None

    health = Health(worker_task=asyncio.create_task(ends()))
    await health.worker_task  # type: ignore[misc]
    ok, body = ready(health)
    assert not ok and body["failing"] == {"job_loop": "ended"}


def test_kimi_outages_that_pass_by_themselves_do_not_make_it_unready() -> None:
    assert ready(Health(), kimi_outcome="unavailable")[0]
    assert ready(Health(), kimi_outcome="")[1]["kimi_last_outcome"] == "none yet"
    assert not ready(Health(), kimi_outcome="quota")[0]


def test_a_receiver_is_not_judged_by_a_job_loop_or_kimi() -> None:
    ok, body = ready(Health(), answers=False, heartbeat=None, kimi_outcome="auth")
    assert ok and "job_loop" not in body
