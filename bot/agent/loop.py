"""The agent loop: ask Kimi with tools offered, run the calls it makes, feed the results back, repeat until
it answers in text. The rules are pure functions below; all I/O goes through callables handed in (the
model request, the tools, the live view, approvals, checkpoints, usage), so the loop runs the same in
the bot, in tests and in the benchmark.

What Kimi's thinking models require, and this loop keeps:
- every assistant step goes back whole in the next request: `content`, `reasoning_content` and
  `tool_calls` with their ids unchanged (the Accumulator's message, replayed as is);
- one `role: "tool"` message per call id, in the order of the calls, right after that step;
- the same tool definitions, in the same order, on every request of the turn (prefix cache).

Caps: steps per turn, a timeout per call, a size cap per result (longer results are paged: the model
reads on with `read_more`; a `verbatim` result is never touched), total wall time, the context window
(estimated before each request), and a guard against identical repeated calls (the second identical call
gets a nudge, the third is not run). When a cap is hit, one last request with
`tool_choice: "none"` makes the model answer from what it gathered, and the outcome says which cap.

What the thread's history keeps (the pipeline stores it): only the final assistant message, not the
intermediate tool-call steps and their results. Tool results go stale (a channel moves on, a status page
changes), and replaying them on every later turn would cost tokens forever; a later turn that needs fresh
facts calls the tools again. The steps are kept, until the turn completes, as the job's checkpoint: a
re-run after a crash resumes from the last finished step instead of calling tools (and Kimi) again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from bot.context import estimate_tokens
from bot.errors import AnswerError, Reason
from bot.kimi.events import Accumulator, Usage
from bot.tools.base import Tool, ToolContext, ToolResult

if TYPE_CHECKING:
    from bot.settings import Settings

log = logging.getLogger(__name__)

READ_MORE = "read_more"
MAX_TOOLS = 128  # Moonshot's limit on tools per request
READ_MORE_DEFINITION: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": READ_MORE,
        "description": (
            "Read the next page of a tool result that was too long to return at once. Use the ref and page "
            "named at the end of the truncated result."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "ref": {"type": "string", "description": "The ref named in the truncated result."},
                "page": {"type": "integer", "description": "The page to read, from 2."},
            },
            "required": ["ref", "page"],
        },
    },
}


class Cap(StrEnum):
    """Why the loop stopped offering tools before the model was done with them."""

    STEPS = "steps"
    TIME = "time"
    REPEATS = "repeats"
    CONTEXT = "context"


CAP_NOTES = {
    Cap.STEPS: "the tool step limit of this answer was reached",
    Cap.TIME: "the time limit of this answer was reached",
    Cap.REPEATS: "the model kept repeating the same tool call",
    Cap.CONTEXT: "the gathered results filled the model's context window",
}


class ArgumentsTooLong(Exception):
    """Raised by an Approve callable when the call's arguments cannot be shown whole for approval."""


TOO_LONG_TO_APPROVE = (
    "Not run: its arguments are too long to show for approval. Call it again with shorter arguments "
    "(or split the work into smaller calls)."
)


class Verdict(StrEnum):
    RUN = "run"
    NUDGE = "nudge"  # run it, and tell the model it has asked this before
    REFUSE = "refuse"  # identical call asked too often: not run


