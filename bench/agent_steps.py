"""Agent-loop figures: 20 concurrent tool-using answers of 10 tool steps each, against the fake Kimi (tool
calls streamed like Kimi's) and the fake Slack (enforcing Slack's rate limits), with production pacing and a
Redis of its own (or KIMIBOT_TEST_REDIS_URL, which it flushes).

The fakes run in a child process, so their work does not queue in the bot's event loop. It prints the
bot's own overhead per step: the time from the end of one model request to the start of the next, less the
tools' own time (the longest call of the step, as calls of a step run at once). That covers planning the
calls, the live view's bookkeeping, the fenced checkpoint write to Redis and waiting for the event loop
with 19 other answers going on; Kimi's time (and the wait for a KIMI_CONCURRENCY slot) and the tools' time
are not in it. Also the bot process's CPU time per step (everything it does: Slack events, reading Kimi's
streams, the writer, Redis), and Slack calls per step and per answer.

    .venv/bin/python -m bench.agent_steps [--answers 20] [--steps 10] [--tool-ms 20] [--kimi-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import bot.pipeline
from bench.common import bench_harness, start_fakes
from bot.agent.loop import AgentLoop, Outcome
from bot.tools.base import Tool, ToolContext, ToolResult
from tests.fakes.kimi_api import Call, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE, mention

OUTCOMES: list[Outcome] = []


class RecordingLoop(AgentLoop):
    """The real loop; its outcome is kept for the figures."""

    async def run(self, *args: Any, **kwargs: Any) -> Outcome:
        outcome = await super().run(*args, **kwargs)
        OUTCOMES.append(outcome)
        return outcome


@dataclass
class Lookup:
    """A read-only tool that takes `delay` seconds (its own time, excluded from the overhead)."""

    delay: float
    name: str = "lookup"
    description: str = "Look a fact up."
    read_only: bool = True
    parameters: dict[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    )

    def title(self, args: dict[str, Any]) -> str:
        return f"Looking up {args.get('q', '')}"

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        await asyncio.sleep(self.delay)
        return ToolResult(f"fact {args.get('q')}: " + "detail " * 40, sources=("https://example.com/facts",))


def responder(steps: int, chunk_delay: float) -> Any:
    def reply(request: dict[str, Any]) -> Reply:
        done = sum(1 for m in request["messages"] if m["role"] == "tool")
        if done >= steps:
            return Reply(
                reasoning="I have everything.",
                content="Here is the answer. " * 30,
                chunk_chars=60,
                chunk_delay=chunk_delay,
            )
        return Reply(
            reasoning=f"Step {done + 1}: look up the next fact.",
            tool_calls=[Call("lookup", json.dumps({"q": f"fact {done + 1}"}))],
            chunk_chars=40,
            chunk_delay=chunk_delay,
        )

    return reply


def question(i: int) -> tuple[str, str]:
    return f"C0AGENT{i % 5}", f"1700000400.{i:06d}"


async def fakes(conn: Connection, answers: int, steps: int, chunk_delay: float) -> None:
    """The fake Slack and Kimi; their URLs go to the parent, then their figures once it says stop."""
    slack, kimi = await start_fakes()
    kimi.responder = responder(steps, chunk_delay)
    for i in range(answers):
        channel, ts = question(i)
        slack.seed(channel, user=ALICE, text="look ten things up", ts=ts)
    conn.send((slack.api_url, kimi.base_url))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    channels = [f"C0AGENT{i}" for i in range(5)]
    conn.send(
        {
            "calls": Counter(c.method for c in slack.calls if c.method not in ("auth.test", "users.info")),
            "limit_hits": len(slack.limit_hits),
            "problems": list(slack.problems),
            "open_cards": sum(len(slack.cards_left_open(c)) for c in channels),
            "requests": len(kimi.requests),
            "rejected": list(kimi.rejected),
        }
    )
    await slack.stop()
    await kimi.stop()


def run_fakes(conn: Connection, answers: int, steps: int, chunk_delay: float) -> None:
    asyncio.run(fakes(conn, answers, steps, chunk_delay))


async def main(answers: int, steps: int, tool_ms: float, kimi_ms: float) -> None:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(
        target=run_fakes, args=(child, answers, steps, kimi_ms / 1000 / 8), daemon=True
    )
    process.start()
    slack_api, kimi_base = parent.recv()
    bot.pipeline.AgentLoop = RecordingLoop  # type: ignore[misc]
    # The harness only posts events; Slack is in the child.
    harness = bench_harness(FakeSlack(), slack_api, kimi_base, kimi_concurrency=answers)
    tool: Tool = Lookup(tool_ms / 1000)

    async def tools(ctx: ToolContext) -> list[Tool]:
        return [tool]

    harness.deps.tools = tools
    await harness.start()
    try:
        cpu = time.process_time()
        started = time.monotonic()
        for i in range(answers):
            channel, ts = question(i)
            await harness.send_event(mention("look ten things up", ts, channel=channel), seed=False)
        await harness.settle(limit_s=600)
        wall = time.monotonic() - started
        cpu = time.process_time() - cpu
    finally:
        await harness.stop()
        parent.send("stop")
        figures = parent.recv()
        process.join(10)

    overheads = [o for outcome in OUTCOMES for o in outcome.overheads_s]
    work = [w for outcome in OUTCOMES for w in outcome.work_s]
    total_steps = sum(len(o.steps) for o in OUTCOMES)
    methods: Counter[str] = figures["calls"]
    calls = sum(methods.values())
    print(
        f"answers: {len(OUTCOMES)}/{answers}; {total_steps} tool steps, {steps} each; tools {tool_ms:.0f} ms"
    )
    print(f"Kimi requests: {figures['requests']}, refused by the fake: {len(figures['rejected'])} (target 0)")
    print(
        "bot overhead per step (between model requests, less the tools' time): "
        f"median {statistics.median(overheads) * 1000:.2f} ms, p90 "
        f"{statistics.quantiles(overheads, n=10)[-1] * 1000:.2f} ms, max {max(overheads) * 1000:.2f} ms"
        "  (target median < 5 ms)"
    )
    print(
        "  of which the loop's own work (planning, live view, checkpoint dispatch): "
        f"median {statistics.median(work) * 1000:.2f} ms, max {max(work) * 1000:.2f} ms"
    )
    print(f"bot CPU per step (all the bot process did; fakes excluded): {cpu / total_steps * 1000:.2f} ms")
    print(
        f"Slack calls (answers' writes): {calls} in all, {calls / total_steps:.2f} per step, "
        f"{calls / len(OUTCOMES):.1f} per answer"
    )
    print("  by method: " + ", ".join(f"{m} {n}" for m, n in methods.most_common()))
    print(
        f"all {answers} answers done in {wall:.1f} s; Slack 429s: {figures['limit_hits']}; "
        f"problems: {len(figures['problems'])}; task cards left open: {figures['open_cards']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--answers", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tool-ms", type=float, default=20.0)
    parser.add_argument("--kimi-ms", type=float, default=0.0, help="about how long each model step streams")
    args = parser.parse_args()
    asyncio.run(main(args.answers, args.steps, args.tool_ms, args.kimi_ms))
