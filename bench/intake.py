"""Where the intake's CPU goes: signed HTTP request -> ack, for mentions in one channel, profiled.

The real Bolt app and web app in this process (no worker: only the intake runs), real Redis, the fake Slack
in-process with production pacing. It warms up, then delivers `--events` app_mentions of one channel one
after another (each acked before the next: no queueing), first timed, then under cProfile, and prints the
CPU per event of each part: the whole request in our aiohttp handler, Bolt's dispatch (request parsing,
middleware chain, listener matching), signature verification, authorize, our listener and admission,
Redis commands, and JSON log lines. The load generator's own client runs in this process too: it is
excluded by taking only the bot's functions.

    .venv/bin/python -m bench.intake [--events 30]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

from bench.common import REDIS_URL, start_fakes
from bot.settings import load_settings
from bot.slack.pacing import Pacer
from bot.slack.reply import Pace
from tests.conftest import BotHarness
from tests.fakes.kimi_api import API_KEY
from tests.fakes.slack_api import TOKEN
from tests.slack_requests import SIGNING_SECRET, mention

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


async def main(events: int, dump: str) -> None:
    slack, kimi = await start_fakes()
    settings = load_settings(
        _env_file=None,
        slack_bot_token=TOKEN,
        slack_signing_secret=SIGNING_SECRET,
        slack_api_url=slack.api_url,
        moonshot_api_key=API_KEY,
        kimi_base_url=kimi.base_url,
        redis_url=REDIS_URL,
        log_level="WARNING",
    )
    harness = BotHarness(settings, slack, start_worker=False)
    harness.deps.pace, harness.deps.pacer = Pace(), Pacer()  # production pacing
    await harness.start()
    try:
        for i in range(20):  # warm up: imports, connections, caches
            await harness.send_event(mention(f"warm {i}", f"1700007000.{i:06d}", channel="C0WARM"))
        started = time.perf_counter()
        for i in range(events):
            await harness.send_event(mention(f"q {i}", f"1700007100.{i:06d}", channel="C0ONE"))
        wall = (time.perf_counter() - started) / events
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(events):
            await harness.send_event(mention(f"q {i}", f"1700007200.{i:06d}", channel="C0ONE"))
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
    print(
        f"  request -> ack, wall per event (not profiled; client, fakes, bot in one process): "
        f"{wall * 1000:.2f} ms"
    )
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
    parser.add_argument("--dump", default="", help="also write the profile to this file (pstats)")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.dump))
