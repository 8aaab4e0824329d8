"""The agent loop (issue 8): Kimi asks for tools, the bot runs them and asks again until it answers;
each call shows live as a task card. Pure rules first, then the loop with a scripted model, then the real
bot against the fake Kimi (which refuses what Kimi refuses) and the fake Slack (which checks the chunks)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.agent.loop import (
    READ_MORE,
    AgentLoop,
    Cap,
    Caps,
    Verdict,
    canonical_key,
    page_text,
    parse_arguments,
    plan_calls,
)
from bot.agent.toolbox import ToolBox
from bot.kimi.events import Accumulator, Usage
from bot.slack.blocks import ACTION_APPROVE, ACTION_DENY, ACTION_STOP, status_line
from bot.tools.base import Tool, ToolContext, ToolResult
from tests.conftest import BotHarness
from tests.fakes.kimi_api import API_KEY, Call, FakeKimi, Reply
from tests.fakes.slack_api import TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, BOB, CHANNEL, DM, mention, message


# ---- test tools ----------------------------------------------------------------------------------
@dataclass
class Probe:
    """A tool for tests: records every run (start, end, cancelled), answers with `text`."""

    name: str = "lookup"
    text: str | Callable[[dict[str, Any]], str] = "found it"
    delay: float = 0.0
    read_only: bool = True
    fail: bool = False
    sources: tuple[str, ...] = ()
    description: str = "Look something up."
    parameters: dict[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    )
    runs: list[dict[str, Any]] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    ended: list[float] = field(default_factory=list)
    cancelled: int = 0

    def title(self, args: dict[str, Any]) -> str:
        return f"Looking up {args.get('q', '')}".strip()

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        self.runs.append(args)
        self.started.append(time.monotonic())
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.ended.append(time.monotonic())
        if self.fail:
            raise RuntimeError("the backend is down")
        text = self.text(args) if callable(self.text) else self.text
        return ToolResult(text, sources=self.sources)


def give(bot: BotHarness, *tools: Tool) -> None:
    async def source(ctx: ToolContext) -> list[Tool]:
        return list(tools)

    bot.deps.tools = source


def tool_results(request: dict[str, Any]) -> int:
    return sum(1 for m in request["messages"] if m["role"] == "tool")


async def wait_until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - the state changes in the fake servers
            await asyncio.sleep(0.01)


def ctx() -> ToolContext:
    return ToolContext(TEAM_ID, ALICE, CHANNEL, "1.0", slack=None, redis=None)  # type: ignore[arg-type]


# ---- the rules (pure) ------------------------------------------------------------------------------
def test_identical_calls_have_one_key_whatever_the_key_order_or_spacing() -> None:
    a, _ = parse_arguments('{"q": "x", "n": 1}')
    b, _ = parse_arguments('{"n":1,"q":"x"}')
    assert canonical_key("t", a, "") == canonical_key("t", b, "") != canonical_key("u", a, "")


def test_unreadable_arguments_and_unknown_tools_become_error_results_not_exceptions() -> None:
    tools: dict[str, Tool] = {"lookup": Probe()}
    message = {
        "tool_calls": [
            {"id": "a", "function": {"name": "lookup", "arguments": '{"q": '}},
            {"id": "b", "function": {"name": "lookup", "arguments": "[1, 2]"}},
            {"id": "c", "function": {"name": "nope", "arguments": "{}"}},
            {"id": "d", "function": {"name": "lookup", "arguments": '{"q": "ok"}'}},
        ]
    }
    planned = plan_calls(message, tools, Counter(), Caps())
    assert "not valid JSON" in planned[0].error and "must be a JSON object" in planned[1].error
    assert "no tool named 'nope'" in planned[2].error and "lookup" in planned[2].error
    assert planned[3].error == "" and planned[3].title == "Looking up ok"


def test_the_repeat_guard_runs_then_nudges_then_refuses() -> None:
    counts: Counter[str] = Counter()
    tools: dict[str, Tool] = {"lookup": Probe()}
    call = {"tool_calls": [{"id": "a", "function": {"name": "lookup", "arguments": '{"q":"x"}'}}]}
    verdicts = [plan_calls(call, tools, counts, Caps())[0].verdict for _ in range(4)]
    assert verdicts == [Verdict.RUN, Verdict.NUDGE, Verdict.REFUSE, Verdict.REFUSE]


def test_long_results_are_paged_at_line_ends() -> None:
    text = "\n".join(f"line {i:04d}" for i in range(1000))
    pages = page_text(text, 2_000)
    assert "".join(pages) == text and all(len(p) <= 2_000 for p in pages) and len(pages) >= 5


# ---- the loop, with a scripted model -----------------------------------------------------------------
def step(*calls: tuple[str, str], text: str = "", reasoning: str = "thinking") -> Accumulator:
    acc = Accumulator(reasoning=[reasoning], content=[text] if text else [], finish_reason="stop")
    acc.saw_reasoning_field = True
    acc.usage = Usage(100, 10)
    for index, (name, arguments) in enumerate(calls):
        acc.tool_calls[index] = {
            "id": f"functions.{name}:{index}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
    if calls:
        acc.finish_reason = "tool_calls"
    return acc


class Script:
    def __init__(self, *steps: Accumulator) -> None:
        self.steps = list(steps)
        self.requests: list[tuple[list[dict[str, Any]], str | None]] = []

    async def __call__(
        self, messages: list[dict[str, Any]], definitions: list[dict[str, Any]], tool_choice: str | None
    ) -> Accumulator:
        self.requests.append(([dict(m) for m in messages], tool_choice))
        return self.steps.pop(0)


async def test_a_result_over_the_cap_is_paged_and_read_on_with_read_more() -> None:
    text = "\n".join(f"row {i:05d} of the report" for i in range(2_000))  # ~48,000 characters
    script = Script(
        step(("lookup", '{"q": "report"}')),
        step((READ_MORE, '{"ref": "s1c1", "page": 2}')),
        step(text="Done."),
    )
    outcome = await AgentLoop(
        [Probe(text=text)], complete=script, ctx=ctx(), caps=Caps(result_chars=20_000)
    ).run([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    first = script.requests[1][0][-1]["content"]
    second = script.requests[2][0][-1]["content"]
    assert len(first) < 20_500 and 'call read_more with {"ref": "s1c1", "page": 2}' in first
    assert "page 2 of 3" in second and second.startswith(text[len(first.split("\n\n[Result")[0]) :][:20])
    assert outcome.final.text == "Done." and outcome.cap is None


async def test_a_tool_that_raises_or_hangs_becomes_an_error_result_and_the_turn_goes_on() -> None:
    script = Script(step(("broken", '{"q": "a"}'), ("slow", '{"q": "b"}')), step(text="Answer anyway."))
    tools = [Probe(name="broken", fail=True), Probe(name="slow", delay=5)]
    loop = AgentLoop(tools, complete=script, ctx=ctx(), caps=Caps(call_timeout_s=1.0))
    started = time.monotonic()
    outcome = await loop.run([{"role": "user", "content": "q"}])
    assert time.monotonic() - started < 3
    results = [m["content"] for m in script.requests[1][0] if m["role"] == "tool"]
    assert results == ["Error: broken failed (RuntimeError).", "Error: slow did not finish within 1 seconds."]
    assert [c.ok for c in outcome.steps[0].calls] == [False, False] and outcome.final.text == "Answer anyway."


async def test_the_wall_time_cap_ends_with_a_forced_answer() -> None:
    now = [0.0]
    script = Script(
        step(("lookup", '{"q": "a"}')), step(("lookup", '{"q": "b"}')), step(text="From what I have.")
    )

    async def complete(messages: Any, definitions: Any, tool_choice: Any) -> Accumulator:
        now[0] += 400.0  # each model request takes 400 s of a 600 s budget
        return await script(messages, definitions, tool_choice)

    loop = AgentLoop(
        [Probe()], complete=complete, ctx=ctx(), caps=Caps(wall_time_s=600), clock=lambda: now[0]
    )
    outcome = await loop.run([{"role": "user", "content": "q"}])
    assert outcome.cap is Cap.TIME and len(outcome.steps) == 2
    assert script.requests[-1][1] == "none" and "time limit" in script.requests[-1][0][-1]["content"]


# ---- the real bot ---------------------------------------------------------------------------------
async def test_a_chain_of_steps_sends_every_earlier_step_whole_and_shows_each_call_as_a_card(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    probe = Probe(text=lambda a: f"facts about {a['q']}", sources=("https://status.example.com/",))
    give(bot, probe)
    fake_kimi.script(
        Reply(reasoning="First the incidents channel.", tool_calls=[Call("lookup", '{"q": "incidents"}')]),
        Reply(
            reasoning="Now the vendor status.",
            content="Checking the vendor.",
            tool_calls=[Call("lookup", '{"q": "vendor"}')],
        ),
        Reply(reasoning="And the rollback.", tool_calls=[Call("lookup", '{"q": "rollback"}')]),
        Reply(reasoning="I have it all.", content="The rollback was decided; the vendor is green."),
    )
    ts = "1700000008.000100"
    await bot.send_event(mention("what happened?", ts))
    await bot.settle()

    assert fake_kimi.rejected == [] and len(fake_kimi.requests) == 4
    last = fake_kimi.requests[-1]["messages"]
    assistants = [m for m in last if m["role"] == "assistant"]
    assert [m["reasoning_content"] for m in assistants] == [
        "First the incidents channel.",
        "Now the vendor status.",
        "And the rollback.",
    ]
    assert assistants[1]["content"] == "Checking the vendor."
    for request in fake_kimi.requests[1:]:  # each step's ids come back unchanged, one result per id
        calls = [
            c["id"] for m in request["messages"] if m["role"] == "assistant" for c in m.get("tool_calls", [])
        ]
        answered = [m["tool_call_id"] for m in request["messages"] if m["role"] == "tool"]
        assert calls == answered and len(calls) == tool_results(request)
    assert [m["content"] for m in last if m["role"] == "tool"] == [
        "facts about incidents",
        "facts about vendor",
        "facts about rollback",
    ]
    definitions = {json.dumps(r["tools"]) for r in fake_kimi.requests}
    assert len(definitions) == 1  # byte-identical on every request
    assert all("tool_choice" not in r for r in fake_kimi.requests)

    cards = fake_slack.cards(CHANNEL, ts)
    assert [(c["title"], c["status"]) for c in cards] == [
        ("Looking up incidents", "complete"),
        ("Looking up vendor", "complete"),
        ("Looking up rollback", "complete"),
    ]
    assert cards[0]["sources"] == [
        {"type": "url", "url": "https://status.example.com/", "text": "status.example.com"}
    ]
    starts = fake_slack.calls_of("chat.startStream")
    assert starts[0].args["task_display_mode"] == "timeline" and starts[0].args.get("chunks")
    assert fake_slack.cards_left_open(CHANNEL) == [] and fake_slack.problems == []
    text = "".join(fake_slack.answer_parts(CHANNEL, ts))
    assert (
        text.startswith("Checking the vendor.") and "The rollback was decided; the vendor is green." in text
    )
    assert fake_slack.timeline(CHANNEL, ts) == [  # text written between steps shows between their cards
        "[Looking up incidents]",
        "Checking the vendor.",
        "[Looking up vendor]",
        "[Looking up rollback]",
        "\n\nThe rollback was decided; the vendor is green.",
    ]
    footer = fake_slack.bodies(CHANNEL, ts)[-1]
    assert "3 tool calls in 3 steps" in footer

    state = await bot.deps.threads.load(bot.thread(ts))
    final = state.entries[-1]
    assert (
        final["role"] == "assistant" and final["content"] == "The rollback was decided; the vendor is green."
    )
    assert [t["title"] for t in final["tools"]] == [
        "Looking up incidents",
        "Looking up vendor",
        "Looking up rollback",
    ]
    assert not [e for e in state.entries if e["role"] == "tool" or e.get("tool_calls")]
    details = await bot.deps.threads.turn_details(bot.thread(ts), ts)  # what Show reasoning shows
    assert details is not None and details["reasoning"] == (
        "First the incidents channel.\n\nNow the vendor status.\n\nAnd the rollback.\n\nI have it all."
    )
    usage = await bot.deps.usage.day(
        TEAM_ID, __import__("datetime").datetime.now(__import__("datetime").UTC).date()
    )
    assert usage["turns"] == "1" and usage["requests"] == "4"

    # A later turn gets the final answer, not the stale tool results.
    fake_kimi.script(Reply(content="Still green."))
    await bot.send_event(message("and now?", "1700000008.000101", thread_ts=ts))
    await bot.settle()
    follow_up = fake_kimi.requests[-1]["messages"]
    assert [m["role"] for m in follow_up] == ["system", "user", "assistant", "user"]


async def test_the_fake_kimi_refuses_a_tool_call_message_without_its_reasoning(fake_kimi: FakeKimi) -> None:
    body = {
        "model": "kimi-k2.6",
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "x:0", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "x:0", "content": "r"},
        ],
        "stream": True,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{fake_kimi.base_url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"] == (
        "thinking is enabled but reasoning_content is missing in assistant tool call message at index 1"
    )


async def test_parallel_calls_of_one_step_run_at_once(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    probe = Probe(delay=0.4)
    give(bot, probe)
    calls = [Call("lookup", json.dumps({"q": q})) for q in ("a", "b", "c")]
    fake_kimi.script(Reply(tool_calls=calls), Reply(content="All three."))
    ts = "1700000008.000200"
    await bot.send_event(mention("three things", ts))
    await bot.settle()
    assert len(probe.started) == 3 and max(probe.started) < min(probe.ended)  # all began before any ended
    assert [m["content"] for m in fake_kimi.requests[1]["messages"] if m["role"] == "tool"] == [
        "found it"
    ] * 3
    assert len(fake_slack.cards(CHANNEL, ts)) == 3 and fake_slack.cards_left_open(CHANNEL) == []


async def test_the_step_cap_ends_with_one_request_without_tools_and_the_footer_says_so(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(kimi_max_tool_steps=3)
    give(bot, Probe())

    def endless(request: dict[str, Any]) -> Reply:
        if request.get("tool_choice") == "none":
            return Reply(content="Here is what I found so far.")
        return Reply(tool_calls=[Call("lookup", json.dumps({"q": f"page {tool_results(request)}"}))])

    fake_kimi.responder = endless
    ts = "1700000008.000300"
    await bot.send_event(mention("dig forever", ts))
    await bot.settle()
    assert len(fake_kimi.requests) == 4 and fake_kimi.requests[-1]["tool_choice"] == "none"
    assert "No more tool calls: the tool step limit" in fake_kimi.requests[-1]["messages"][-1]["content"]
    assert fake_kimi.rejected == []
    bodies = fake_slack.bodies(CHANNEL, ts)
    assert "Here is what I found so far." in "".join(fake_slack.answer_parts(CHANNEL, ts))
    assert "stopped using tools: the tool step limit of this answer was reached" in bodies[-1]


async def test_a_repeated_identical_call_is_nudged_then_refused_and_the_model_must_answer(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    probe = Probe()
    give(bot, probe)
    same = [Call("lookup", '{"q": "same"}')]
    fake_kimi.script(
        Reply(tool_calls=same),
        Reply(tool_calls=[Call("lookup", '{ "q":"same" }')]),  # same call, other spacing
        Reply(tool_calls=same),
        Reply(content="I will answer with what I have."),
    )
    ts = "1700000008.000400"
    await bot.send_event(mention("loop please", ts))
    await bot.settle()
    assert len(probe.runs) == 2
    results = [m["content"] for m in fake_kimi.requests[-1]["messages"] if m["role"] == "tool"]
    assert results[0] == "found it" and "[Note: you already called lookup" in results[1]
    assert results[2].startswith("Not run: lookup was already called 2 times")
    assert fake_kimi.requests[-1]["tool_choice"] == "none"
    assert "kept repeating the same tool call" in fake_slack.bodies(CHANNEL, ts)[-1]
    assert [c["status"] for c in fake_slack.cards(CHANNEL, ts)] == ["complete", "complete", "error"]


async def test_unknown_tools_and_bad_arguments_get_error_results_and_the_answer_still_comes(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    give(bot, Probe())
    fake_kimi.script(
        Reply(tool_calls=[Call("launch_rockets", "{}"), Call("lookup", '{"q": ')]),
        Reply(content="Sorry, I could not look that up."),
    )
    ts = "1700000008.000500"
    await bot.send_event(mention("do odd things", ts))
    await bot.settle()
    results = [m["content"] for m in fake_kimi.requests[1]["messages"] if m["role"] == "tool"]
    assert "no tool named 'launch_rockets'" in results[0] and "not valid JSON" in results[1]
    cards = fake_slack.cards(CHANNEL, ts)
    assert [c["status"] for c in cards] == ["error", "error"] and cards[0][
        "title"
    ] == "Unknown tool launch_rockets"
    assert "Sorry, I could not look that up." in "".join(fake_slack.answer_parts(CHANNEL, ts))


async def test_stop_mid_loop_cancels_the_running_call_and_asks_kimi_no_more(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    probe = Probe(delay=30)
    give(bot, probe)
    fake_kimi.script(Reply(tool_calls=[Call("lookup", '{"q": "slow"}')]), Reply(content="never"))
    ts = "1700000008.000600"
    await bot.send_event(mention("take your time", ts))
    await wait_until(lambda: bool(probe.started))
    placeholder = fake_slack.replies(CHANNEL, ts)[0]
    started = time.monotonic()
    status, _ = await bot.click(placeholder, ACTION_STOP)
    assert status == 200
    await bot.settle(limit_s=5)
    assert time.monotonic() - started < 3 and probe.cancelled == 1 and len(fake_kimi.requests) == 1
    assert "Stopped by <@U04RZ8N2PQM>" in fake_slack.bodies(CHANNEL, ts)[-1]
    cards = fake_slack.cards(CHANNEL, ts)
    assert [(c["status"], c.get("details")) for c in cards] == [("error", "Stopped")]
    assert fake_slack.cards_left_open(CHANNEL) == [] and fake_slack.problems == []
    usage = await bot.deps.usage.day(
        TEAM_ID, __import__("datetime").datetime.now(__import__("datetime").UTC).date()
    )
    assert usage["requests"] == "1"


async def test_a_crash_mid_loop_resumes_after_the_last_finished_step_and_shows_one_answer(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    quick, slow = Probe(name="quick"), Probe(name="slow", delay=1.0)

    def script(request: dict[str, Any]) -> Reply:
        done = tool_results(request)
        if done == 0:
            return Reply(reasoning="Quick first.", tool_calls=[Call("quick", '{"q": "one"}')])
        if done == 1:
            return Reply(reasoning="Then the slow one.", tool_calls=[Call("slow", '{"q": "two"}')])
        return Reply(reasoning="Done.", content="Both looked up: one and two.")

    fake_kimi.responder = script
    first: BotHarness = await make_bot()
    give(first, quick, slow)
    ts = "1700000008.000700"
    await first.send_event(mention("two lookups", ts))
    await wait_until(lambda: bool(slow.started))
    await first.worker.drain(grace_s=0)  # the worker dies while step 2's call runs
    second: BotHarness = await make_bot()
    give(second, quick, slow)
    await second.settle()

    assert len(quick.runs) == 1  # step 1 was checkpointed: not run again
    assert len(slow.runs) == 2 and fake_kimi.rejected == []
    assert len(fake_kimi.requests) == 4  # 2 by the dead run, 2 by the re-run (step 1 not asked again)
    resumed = fake_kimi.requests[2]["messages"]
    assert [m.get("reasoning_content") for m in resumed if m["role"] == "assistant"] == ["Quick first."]
    assert fake_slack.answer_parts(CHANNEL, ts) == ["Both looked up: one and two."]
    assert [(c["title"], c["status"]) for c in fake_slack.cards(CHANNEL, ts)] == [
        ("Looking up one", "complete"),
        ("Looking up two", "complete"),
    ]
    assert fake_slack.cards_left_open(CHANNEL) == []
    placeholders = [c for c in fake_slack.calls_of("chat.postMessage") if c.args.get("text") == "Thinking…"]
    assert len(placeholders) == 1


@pytest.mark.parametrize(
    ("action", "runs", "result"),
    [
        (ACTION_APPROVE, 1, "done: wrote it"),
        (ACTION_DENY, 0, "The user declined this action; it was not run."),
    ],
)
async def test_a_tool_that_changes_things_waits_for_the_askers_approve_or_deny(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, action: str, runs: int, result: str
) -> None:
    writer = Probe(name="mcp__tickets__create", read_only=False, text="done: wrote it")
    give(bot, writer)
    fake_kimi.script(
        Reply(tool_calls=[Call("mcp__tickets__create", '{"q": "outage"}')]), Reply(content="Handled.")
    )
    ts = "1700000008.000800"
    await bot.send_event(mention("file a ticket", ts))

    def prompt() -> dict[str, Any] | None:
        return next((m for m in fake_slack.replies(CHANNEL, ts) if "Approve?" in m.get("text", "")), None)

    await wait_until(lambda: prompt() is not None)
    asked = prompt()
    assert asked is not None
    status, _ = await bot.click(asked, action, user=BOB)  # not the asker: refused
    await wait_until(lambda: bool(fake_slack.ephemerals))
    assert "Only <@U04RZ8N2PQM>" in fake_slack.ephemerals[-1]["text"] and not writer.runs
    status, _ = await bot.click(asked, action, user=ALICE)
    assert status == 200
    await bot.settle()
    assert len(writer.runs) == runs
    assert [m["content"] for m in fake_kimi.requests[1]["messages"] if m["role"] == "tool"] == [result]
    settled = fake_slack.find(CHANNEL, asked["ts"])
    assert settled is not None and not any(b["type"] == "actions" for b in settled["blocks"])
    assert ("approved by" if runs else "declined by") in settled["text"]
    assert fake_slack.problems == []


async def test_without_streaming_the_thinking_view_lists_the_steps(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    give(bot, Probe(delay=0.5))
    fake_slack.fail("chat.startStream", "invalid_chunks", times=5)
    fake_kimi.script(Reply(tool_calls=[Call("lookup", '{"q": "a"}')]), Reply(content="Plain answer."))
    ts = "1700000008.000900"
    await bot.send_event(mention("no streams here", ts))
    await bot.settle()
    views = [json.dumps(c.args.get("blocks")) for c in fake_slack.calls_of("chat.update")]
    assert any("Looking up a" in v and "Thinking" in v for v in views)
    assert "Plain answer." in "".join(fake_slack.bodies(CHANNEL, ts))


async def test_cards_roll_over_to_a_new_message_within_the_message_limit(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot.deps.pace = dataclasses.replace(bot.deps.pace, cards_per_message=3)
    give(bot, Probe())
    fake_kimi.script(
        *(
            Reply(
                tool_calls=[
                    Call("lookup", json.dumps({"q": f"n{i}"})),
                    Call("lookup", json.dumps({"q": f"m{i}"})),
                ]
            )
            for i in range(4)
        ),
        Reply(content="Eight lookups later."),
    )
    ts = "1700000008.001000"
    await bot.send_event(mention("many", ts))
    await bot.settle()
    messages = [m for m in fake_slack.replies(CHANNEL, ts) if m.get("tasks")]
    assert len(messages) >= 3 and all(len(m["tasks"]) <= 3 for m in messages)
    # A call still running when its message fills up shows in both messages ("Continued below", then
    # again below): count the calls, not the cards.
    shown = fake_slack.cards(CHANNEL, ts)
    assert len({c["title"] for c in shown}) == 8, shown
    assert all(c["status"] == "complete" or c.get("details") == "Continued below" for c in shown), shown
    assert fake_slack.cards_left_open(CHANNEL) == []
    assert fake_slack.problems == []


async def test_the_assistant_panel_status_says_what_the_tool_is_doing(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    thread_ts = fake_slack.seed(DM, user="U07F3N1BOTX", text="(assistant thread)")
    await bot.deps.threads.start_assistant_thread(bot.thread(thread_ts, DM))
    give(bot, Probe(name="web_search", delay=0.5))
    fake_kimi.script(Reply(tool_calls=[Call("web_search", '{"q": "the web"}')]), Reply(content="Found."))
    await bot.send_event(
        message("search", "1700000008.001101", channel=DM, channel_type="im", thread_ts=thread_ts)
    )
    await bot.settle()
    statuses = [c.args["status"] for c in fake_slack.calls_of("assistant.threads.setStatus")]
    assert status_line("Looking up the web") == "is looking up the web…"
    assert "is looking up the web…" in statuses
    assert fake_slack.problems == []


async def test_the_built_in_and_mcp_tools_are_offered_and_run_through_the_loop(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, tmp_path: Path
) -> None:
    config = tmp_path / "mcp.json"
    server = Path(__file__).parent / "fakes" / "mcp_server.py"
    config.write_text(
        json.dumps({"mcpServers": {"fake": {"command": sys.executable, "args": [str(server)]}}})
    )
    bot: BotHarness = await make_bot(mcp_config=str(config))
    toolbox = ToolBox(bot.settings)
    await toolbox.start()
    await toolbox.ready()
    bot.deps.tools = toolbox
    fake_kimi.script(
        Reply(tool_calls=[Call("current_time", "{}"), Call("mcp__fake__echo", '{"text": "hi"}')]),
        Reply(tool_calls=[Call("mcp__fake__write_note", '{"note": "rollback done"}')]),
        Reply(content="Noted, and it is now later than before."),
    )
    ts = "1700000008.001200"
    await bot.send_event(mention("note the rollback", ts))

    def prompt() -> dict[str, Any] | None:
        return next((m for m in fake_slack.replies(CHANNEL, ts) if "Approve?" in m.get("text", "")), None)

    await wait_until(prompt, limit_s=20)
    asked = prompt()
    assert asked is not None and "mcp__fake__write_note" in asked["text"]
    await bot.click(asked, ACTION_APPROVE)
    await bot.settle(limit_s=30)

    offered = [t["function"]["name"] for t in fake_kimi.requests[0]["tools"]]
    assert {
        "current_time",
        "slack_read_thread",
        "fetch_url",
        "mcp__fake__echo",
        "mcp__fake__write_note",
    } <= set(offered)
    assert offered[-1] == READ_MORE and offered[:-1] == sorted(offered[:-1])
    assert len({json.dumps(r["tools"]) for r in fake_kimi.requests}) == 1
    results = [m["content"] for m in fake_kimi.requests[-1]["messages"] if m["role"] == "tool"]
    assert "echo: hi" in results[1] and "noted: rollback done" in results[2]
    assert fake_kimi.rejected == [] and fake_slack.cards_left_open(CHANNEL) == []
    assert "Noted, and it is now later than before." in "".join(fake_slack.answer_parts(CHANNEL, ts))


async def test_no_approval_in_time_is_a_result_and_the_turn_goes_on() -> None:
    async def never(call: Any, tool: Any) -> bool | None:
        await asyncio.sleep(60)
        return True

    writer = Probe(name="write_note", read_only=False)
    script = Script(step(("write_note", '{"q": "x"}')), step(text="Not done."))
    loop = AgentLoop([writer], complete=script, ctx=ctx(), caps=Caps(approval_timeout_s=0.2), approve=never)
    outcome = await loop.run([{"role": "user", "content": "q"}])
    assert not writer.runs and outcome.final.text == "Not done."
    assert script.requests[1][0][-1]["content"] == "No one approved this action in time; it was not run."


async def test_stop_while_kimi_streams_a_later_step_cancels_that_request_and_counts_it(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    give(bot, Probe())
    fake_kimi.script(
        Reply(tool_calls=[Call("lookup", '{"q": "a"}')]),
        Reply(reasoning="Thinking slowly. " * 200, chunk_chars=20, chunk_delay=0.05, content="never shown"),
    )
    ts = "1700000008.001300"
    await bot.send_event(mention("stop me", ts))
    await wait_until(lambda: len(fake_kimi.requests) == 2)
    await asyncio.sleep(0.3)  # the second request is streaming its reasoning
    status, _ = await bot.click(fake_slack.replies(CHANNEL, ts)[0], ACTION_STOP)
    assert status == 200
    await bot.settle(limit_s=5)
    assert 1 not in fake_kimi.finished  # the second stream was cut off by the bot, not finished
    assert "Stopped by <@U04RZ8N2PQM>" in fake_slack.bodies(CHANNEL, ts)[-1]
    assert [c["status"] for c in fake_slack.cards(CHANNEL, ts)] == ["complete"]
    today = __import__("datetime").datetime.now(__import__("datetime").UTC).date()
    usage = await bot.deps.usage.day(TEAM_ID, today)
    assert usage["requests"] == "2" and usage["turns"] == "1"  # the stopped request counted (estimated)
    assert fake_slack.cards_left_open(CHANNEL) == [] and "never shown" not in "".join(
        fake_slack.bodies(CHANNEL, ts)
    )


def test_read_more_keeps_its_place_within_kimis_128_tools() -> None:
    tools = [Probe(name=f"tool_{i:03d}") for i in range(128)]
    loop = AgentLoop(tools, complete=Script(), ctx=ctx())
    names = [d["function"]["name"] for d in loop.definitions]
    assert len(names) == 128 and names[-1] == READ_MORE and "tool_127" not in names


async def test_a_dropped_connection_in_a_later_step_keeps_the_earlier_steps_and_their_cards(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    give(bot, Probe())
    long_text = "A careful answer. " * 120
    fake_kimi.script(
        Reply(tool_calls=[Call("lookup", '{"q": "a"}')]),
        Reply(content=long_text, chunk_chars=100, chunk_delay=0.02, reset_after_chunks=12),
        Reply(content=long_text, chunk_chars=400),
    )
    ts = "1700000008.001400"
    await bot.send_event(mention("answer after a hiccup", ts))
    await bot.settle()
    assert len(fake_kimi.requests) == 3 and fake_kimi.rejected == []
    assert fake_kimi.requests[2]["messages"] == fake_kimi.requests[1]["messages"]  # the same step, again
    text = "".join(fake_slack.answer_parts(CHANNEL, ts))
    assert text.endswith(long_text.rstrip()) or text.rstrip().endswith(long_text.rstrip())
    assert [c["status"] for c in fake_slack.cards(CHANNEL, ts)] == ["complete"]
    assert fake_slack.cards_left_open(CHANNEL) == [] and fake_slack.problems == []


async def test_the_events_action_token_reaches_the_tools(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    seen: list[ToolContext] = []

    async def source(ctx: ToolContext) -> list[Tool]:
        seen.append(ctx)
        return [Probe()]

    bot.deps.tools = source
    fake_kimi.script(Reply(content="Hello."))
    event = message(
        "search for me",
        "1700000008.001500",
        channel=DM,
        channel_type="im",
        assistant_thread={"action_token": "9.8.abc"},
    )
    await bot.send_event(event)
    await bot.settle()
    assert [c.action_token for c in seen] == ["9.8.abc"] and seen[0].user == ALICE and seen[0].channel == DM


async def test_a_call_that_outlives_slacks_stream_goes_on_in_a_new_message_with_no_card_left_open(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot.deps.pace = dataclasses.replace(bot.deps.pace, stream_max_age_s=0.3)
    fake_slack.stream_lifetime_s = 1.5  # Slack's ~5 minutes, shortened (well past the 0.3 s roll-over)
    give(bot, Probe(delay=1.0))
    fake_kimi.script(Reply(tool_calls=[Call("lookup", '{"q": "slow"}')]), Reply(content="Done at last."))
    ts = "1700000008.001600"
    await bot.send_event(mention("a long call", ts))
    await bot.settle()
    cards = fake_slack.cards(CHANNEL, ts)
    states = [(c["status"], c.get("details")) for c in cards]  # one message per ~0.3 s of the call
    assert len(states) >= 2 and states[-1] == ("complete", None)
    assert set(states[:-1]) == {("error", "Continued below")}
    assert fake_slack.cards_left_open(CHANNEL) == [] and fake_slack.problems == []
    assert "Done at last." in "".join(fake_slack.answer_parts(CHANNEL, ts))


async def test_stop_while_waiting_for_approval_runs_nothing_and_settles_the_prompt(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    writer = Probe(name="mcp__tickets__create", read_only=False)
    give(bot, writer)
    fake_kimi.script(Reply(tool_calls=[Call("mcp__tickets__create", '{"q": "x"}')]), Reply(content="never"))
    ts = "1700000008.001700"
    await bot.send_event(mention("file it", ts))
    await wait_until(lambda: any("Approve?" in m.get("text", "") for m in fake_slack.replies(CHANNEL, ts)))
    await bot.click(fake_slack.replies(CHANNEL, ts)[0], ACTION_STOP)
    await bot.settle(limit_s=5)
    assert not writer.runs and len(fake_kimi.requests) == 1
    prompt = next(m for m in fake_slack.replies(CHANNEL, ts) if "mcp__tickets__create" in m.get("text", ""))
    assert "stopped; not run" in prompt["text"] and not any(b["type"] == "actions" for b in prompt["blocks"])
    assert fake_slack.cards_left_open(CHANNEL) == [] and fake_slack.problems == []


async def test_the_fake_slack_checks_task_cards_as_slack_would(fake_slack: FakeSlack) -> None:
    thread = fake_slack.seed(CHANNEL, user=ALICE, text="q")
    base = {"channel": CHANNEL, "thread_ts": thread, "recipient_user_id": ALICE, "recipient_team_id": TEAM_ID}
    headers = {"Authorization": "Bearer xoxb-test-token"}

    async def call(session: aiohttp.ClientSession, method: str, body: dict[str, Any]) -> dict[str, Any]:
        async with session.post(f"{fake_slack.api_url}{method}", json=body, headers=headers) as response:
            result: dict[str, Any] = await response.json()
            return result

    card = {"type": "task_update", "id": "t1", "title": "Reading #incidents", "status": "in_progress"}
    async with aiohttp.ClientSession() as session:
        bad = await call(session, "chat.startStream", {**base, "chunks": [{**card, "status": "done"}]})
        assert bad == {"ok": False, "error": "invalid_chunks"}
        started = await call(
            session, "chat.startStream", {**base, "task_display_mode": "timeline", "chunks": [card]}
        )
        ts = started["ts"]
        source = {"type": "url", "url": "https://status.example.com/", "text": "status"}
        done = {**card, "status": "complete", "sources": [source]}
        appended = await call(session, "chat.appendStream", {"channel": CHANNEL, "ts": ts, "chunks": [done]})
        assert appended["ok"]  # chunks alone, without markdown_text, as the SDK's ChatStream sends them
        await call(session, "chat.stopStream", {"channel": CHANNEL, "ts": ts})
    assert fake_slack.cards(CHANNEL, thread) == [{k: v for k, v in done.items() if k != "type"}]
    assert fake_slack.cards_left_open(CHANNEL) == []
    assert fake_slack.problems == ["chat.startStream: task_update with status 'done'"]


async def test_a_call_finishing_while_its_message_is_being_closed_shows_complete_below(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """The roll-over's chat.stopStream is still out when the tool finishes: the card carried into the
    next message shows the call's newest state (complete), not the running state from before the close."""
    bot.deps.pace = dataclasses.replace(bot.deps.pace, stream_max_age_s=0.3)
    probe = Probe(delay=1.0)  # well past the 0.3 s roll-over, so the first chat.stopStream is the roll-over's
    give(bot, probe)
    fake_kimi.script(Reply(tool_calls=[Call("lookup", '{"q": "slow"}')]), Reply(content="Done at last."))
    closing = fake_slack.hold("chat.stopStream")
    ts = "1700000008.001650"
    await bot.send_event(mention("a call ending mid roll-over", ts))
    await closing.wait()
    await wait_until(lambda: bool(probe.ended))  # the call finished while the close was out
    closing.release()
    await bot.settle()
    states = [(c["status"], c.get("details")) for c in fake_slack.cards(CHANNEL, ts)]
    assert states == [("error", "Continued below"), ("complete", None)], states
    assert fake_slack.cards_left_open(CHANNEL) == [] and fake_slack.problems == []
    assert "Done at last." in "".join(fake_slack.answer_parts(CHANNEL, ts))


