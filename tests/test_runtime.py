"""What `kimibot serve` runs on for speed (README, Benchmarks): uvloop as its event loop, hiredis parsing
Redis replies."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from bot.cli import run_fast


def test_serve_and_worker_run_on_uvloop() -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_fast(loop_module()).startswith("uvloop")


async def test_redis_replies_are_parsed_by_hiredis(redis: Redis) -> None:
    """The suite's client is build_redis's (tests/conftest.py)."""
    assert await redis.ping()
    pool = redis.connection_pool
    connection = await pool.get_connection()
    try:
        assert "Hiredis" in type(connection._parser).__name__
    finally:
        await pool.release(connection)
