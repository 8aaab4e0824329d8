"""The Kimi client: one streamed completion with retries, and failures sorted into Reasons.

`classify` is pure (status, error type, message -> reason, retryable); `KimiClient` is the thin I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import openai
from openai import AsyncOpenAI, DefaultAioHttpClient

from bot.errors import AnswerError, Reason
from bot.kimi.events import Accumulator, Event
from bot.kimi.profiles import ModelProfile
from bot.metrics import Metrics

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Verdict:
    reason: Reason
    retryable: bool


def classify(status: int | None, error_type: str | None, message: str = "") -> Verdict:
    """Map an HTTP status and Kimi's `error.type` to a Reason, and say whether to try again."""
    kind = (error_type or "").lower()
    text = message.lower()
    if kind == "exceeded_current_quota_error" or "suspended" in text or "insufficient balance" in text:
        return Verdict(Reason.QUOTA, False)
    if kind == "content_filter" or "high risk" in text:
        return Verdict(Reason.FILTERED, False)
    if status == 429:
        if kind == "rate_limit_reached_error":
            return Verdict(Reason.RATE_LIMITED, True)
        return Verdict(Reason.OVERLOADED, True)
    if status in (401, 403) or "authentication" in kind or "api_key" in kind:
        return Verdict(Reason.AUTH, False)
    if status == 404 or kind == "resource_not_found_error":
        return Verdict(Reason.MODEL, False)
    if status == 400 or kind == "invalid_request_error":
        if "token" in text and ("too long" in text or "exceeded model token limit" in text):
            return Verdict(Reason.TOO_LONG, False)
        return Verdict(Reason.INVALID, False)
    if status is None or status >= 500 or status in (408, 409, 499):
        return Verdict(Reason.UNAVAILABLE, True)
    return Verdict(Reason.INVALID, False)


