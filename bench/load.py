"""Load benchmark: N questions at once, slow thinking answers, through /slack/events.

Starts `kimibot serve` as its own process against the fake Slack (enforcing Slack's rate limits) and the
fake Kimi (reasoning, then an answer streamed over a few seconds), sends N signed app_mention events at
once (from a process of their own, as Slack sends from its own machines: bench/sender.py), and prints ack
latency, throughput, Slack calls per answer, the bot's peak RSS and its own overhead per turn. Then issue
10's scale round (bench/scale.py): 300 answers of ~30 s in flight at once in one process, across 10
workspaces (OAuth installs), with the event-loop lag, peak RSS, Slack 429s and completeness beside their
targets. Redis: its own redis-server (or KIMIBOT_TEST_REDIS_URL, flushed).

    .venv/bin/python -m bench.load [--questions 30] [--scale-answers 300 (0: skip)] [--scale-arrival-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp

from bench.common import REDIS_URL, answers, start_fakes
from bench.scale import BotProcess, print_figures, rss_mb, run_scale
from bench.sender import send_round_apart
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE, envelope, json_body, mention, sign
from tests.test_startup_checks import serve_env

CHANNELS = 10


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Round:
    """One round of questions: when each was sent, how long its ack took."""

    def __init__(self, name: str, prefix: str, questions: int, channels: int = CHANNELS) -> None:
        self.name = name
        self.events = []
        for i in range(questions):
            channel, ts = f"C0{prefix}{i % channels:04d}", f"17000{prefix[-1]}1000.{i:06d}"
            self.events.append(
                (channel, ts, json_body(envelope(mention(f"question {prefix}{i}", ts, channel=channel))))
            )
        self.acks: list[float] = []
        self.sent_at: dict[str, float] = {}
        self.started = self.finished = 0.0


async def run_round(url: str, slack: FakeSlack, rnd: Round, gap_s: float) -> None:
    for channel, ts, _ in rnd.events:
        slack.seed(channel, user=ALICE, text="q", ts=ts)
    acks = await send_round_apart(url, [body for _, _, body in rnd.events], gap_s)
    for (_, ts, _), ack in zip(rnd.events, acks, strict=True):
        assert ack.status == 200, ack.status
        rnd.sent_at[ts] = ack.sent_at
        rnd.acks.append(ack.seconds)
    rnd.started = min(rnd.sent_at.values())

    def done(channel: str, ts: str) -> bool:
        bodies = slack.bodies(channel, ts)
        return bool(bodies) and not any("Thinking…" in b for b in bodies) and "kimi" in bodies[-1]

    async with asyncio.timeout(300):
        while not all(done(channel, ts) for channel, ts, _ in rnd.events):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    rnd.finished = time.monotonic()


def report(rnd: Round, slack: FakeSlack, kimi: FakeKimi) -> None:
    """Per-turn figures from the fakes' own clocks."""
    calls: dict[str, list[float]] = defaultdict(list)
    thread_of: dict[str, str] = {}
    for call in slack.calls:
        thread = call.args.get("thread_ts")
        if thread and call.args.get("_result", {}).get("ts"):
            thread_of[str(call.args["_result"]["ts"])] = str(thread)
        key = thread or thread_of.get(str(call.args.get("ts")))
        if key in rnd.sent_at and call.method.startswith(("chat.", "assistant.")):
            calls[key].append(call.at)
    to_model, after_model = [], []
    for index, request in enumerate(kimi.requests):
        asked = request["messages"][-1]["content"].rsplit(" ", 1)[-1]
        ts = next(
            (
                ts
                for _, ts, body in rnd.events
                if f'"question {asked}"' in body.decode() or body.decode().endswith(f"question {asked}")
            ),
            None,
        )
        ts = next((t for c, t, b in rnd.events if f"question {asked}" in b.decode()), ts)
        if ts is None:
            continue
        to_model.append(kimi.request_times[index] - rnd.sent_at[ts])
        if index in kimi.finished:
            after_model.append(max(calls[ts]) - kimi.finished[index])
    # A sign of life: the placeholder in the question's thread, or a reaction on the question, whichever
    # Slack got first.
    signs = []
    for _, ts, _ in rnd.events:
        shown = [
            c.at
            for c in slack.calls
            if (c.method == "chat.postMessage" and c.args.get("thread_ts") == ts)
            or (c.method == "reactions.add" and c.args.get("timestamp") == ts)
        ]
        if shown:
            signs.append(min(shown) - rnd.sent_at[ts])
    once = all(len([b for b in slack.bodies(c, t) if "kimi" in b]) == 1 for c, t, _ in rnd.events)
    n = len(rnd.events)
    print(f"{rnd.name}")
    answered = sum(1 for c, t, _ in rnd.events if slack.bodies(c, t))
    print(f"  answered once each:              {once} ({answered}/{n})")
    print(
        f"  ack latency:                     p50 {percentile(rnd.acks, 50) * 1000:.1f} ms, "
        f"p99 {percentile(rnd.acks, 99) * 1000:.1f} ms, max {max(rnd.acks) * 1000:.1f} ms   "
        "(targets p50 < 10 ms, max < 50 ms)"
    )
    if signs:
        print(
            f"  sign of life (placeholder or 👀): median {statistics.median(signs):.2f} s, "
            f"max {max(signs):.2f} s   (targets < 1 s, < 2 s)"
        )
    print(
        f"  event -> model request:          median {statistics.median(to_model) * 1000:.1f} ms  "
        "(target < 10 ms)"
    )
    print(
        f"  model done -> last Slack write:  median {statistics.median(after_model) * 1000:.1f} ms  "
        "(target < 50 ms)"
    )
    print(
        f"  answers per minute:              {n / (rnd.finished - rnd.started) * 60:.0f} "
        f"(all {n} done in {rnd.finished - rnd.started:.1f} s)"
    )
    print(f"  Slack calls per answer:          {statistics.mean(len(v) for v in calls.values()):.1f}")


