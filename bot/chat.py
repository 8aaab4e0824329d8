"""`kimibot chat`: a conversation with Kimi in the terminal, through the bot's own pieces, without Slack.

The same thread storage (an append-only history in Redis, under ThreadKey("cli", "chat", NAME)), window
fitting (bot/context.py), model profiles, Kimi client (retries, the error taxonomy and its user sentences)
and agent loop (web_search, fetch_url and MCP tools; the tools that read Slack are not offered). It serves
to try the bot and to debug prompts.

Two faces, chosen by whether stdin is a terminal:
- a terminal: rich streams the reasoning dimmed, collapses it to one line once the answer starts
  (`/reasoning` shows it again) and renders the answer as Markdown. Ctrl-C stops the answer in progress
  (what was said is kept, and recorded as stopped); Ctrl-D or `/exit` quits. Errors are the bot's one
  sentence, never a traceback.
- a script (stdin not a terminal): one question per line; each answer is written whole to stdout, then a
  blank line; nothing else goes to stdout (reasoning only with --reasoning, to stderr). Exit 0 at the end of
  input; at the first answer that fails, its sentence goes to stderr and the exit status is 1.

Not metered: chat answers are not in the usage records nor held to the BUDGET_* limits (those count Slack
people and workspaces); each answer's footer shows its tokens instead.
"""

from __future__ import annotations

import asyncio
import getpass
import io
import logging
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from redis.exceptions import RedisError

from bot.agent.loop import AgentLoop, CallRecord, Caps, Outcome, Planned
from bot.channel_settings import env_config
from bot.context import calibrate, fit, user_entry
from bot.errors import USER_MESSAGES, AnswerError, Reason
from bot.kimi.client import KimiClient, ModelCall
from bot.kimi.events import Accumulator, Event, Reasoning, Text, Usage
from bot.kimi.profiles import ModelProfile, Thinking, parse_prices, profile_for
from bot.settings import Settings
from bot.store import ThreadStore
from bot.tools.base import Tool, ToolContext
from bot.tools.builtin import BUILTIN_NAMES
from bot.turn import ThreadKey

log = logging.getLogger(__name__)

