"""What `kimibot serve` runs on for speed (README, Benchmarks): uvloop as its event loop, hiredis parsing
Redis replies, and no page reader loaded until a page is fetched."""

from __future__ import annotations

import asyncio
import subprocess
import sys

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


def test_serve_does_not_load_the_page_reader_until_a_page_is_fetched() -> None:
    """trafilatura (with lxml, justext, htmldate and their data, ~9 MB) is imported by fetch_url on first
    use, not when `kimibot serve` loads its modules."""
    probe = (
        "import sys, bot.cli, bot.server, bot.deps, bot.worker, bot.tools.web; "
        "print('trafilatura' in sys.modules)"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "False"
