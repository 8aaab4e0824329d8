"""Live-answer figures with Slack's real pace: time to first sign, Slack calls per answer, 429s.

Runs the real Bolt app over loopback HTTP against the fake Slack (enforcing Slack's rate limits) and the
fake Kimi (streaming reasoning, then the answer), with a Redis of its own (or KIMIBOT_TEST_REDIS_URL,
flushed).

    .venv/bin/python -m bench.live_answers [--questions 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from bench.common import answers, bench_harness, start_fakes
from tests.conftest import BotHarness
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE, mention

WRITES = ("chat.", "assistant.", "reactions.", "views.")


def writes_in(slack: FakeSlack, channel: str, thread_ts: str, since: float) -> list[str]:
    return [
        c.method
        for c in slack.calls
        if c.at >= since
        and c.method.startswith(WRITES)
        and (c.args.get("channel") == channel or c.args.get("channel_id") == channel)
        and (
            c.args.get("thread_ts") in (thread_ts, None)
            or c.method in ("chat.update", "chat.appendStream", "chat.stopStream")
        )
    ]


async def one(bot: BotHarness, slack: FakeSlack, channel: str, ts: str) -> tuple[float, list[str]]:
    slack.seed(channel, user=ALICE, text="q", ts=ts)
    started = time.monotonic()
    await bot.send_event(mention("a question", ts, channel=channel), seed=False)
    await bot.settle(limit_s=120)
    first = min(c.at for c in slack.calls if c.method == "chat.postMessage" and c.args.get("thread_ts") == ts)
    return first - started, writes_in(slack, channel, ts, started)


async def main(questions: int) -> None:
    slack, kimi = await start_fakes()
    bot = bench_harness(slack, slack.api_url, kimi.base_url)
    await bot.start()
    results: dict[str, Any] = {}
    try:
        # Short answers: the whole answer arrives at once after ~2 s of thinking.
        kimi.script(
            *answers(
                questions,
                reasoning="Thinking. " * 40,
                content="A short answer.",
                chunk_chars=20,
                chunk_delay=0.01,
            )
        )
        short = [await one(bot, slack, f"C0SHORT{i:03d}", f"1700000100.{i:06d}") for i in range(questions)]
        # Streamed answers: ~2,000 characters arriving over ~4 s.
        kimi.script(
            *answers(
                questions // 4 or 1,
                reasoning="Thinking. " * 10,
                content="Some words of the answer. " * 80,
                chunk_chars=40,
                chunk_delay=0.08,
            )
        )
        streamed = [
            await one(bot, slack, f"C0STREAM{i:03d}", f"1700000200.{i:06d}")
            for i in range(questions // 4 or 1)
        ]
        # Many at once: every question in flight together (placeholders, updates, streams all competing).
        kimi.script(
            *answers(
                questions,
                reasoning="Thinking.",
                content="Concurrent answer. " * 60,
                chunk_chars=60,
                chunk_delay=0.05,
            )
        )
        started = time.monotonic()
        for i in range(questions):
            slack.seed(f"C0LOAD{i % 5}", user=ALICE, text="q", ts=f"1700000300.{i:06d}")
            await bot.send_event(
                mention("at once", f"1700000300.{i:06d}", channel=f"C0LOAD{i % 5}"), seed=False
            )
        await bot.settle(limit_s=300)
        results["concurrent_s"] = time.monotonic() - started
    finally:
        await bot.stop()
        await slack.stop()
        await kimi.stop()

    first_signs = [s for s, _ in short + streamed]
    print(f"questions: {questions} short, {len(streamed)} streamed, {questions} concurrent (5 channels)")
    print(
        "time to first sign (event -> placeholder in Slack): "
        f"median {statistics.median(first_signs) * 1000:.1f} ms, "
        f"max {max(first_signs) * 1000:.1f} ms  (target < 1 s)"
    )
    print(
        f"Slack calls per short answer:    {statistics.median(len(c) for _, c in short):.0f}"
        f"  e.g. {short[0][1]}  (target <= 5)"
    )
    print(
        f"Slack calls per streamed answer: {statistics.median(len(c) for _, c in streamed):.0f}"
        f"  e.g. {streamed[0][1]}"
    )
    print(f"{questions} concurrent answers finished in {results['concurrent_s']:.1f} s")
    print(
        f"429s from Slack: {len(slack.limit_hits)}  (target 0)   slack_429s metric: "
        f"{bot.deps.metrics.snapshot()['slack_429s']}"
    )
    print(f"problems with Web API calls: {len(slack.problems)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--questions", type=int, default=20)
    asyncio.run(main(parser.parse_args().questions))