def backoff_delay(attempt: int, base: float, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; Retry-After, when the server sends one, is the floor."""
    delay = random.uniform(0, min(MAX_BACKOFF_S, base * 2**attempt))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


class StreamCut(Exception):
    """The stream ended before its last chunk: worth another try."""


def _is_transport(exc: Exception) -> bool:
    """A network error from the HTTP library under the SDK (httpx in openai 1.x/2.x, httpx2 in 3.x). With
    the aiohttp transport, a failure while reading the body arrives as httpx2's (the SDK's adapter maps
    aiohttp's: a mid-stream drop is ReadError, an idle stall ReadTimeout); one it does not map arrives as
    aiohttp's own ClientError."""
    return isinstance(exc, aiohttp.ClientError) or any(
        cls.__name__ in ("TransportError", "HTTPError") and cls.__module__.startswith("httpx")
        for cls in type(exc).__mro__
    )


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def verdict_for(exc: Exception) -> Verdict:
    """Sort any exception from the openai SDK (or the network under it) into a Verdict."""
    if isinstance(exc, openai.APIStatusError):
        return classify(exc.status_code, getattr(exc, "type", None), str(exc.message))
    if isinstance(
        exc, openai.APIConnectionError | StreamCut | OSError | asyncio.TimeoutError
    ) or _is_transport(exc):
        return Verdict(Reason.UNAVAILABLE, True)
    if isinstance(exc, openai.APIError):
        # An error inside the SSE stream (no HTTP status) or a bare drop mid-stream.
        body = exc.body if isinstance(exc.body, dict) else {}
        status = None
        code = body.get("code")
        if isinstance(code, int):
            status = code
        return classify(status, getattr(exc, "type", None) or body.get("type"), str(exc.message))
    return Verdict(Reason.INTERNAL, False)


DONE: Any = object()  # the `data: [DONE]` line


def sse_data(line: str) -> Any:
    """The JSON of one Server-Sent Events `data:` line, DONE for `[DONE]`, None for anything else."""
    if not line.startswith("data:"):
        return None  # blank separators, `:` comments, `event:`/`id:` fields
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    return json.loads(data) if data else None


# Sent as they are, past the SDK's request transform: they are plain JSON already, and the transform walks
# every message and tool schema (about 7 ms per request for a 10-step tool conversation; see
# bench/agent_steps.py). `extra_body` keys take precedence over the typed ones in the SDK's merge.
UNTRANSFORMED = ("messages", "tools", "tool_choice")


def wire_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`request_kwargs` as handed to the SDK: the bulky plain-JSON fields moved into `extra_body`."""
    extra = dict(kwargs.get("extra_body") or {})
    wire = {k: v for k, v in kwargs.items() if k not in (*UNTRANSFORMED, "extra_body")}
    for key in UNTRANSFORMED:
        if key in kwargs:
            extra[key] = kwargs[key]
    return {**wire, "messages": [], "extra_body": extra}


@dataclass(frozen=True)
class ModelCall:
    """Which model one request goes to, and how: per request, since each channel may pick its own."""

    model: str
    profile: ModelProfile
    reasoning_effort: str = "high"
    thinking: bool = True


def openai_client(*, api_key: str, base_url: str, idle_timeout: float) -> AsyncOpenAI:
    """The SDK's client over aiohttp (its DefaultAioHttpClient) rather than httpx2's own transport: with
    hundreds of answers streaming at once, reading each small SSE event through httpcore2 and anyio cost most
    of the process's CPU (bench/scale.py). No SDK retries: `KimiClient.complete` retries within its budget.
    read= is the idle timeout, the longest wait for the next byte, not for the whole answer (aiohttp's
    sock_read); connect= is aiohttp's sock_connect, pool= its connect (a pooled connection, or a new one).
    The aiohttp session opens at the first request, on the running loop; `close()` closes it."""
    return AsyncOpenAI(
        api_key=api_key,
        base_url=base_url,
        max_retries=0,
        timeout=openai.Timeout(connect=15.0, read=idle_timeout, write=30.0, pool=30.0),
        http_client=DefaultAioHttpClient(),
    )


OnEvent = Callable[[Event], Awaitable[None]]
OnRestart = Callable[[], Awaitable[None]]


class RequestMeter(Protocol):
    """Budgets and usage per request (bot/usage.py Meter): `before` each attempt, once it has a Kimi slot,
    may refuse it (raising) or cap its output tokens (returning the cap; None: the usual budget); `after`
    each attempt that was sent hears what it used (`acc.usage`, None when Kimi did not say)."""

    async def before(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> int | None: ...

    async def after(self, acc: Accumulator, *, cancelled: bool) -> None: ...


class NotSent(Exception):
    """The meter refused a request, or could not reserve for it: nothing went to Kimi, so `error` is raised
    to the caller as it is (not sorted into a Reason, not retried)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class KimiClient:
    """Streams one completion from Kimi, retrying what is worth retrying within a time budget."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        model: str,
        profile: ModelProfile,
        reasoning_effort: str = "high",
        max_completion_tokens: int = 0,
        idle_timeout: float = 180.0,
        retry_budget: float = 120.0,
        max_attempts: int = 4,
        backoff_base: float = 1.0,
        concurrency: int = 8,
    ) -> None:
        self.model = model
        self.profile = profile
        self.reasoning_effort = reasoning_effort
        self.max_completion_tokens = max_completion_tokens
        self.retry_budget = retry_budget
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        # KIMI_CONCURRENCY: requests in flight at once in this process. A request waits here, not a whole
        # job: a thread waiting for Kimi shows its placeholder, and jobs that never call Kimi (greetings,
        # /kimi announcements, waiting placeholders) never queue behind long answers. Backoff holds no slot.
        self._slots = asyncio.Semaphore(concurrency)
        self.last_outcome = ""  # "" until the first call; then "ok" or the Reason of the last failure
        self.last_outcome_at = 0.0
        self.metrics = Metrics()  # build_deps hands in the app's: latency and time to first token
        self.openai = openai_client(api_key=api_key, base_url=base_url, idle_timeout=idle_timeout)

    @property
    def output_budget(self) -> int:
        return self.max_completion_tokens or self.profile.output_budget

    def budget_of(self, call: ModelCall) -> int:
        """The output budget of a request to `call`'s model: KIMI_MAX_COMPLETION_TOKENS was set for
        KIMI_MODEL, so it applies to that model only; a channel's other model keeps its profile's budget
        (a K3-sized value would leave a K2 window no room for input)."""
        if self.max_completion_tokens and call.model == self.model:
            return self.max_completion_tokens
        return call.profile.output_budget

    @property
    def default_call(self) -> ModelCall:
        """KIMI_MODEL with KIMI_REASONING_EFFORT: what a request without a channel's settings uses."""
        return ModelCall(self.model, self.profile, self.reasoning_effort)

    def request_kwargs(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        call: ModelCall | None = None,
        output_cap: int | None = None,
    ) -> dict[str, Any]:
        """Everything sent to chat.completions.create; model rules come from the profile only. `tools` go
        out exactly as given (the registry keeps them byte-stable, in a fixed order, for the prefix cache).
        `output_cap`: fewer output tokens than the usual budget (what a Kimi budget has room for)."""
        call = call or self.default_call
        budget = self.budget_of(call)
        if output_cap is not None:
            budget = max(min(budget, output_cap), 1)
        kwargs: dict[str, Any] = {
            "model": call.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **call.profile.request_params(call.reasoning_effort, budget, thinking=call.thinking),
        }
        if tools:
            kwargs["tools"] = tools
            if tool_choice:
                kwargs["tool_choice"] = tool_choice
        return kwargs

    async def complete(
        self,
        messages: list[dict[str, Any]],
        on_event: OnEvent | None = None,
        on_restart: OnRestart | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        meter: RequestMeter | None = None,
        call: ModelCall | None = None,
        on_send: Callable[[], None] | None = None,
    ) -> Accumulator:
        """Stream an answer to the end and return it whole; raise AnswerError when it cannot be had.

        With `tools`, an answer may be tool calls instead of text (`finish_reason` "tool_calls"): that is an
        answer too, returned like text. `tool_choice` "none" asks for text only (the agent loop's last word).
        `on_restart` is awaited before a retry whose failed attempt had already produced events, so the
        caller can take back what it showed of the abandoned answer. `meter` is asked before every attempt
        once the attempt has a Kimi slot (a refusal, e.g. OverBudget, is raised as is: nothing was sent)
        and told after each attempt that was sent what it used.
        `on_send` (e.g. the answer's sign of life) is called, without waiting for it, once a request is about
        to be built and sent (its slot had and its reservation made), or at once when the request has to
        wait for a slot: work it starts runs behind the request instead of delaying it.
        """
        slept = 0.0  # the budget counts backoff only: a long stream that stalls must still get its retry
        attempt = 0
        while True:
            acc = Accumulator()
            timing = self.metrics.kimi_request((call or self.default_call).model, on_event)
            try:
                finished = await self._metered(
                    acc, meter, messages, timing.on_event, tools, tool_choice, call, on_send
                )
                self._outcome("ok")
                timing.done("ok")
                return finished
            except NotSent as exc:
                raise exc.error from None
            except AnswerError as exc:
                self._outcome(str(exc.reason))
                timing.done(str(exc.reason))
                raise
            except Exception as exc:  # sorted below; nothing raw reaches the user
                verdict = verdict_for(exc)
                timing.done(str(verdict.reason))
                delay = backoff_delay(attempt, self.backoff_base, _retry_after(exc))
                give_up = (
                    not verdict.retryable
                    or attempt + 1 >= self.max_attempts
                    or slept + delay > self.retry_budget
                )
                log.warning(
                    "kimi call failed",
                    extra={
                        "reason": str(verdict.reason),
                        "attempt": attempt + 1,
                        "retrying": not give_up,
                        "error": f"{type(exc).__name__}: {exc}",
                        "kimi_request_id": _header(exc, "x-request-id"),
                        "kimi_trace_id": _header(exc, "x-trace-id"),
                    },
                )
                if give_up:
                    self._outcome(str(verdict.reason))
                    raise AnswerError(verdict.reason, f"{type(exc).__name__}: {exc}") from exc
                if on_restart is not None and (acc.content or acc.reasoning):
                    await on_restart()
                await asyncio.sleep(delay)
                slept += delay
                attempt += 1

    async def _metered(
        self,
        acc: Accumulator,
        meter: RequestMeter | None,
        messages: list[dict[str, Any]],
        on_event: OnEvent | None,
        tools: list[dict[str, Any]] | None,
        tool_choice: str | None,
        call: ModelCall | None = None,
        on_send: Callable[[], None] | None = None,
    ) -> Accumulator:
        """One attempt, and the meter told what it used however it ended (an answer, a failure that
        reported usage, Stop's cancellation). KIMI_CONCURRENCY's slot comes first, then the meter's
        reservation: a request waiting for a slot holds no budget, and one stopped while it waits was never
        sent, so nothing is recorded (nor guessed) for it. Backoff holds no slot."""
        if on_send is not None and self._slots.locked():
            on_send()  # it waits for a slot: what goes beside it starts now
        async with self._slots:
            output_cap = None
            if meter is not None:
                try:
                    output_cap = await meter.before(messages, tools)
                except Exception as exc:
                    raise NotSent(exc) from exc
            if on_send is not None:
                # Nothing in the request's building and sending waits on I/O until it is written: what
                # on_send starts (a task) runs once the request is on its way.
                on_send()
            try:
                await self._stream_once(messages, acc, on_event, tools, tool_choice, call, output_cap)
                finished = self._finished(acc)
            except asyncio.CancelledError:
                if meter is not None:
                    await meter.after(acc, cancelled=True)
                raise
            except BaseException:
                if meter is not None:
                    await meter.after(acc, cancelled=False)
                raise
            if meter is not None:
                await meter.after(acc, cancelled=False)
            return finished

    def _outcome(self, outcome: str) -> None:
        """The last call's outcome ("ok" or a Reason), for /healthz."""
        self.last_outcome = outcome
        self.last_outcome_at = time.time()

    async def _stream_once(
        self,
        messages: list[dict[str, Any]],
        acc: Accumulator,
        on_event: OnEvent | None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | None = None,
        call: ModelCall | None = None,
        output_cap: int | None = None,
    ) -> None:
        """One streamed request (the caller holds its slot). The SDK builds it and raises HTTP errors; the
        Server-Sent Events are read here as plain JSON, since a typed model per chunk costs more CPU than
        everything else per answer."""
        kwargs = wire_kwargs(self.request_kwargs(messages, tools, tool_choice, call, output_cap))
        async with self.openai.chat.completions.with_streaming_response.create(**kwargs) as response:
            async for line in response.iter_lines():
                try:
                    chunk = sse_data(line)
                except ValueError as exc:
                    raise StreamCut(f"unreadable stream chunk: {line[:80]!r}") from exc
                if chunk is None or chunk is DONE:
                    continue  # read on to the end of the body, so the connection goes back to the pool
                if isinstance(chunk, dict) and chunk.get("error"):
                    error = chunk["error"]
                    message = str(error.get("message") if isinstance(error, dict) else error)
                    raise openai.APIError(message, response.http_request, body=error)
                for event in acc.feed(chunk):
                    if on_event is not None:
                        await on_event(event)

    @staticmethod
    def _finished(acc: Accumulator) -> Accumulator:
        """Only a stream that reached its finish_reason is an answer; a cut one is tried again."""
        if acc.finish_reason is None:
            # The connection closed before the last chunk; verdict_for() calls this retryable.
            raise StreamCut("stream ended before its last chunk")
        if not acc.text and not acc.tool_calls:
            if acc.finish_reason == "length":
                raise AnswerError(Reason.NO_ANSWER, "output budget used up while thinking")
            raise StreamCut("stream finished with no answer text")
        return acc

    async def close(self) -> None:
        await self.openai.close()


def _header(exc: Exception, name: str) -> str | None:
    response = getattr(exc, "response", None)
    return response.headers.get(name) if response is not None else None
