"""Where the time goes between a job being queued and its request reaching Kimi (issue 10), step by step.

The real bot in this process (Bolt app, web app, worker, the built-in tools offered as `kimibot serve`
offers them), real Redis; the fake Slack and the fake Kimi in a child process, so their work does not
borrow the bot's event loop. Plain mentions, each in a new thread and each answered before the next is
sent (paced: nothing queues), the answer a short one with no tool call. For each, the worker's path is
timed with wrappers around its steps: from the queueing (`JobQueue.put` returning, in the intake) through
the worker's wake-up (`_claim_some`), the claim, `run_job`, the pipeline's reads and writes, the tools'
offer and the usage meter, to the fake Kimi's handler seeing the request (both clocks are CLOCK_MONOTONIC).
Every Redis round trip the bot sends (a command, or a pipeline's execute) is counted and charged to the
innermost step running it.

Prints, per step (median over the mentions): when it starts after the queueing, how long it takes, and the
Redis round trips it sent itself; then queued -> Kimi has the request, and the round trips on the way.

    .venv/bin/python -m bench.job_start [--mentions 30] [--warm 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import gc
import multiprocessing
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp.client_reqrep

import bot.agent.loop
import bot.kimi.client
import bot.pipeline
import bot.queue
import bot.slack.reply
import bot.store
import bot.usage
import bot.work
import bot.worker
from bench.common import bench_harness, start_fakes
from bot.agent.toolbox import ToolBox
from bot.channel_settings import ChannelSettings
from tests.fakes.kimi_api import Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import mention

QUEUED = "queued (JobQueue.put returned)"
KIMI = "fake Kimi has the request"

# (owner, attribute, label): the steps timed, in about the order they run.
STEPS: list[tuple[Any, str, str]] = [
    (bot.worker.Worker, "_claim_some", "worker: _claim_some (wake-up)"),
    (bot.queue.JobQueue, "due", "  queue.due"),
    (bot.queue.JobQueue, "claim", "  queue.claim"),
    (bot.queue.JobQueue, "listing", "    queue.listing"),
    (bot.queue.JobQueue, "forget", "    queue.forget"),
    (bot.worker.Worker, "_serve_thread", "worker: _serve_thread"),
    (bot.queue.Lease, "next_job", "  lease.next_job"),
    (bot.queue.Lease, "release", "  lease.release"),
    (bot.work, "answer", "  pipeline.answer"),
    (bot.queue.Lease, "progress", "    lease.progress"),
    (bot.pipeline, "speaker_name", "    speaker_name"),
    (bot.store.ThreadStore, "load", "    threads.load"),
    (ChannelSettings, "resolve", "    channel_settings.resolve"),
    (bot.queue.Lease, "save_progress", "    lease.save_progress"),
    (bot.store.Stops, "requested_by", "    stops.requested_by"),
    (bot.pipeline, "_think_and_deliver", "    _think_and_deliver"),
    (bot.queue.Lease, "append", "      lease.append"),
    (bot.pipeline, "_with_files", "      _with_files"),
    (bot.pipeline, "fit_thread", "      fit_thread"),
    (ToolBox, "__call__", "      deps.tools (ToolBox)"),
    (bot.pipeline, "offer", "      offer (tool registry)"),
    (bot.pipeline, "_agent_answer", "      _agent_answer"),
    (bot.agent.loop.AgentLoop, "run", "        AgentLoop.run"),
    (bot.kimi.client.KimiClient, "_metered", "          KimiClient._metered"),
    (bot.usage.Meter, "before", "            Meter.before"),
    (bot.usage, "prompt_bound", "              prompt_bound"),
    (bot.usage.UsageLedger, "reserve", "              ledger.reserve"),
    (bot.kimi.client.KimiClient, "_stream_once", "            KimiClient._stream_once"),
    (bot.kimi.client.KimiClient, "request_kwargs", "              request_kwargs"),
    (aiohttp.client_reqrep.ClientRequest, "send", "first HTTP request out (Kimi's or Slack's)"),
    (bot.slack.reply.ReplyWriter, "begin", "(beside) ReplyWriter.begin: the placeholder"),
]


@dataclass
class Span:
    label: str
    start: float
    end: float = 0.0
    commands: list[tuple[float, str]] = field(default_factory=list)


class Tracer:
    """Spans of the steps above and the Redis round trips, while `on`."""

    def __init__(self) -> None:
        self.on = False
        self.spans: list[Span] = []
        self.loose: list[tuple[float, str]] = []  # round trips outside any step (the watcher's ticks...)
        self.current: contextvars.ContextVar[Span | None] = contextvars.ContextVar("span", default=None)
        self.queued_at = 0.0

    def reset(self) -> None:
        self.spans, self.loose, self.queued_at = [], [], 0.0

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        tracer = self
        if asyncio.iscoroutinefunction(original):

            @functools.wraps(original)
            async def traced_async(*args: Any, **kwargs: Any) -> Any:
                if not tracer.on:
                    return await original(*args, **kwargs)
                span = Span(label, time.monotonic())
                tracer.spans.append(span)
                token = tracer.current.set(span)
                try:
                    return await original(*args, **kwargs)
                finally:
                    span.end = time.monotonic()
                    tracer.current.reset(token)

            setattr(owner, name, traced_async)
        else:

            @functools.wraps(original)
            def traced(*args: Any, **kwargs: Any) -> Any:
                if not tracer.on:
                    return original(*args, **kwargs)
                span = Span(label, time.monotonic())
                tracer.spans.append(span)
                token = tracer.current.set(span)
                try:
                    return original(*args, **kwargs)
                finally:
                    span.end = time.monotonic()
                    tracer.current.reset(token)

            setattr(owner, name, traced)

    def round_trip(self, what: str) -> None:
        if not self.on:
            return
        span = self.current.get()
        if span is None:
            self.loose.append((time.monotonic(), what))
        else:
            span.commands.append((time.monotonic(), what))

    @staticmethod
    def script_names() -> dict[str, str]:
        """Lua text and SHA1 -> the module constant holding it, to name EVAL/EVALSHA round trips."""
        import hashlib
        import sys

        names: dict[str, str] = {}
        for module_name, module in list(sys.modules.items()):
            if not module_name.startswith(("bot.", "handlers.")):
                continue
            for attr, value in vars(module).items():
                if isinstance(value, str) and "redis.call" in value:
                    names[value] = names[hashlib.sha1(value.encode()).hexdigest()] = attr
        return names

    def count_redis(self, client: Any) -> None:
        """Charge each command and each pipeline's execute to the step running it."""
        command, pipeline = client.execute_command, client.pipeline
        tracer = self
        scripts = self.script_names()

        def named(args: tuple[Any, ...]) -> str:
            name = str(args[0])
            if name in ("EVALSHA", "EVAL"):
                return f"{name} {scripts.get(str(args[1]), str(args[1])[:16].strip())}"
            return name

        async def counted(*args: Any, **options: Any) -> Any:
            tracer.round_trip(named(args))
            return await command(*args, **options)

        def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = pipeline(*args, **kwargs)
            execute = pipe.execute

            async def counted_execute(*a: Any, **kw: Any) -> Any:
                inner = "+".join(named(c[0]) for c in pipe.command_stack)
                tracer.round_trip(f"pipeline({inner})")
                return await execute(*a, **kw)

            pipe.execute = counted_execute
            return pipe

        client.execute_command = counted
        client.pipeline = counted_pipeline