async def main(questions: int, scale_answers: int, scale_arrival_s: float) -> None:
    slack, kimi = await start_fakes()
    # Slow answers: ~1.5 s of reasoning, then ~1,600 characters over ~2 s.
    kimi.script(
        *answers(
            3 * questions,
            reasoning="Let me think this through. " * 12,
            content="Part of the answer. " * 80,
            chunk_chars=40,
            chunk_delay=0.05,
        )
    )
    workdir = Path(tempfile.mkdtemp())
    env = serve_env(
        slack,
        kimi,
        REDIS_URL,
        workdir,
        SHUTDOWN_GRACE_SECONDS="",
        KIMI_CONCURRENCY=str(questions),
        LOG_LEVEL="WARNING",
    )
    bot = BotProcess(env, workdir)
    paced = Round(
        f"{questions} questions arriving over {questions * 0.05:.1f} s ({questions} in flight)",
        "PACE",
        questions,
    )
    burst = Round(f"{questions} questions in one burst (all sent at the same instant)", "BURST", questions)
    one_channel = Round(
        f"{questions} mentions in ONE channel at the same instant (Slack posts ~1/s per channel)",
        "ONEC",
        questions,
        channels=1,
    )
    try:
        async with aiohttp.ClientSession() as session:
            await bot.wait_healthy(session)
            url = f"{bot.base}/slack/events"
            warm = json_body(envelope(mention("warm up", "1700000999.000001", channel="C0WARM")))
            slack.seed("C0WARM", user=ALICE, text="warm up", ts="1700000999.000001")
            kimi.replies.appendleft(Reply(content="ok"))
            async with session.post(
                url, data=warm, headers={"Content-Type": "application/json", **sign(warm)}
            ):
                pass
            await asyncio.sleep(1.0)
            await run_round(url, slack, paced, gap_s=0.05)
            await asyncio.sleep(5.0)
            await run_round(url, slack, burst, gap_s=0)
            await asyncio.sleep(5.0)
            await run_round(url, slack, one_channel, gap_s=0)
            rss = rss_mb(bot.process.pid, "VmHWM")
    finally:
        await bot.stop()
        await slack.stop()
        await kimi.stop()
    print(
        f"kimibot load benchmark (answers: ~1.5 s thinking, then ~1,600 chars streamed over ~2 s; "
        f"{CHANNELS} channels; fake Slack enforcing its rate limits)"
    )
    report(paced, slack, kimi)
    report(burst, slack, kimi)
    report(one_channel, slack, kimi)
    print(f"peak RSS of kimibot:               {rss:.0f} MB   (target < 100 MB)")
    print(f"Slack 429s:                        {len(slack.limit_hits)}   (target 0)")
    print(f"Web API call problems:             {len(slack.problems)}")
    if scale_answers:
        print()
        print_figures(await run_scale(scale_answers, arrival_s=scale_arrival_s))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument(
        "--scale-answers", type=int, default=300, help="the scale round's answers; 0: skip it"
    )
    parser.add_argument(
        "--scale-arrival-s", type=float, default=10.0, help="its questions arrive over this long"
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.questions, args.scale_answers, args.scale_arrival_s)))
