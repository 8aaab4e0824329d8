"""Fixes from the adversarial review of the agent loop (issue 8): verbatim results, the context window,
the lease, read_more refs, double paging, the 128-tool cap, parallel calls and huge results."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest

from bot.agent.loop import READ_MORE, AgentLoop, Cap, Caps, Step
from bot.errors import AnswerError, Reason
from bot.kimi.events import Accumulator
from bot.settings import Settings
from bot.slack.blocks import approval_blocks, approval_fits
from bot.tools.base import Tool, ToolContext, ToolResult
from bot.tools.builtin import builtin_tools
from bot.tools.registry import build_registry
from bot.tools.registry import page_text as tool_page
from tests.conftest import BotHarness
from tests.fakes.kimi_api import Call, FakeKimi, Reply
from tests.fakes.slack_api import TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, CHANNEL, mention
from tests.test_agent_loop import Probe, Script, ctx, give, step, tool_results, wait_until

QUESTION = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]


def tool_messages(request: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in request if m["role"] == "tool"]


class Verbatim(Probe):
    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        self.runs.append(args)
        text = self.text(args) if callable(self.text) else self.text
        return ToolResult(text, verbatim=True)


ENVELOPE = "\n".join("x" * 99 for _ in range(400))  # 40,000 characters, line breaks and all


# ---- 1. a verbatim result is never paged nor annotated ------------------------------------------
async def test_a_verbatim_result_goes_back_whole_even_over_the_cap_and_when_nudged() -> None:
    search = Verbatim(name="web_search", text=ENVELOPE)
    script = Script(
        step(("web_search", '{"q": "a"}')),
        step(("web_search", '{"q": "a"}')),  # identical: nudged, but the envelope is not touched
        step(text="Done."),
    )
    outcome = await AgentLoop([search], complete=script, ctx=ctx(), caps=Caps(result_chars=20_000)).run(
        QUESTION
    )
    assert [m["content"] for m in tool_messages(script.requests[2][0])] == [ENVELOPE, ENVELOPE]
    assert outcome.final.text == "Done."


async def test_the_forced_answer_note_never_lands_inside_a_verbatim_result() -> None:
    search = Verbatim(name="web_search", text=ENVELOPE)
    script = Script(step(("web_search", '{"q": "a"}')), step(text="From what I have."))
    outcome = await AgentLoop([search], complete=script, ctx=ctx(), caps=Caps(max_steps=1)).run(QUESTION)
    final, choice = script.requests[1]
    assert choice == "none" and outcome.cap is Cap.STEPS
    assert tool_messages(final)[0]["content"] == ENVELOPE
    assert final[-1]["role"] == "user" and "No more tool calls" in final[-1]["content"]


# ---- 2. the context window -----------------------------------------------------------------------
class UntilNone(Script):
    """Tool calls while tools are offered; "Summary." once tool_choice is "none"."""

    async def __call__(
        self, messages: list[dict[str, Any]], definitions: list[dict[str, Any]], tool_choice: str | None
    ) -> Accumulator:
        if tool_choice == "none":
            self.requests.append(([dict(m) for m in messages], tool_choice))
            return step(text="Summary.")
        return await super().__call__(messages, definitions, tool_choice)


async def test_a_session_that_fills_the_window_stops_offering_tools_and_the_last_request_fits() -> None:
    big = "\n".join("w" * 79 for _ in range(240))  # ~19,000 characters, ~6,400 tokens a result
    script = UntilNone(*[step(("lookup", f'{{"q": "{i}"}}')) for i in range(20)])
    caps = Caps(result_chars=20_000, context_tokens=30_000, context_margin_tokens=6_000)
    loop = AgentLoop([Probe(text=big)], complete=script, ctx=ctx(), caps=caps)
    outcome = await loop.run(QUESTION)
    assert outcome.cap is Cap.CONTEXT and outcome.final.text == "Summary."
    assert len(outcome.steps) < 20
    final, choice = script.requests[-1]
    assert choice == "none"
    assert loop._estimate(final) <= 30_000  # the forced request itself fits the window
    assert "filled the model's context window" in final[-1]["content"]


async def test_kimi_saying_too_long_on_a_later_step_gives_the_forced_answer_not_an_error() -> None:
    calls = 0

    async def complete(
        messages: list[dict[str, Any]], definitions: list[dict[str, Any]], tool_choice: str | None
    ) -> Accumulator:
        nonlocal calls
        calls += 1
        if calls == 1:
            return step(("lookup", '{"q": "a"}'))
        if tool_choice is None:
            raise AnswerError(Reason.TOO_LONG, "Invalid request: Your request exceeded model token limit")
        return step(text="From what I gathered.")

    outcome = await AgentLoop([Probe(text="y" * 15_000)], complete=complete, ctx=ctx()).run(QUESTION)
    assert outcome.cap is Cap.CONTEXT and outcome.final.text == "From what I gathered."


async def test_too_long_on_the_first_request_is_still_an_error() -> None:
    async def complete(*_: Any) -> Accumulator:
        raise AnswerError(Reason.TOO_LONG, "too long")

    with pytest.raises(AnswerError):
        await AgentLoop([Probe()], complete=complete, ctx=ctx()).run(QUESTION)


# ---- 3. a lost lease stops the turn before any tool runs -----------------------------------------
class LeaseLost(Exception):
    pass


async def test_a_lost_lease_from_the_checkpoint_stops_the_next_step_before_its_calls_run() -> None:
    writer = Probe(name="create_ticket", read_only=False)
    writer.trusted = True  # type: ignore[attr-defined]

    async def checkpoint(index: int, step_: Step) -> None:
        raise LeaseLost("another worker owns the thread")

    script = Script(step(("create_ticket", '{"q": "1"}')), step(("create_ticket", '{"q": "2"}')))
    loop = AgentLoop([writer], complete=script, ctx=ctx(), checkpoint=checkpoint)
    with pytest.raises(LeaseLost):
        await loop.run(QUESTION)
    assert writer.runs == [{"q": "1"}]


async def test_the_lease_guard_runs_before_a_tool_that_changes_things_and_not_before_a_reader() -> None:
    writer = Probe(name="create_ticket", read_only=False)
    writer.trusted = True  # type: ignore[attr-defined]
    reader = Probe(name="lookup")
    guarded: list[str] = []

    async def guard() -> None:
        guarded.append("checked")
        raise LeaseLost("lost")

    script = Script(step(("lookup", '{"q": "r"}')), step(("create_ticket", '{"q": "w"}')))
    loop = AgentLoop([reader, writer], complete=script, ctx=ctx(), guard=guard)
    with pytest.raises(LeaseLost):
        await loop.run(QUESTION)
    assert reader.runs == [{"q": "r"}] and writer.runs == [] and guarded == ["checked"]


# ---- 6. read_more refs are unique per step and call ----------------------------------------------
async def test_read_more_refs_name_the_step_and_call_so_a_resume_cannot_reuse_one() -> None:
    long_a = "\n".join(f"A{i:04d}" * 10 for i in range(100))
    long_b = "\n".join(f"B{i:04d}" * 10 for i in range(100))
    first = Script(step(("lookup", '{"q": "a"}')), step(text="x"))
    done = AgentLoop([Probe(text=long_a)], complete=first, ctx=ctx(), caps=Caps(result_chars=2_000))
    earlier = (await done.run(QUESTION)).steps
    second = Script(
        step(("lookup", '{"q": "b"}')),
        step((READ_MORE, '{"ref": "s1c1", "page": 2}')),
        step(text="Done."),
    )
    resumed = AgentLoop([Probe(text=long_b)], complete=second, ctx=ctx(), caps=Caps(result_chars=2_000))
    await resumed.run(QUESTION, earlier)
    b_note = tool_messages(second.requests[1][0])[-1]["content"]
    assert '{"ref": "s2c1", "page": 2}' in b_note
    read_on = tool_messages(second.requests[2][0])[-1]["content"]
    assert "A" not in read_on.split("\n\n[")[0] and "no result 's1c1'" in read_on


# ---- 7. built-in tools page within the loop's cap -------------------------------------------------
def test_built_in_tools_page_a_few_hundred_characters_below_the_loops_cap(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    loop_cap = settings.tool_result_max_chars
    text = "\n".join("word " * 19 for _ in range(5_000))
    for tool in builtin_tools(settings):
        own = getattr(tool, "max_chars", None)
        if own is None:
            continue
        assert own <= loop_cap - 300, tool.name
        page = f"Contents of https://example.com/{'p' * 200}:\n" + tool_page(
            text, max_length=own, tool_name=tool.name
        )
        assert len(page) <= loop_cap, tool.name  # the loop leaves it as it is: paged once


# ---- 8. with many MCP tools, web_search and read_more are both offered ---------------------------
def test_web_search_keeps_its_place_among_many_mcp_tools() -> None:
    names = ["current_time", "slack_user_info", "slack_read_thread", "slack_channel_history", "web_search"]
    tools: list[Tool] = [Probe(name=n) for n in [*names, "fetch_url"]]
    tools += [Probe(name=f"mcp__jira__tool{i:03d}") for i in range(140)]
    registry = build_registry(tools)
    loop = AgentLoop(
        list(registry.tools), complete=Script(), ctx=ctx(), definitions=registry.definitions_list()
    )
    offered = [d["function"]["name"] for d in loop.definitions]
    assert len(offered) == 128 and offered[-1] == READ_MORE and "web_search" in offered
    assert set(loop.tools) == set(offered) - {READ_MORE}


def test_a_tool_the_loop_cannot_offer_cannot_be_run_either() -> None:
    tools = [Probe(name=f"tool_{i:03d}") for i in range(130)]
    loop = AgentLoop(tools, complete=Script(), ctx=ctx())
    offered = {d["function"]["name"] for d in loop.definitions}
    assert len(offered) == 128 and set(loop.tools) == offered - {READ_MORE}


# ---- 9. parallel calls are limited; huge results are cut before paging ---------------------------
async def test_parallel_calls_of_one_step_run_at_most_max_parallel_at_a_time() -> None:
    running = peak = 0

    class Counting(Probe):
        async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.02)
            running -= 1
            return ToolResult("ok")

    calls = [("lookup", f'{{"q": "{i}"}}') for i in range(20)]
    script = Script(step(*calls), step(text="Done."))
    outcome = await AgentLoop([Counting()], complete=script, ctx=ctx(), caps=Caps(max_parallel=8)).run(
        QUESTION
    )
    assert peak == 8 and outcome.calls == 20


async def test_a_huge_result_is_cut_at_a_multiple_of_the_cap_before_it_is_paged() -> None:
    huge = "\n".join("z" * 99 for _ in range(50_000))  # 5,000,000 characters
    script = Script(step(("lookup", '{"q": "a"}')), step(text="Done."))
    loop = AgentLoop(
        [Probe(text=huge)], complete=script, ctx=ctx(), caps=Caps(result_chars=10_000, keep_pages=5)
    )
    await loop.run(QUESTION)
    kept = sum(len(p) for pages in loop.pages.values() for p in pages)
    assert kept <= 50_000
    assert "4,999,999 characters" in tool_messages(script.requests[1][0])[0]["content"]


# ---- 5. nobody approves what the prompt cannot show ----------------------------------------------
def test_the_approval_prompt_shows_the_arguments_whole_or_says_they_do_not_fit() -> None:
    arguments = json.dumps({"body": "b" * 2_000})
    assert approval_fits(ALICE, "mcp__tickets__create", arguments)
    _, blocks = approval_blocks(ALICE, "mcp__tickets__create", arguments, "id1")
    assert arguments in blocks[0]["text"]["text"]
    assert not approval_fits(ALICE, "mcp__tickets__create", json.dumps({"body": "b" * 3_000}))


async def test_a_write_call_too_long_to_show_is_not_asked_nor_run(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    writer = Probe(name="mcp__tickets__create", read_only=False, text="done: wrote it")
    give(bot, writer)
    long_call = json.dumps({"q": "x" * 4_000})
    fake_kimi.script(Reply(tool_calls=[Call("mcp__tickets__create", long_call)]), Reply(content="Too long."))
    ts = "1700000008.000900"
    await bot.send_event(mention("file a long ticket", ts))
    await bot.settle()
    assert not writer.runs
    assert not any("Approve?" in m.get("text", "") for m in fake_slack.replies(CHANNEL, ts))
    results = [m["content"] for m in fake_kimi.requests[1]["messages"] if m["role"] == "tool"]
    assert len(results) == 1 and results[0].startswith(
        "Not run: its arguments are too long to show for approval"
    )
    assert fake_slack.problems == []


# ---- 10. a running card carries on in the next message when one fills up --------------------------
async def test_a_card_still_running_when_its_message_fills_up_carries_on_in_the_next_message(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot.deps.pace = dataclasses.replace(bot.deps.pace, cards_per_message=3)
    slow = Probe(name="slow_lookup", delay=1.0)
    give(bot, Probe(), slow)
    fake_kimi.script(
        Reply(
            tool_calls=[
                Call("slow_lookup", json.dumps({"q": "s"})),
                *(Call("lookup", json.dumps({"q": f"n{i}"})) for i in range(3)),
            ]
        ),
        Reply(content="Four lookups later."),
    )
    ts = "1700000008.001100"
    await bot.send_event(mention("many", ts))
    await bot.settle()
    cards = fake_slack.cards(CHANNEL, ts)
    assert not any(c.get("details") == "Not finished" for c in cards), cards
    slow_cards = [c for c in cards if "Looking up s" in str(c.get("title"))]
    assert [c["status"] for c in slow_cards] == ["error", "complete"]  # "Continued below", then done
    assert slow_cards[0].get("details") == "Continued below"
    assert fake_slack.cards_left_open(CHANNEL) == [] and fake_slack.problems == []


# ---- 11. usage after a resume ------------------------------------------------------------------
async def test_a_resumed_turns_usage_includes_the_replayed_steps() -> None:
    first = Script(step(("lookup", '{"q": "a"}')), step(text="x"))
    earlier = (await AgentLoop([Probe()], complete=first, ctx=ctx()).run(QUESTION)).steps
    again = Script(step(text="Done."))
    outcome = await AgentLoop([Probe()], complete=again, ctx=ctx()).run(QUESTION, earlier)
    assert outcome.usage is not None and outcome.usage.prompt_tokens == 200  # step 1's and the answer's


async def test_a_re_run_after_a_crash_counts_the_turn_once(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    quick, slow = Probe(name="quick"), Probe(name="slow", delay=1.0)

    def script(request: dict[str, Any]) -> Reply:
        done = tool_results(request)
        if done == 0:
            return Reply(reasoning="Quick first.", tool_calls=[Call("quick", '{"q": "one"}')])
        if done == 1:
            return Reply(reasoning="Then the slow one.", tool_calls=[Call("slow", '{"q": "two"}')])
        return Reply(reasoning="Done.", content="Both looked up.")

    fake_kimi.responder = script
    first: BotHarness = await make_bot()
    give(first, quick, slow)
    await first.send_event(mention("two lookups", "1700000008.001200"))
    await wait_until(lambda: bool(slow.started))
    await first.worker.drain(grace_s=0)
    second: BotHarness = await make_bot()
    give(second, quick, slow)
    await second.settle()
    day = await second.deps.usage.day(TEAM_ID, dt.datetime.now(dt.UTC).date())
    assert day["turns"] == "1" and int(day["requests"]) == 4