@dataclass
class Gated(Probe):
    """A lookup that ends only when the test opens its query's gate."""

    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        await self.gates.setdefault(str(args.get("q")), asyncio.Event()).wait()
        return await super().run(args, ctx)


def carries_card(title: str) -> Callable[[dict[str, Any]], bool]:
    """A Slack call that shows the card with this title (in any state)."""

    def check(args: dict[str, Any]) -> bool:
        chunks = args.get("chunks") or []
        chunks = json.loads(chunks) if isinstance(chunks, str) else chunks
        return any(c.get("title") == title for c in chunks)

    return check


async def test_a_full_message_closed_while_its_last_card_finished_unseen_shows_that_card_complete(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """The call shown last in a full message finishes while the Slack call first showing its card
    (pending or running) is still out; the next card needs a new message. The full message is closed
    showing the call complete (it is not left spinning there, nor shown twice)."""
    bot.deps.pace = dataclasses.replace(bot.deps.pace, cards_per_message=3)
    tool = Gated()
    for query in ("a", "b"):
        tool.gates[query] = asyncio.Event()
        tool.gates[query].set()
    give(bot, tool)
    fake_kimi.script(
        Reply(tool_calls=[Call("lookup", '{"q": "a"}'), Call("lookup", '{"q": "b"}')]),
        Reply(tool_calls=[Call("lookup", '{"q": "c"}'), Call("lookup", '{"q": "d"}')]),
        Reply(content="Four lookups later."),
    )
    # c's card goes out in the message's first call or in an append, whichever comes first.
    holds = [
        fake_slack.hold(method, when=carries_card("Looking up c"))
        for method in ("chat.startStream", "chat.appendStream")
    ]
    ts = "1700000008.001660"
    await bot.send_event(mention("four lookups", ts))
    await wait_until(lambda: any(hold.reached.is_set() for hold in holds))
    tool.gates.setdefault("c", asyncio.Event()).set()
    await wait_until(lambda: len(tool.ended) == 3)  # c finished while the call showing it was out
    fake_slack.release_holds()
    await asyncio.sleep(0.3)
    tool.gates.setdefault("d", asyncio.Event()).set()
    await bot.settle()
    shown = [(c["title"], c["status"]) for c in fake_slack.cards(CHANNEL, ts)]
    assert sorted(shown) == [
        ("Looking up a", "complete"),
        ("Looking up b", "complete"),
        ("Looking up c", "complete"),
        ("Looking up d", "complete"),
    ], shown
    assert fake_slack.cards_left_open(CHANNEL) == [] and fake_slack.problems == []
    assert "Four lookups later." in "".join(fake_slack.answer_parts(CHANNEL, ts))


async def test_a_closing_card_slack_refuses_does_not_keep_the_stream_open(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slack refuses a finished card (here: its sources) in an append and again in the stop that follows:
    the stop goes again with the cards bare, so the stream ends and no card is left spinning."""
    checked = FakeSlack._task_problem

    def refuse_sources(chunk: dict[str, Any]) -> str:
        return "sources refused (test)" if chunk.get("sources") else checked(chunk)

    monkeypatch.setattr(FakeSlack, "_task_problem", staticmethod(refuse_sources))
    tool = Gated(sources=("https://example.com/found",))
    give(bot, tool)
    fake_kimi.script(
        Reply(tool_calls=[Call("lookup", '{"q": "x"}'), Call("lookup", '{"q": "y"}')]),
        Reply(content="Both looked up."),
    )
    ts = "1700000008.001670"
    await bot.send_event(mention("two lookups", ts))
    await wait_until(
        lambda: len([c for c in fake_slack.cards(CHANNEL, ts) if c["status"] == "in_progress"]) == 2
    )
    tool.gates.setdefault("x", asyncio.Event()).set()
    await wait_until(lambda: bool(fake_slack.calls_of("chat.stopStream")))
    tool.gates.setdefault("y", asyncio.Event()).set()
    await bot.settle()
    assert fake_slack.cards_left_open(CHANNEL) == []
    first = next(c for c in fake_slack.replies(CHANNEL, ts) if c.get("tasks"))
    assert {c["title"]: c["status"] for c in first["tasks"].values()} == {
        "Looking up x": "complete",
        "Looking up y": "error",
    }
    assert fake_slack.problems and all("sources refused (test)" in p for p in fake_slack.problems)
    assert "Both looked up." in "".join(fake_slack.bodies(CHANNEL, ts))
