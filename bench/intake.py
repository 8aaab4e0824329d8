"""Where the intake's CPU goes: signed HTTP request -> ack, for mentions in one channel, profiled.

The real Bolt app and web app in this process (no worker: only the intake runs), real Redis, the fake Slack
in-process with production pacing. It warms up, then delivers `--events` app_mentions of one channel one
after another (each acked before the next: no queueing), first timed, then under cProfile, and prints the
CPU per event of each part: the whole request in our aiohttp handler, Bolt's dispatch (request parsing,
middleware chain, listener matching), signature verification, authorize, our listener and admission,
Redis commands, and JSON log lines. The load generator's own client runs in this process too: it is
excluded by taking only the bot's functions.

cProfile inflates pure-Python code (Bolt most of all), so a second pass times the same parts with
perf_counter wrappers, unprofiled: the wall time of each part per event, the Redis round trips included
(nothing else runs meanwhile, so outside the Redis call it is CPU). Bolt's own share is its dispatch less
our listener function. Both for the app_mention and for its `message` twin (Slack sends both for a mention
in a channel; the twin is the duplicate path), and the Redis commands each event sent.

    .venv/bin/python -m bench.intake [--events 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import gc
import os
import pstats
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.listener.async_listener import AsyncCustomListener
from slack_bolt.listener.asyncio_runner import AsyncioListenerRunner
from slack_bolt.request.async_request import AsyncBoltRequest

import bot.redis_client
import bot.server
import handlers.events
import tests.conftest
from bench.common import bench_harness, start_fakes
from bot.queue import JobQueue
from tests.fakes.slack_api import BOT_USER_ID
from tests.slack_requests import mention, message

# (label, pattern matched against "file:line(function)" of the profile): the parts of one event's intake.
PARTS = [
    ("the request in all (bot/server.py slack_events)", "bot/server.py", "slack_events"),
    ("  Bolt: dispatch in all, our listener included", "slack_bolt/app/async_app.py", "async_dispatch"),
    ("    Bolt: request object (AsyncBoltRequest)", "slack_bolt/request/async_request.py", "__init__"),
    ("    Bolt: signature verification", "slack_sdk/signature/__init__.py", "is_valid"),
    ("    Bolt: context, a WebClient per request", "slack_bolt/app/async_app.py", "_init_context"),
    ("    Bolt: listener matching", "slack_bolt/listener/async_listener.py", "async_matches"),
    (
        "    Bolt: listener arguments",
        "slack_bolt/kwargs_injection/async_utils.py",
        "build_async_required_kwargs",
    ),
    ("    authorize (bot/server.py)", "bot/server.py", "authorize"),
    ("    our listener (handlers/events.py)", "handlers/events.py", "on_message_event"),
    ("      our admission (bot/admission.py admit)", "bot/admission.py", "admit"),
    ("      queueing the job (bot/queue.py put)", "bot/queue.py", "put"),
    ("  Redis pipelines (incl. sending)", "bot/metrics.py", "counted_execute"),
    ("  Redis single commands (incl. sending)", "bot/metrics.py", "execute_command"),
    ("  JSON log lines (bot/logs.py format)", "bot/logs.py", "format"),
]


class Timers:
    """Wall time per labelled part, summed while `on`; installed once, before the app is built."""

    def __init__(self) -> None:
        self.on = False
        self.seconds: dict[str, float] = defaultdict(float)  # wall
        self.cpu: dict[str, float] = defaultdict(float)  # this thread's CPU (not Redis' time)
        self.redis_commands = 0

    def reset(self) -> None:
        self.seconds.clear()
        self.cpu.clear()
        self.redis_commands = 0

    def add(self, label: str, started: float, cpu: float) -> None:
        self.seconds[label] += time.perf_counter() - started
        self.cpu[label] += time.thread_time() - cpu

    @contextlib.contextmanager
    def timing(self, label: str) -> Iterator[None]:
        """The block's wall and CPU time, added to `label` (nothing while the timers are off)."""
        if not self.on:
            yield
            return
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.add(label, started, cpu)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        timers = self

        if asyncio.iscoroutinefunction(original):

            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                with timers.timing(label):
                    return await original(*args, **kwargs)

            setattr(owner, name, timed_async)
        else:

            @functools.wraps(original)
            def timed(*args: Any, **kwargs: Any) -> Any:
                with timers.timing(label):
                    return original(*args, **kwargs)

            setattr(owner, name, timed)

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def timed(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            with self.timing(HANDLER):
                return await handler(request)

        return timed


HANDLER = "our aiohttp handler in all (slack_events)"
PARSE = "  Bolt request object (JSON parse, headers)"
PROBLEM = "  payload_problem"
DISPATCH = "  Bolt dispatch in all"
CONTEXT = "    context (+ a WebClient per request)"
MATCHING = "    listener matching"
LISTENER_MW = "    listener middleware"
RUNNER = "    listener runner in all"
ACK_FN = "      listener kwargs + our listener"
OURS = "        our listener (handlers/events.py)"
ADMIT = "          admission (admit)"
PUT = "          queueing (JobQueue.put)"
REDIS = "            the Redis call(s) (Script, EVALSHA)"
RESPONSE = "  aiohttp response (to_aiohttp_response)"
BOLT_OWN = "Bolt's own: dispatch less our listener"
TIMED_BEFORE = [HANDLER, PARSE, PROBLEM, DISPATCH, CONTEXT]  # then the global middleware, then:
MIDDLEWARE: list[str] = []  # filled when the app is built
TIMED_AFTER = [MATCHING, LISTENER_MW, RUNNER, ACK_FN, OURS, ADMIT, PUT, REDIS, RESPONSE]


def install_timers(timers: Timers) -> None:
    """Class-level wrappers for what every app shares; the app's own middleware and listeners are
    wrapped when it is built (build_bolt_app, patched where the harness looks it up)."""
    timers.wrap(AsyncBoltRequest, "__init__", PARSE)
    timers.wrap(bot.server, "payload_problem", PROBLEM)
    timers.wrap(bot.server, "to_aiohttp_response", RESPONSE)
    timers.wrap(AsyncApp, "async_dispatch", DISPATCH)
    timers.wrap(AsyncApp, "_init_context", CONTEXT)
    timers.wrap(AsyncCustomListener, "async_matches", MATCHING)
    timers.wrap(AsyncCustomListener, "run_async_middleware", LISTENER_MW)
    timers.wrap(AsyncioListenerRunner, "run", RUNNER)
    timers.wrap(AsyncCustomListener, "run_ack_function", ACK_FN)
    timers.wrap(JobQueue, "put", PUT)
    if hasattr(bot.redis_client, "Script"):  # run against the code before it too
        timers.wrap(bot.redis_client.Script, "__call__", REDIS)
    timers.wrap(handlers.events, "admit", ADMIT)
    build = tests.conftest.build_bolt_app

    def build_timed(deps: Any) -> AsyncApp:
        app = build(deps)
        for middleware in app._async_middleware_list:
            label = f"    global middleware: {type(middleware).__name__}"
            MIDDLEWARE.append(label)
            timers.wrap(middleware, "async_process", label)
        for listener in app._async_listeners:
            if listener.ack_function.__name__ == "on_message_event":
                timers.wrap(listener, "ack_function", OURS)
        return app

    tests.conftest.build_bolt_app = build_timed  # type: ignore[attr-defined]


def count_commands(timers: Timers, client: Any) -> None:
    """Count the commands the bot's Redis client sends (each is one round trip here: no pipelines)."""
    command = client.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        if timers.on:
            timers.redis_commands += 1
        return await command(*args, **options)

    client.execute_command = counted


def print_timed(timers: Timers, title: str, events: int) -> None:
    commands = timers.redis_commands / events
    print(f"  {title}: per event, unprofiled, by part, best of the rounds ({commands:.1f} Redis commands)")
    print(f"    {'':56s} {'wall':>8s} {'CPU':>8s}")
    for label in TIMED_BEFORE + MIDDLEWARE + TIMED_AFTER:
        if label in timers.seconds:
            wall, cpu = timers.seconds[label] / events * 1000, timers.cpu[label] / events * 1000
            print(f"    {label:56s} {wall:5.3f} ms {cpu:5.3f} ms")
    own_cpu = (timers.cpu[DISPATCH] - timers.cpu.get(OURS, 0.0)) / events * 1000
    print(f"    {BOLT_OWN:56s} {'':8s} {own_cpu:5.3f} ms")


async def main(events: int, rounds: int, dump: str) -> None:
    timers = Timers()
    install_timers(timers)
    slack, kimi = await start_fakes()
    harness = bench_harness(slack, slack.api_url, kimi.base_url, start_worker=False, log_level="WARNING")
    harness.server.app.middlewares.append(timers.middleware())
    count_commands(timers, harness.deps.redis)
    await harness.start()
    gc.collect()
    gc.freeze()  # as `kimibot serve` does once it has started (bot/server.py serve)
    try:
        for i in range(20):  # warm up: imports, connections, caches
            await harness.send_event(mention(f"warm {i}", f"1700007000.{i:06d}", channel="C0WARM"))
            await harness.send_event(
                message(f"<@{BOT_USER_ID}> warm {i}", f"1700007000.{i:06d}", channel="C0WARM")
            )
        started = time.perf_counter()
        for i in range(events):
            await harness.send_event(mention(f"q {i}", f"1700007100.{i:06d}", channel="C0ONE"))
        wall = (time.perf_counter() - started) / events
        timed: list[tuple[str, Timers]] = []
        for title, make in (
            ("app_mention", lambda r, i: mention(f"q {i}", f"17000072{r:02d}.{i:06d}", channel="C0ONE")),
            (
                "its message twin (a duplicate)",
                lambda r, i: message(f"<@{BOT_USER_ID}> q {i}", f"17000072{r:02d}.{i:06d}", channel="C0ONE"),
            ),
        ):
            best = Timers()  # each part's best round: the other helper's load only ever adds time
            for r in range(rounds):
                timers.reset()
                timers.on = True
                for i in range(events):
                    await harness.send_event(make(r, i))
                timers.on = False
                for label, seconds in timers.seconds.items():
                    best.seconds[label] = min(best.seconds.get(label, seconds), seconds)
                    best.cpu[label] = min(best.cpu.get(label, timers.cpu[label]), timers.cpu[label])
                best.redis_commands = timers.redis_commands
            timed.append((title, best))
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(events):
            await harness.send_event(mention(f"q {i}", f"1700007300.{i:06d}", channel="C0ONE"))
        profiler.disable()
        if dump:
            profiler.dump_stats(dump)
    finally:
        await harness.stop()
        await slack.stop()
        await kimi.stop()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total_cpu = sum(tt for (_, _, _), (_, _, tt, _, _) in stats.items())
    print(f"{events} mentions in one channel, one after another (each acked before the next)")
    print("  load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(
        f"  request -> ack, wall per event (not profiled; client, fakes, bot in one process): "
        f"{wall * 1000:.2f} ms"
    )
    for title, snapshot in timed:
        print_timed(snapshot, title, events)
    print(
        f"  profiled: {total_cpu / events * 1000:.2f} ms per event in all "
        "(cProfile inflates pure-Python code)"
    )
    for label, path, name in PARTS:
        cumulative = sum(
            ct
            for (file, _, function), (_, _, _, ct, _) in stats.items()
            if file.endswith(path) and function == name
        )
        print(f"  {label:52s} {cumulative / events * 1000:6.2f} ms per event")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of --events (best kept)")
    parser.add_argument("--dump", default="", help="also write the profile to this file (pstats)")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds, args.dump))