@dataclass(frozen=True)
class Caps:
    max_steps: int = 100
    call_timeout_s: float = 60.0
    result_chars: int = 20_000
    wall_time_s: float = 600.0
    approval_timeout_s: float = 300.0
    nudge_at: int = 2  # the Nth identical call gets a nudge
    refuse_at: int = 3  # from the Nth identical call on, calls are not run
    max_parallel: int = 8  # calls of one step running at once
    keep_pages: int = 10  # a result is cut at this many times `result_chars` before it is paged
    # The model's window less its output budget, in tokens (0: no limit). Tools stop being offered when the
    # request would pass it less `context_margin_tokens`; the forced last request is shortened to fit it.
    context_tokens: int = 0
    context_margin_tokens: int = 8_000

    @classmethod
    def from_settings(cls, settings: Settings, context_tokens: int) -> Caps:
        """The caps of a turn from the settings, for a window of `context_tokens` (the model's window less
        its output budget): the margin leaves room for one more step's results, at most a quarter of it."""
        return cls(
            max_steps=settings.kimi_max_tool_steps,
            call_timeout_s=settings.tool_call_timeout,
            result_chars=settings.tool_result_max_chars,
            wall_time_s=settings.agent_max_seconds,
            approval_timeout_s=settings.tool_approval_timeout,
            context_tokens=context_tokens,
            context_margin_tokens=min(max(settings.tool_result_max_chars // 2, 4_000), context_tokens // 4),
        )


@dataclass
class Planned:
    """One call the model asked for, and what the loop decided about it (before running anything)."""

    id: str
    name: str
    arguments: str  # as the model sent them
    args: dict[str, Any] | None
    key: str  # name + canonical arguments: what the repeat guard counts
    verdict: Verdict
    error: str = ""  # unknown tool or unreadable arguments: this text is the result
    title: str = ""


@dataclass(frozen=True)
class CallRecord:
    """What the live view (and a resumed run) needs to show a finished call again."""

    id: str
    name: str
    title: str
    ok: bool
    sources: tuple[str, ...] = ()
    key: str = ""
    seconds: float = 0.0


@dataclass
class Step:
    """One assistant step that made tool calls, with the results sent back for it."""

    message: dict[str, Any]
    results: list[dict[str, Any]]
    calls: list[CallRecord]
    usage: Usage | None = None

    def dump(self) -> str:
        return json.dumps(
            {
                "message": self.message,
                "results": self.results,
                "calls": [c.__dict__ | {"sources": list(c.sources)} for c in self.calls],
                "usage": self.usage.__dict__ if self.usage else None,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @staticmethod
    def load(raw: str) -> Step:
        data = json.loads(raw)
        calls = [CallRecord(**{**c, "sources": tuple(c.get("sources") or ())}) for c in data["calls"]]
        usage = Usage(**data["usage"]) if data.get("usage") else None
        return Step(data["message"], data["results"], calls, usage)


@dataclass
class Outcome:
    final: Accumulator
    steps: list[Step]
    cap: Cap | None = None
    usage: Usage | None = None  # every request of the turn, summed
    reasoning: str = ""  # every step's reasoning, in order
    # Per step: the wall time between model requests less the tools' time (waiting for the event loop
    # included), and the loop's own work in it (planning, the view, the checkpoint's dispatch).
    overheads_s: list[float] = field(default_factory=list)
    work_s: list[float] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(len(s.calls) for s in self.steps)


# ---- the rules (pure) ----------------------------------------------------------------------------
def canonical_key(name: str, args: dict[str, Any] | None, raw: str) -> str:
    """Same name and same arguments (whatever their key order or spacing) give the same key."""
    if args is None:
        return f"{name}\n{raw.strip()}"
    return f"{name}\n{json.dumps(args, sort_keys=True, separators=(',', ':'), ensure_ascii=False)}"


def parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str]:
    """The model's arguments as a dict, or the reason they cannot be used."""
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as exc:
        return None, f"the arguments are not valid JSON ({exc.msg} at character {exc.pos})"
    if not isinstance(value, dict):
        return None, f"the arguments must be a JSON object, not {type(value).__name__}"
    return value, ""


def verdict_for(count: int, caps: Caps) -> Verdict:
    """The repeat guard: `count` is how many times this exact call has been asked, this one included."""
    if count >= caps.refuse_at:
        return Verdict.REFUSE
    if count >= caps.nudge_at:
        return Verdict.NUDGE
    return Verdict.RUN


def plan_calls(
    message: dict[str, Any], tools: dict[str, Tool], counts: Counter[str], caps: Caps
) -> list[Planned]:
    """Decide about every call of one assistant step (counts are updated: the step has asked them)."""
    planned = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        name = str(function.get("name") or "")
        raw = str(function.get("arguments") or "")
        args, error = parse_arguments(raw)
        key = canonical_key(name, args, raw)
        counts[key] += 1
        verdict = verdict_for(counts[key], caps)
        title = name
        if name != READ_MORE and name not in tools:
            error = f"Error: there is no tool named {name!r}. Available tools: {', '.join(sorted(tools))}."
            title = f"Unknown tool {name}"
        elif error:
            error = f"Error: {error}. Call {name} again with a JSON object that matches its parameters."
        elif name == READ_MORE:
            title = "Reading on"
        else:
            assert args is not None
            try:
                title = tools[name].title(args) or name
            except Exception:  # a title is decoration; it must not cost the call
                title = name
        planned.append(Planned(str(call.get("id") or ""), name, raw, args, key, verdict, error, title))
    return planned


def refusal(call: Planned, count: int) -> str:
    return (
        f"Not run: {call.name} was already called {count - 1} times with exactly these arguments. Use the "
        "earlier result, try something different, or answer with what you have."
    )


NUDGE = (
    "\n\n[Note: you already called {name} with exactly these arguments. The result above is the same; "
    "use it rather than asking again.]"
)


def page_text(text: str, limit: int) -> list[str]:
    """A result cut into pages of at most `limit` characters, preferring line ends."""
    if len(text) <= limit:
        return [text]
    pages = []
    while len(text) > limit:
        cut = text.rfind("\n", limit // 2, limit)
        cut = cut if cut > 0 else limit
        pages.append(text[:cut])
        text = text[cut:]
    if text:
        pages.append(text)
    return pages


def paged_note(ref: str, page: int, pages: int, total: int) -> str:
    if page >= pages:
        return f"\n\n[Last page ({page} of {pages}) of a {total:,}-character result.]"
    return (
        f"\n\n[Result truncated: page {page} of {pages} ({total:,} characters in all). To read on, call "
        f'{READ_MORE} with {{"ref": "{ref}", "page": {page + 1}}}.]'
    )


def tool_message(call_id: str, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def final_note(cap: Cap) -> str:
    """Appended to the last tool result before the forced final request: answer now, say what is missing."""
    return (
        f"\n\n[No more tool calls: {CAP_NOTES[cap]}. Answer the question now from what you have gathered, "
        "and say plainly what you could not check.]"
    )


def add_usage(total: Usage | None, usage: Usage | None) -> Usage | None:
    if usage is None:
        return total
    if total is None:
        return usage
    return Usage(
        total.prompt_tokens + usage.prompt_tokens,
        total.completion_tokens + usage.completion_tokens,
        total.cached_tokens + usage.cached_tokens,
    )


def definitions_of(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """Function definitions in the order given (the registry's, when it supplies them, take precedence)."""
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


# ---- the I/O it is handed ------------------------------------------------------------------------
Complete = Callable[[list[dict[str, Any]], list[dict[str, Any]], str | None], Awaitable[Accumulator]]
Approve = Callable[[Planned, Tool], Awaitable[bool | None]]  # True approved, False declined, None no answer
Checkpoint = Callable[[int, Step], Awaitable[None]]
RecordUsage = Callable[[Usage], Awaitable[None]]
Guard = Callable[[], Awaitable[None]]  # raises (e.g. LeaseLost) when the turn may no longer change things


class View(Protocol):
    """The live view of the loop (the ReplyWriter's task cards, or nothing)."""

    def step_started(self, step: int) -> None: ...

    def call_planned(self, call: Planned) -> None: ...

    def call_running(self, call: Planned) -> None: ...

    def call_done(self, record: CallRecord, detail: str) -> None: ...


class NoView:
    def step_started(self, step: int) -> None:
        pass

    def call_planned(self, call: Planned) -> None:
        pass

    def call_running(self, call: Planned) -> None:
        pass

    def call_done(self, record: CallRecord, detail: str) -> None:
        pass


async def _no_checkpoint(index: int, step: Step) -> None:
    pass


async def _no_usage(usage: Usage) -> None:
    pass


async def _no_guard() -> None:
    pass


LEFT_OUT = "[This result was left out: the gathered results no longer fit the model's context window.]"


def shorten(text: str, limit: int) -> str:
    """A result cut to about `limit` characters, saying so (for the forced last request only)."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n\n[Cut to fit the context window: {len(text):,} characters in all.]"


class AgentLoop:
    """One turn's loop. `run` returns the Outcome; after a cancellation (Stop), `partial()` says what was
    done so far."""

    def __init__(
        self,
        tools: Sequence[Tool],
        *,
        complete: Complete,
        ctx: ToolContext,
        caps: Caps | None = None,
        definitions: list[dict[str, Any]] | None = None,
        view: View | None = None,
        approve: Approve | None = None,
        checkpoint: Checkpoint = _no_checkpoint,
        record_usage: RecordUsage = _no_usage,
        guard: Guard = _no_guard,
        calibration: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tools = {t.name: t for t in tools}
        self.definitions = [*(definitions if definitions is not None else definitions_of(tools))]
        if READ_MORE not in {d["function"]["name"] for d in self.definitions}:
            while len(self.definitions) >= MAX_TOOLS:  # Kimi takes 128 at most: read_more keeps its place
                dropped = self.definitions.pop()
                name = dropped["function"]["name"]
                self.tools.pop(name, None)  # not offered, so not run either
                log.warning("tool not offered: 128 tools at most", extra={"tool": name})
            self.definitions.append(READ_MORE_DEFINITION)
        offered_names = {d["function"]["name"] for d in self.definitions}
        self.tools = {name: tool for name, tool in self.tools.items() if name in offered_names}
        self.complete = complete
        self.ctx = ctx
        self.caps = caps or Caps()
        self.view: View = view or NoView()
        self.approve = approve
        self.checkpoint = checkpoint
        self.record_usage = record_usage
        self.guard = guard
        self.calibration = calibration
        self.clock = clock
        self.slots = asyncio.Semaphore(max(self.caps.max_parallel, 1))
        self.verbatim: set[str] = set()  # call ids whose result goes to the model unchanged
        self._definitions_tokens = int(
            len(json.dumps(self.definitions, ensure_ascii=False)) / 3.0 * calibration
        )
        self.messages: list[dict[str, Any]] = []
        self.steps: list[Step] = []
        self.counts: Counter[str] = Counter()
        self.pages: dict[str, list[str]] = {}
        self.usage: Usage | None = None
        self.reasoning: list[str] = []
        self.overheads: list[float] = []
        self.work: list[float] = []
        self.requesting = False  # a model request is in flight (what Stop interrupts)
        self._checkpointing: asyncio.Task[None] | None = None

    # ---- running ---------------------------------------------------------------------------------
    async def run(self, messages: list[dict[str, Any]], resume: Sequence[Step] = ()) -> Outcome:
        self.messages = list(messages)
        for step in resume:
            self._replay(step)
        started = self.clock()
        cap: Cap | None = None
        model_done: float | None = None
        tools_s = work = resumed = 0.0
        while True:
            if len(self.steps) >= self.caps.max_steps:
                cap = Cap.STEPS
                break
            if self.clock() - started >= self.caps.wall_time_s:
                cap = Cap.TIME
                break
            if self._over_context():
                cap = Cap.CONTEXT
                break
            self.view.step_started(len(self.steps))
            if model_done is not None:
                now = self.clock()
                self.overheads.append(max(now - model_done - tools_s, 0.0))
                self.work.append(work + now - resumed)
            try:
                acc = await self._ask(None)
            except AnswerError as exc:
                if exc.reason is not Reason.TOO_LONG or not self.steps:
                    raise
                # Kimi counted more than the estimate: answer from what was gathered, shortened further.
                log.warning("context window full mid-loop", extra={"steps": len(self.steps)})
                await self._checkpointed()
                return await self._forced_answer(Cap.CONTEXT, shrink=0.6)
            model_done = self.clock()
            # The last step's checkpoint (a lost lease raises here) lands before this step runs anything.
            await self._checkpointed()
            if not acc.tool_calls:
                return self._outcome(acc, None)
            message = acc.message()
            planned = plan_calls(message, self.tools, self.counts, self.caps)
            for call in planned:
                self.view.call_planned(call)
            deadline = started + self.caps.wall_time_s
            index = len(self.steps)
            calls = [
                self._run_call(call, deadline, f"s{index + 1}c{n + 1}") for n, call in enumerate(planned)
            ]
            work = self.clock() - model_done
            done = await asyncio.gather(*calls)
            resumed = self.clock()
            tools_s = max((record.seconds for record, _ in done), default=0.0)
            step = Step(message, [result for _, result in done], [record for record, _ in done], acc.usage)
            self.messages.append(message)
            self.messages.extend(step.results)
            self.steps.append(step)
            # Written while Kimi is asked for the next step (one round trip less between requests); the
            # previous write is awaited first, so they land in order and a lost lease still stops the turn.
            await self._checkpointed()
            self._checkpointing = asyncio.ensure_future(self.checkpoint(len(self.steps) - 1, step))
            if all(call.verdict is Verdict.REFUSE for call in planned):
                cap = Cap.REPEATS
                break
        return await self._forced_answer(cap)

    async def _checkpointed(self) -> None:
        """Wait for the last checkpoint write (its errors, e.g. a lost lease, are raised here)."""
        task, self._checkpointing = self._checkpointing, None
        if task is not None:
            await task

    def _estimate(self, messages: Sequence[dict[str, Any]]) -> int:
        return self._definitions_tokens + sum(estimate_tokens(m, self.calibration) for m in messages)

    def _over_context(self) -> bool:
        """Would the next request (with room left for one more step's results) pass the window?"""
        if self.caps.context_tokens <= 0 or not self.steps:
            return False
        limit = self.caps.context_tokens - self.caps.context_margin_tokens
        return self._estimate(self.messages) > limit

    def _fit(self, messages: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
        """The forced request within `budget` tokens: the largest tool results of the turn are shortened
        (a verbatim one is left out whole, never cut) until it fits, or nothing is left to shorten."""
        first = len(messages) - sum(len(s.results) + 1 for s in self.steps)  # this turn's steps start here
        messages = list(messages)
        while self._estimate(messages) > budget:
            tools = [i for i in range(max(first, 0), len(messages)) if messages[i].get("role") == "tool"]
            sizes = {i: len(str(messages[i].get("content") or "")) for i in tools}
            shortenable = [i for i in tools if sizes[i] > len(LEFT_OUT) + 200]
            if not shortenable:
                break
            i = max(shortenable, key=lambda j: sizes[j])
            excess_chars = int((self._estimate(messages) - budget) * 3.0 / max(self.calibration, 0.25)) + 200
            content = str(messages[i].get("content") or "")
            if messages[i].get("tool_call_id") in self.verbatim:
                text = LEFT_OUT
            else:
                text = shorten(content, max(sizes[i] - excess_chars, sizes[i] // 2, 200))
                if len(text) >= sizes[i]:
                    text = LEFT_OUT
            messages[i] = {**messages[i], "content": text}
        return messages

    async def _forced_answer(self, cap: Cap, shrink: float = 1.0) -> Outcome:
        """The last request, with tool_choice "none": an answer from what was gathered."""
        log.info("agent loop cap reached", extra={"cap": str(cap), "steps": len(self.steps)})
        messages = list(self.messages)
        if self.caps.context_tokens > 0 or shrink < 1.0:
            budget = self.caps.context_tokens or self._estimate(messages)
            if shrink < 1.0:
                budget = min(budget, int(self._estimate(messages) * shrink))
            messages = self._fit(messages, budget)
        if messages and messages[-1].get("role") == "tool":
            last = messages[-1]
            if last.get("tool_call_id") in self.verbatim:  # never annotated: the note goes on its own
                messages.append({"role": "user", "content": final_note(cap).strip()})
            else:
                messages[-1] = {**last, "content": str(last.get("content") or "") + final_note(cap)}
        self.view.step_started(len(self.steps))
        acc = await self._ask("none", messages)
        await self._checkpointed()
        acc.tool_calls = {}  # tool_choice "none": a call it made anyway cannot be run, nor replayed
        return self._outcome(acc, cap)

    async def _ask(
        self, tool_choice: str | None, messages: list[dict[str, Any]] | None = None
    ) -> Accumulator:
        self.requesting = True  # stays True when the request is cancelled: Stop cut it, and it is counted
        acc = await self.complete(
            messages if messages is not None else self.messages, self.definitions, tool_choice
        )
        self.requesting = False
        if acc.reasoning_text:
            self.reasoning.append(acc.reasoning_text)
        if acc.usage is not None:
            self.usage = add_usage(self.usage, acc.usage)
            await self.record_usage(acc.usage)
        return acc

    def _outcome(self, acc: Accumulator, cap: Cap | None) -> Outcome:
        return Outcome(
            acc, self.steps, cap, self.usage, "\n\n".join(self.reasoning), self.overheads, self.work
        )

    def partial(self, reasoning: str, text: str) -> Outcome:
        """What a stopped turn has: its steps, and the text the interrupted step had written so far."""
        acc = Accumulator(reasoning=[reasoning] if reasoning else [], content=[text], finish_reason="stopped")
        return Outcome(
            acc,
            self.steps,
            None,
            self.usage,
            "\n\n".join([*self.reasoning, reasoning]),
            self.overheads,
            self.work,
        )

    def _replay(self, step: Step) -> None:
        """A finished step of an earlier run of this turn: back into the request, and into the view."""
        self.messages.append(step.message)
        self.messages.extend(step.results)
        self.steps.append(step)
        # The turn's total usage (recorded by the earlier run), its reasoning, its cards in the view.
        self.usage = replay_step(self.view, len(self.steps) - 1, step, self.usage, self.reasoning)
        for record in step.calls:
            self.counts[record.key] += 1

    async def _run_call(self, call: Planned, deadline: float, ref: str) -> tuple[CallRecord, dict[str, Any]]:
        """Run one call (or don't), and return its record and its tool message. Never raises, except
        CancelledError (Stop) and the guard's error (the turn is no longer ours)."""
        started = self.clock()
        result, text = await self._result(call, deadline)
        seconds = self.clock() - started
        if result.verbatim and text:  # web_search's encrypted envelope: handed back exactly as it came
            self.verbatim.add(call.id)
        else:
            text = text or ("(empty result)" if result.ok else "Error")
            if call.name != READ_MORE:  # its pages are already within the cap
                text = self._paged(text, ref)
            if call.verdict is Verdict.NUDGE:
                text += NUDGE.format(name=call.name)
        record = CallRecord(
            call.id, call.name, result.title or call.title, result.ok, result.sources, call.key, seconds
        )
        self.view.call_done(record, "" if result.ok else result.text)
        return record, tool_message(call.id, text)

    async def _result(self, call: Planned, deadline: float) -> tuple[ToolResult, str]:
        if call.error:
            return ToolResult(call.error, ok=False), call.error
        if call.verdict is Verdict.REFUSE:
            text = refusal(call, self.counts[call.key])
            return ToolResult(text, ok=False, title=call.title), text
        assert call.args is not None
        if call.name == READ_MORE:
            text = self._read_more(call.args)
            return ToolResult(text), text
        tool = self.tools[call.name]
        if not tool.read_only and not getattr(tool, "trusted", False):
            try:
                decision = await self._approval(call, tool)
            except ArgumentsTooLong:
                return ToolResult(TOO_LONG_TO_APPROVE, ok=False), TOO_LONG_TO_APPROVE
            except Exception as exc:  # e.g. the prompt could not be posted: no approval, no run
                log.warning(
                    "approval not asked", extra={"tool": call.name, "error": f"{type(exc).__name__}: {exc}"}
                )
                text = "The user could not be asked to approve this action; it was not run."
                return ToolResult(text, ok=False), text
            if decision is not True:
                text = (
                    "The user declined this action; it was not run."
                    if decision is False
                    else "No one approved this action in time; it was not run."
                )
                return ToolResult(text, ok=False), text
        if not tool.read_only:
            await self.guard()  # a lost lease: another worker owns the turn now, nothing is changed
        self.view.call_running(call)
        own = getattr(tool, "timeout", None)  # an MCP server's own per-call timeout, when it has one
        limit = float(own) if isinstance(own, int | float) and own > 0 else self.caps.call_timeout_s
        timeout = max(min(limit, deadline - self.clock()), 1.0)
        try:
            async with self.slots, asyncio.timeout(timeout):
                result = await tool.run(call.args, self.ctx)
        except TimeoutError:
            text = f"Error: {call.name} did not finish within {timeout:.0f} seconds."
            return ToolResult(text, ok=False), text
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an outage in the tool: the model hears of it, the turn goes on
            log.warning(
                "tool failed",
                extra={"tool": call.name, "error": f"{type(exc).__name__}: {exc}"},
                exc_info=True,
            )
            text = f"Error: {call.name} failed ({type(exc).__name__})."
            return ToolResult(text, ok=False), text
        return result, result.text

    async def _approval(self, call: Planned, tool: Tool) -> bool | None:
        if self.approve is None:
            return False
        self.view.call_running(call)
        try:
            async with asyncio.timeout(self.caps.approval_timeout_s):
                return await self.approve(call, tool)
        except TimeoutError:
            return None

    def _paged(self, text: str, ref: str) -> str:
        """`ref` names the step and the call (s3c2), so it stays unique when a resumed run goes on."""
        limit = self.caps.result_chars * max(self.caps.keep_pages, 1)
        total = len(text)
        if total > limit:  # a huge result is not kept whole: the first pages are
            text = text[:limit]
        pages = page_text(text, self.caps.result_chars)
        if len(pages) == 1 and total <= limit:
            return text
        self.pages[ref] = pages
        note = paged_note(ref, 1, len(pages), total)
        if total > limit and len(pages) == 1:
            note = f"\n\n[Result truncated: the first {limit:,} of {total:,} characters are shown.]"
        return pages[0] + note

    def _read_more(self, args: dict[str, Any]) -> str:
        ref = str(args.get("ref") or "")
        pages = self.pages.get(ref)
        if pages is None:
            return (
                f"Error: no result {ref!r} to read on (results are kept for this answer only; after a "
                "restart, call the original tool again)."
            )
        try:
            page = int(args.get("page") or 2)
        except (TypeError, ValueError):
            page = 2
        if not 1 <= page <= len(pages):
            return f"Error: result {ref} has pages 1 to {len(pages)}."
        total = sum(len(p) for p in pages)
        return pages[page - 1] + paged_note(ref, page, len(pages), total)


def replay_step(
    view: View, index: int, step: Step, usage: Usage | None, reasoning: list[str]
) -> Usage | None:
    """A finished step of an earlier run of the turn, shown again: its cards back in the view, its reasoning
    appended to `reasoning`; the usage with its own added."""
    if step.message.get("reasoning_content"):
        reasoning.append(str(step.message["reasoning_content"]))
    view.step_started(index)
    for record in step.calls:
        view.call_done(record, "")
    return add_usage(usage, step.usage)


def replayed_outcome(resume: Sequence[Step], final: Accumulator, cap: Cap | None, view: View) -> Outcome:
    """The outcome of an earlier run of a turn that got its final answer and died before recording it: its
    checkpointed steps back into the view (their cards) and the outcome, and that answer; nothing is asked
    or run again."""
    usage: Usage | None = None
    reasoning: list[str] = []
    for index, step in enumerate(resume):  # usage recorded by the earlier run, as was the final answer's
        usage = replay_step(view, index, step, usage, reasoning)
    view.step_started(len(resume))
    if final.reasoning_text:
        reasoning.append(final.reasoning_text)
    return Outcome(final, list(resume), cap, add_usage(usage, final.usage), "\n\n".join(reasoning))