async def fakes(conn: Connection) -> None:
    slack, kimi = await start_fakes()
    kimi.responder = lambda body: Reply(reasoning="Thinking.", content="A short answer.", chunk_chars=400)
    conn.send((slack.api_url, kimi.base_url))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)
    conn.send(list(kimi.request_times))
    await slack.stop()
    await kimi.stop()


def run_fakes(conn: Connection) -> None:
    asyncio.run(fakes(conn))


def steps_of(spans: list[Span], queued: float, arrived: float) -> dict[str, tuple[float, float, int]]:
    """label -> (first start after the queueing, ms; time in it before Kimi had the request, ms; round
    trips it sent itself before then)."""
    out: dict[str, tuple[float, float, int]] = {}
    for span in spans:
        if not queued <= span.start <= arrived:
            continue
        end = min(span.end or arrived, arrived)
        start, spent, trips = out.get(span.label, (span.start, 0.0, 0))
        sent = sum(1 for at, _ in span.commands if at <= arrived)
        out[span.label] = (min(start, span.start), spent + end - span.start, trips + sent)
    return {k: ((s - queued) * 1000, d * 1000, n) for k, (s, d, n) in out.items()}


async def main(mentions: int, warm: int) -> None:
    tracer = Tracer()
    for owner, name, label in STEPS:
        tracer.wrap(owner, name, label)
    put = bot.queue.JobQueue.put

    async def marked_put(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = await put(self, *args, **kwargs)
        if tracer.on and not tracer.queued_at:
            tracer.queued_at = time.monotonic()
        return result

    bot.queue.JobQueue.put = marked_put  # type: ignore[method-assign]

    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=run_fakes, args=(child,), daemon=True)
    process.start()
    slack_api, kimi_base = parent.recv()
    harness = bench_harness(FakeSlack(), slack_api, kimi_base, log_level="WARNING")
    toolbox = ToolBox(harness.deps.settings)  # as `kimibot serve` offers them
    await toolbox.start()
    await toolbox.ready()
    harness.deps.tools = toolbox
    tracer.count_redis(harness.deps.redis)
    await harness.start()
    gc.collect()
    gc.freeze()  # as `kimibot serve` does once it has started
    runs: list[tuple[list[Span], list[tuple[float, str]], float]] = []
    try:
        for i in range(warm + mentions):
            tracer.reset()
            tracer.on = i >= warm
            await harness.send_event(
                mention(f"question {i}", f"1700009000.{i:06d}", channel="C0TRACE"), seed=False
            )
            await harness.settle(limit_s=30)
            tracer.on = False
            if i >= warm:
                runs.append((tracer.spans, tracer.loose, tracer.queued_at))
            await asyncio.sleep(0.05)  # between mentions: the watcher's ticks and the placeholder's end
    finally:
        await harness.stop()
        parent.send("stop")
        arrivals: list[float] = parent.recv()
        process.join(10)

    kimi_times = arrivals[warm:]
    per_step: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    totals, trips, loose_trips = [], [], []
    commands: dict[str, list[str]] = defaultdict(list)
    for (spans, loose, queued), arrived in zip(runs, kimi_times, strict=True):
        totals.append((arrived - queued) * 1000)
        for label, figures in steps_of(spans, queued, arrived).items():
            per_step[label].append(figures)
        trips.append(sum(1 for s in spans for at, _ in s.commands if queued <= at <= arrived))
        loose_trips.append(sum(1 for at, _ in loose if queued <= at <= arrived))
        for span in spans:
            sent = [what for at, what in span.commands if queued <= at <= arrived]
            if sent and not commands[span.label]:
                commands[span.label] = sent
    print(f"{mentions} paced mentions (each answered before the next), tools offered, no tool called")
    print("  load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"  {'step (median of the mentions)':46s} {'starts at':>10s} {'takes':>9s} {'Redis':>6s}")
    order = sorted(per_step, key=lambda k: statistics.median(f[0] for f in per_step[k]))
    for label in order:
        values = per_step[label]
        start = statistics.median(v[0] for v in values)
        spent = statistics.median(v[1] for v in values)
        count = statistics.median(v[2] for v in values)
        what = ", ".join(commands.get(label, []))
        print(f"  {label:46s} {start:7.2f} ms {spent:6.2f} ms {count:6.1f}  {what}")
    print(
        f"  {KIMI:46s} {statistics.median(totals):7.2f} ms  (p90 {quantile(totals, 0.9):.2f} ms, "
        f"min {min(totals):.2f} ms)"
    )
    print(
        f"  Redis round trips queued -> Kimi: median {statistics.median(trips):.0f} in the steps, "
        f"{statistics.median(loose_trips):.0f} outside them (the watcher's ticks)"
    )


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mentions", type=int, default=30)
    parser.add_argument("--warm", type=int, default=10, help="mentions first, not counted")
    args = parser.parse_args()
    asyncio.run(main(args.mentions, args.warm))