CHAT_TEAM = "cli"  # lower case: no Slack team id (T…, E…) can be the same
CHAT_CHANNEL = "chat"
THREAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Built-in tools that read Slack (the asker's time zone included): chat has no Slack to read.
NEEDS_SLACK = frozenset(BUILTIN_NAMES) - {"web_search", "fetch_url"}
COMMANDS = {
    "/exit": "quit (Ctrl-D too)",
    "/reasoning": "show the last answer's reasoning",
    "/thread": "the thread's name, to resume it with --thread",
    "/help": "this list",
}


# ---- pure helpers --------------------------------------------------------------------------------
def chat_thread(name: str) -> ThreadKey:
    """Where a chat thread's history lives: beside Slack's threads, never one of them."""
    return ThreadKey(CHAT_TEAM, CHAT_CHANNEL, name)


def new_thread_name(now: float | None = None, token: str | None = None) -> str:
    """A fresh thread's name: readable, sortable by time, unlikely to collide."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"chat-{stamp}-{token or secrets.token_hex(2)}"


def thread_name_problem(name: str) -> str:
    """Why `name` cannot name a thread ("" when it can)."""
    if THREAD_NAME.fullmatch(name):
        return ""
    return (
        f"--thread {name!r} is not a thread name: use 1 to 64 letters, digits, dots, dashes or underscores, "
        "starting with a letter or digit."
    )


def thinking_for(model: str, profile: ModelProfile, no_thinking: bool) -> tuple[bool, str]:
    """Whether to ask for thinking, and a sentence when --no-thinking cannot be honoured for this model."""
    if not no_thinking:
        return True, ""
    if profile.thinking is Thinking.EXTRA_BODY:
        return False, ""
    if profile.thinking is Thinking.NONE:
        return True, f"kimibot does not know how to switch thinking off for {model}: --no-thinking ignored."
    return True, f"{model} always thinks: --no-thinking does not apply to it, and is ignored."


def error_sentence(error: AnswerError) -> str:
    """The sentence the bot would post in Slack, without Slack's emoji and reference formatting."""
    return USER_MESSAGES[error.reason]


def parse_command(line: str) -> str | None:
    """A terminal line's command (`/exit`, `/reasoning`, ...), "?" for an unknown one, None for a question
    (a line starting with a space is always a question)."""
    if not line.startswith("/"):
        return None
    word = line.split(maxsplit=1)[0].lower()
    if word == "/quit":
        return "/exit"
    return word if word in COMMANDS else "?"


def thought_line(seconds: float) -> str:
    """The one line a finished reasoning collapses to."""
    return f"Thought for {max(round(seconds), 1)} s — /reasoning to show"


def tail_lines(text: str, lines: int) -> str:
    """The last `lines` lines of `text`: what fits on screen of a long reasoning while it streams."""
    return "\n".join(text.rstrip("\n").split("\n")[-max(lines, 1) :])


def footer_line(
    model: str, elapsed: float, usage: Usage | None, *, notes: tuple[str, ...] = (), stopped: bool = False
) -> str:
    """Under each answer: model, time, tokens, tool use and whether it was stopped."""
    parts = [model, f"{elapsed:.1f} s"]
    if usage is not None:
        parts.append(f"{usage.prompt_tokens:,} tokens in, {usage.completion_tokens:,} out")
    parts.extend(notes)
    if stopped:
        parts.append("stopped")
    return " · ".join(parts)


@dataclass
class AnswerState:
    """What the terminal shows of one answer while it streams: reasoning (until the answer starts), tool
    lines, the answer so far, and the thinking time the collapsed line states."""

    started: float
    reasoning: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    tools: list[str] = field(default_factory=list)
    answer_started: float | None = None

    def feed(self, event: Event, now: float) -> None:
        if isinstance(event, Text):
            if self.answer_started is None:
                self.answer_started = now
            self.answer.append(event.text)
        elif isinstance(event, Reasoning):
            self.reasoning.append(event.text)

    def restarted(self) -> None:
        """Kimi's retry starts the answer over: what the failed attempt said is dropped."""
        self.reasoning.clear()
        self.answer.clear()
        self.answer_started = None

    @property
    def answering(self) -> bool:
        return self.answer_started is not None

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    @property
    def answer_text(self) -> str:
        return "".join(self.answer)

    def thinking_s(self, now: float) -> float:
        return (self.answer_started if self.answer_started is not None else now) - self.started


# ---- the two faces -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finished:
    """One answer, as delivered."""

    text: str
    reasoning: str
    footer: str
    stopped: bool = False


class Face(Protocol):
    """How answers reach the person (a terminal) or the script (stdout): also the agent loop's View."""

    def note(self, text: str) -> None: ...

    def begin(self) -> None: ...

    def event(self, event: Event) -> None: ...

    def restarted(self) -> None: ...

    def finish(self, answer: Finished) -> None: ...

    def failed(self, sentence: str) -> None: ...

    async def approve(self, call: Planned, tool: Tool) -> bool | None: ...

    def step_started(self, step: int) -> None: ...

    def call_planned(self, call: Planned) -> None: ...

    def call_running(self, call: Planned) -> None: ...

    def call_done(self, record: CallRecord, detail: str) -> None: ...


class ScriptFace:
    """stdin is not a terminal: answers whole on stdout, each followed by a blank line; all else on stderr."""

    def __init__(self, out: TextIO, err: TextIO, *, show_reasoning: bool = False) -> None:
        self.out = out
        self.err = err
        self.show_reasoning = show_reasoning

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def begin(self) -> None:
        pass

    def event(self, event: Event) -> None:
        pass  # an answer is written whole: a retry may start it over, and stdout cannot take text back

    def restarted(self) -> None:
        pass

    def finish(self, answer: Finished) -> None:
        if self.show_reasoning and answer.reasoning:
            self.err.write(f"[reasoning]\n{answer.reasoning.rstrip()}\n[/reasoning]\n")
            self.err.flush()
        self.out.write(f"{answer.text.strip()}\n\n")
        self.out.flush()

    def failed(self, sentence: str) -> None:
        print(f"kimibot chat: {sentence}", file=self.err, flush=True)

    async def approve(self, call: Planned, tool: Tool) -> bool | None:
        self.note(f"kimibot chat: {call.name} needs approval, which needs a terminal; it was not run.")
        return False

    def step_started(self, step: int) -> None:
        pass

    def call_planned(self, call: Planned) -> None:
        pass

    def call_running(self, call: Planned) -> None:
        pass

    def call_done(self, record: CallRecord, detail: str) -> None:
        if self.show_reasoning:
            self.note(f"[tool] {record.title or record.name}: {'done' if record.ok else 'failed'}")


class TerminalFace:
    """stdin is a terminal: rich streams the reasoning dimmed and the answer as Markdown."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(highlight=False)
        self.state = AnswerState(time.monotonic())
        self.live: Any = None
        self.last_reasoning = ""
        self.tool_lines: dict[str, int] = {}  # call id -> its line in state.tools

    def note(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False)

    def _render(self) -> Any:
        from rich.console import Group
        from rich.markdown import Markdown
        from rich.text import Text as RichText

        state, now = self.state, time.monotonic()
        parts: list[Any] = []
        if state.answering:
            if state.reasoning:
                parts.append(RichText(thought_line(state.thinking_s(now)), style="dim"))
        else:
            parts.append(RichText(f"Thinking… {now - state.started:.0f} s", style="dim italic"))
            if state.reasoning:
                room = max(self.console.height - 6 - len(state.tools), 3)
                parts.append(RichText(tail_lines(state.reasoning_text, room), style="dim"))
        parts.extend(RichText(line, style="dim") for line in state.tools)
        if state.answer:
            parts.append(Markdown(state.answer_text))
        return Group(*parts)

    def begin(self) -> None:
        from rich.live import Live

        self.state = AnswerState(time.monotonic())
        self.tool_lines = {}
        self.live = Live(
            console=self.console, get_renderable=self._render, refresh_per_second=8, transient=False
        )
        self.live.start()

    def event(self, event: Event) -> None:
        self.state.feed(event, time.monotonic())

    def restarted(self) -> None:
        self.state.restarted()

    def _end_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def finish(self, answer: Finished) -> None:
        if self.state.answer_started is None:  # the collapsed line must say how long it thought
            self.state.answer_started = time.monotonic()
        self._end_live()
        self.last_reasoning = answer.reasoning
        self.console.print(answer.footer, style="dim", markup=False)
        self.console.print()

    def failed(self, sentence: str) -> None:
        self._end_live()
        self.console.print(f"⚠ {sentence}", style="yellow", markup=False)
        self.console.print()

    def show_reasoning(self) -> None:
        from rich.text import Text as RichText

        if not self.last_reasoning:
            self.note("The last answer has no reasoning to show.")
            return
        self.console.print(RichText(self.last_reasoning.rstrip(), style="dim"))
        self.console.print()

    async def approve(self, call: Planned, tool: Tool) -> bool | None:
        """A y/n question; the answer pauses while it waits (the loop's approval timeout does not run)."""
        live, self.live = self.live, None
        if live is not None:
            live.stop()
        try:
            arguments = call.arguments if len(call.arguments) <= 2_000 else call.arguments[:2_000] + "…"
            reply = self.console.input(f"Allow [bold]{call.name}[/bold] with {_escape(arguments)}? \\[y/N] ")
        except (EOFError, KeyboardInterrupt):
            reply = ""
        finally:
            if live is not None:
                self.live = live
                live.start()
        return reply.strip().lower() in ("y", "yes")

    def step_started(self, step: int) -> None:
        pass

    def call_planned(self, call: Planned) -> None:
        self.tool_lines[call.id] = len(self.state.tools)
        self.state.tools.append(f"⚙ {call.title or call.name}…")

    def call_running(self, call: Planned) -> None:
        pass

    def call_done(self, record: CallRecord, detail: str) -> None:
        line = f"{'✓' if record.ok else '✗'} {record.title or record.name}"
        index = self.tool_lines.get(record.id)
        if index is not None and index < len(self.state.tools):
            self.state.tools[index] = line
        else:
            self.state.tools.append(line)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# ---- the session (Redis, Kimi, tools) ------------------------------------------------------------
class ChatSession:
    """One chat thread: its history in Redis, a Kimi client for its model, and the tools it may use."""

    def __init__(
        self,
        settings: Settings,
        face: Face,
        *,
        thread: str,
        model: str,
        thinking: bool,
        speaker: str,
    ) -> None:
        from bot.redis_client import build_redis

        self.settings = settings
        self.face = face
        self.thread_name = thread
        self.thread = chat_thread(thread)
        self.speaker = speaker
        self.profile = profile_for(model, parse_prices(settings.kimi_prices))
        self.call = ModelCall(model, self.profile, settings.kimi_reasoning_effort, thinking)
        self.redis = build_redis(settings.redis_url, settings.redis_cluster)
        self.threads = ThreadStore(self.redis, settings.thread_ttl_seconds)
        self.kimi = KimiClient(
            api_key=settings.moonshot_api_key,
            base_url=settings.kimi_base_url,
            model=model,
            profile=self.profile,
            reasoning_effort=settings.kimi_reasoning_effort,
            max_completion_tokens=settings.kimi_max_completion_tokens if model == settings.kimi_model else 0,
            idle_timeout=settings.kimi_idle_timeout,
            retry_budget=settings.kimi_retry_budget,
            max_attempts=settings.kimi_max_attempts,
            backoff_base=settings.kimi_retry_base_delay,
            concurrency=1,
        )
        self.toolbox: Any = None
        self.system_prompt = env_config(settings).system_prompt(settings.system_prompt)
        self._task: asyncio.Task[tuple[Accumulator, Outcome | None]] | None = None
        self._loop: AgentLoop | None = None
        self._stopping = False

    async def open(self) -> int:
        """Check Redis (raises RedisError), start the tools; returns how many entries the thread has."""
        await self.redis.ping()  # type: ignore[misc]
        if self.settings.tools_enabled:
            from bot.agent.toolbox import ToolBox

            self.toolbox = ToolBox(self.settings)
            await self.toolbox.start()
        state = await self.threads.load(self.thread)
        return state.offset + len(state.entries)

    async def close(self) -> None:
        await self.kimi.close()
        await self.redis.aclose()
        if self.toolbox is not None:
            await self.toolbox.close()

    def stop(self) -> None:
        """Ctrl-C: stop the answer in progress (what it said so far is kept)."""
        if self._task is not None and not self._task.done():
            self._stopping = True
            self._task.cancel()

    def _context(self) -> ToolContext:
        from slack_sdk.web.async_client import AsyncWebClient

        # No Slack tool is offered, so the Slack client is never called; ToolContext requires one.
        return ToolContext(
            team_id=CHAT_TEAM,
            user=self.speaker,
            channel=CHAT_CHANNEL,
            thread_ts=self.thread_name,
            slack=AsyncWebClient(),
            redis=self.redis,
        )

    async def _tools(self, ctx: ToolContext) -> tuple[list[Tool], list[dict[str, Any]]]:
        if self.toolbox is None:
            return [], []
        from bot.pipeline import offer

        available = [t for t in await self.toolbox(ctx) if t.name not in NEEDS_SLACK]
        return offer(available, ctx)

    async def ask(self, question: str, *, on_sigint: bool = False) -> bool:
        """Answer one question (stored first, like the bot does, so a failure never loses it); the answer
        is recorded with its reasoning and tool record. False when it failed (the face said why)."""
        try:
            return await self._ask(question, on_sigint=on_sigint)
        except AnswerError as exc:
            log.info("chat answer failed", extra={"reason": str(exc.reason), "detail": exc.detail})
            self.face.failed(error_sentence(exc))
            return False
        except RedisError:
            raise  # the callers say so: the question may not be stored
        except Exception:  # a bug: the bot's sentence, the traceback in the log (LOG_LEVEL=DEBUG)
            log.info("chat answer failed", exc_info=True)
            self.face.failed(USER_MESSAGES[Reason.INTERNAL])
            return False

    async def _ask(self, question: str, *, on_sigint: bool) -> bool:
        state = await self.threads.load(self.thread)
        entries, meta, offset = state.entries, state.meta, state.offset
        asked = user_entry(self.speaker, question, ts=f"{time.time():.6f}", user=self.speaker)
        await self.threads.append(self.thread, asked, answered=1)
        entries = [*entries, asked]
        budget = self.profile.context_window - self.kimi.budget_of(self.call)
        calibration = float(meta.get("calibration", "1.0"))
        fitted = fit(
            self.system_prompt,
            entries,
            start=max(int(meta.get("start", "0")) - offset, 0),
            budget_tokens=budget,
            calibration=calibration,
            replays_reasoning=self.profile.replays_reasoning,
        )
        if fitted.too_long:
            raise AnswerError(Reason.TOO_LONG, f"question alone exceeds {budget} tokens")
        ctx = self._context()
        tools, definitions = await self._tools(ctx)
        self.face.begin()
        started = time.monotonic()
        self._stopping = False
        self._loop = None
        self._task = asyncio.create_task(self._think(fitted.messages, tools, definitions, ctx, calibration))
        loop = asyncio.get_running_loop()
        if on_sigint:
            loop.add_signal_handler(signal.SIGINT, self.stop)
        stopped = False
        try:
            acc, outcome = await self._task
            shown_reasoning = outcome.reasoning if outcome is not None else acc.reasoning_text
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            stopped = True
            # What was shown: every step's reasoning, and the text so far (kept as the pipeline keeps a
            # stopped answer: with tools, the final text only, the finished steps in the tool record).
            face_state = getattr(self.face, "state", None)
            shown_reasoning = face_state.reasoning_text if isinstance(face_state, AnswerState) else ""
            text = face_state.answer_text if isinstance(face_state, AnswerState) else ""
            outcome = self._loop.partial("", text) if self._loop is not None else None
            acc = (
                outcome.final
                if outcome is not None
                else Accumulator(reasoning=[shown_reasoning], content=[text], finish_reason="stopped")
            )
        finally:
            if on_sigint:
                loop.remove_signal_handler(signal.SIGINT)
            self._task = None
        elapsed = time.monotonic() - started
        usage = outcome.usage if outcome is not None else acc.usage
        self.face.finish(
            Finished(
                acc.text,
                shown_reasoning,
                footer_line(self.call.model, elapsed, usage, notes=_agent_notes(outcome), stopped=stopped),
                stopped,
            )
        )
        await self._record(acc, outcome, offset + fitted.start, fitted.estimated_tokens, elapsed, stopped)
        return True

    async def _think(
        self,
        messages: list[dict[str, Any]],
        tools: list[Tool],
        definitions: list[dict[str, Any]],
        ctx: ToolContext,
        calibration: float,
    ) -> tuple[Accumulator, Outcome | None]:
        async def on_event(event: Event) -> None:
            self.face.event(event)

        async def on_restart() -> None:
            self.face.restarted()

        if not tools:
            acc = await self.kimi.complete(messages, on_event=on_event, on_restart=on_restart, call=self.call)
            return acc, None

        async def complete(
            messages: list[dict[str, Any]], definitions: list[dict[str, Any]], tool_choice: str | None
        ) -> Accumulator:
            return await self.kimi.complete(
                messages,
                on_event=on_event,
                on_restart=on_restart,
                tools=definitions,
                tool_choice=tool_choice,
                call=self.call,
            )

        settings = self.settings
        caps = Caps.from_settings(settings, self.profile.context_window - self.kimi.budget_of(self.call))
        self._loop = AgentLoop(
            tools,
            complete=complete,
            ctx=ctx,
            caps=caps,
            definitions=definitions,
            view=self.face,
            approve=self.face.approve,
            calibration=calibration,
        )
        outcome = await self._loop.run(messages)
        return outcome.final, outcome

    async def _record(
        self,
        acc: Accumulator,
        outcome: Outcome | None,
        start: int,
        estimated: int,
        elapsed: float,
        stopped: bool,
    ) -> None:
        """The answer as the bot stores one: the whole assistant message (reasoning and any tool calls
        kept; a model that ignores old reasoning is sent none, bot/context.py), its tool record, usage."""
        from bot.pipeline import tool_record

        usage = outcome.usage if outcome is not None else acc.usage
        calibration_usage = outcome.steps[0].usage if outcome is not None and outcome.steps else acc.usage
        entry: dict[str, Any] = {
            **acc.message(),
            "ts": f"{time.time():.6f}",
            "model": self.call.model,
            "usage": usage.__dict__ if usage else None,
            "elapsed_s": round(elapsed, 3),
            **({"tools": tool_record(outcome)} if outcome is not None and outcome.steps else {}),
            **({"stopped": True} if stopped else {}),
        }
        meta: dict[str, str | int | float] = {"start": start}
        if calibration_usage and calibration_usage.prompt_tokens:
            meta["calibration"] = round(calibrate(estimated, calibration_usage.prompt_tokens), 4)
        await self.threads.append(self.thread, entry, **meta)


def _agent_notes(outcome: Outcome | None) -> tuple[str, ...]:
    if outcome is None:
        return ()
    from bot.pipeline import agent_notes

    return agent_notes(outcome)


# ---- the command ---------------------------------------------------------------------------------
def speaker_name() -> str:
    """The OS user: the name the model sees before each question, as it sees Slack names."""
    try:
        return getpass.getuser() or "you"
    except (KeyError, OSError):
        return "you"


def _problems(lines: list[str]) -> int:
    print("kimibot chat cannot start:", file=sys.stderr)
    for line in lines:
        print(f"  - {line}", file=sys.stderr)
    return 2


def run(*, model: str | None, thread: str | None, no_thinking: bool, show_reasoning: bool) -> int:
    """`kimibot chat`: 0 at the end of input, 1 when an answer failed (stdin not a terminal), 2 when it
    cannot start (settings, Redis)."""
    from bot.settings import SettingsError, load_settings_without_slack

    try:
        settings = load_settings_without_slack()
    except SettingsError as exc:
        return _problems(exc.problems)
    if thread is not None and (problem := thread_name_problem(thread)):
        return _problems([problem])
    model = (model if model is not None else settings.kimi_model).strip()
    if not model:
        return _problems(["--model is empty: name a model id such as kimi-k2.6."])
    _quiet_logs(settings.log_level)
    interactive = sys.stdin.isatty()
    face: TerminalFace | ScriptFace = (
        TerminalFace() if interactive else ScriptFace(sys.stdout, sys.stderr, show_reasoning=show_reasoning)
    )
    name = thread or new_thread_name()
    profile = profile_for(model, parse_prices(settings.kimi_prices))
    thinking, note = thinking_for(model, profile, no_thinking)
    session = ChatSession(settings, face, thread=name, model=model, thinking=thinking, speaker=speaker_name())
    with asyncio.Runner() as runner:
        try:
            earlier = runner.run(session.open())
        except (RedisError, OSError) as exc:
            runner.run(session.close())
            return _problems([f"Redis at REDIS_URL cannot be reached ({type(exc).__name__}: {exc})."])
        except KeyboardInterrupt:
            runner.run(session.close())
            return 130
        if note:
            face.note(note)
        if not profile.known:
            face.note(f"{model} is not a model kimibot knows: using a conservative profile (128k window).")
        what = f"Resumed thread {name} ({earlier} earlier messages)" if earlier else f"New thread {name}"
        face.note(f"{what}; resume it with: kimibot chat --thread {name}")
        try:
            if interactive:
                assert isinstance(face, TerminalFace)
                code = _terminal(runner, session, face)
            else:
                code = _script(runner, session, _lenient(sys.stdin))
        except KeyboardInterrupt:
            code = 130
        finally:
            runner.run(session.close())
    return code


def _quiet_logs(level: str) -> None:
    """JSON log lines on stderr, errors only unless LOG_LEVEL=DEBUG: a retry's warning would otherwise
    interrupt the conversation."""
    from bot.logs import setup_logging

    setup_logging("DEBUG" if level.upper() == "DEBUG" else "ERROR")


def _lenient(stream: TextIO) -> TextIO:
    """stdin with bytes that are not UTF-8 (a Latin-1 file, a binary piped in by mistake) read as U+FFFD:
    the line is still asked, instead of the whole run failing with a UnicodeDecodeError."""
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="replace")
    return stream


def _script(runner: asyncio.Runner, session: ChatSession, lines: TextIO) -> int:
    for line in lines:
        question = line.strip()
        if not question:
            continue
        try:
            answered = runner.run(session.ask(question))
        except RedisError as exc:
            session.face.failed(f"Redis failed ({type(exc).__name__}: {exc}).")
            return 1
        if not answered:
            return 1
    return 0


def _terminal(runner: asyncio.Runner, session: ChatSession, face: TerminalFace) -> int:
    import readline  # noqa: F401 - line editing and history for input()

    face.note("Ctrl-C stops an answer; Ctrl-D or /exit quits; /help lists the commands.")
    prompt: Callable[[], str] = lambda: face.console.input("[bold cyan]›[/bold cyan] ")  # noqa: E731
    while True:
        try:
            line = prompt()
        except EOFError:
            face.console.print()
            return 0
        except KeyboardInterrupt:
            face.console.print()
            face.note("(Ctrl-D or /exit quits)")
            continue
        command = parse_command(line)
        if command == "/exit":
            return 0
        if command == "/reasoning":
            face.show_reasoning()
        elif command == "/thread":
            face.note(f"Thread {session.thread_name}: kimibot chat --thread {session.thread_name}")
        elif command in ("/help", "?"):
            if command == "?":
                face.note(f"Unknown command {line.split()[0]}; to ask it as a question, start with a space.")
            face.note("\n".join(f"{name:<11} {what}" for name, what in COMMANDS.items()))
        elif line.strip():
            try:
                runner.run(session.ask(line.strip(), on_sigint=True))
            except KeyboardInterrupt:  # Ctrl-C outside the answer itself (reading or writing Redis)
                face.failed("Interrupted.")
            except RedisError as exc:
                face.failed(f"Redis failed ({type(exc).__name__}: {exc}); the question may not be stored.")
