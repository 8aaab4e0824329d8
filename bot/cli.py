"""The `kimibot` command: `kimibot serve` runs the bot; `kimibot doctor` checks its settings and services;
`kimibot chat` talks to Kimi in the terminal."""

from __future__ import annotations

import argparse
import asyncio
import errno
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from bot import __version__

T = TypeVar("T")


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where it is installed (not on Windows): serve's hundreds of streams and timers
    cost less CPU and event-loop lag there (bench/scale.py). Signal handlers, subprocesses and aiohttp work
    the same; without uvloop, asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimibot",
        description="A Slack bot that answers with Kimi thinking models; thread context lives in Redis.",
        epilog="Settings come from the environment or a .env file; see README.md for the full table.",
    )
    parser.add_argument("--version", action="version", version=f"kimibot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "serve",
        help="run the bot",
        description="Run the bot: Socket Mode when SLACK_APP_TOKEN is set, otherwise HTTP on PORT "
        "(POST /slack/events for events, commands and interactivity; GET /healthz, GET /livez, "
        "GET /metrics). First checks SLACK_BOT_TOKEN, SLACK_APP_TOKEN and MOONSHOT_API_KEY with Slack and "
        "Kimi. Receives Slack's requests and answers them; KIMIBOT_ROLE=receiver or worker runs one half "
        "only.",
    )
    sub.add_parser(
        "worker",
        help="run only the workers that answer queued questions (same as KIMIBOT_ROLE=worker)",
        description="Take questions off the Redis job queue and answer them; serves GET /healthz, "
        "GET /livez and GET /metrics on PORT. Needs no SLACK_SIGNING_SECRET or SLACK_APP_TOKEN.",
    )
    sub.add_parser(
        "doctor",
        help="check every setting, Redis, Slack and Kimi, and the MCP servers; one line per check",
        description="Check every setting; Redis at REDIS_URL (and whether it is a cluster); "
        "SLACK_BOT_TOKEN (auth.test) and its scopes against the manifest's; SLACK_APP_TOKEN when set "
        "(apps.connections.open); MOONSHOT_API_KEY and KIMI_MODEL (GET /models); each MCP server of "
        "MCP_CONFIG. Prints one line per check (✓ or ✗) and exits with 1 when any fails. Changes nothing; "
        "works before the first serve.",
    )
    chat = sub.add_parser(
        "chat",
        help="talk to Kimi in the terminal through the bot's pipeline (needs no Slack settings)",
        description="A conversation with Kimi through the bot's pipeline: context in Redis, model profiles, "
        "tools (web_search, fetch_url, MCP), streaming with the reasoning shown dimmed. Needs only "
        "MOONSHOT_API_KEY and REDIS_URL. With stdin not a terminal: one question per line, each answer on "
        "stdout followed by a blank line; exit 1 at the first answer that fails.",
    )
    chat.add_argument("--model", metavar="ID", help="the model to talk to (default: KIMI_MODEL)")
    chat.add_argument(
        "--thread", metavar="NAME", help="resume the thread NAME (default: a new thread; its name is printed)"
    )
    chat.add_argument(
        "--no-thinking",
        action="store_true",
        help="ask without thinking, where the model allows it (kimi-k2.5, kimi-k2.6); others say so",
    )
    chat.add_argument(
        "--reasoning",
        action="store_true",
        help="stdin not a terminal: write each answer's reasoning (and tool calls) to stderr",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        return doctor()
    if args.command == "chat":
        from bot.chat import run

        return run(
            model=args.model, thread=args.thread, no_thinking=args.no_thinking, show_reasoning=args.reasoning
        )
    if args.command not in ("serve", "worker"):
        _parser().print_help()
        return 2
    from bot.deps import build_deps
    from bot.logs import setup_logging
    from bot.server import Stopped, serve
    from bot.settings import SettingsError, load_settings
    from bot.startup import Rejected

    try:
        settings = load_settings(**({"kimibot_role": "worker"} if args.command == "worker" else {}))
    except SettingsError as exc:
        print("kimibot cannot start:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        deps = build_deps(settings)  # may find out more about REDIS_URL (a cluster URL with a database)
    except SettingsError as exc:
        print("kimibot cannot start:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    try:
        run_fast(serve(deps))
    except KeyboardInterrupt:
        pass
    except Rejected as exc:  # Slack or Kimi refused a setting: one line, no traceback
        print(f"kimibot {'stopped' if exc.after_start else 'cannot start'}: {exc.line()}", file=sys.stderr)
        return 2
    except Stopped as exc:  # logged with its traceback where it happened
        print(f"kimibot stopped: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the port is taken
        if exc.errno == errno.EADDRINUSE:
            print(
                f"kimibot cannot start: PORT {settings.port} is already in use; set PORT to a free port",
                file=sys.stderr,
            )
            return 2
        print(f"kimibot stopped: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def doctor() -> int:
    import logging

    from bot.doctor import run
    from bot.settings import SettingsError, load_settings

    logging.getLogger().addHandler(logging.NullHandler())  # the checks' own log lines stay out of the report
    try:
        settings, problems = load_settings(), []
    except SettingsError as exc:
        if exc.settings is None:
            for problem in exc.problems:
                print(f"✗ {problem}", flush=True)
            return 1
        settings, problems = exc.settings, exc.problems
    ok = asyncio.run(run(settings, problems, lambda check: print(check.line(), flush=True)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
