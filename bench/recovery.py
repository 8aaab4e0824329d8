"""Recovery benchmark: how long after a `kill -9` are a thread's questions answered again?

Starts `kimibot serve` (default settings: JOB_VISIBILITY_TIMEOUT 10 s) against a private redis-server and the
fake Slack and Kimi, asks a slow question, adds a follow-up in the same thread, kills the process with
SIGKILL while the first answer streams, starts it again and prints, per round, the seconds from the restart
until the first question is answered (completely, once) and until the follow-up is (after it, in order).
Target: both within 15 s of the restart.

    .venv/bin/python -m bench.recovery [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.fakes.kimi_api import API_KEY, FakeKimi, Reply
from tests.fakes.slack_api import TOKEN, FakeSlack
from tests.redis_servers import PrivateRedis
from tests.slack_requests import ALICE, BOB, CHANNEL, SIGNING_SECRET, mention, message
from tests.test_serve_process import ServeProcess, free_port

SLOW = "\n\n".join(f"Paragraph {i}: " + "a slow answer " * 8 for i in range(40))


def finished(slack: FakeSlack, thread_ts: str, count: int) -> bool:
    """`count` answers with their footer, and no placeholder still thinking."""
    bodies = slack.bodies(CHANNEL, thread_ts)
    footers = [body for body in bodies if "kimi-k2.6 ·" in body]
    return len(footers) >= count and not any("Thinking…" in body for body in bodies)


async def one_round(
    index: int, slack: FakeSlack, kimi: FakeKimi, redis: PrivateRedis, home: Path
) -> tuple[float, float]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "SLACK_BOT_TOKEN": TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": slack.api_url,
        "MOONSHOT_API_KEY": API_KEY,
        "KIMI_BASE_URL": kimi.base_url,
        "KIMI_MODEL": "kimi-k2.6",
        "REDIS_URL": redis.url,
        "PORT": str(free_port()),
    }
    root, follow = f"17000090{index:02d}.000100", f"17000090{index:02d}.000200"
    kimi.script(
        Reply(content=SLOW, chunk_chars=40, chunk_delay=0.05),  # killed mid-stream
        Reply(content="first answer, complete"),  # the re-run
        Reply(content="second answer"),
    )
    slack.seed(CHANNEL, user=ALICE, text="slow question", ts=root)
    async with aiohttp.ClientSession() as session:
        bot = ServeProcess(env, home)
        await bot.wait_healthy(session)
        assert await bot.send(session, mention("a slow question", root)) == 200
        streamed = len(slack.calls_of("chat.appendStream"))
        async with asyncio.timeout(20):
            while len(slack.calls_of("chat.appendStream")) <= streamed:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.01)
        assert await bot.send(session, message("and a follow-up", follow, thread_ts=root, user=BOB)) == 200
        bot.process.kill()
        bot.process.wait()
        restarted = time.monotonic()
        again = ServeProcess(env, home)
        try:
            await again.wait_healthy(session)
            first = second = 0.0
            async with asyncio.timeout(60):
                while not second:
                    if not first and finished(slack, root, 1):
                        first = time.monotonic() - restarted
                    if first and finished(slack, root, 2):
                        second = time.monotonic() - restarted
                    await asyncio.sleep(0.02)
        finally:
            again.process.kill()
            again.process.wait()
    bodies = slack.bodies(CHANNEL, root)
    assert len(bodies) == 2, (
        bodies and bodies[0].startswith("first answer") and bodies[1].startswith("second answer")
    )
    return first, second


async def main(rounds: int) -> None:
    slack, kimi = FakeSlack(), FakeKimi()
    slack.add_user(ALICE, "alice")
    slack.add_user(BOB, "bob")
    await slack.start()
    await kimi.start()
    with tempfile.TemporaryDirectory() as tmp:
        redis = PrivateRedis(Path(tmp))
        await redis.start()
        try:
            results = [await one_round(i, slack, kimi, redis, Path(tmp)) for i in range(rounds)]
        finally:
            await redis.stop()
            await slack.stop()
            await kimi.stop()
    firsts, seconds = [r[0] for r in results], [r[1] for r in results]
    print("kill -9 mid-answer with a follow-up queued, default settings (JOB_VISIBILITY_TIMEOUT=10 s)")
    print(f"{'':36} {'median':>8} {'max':>8}   target")
    for name, values in (
        ("restart -> first answered (s)", firsts),
        ("restart -> follow-up answered (s)", seconds),
    ):
        print(f"{name:36} {statistics.median(values):8.2f} {max(values):8.2f}   < 15")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args().rounds))
