"""The agent loop in real `kimibot serve` processes: kill -9 while a tool runs, and the restarted process
finishes the turn from its checkpoint (the built-in ToolBox with a stdio MCP server, as in production)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.fakes.kimi_api import Call, Reply
from tests.slack_requests import CHANNEL, envelope, mention
from tests.test_interleavings import FAST_LEASE, Stack, seed_thread, stack, until

__all__ = ["stack"]  # the fixture, shared with tests/test_interleavings.py

MCP_SERVER = Path(__file__).parent / "fakes" / "mcp_server.py"


def tool_results(request: dict[str, Any]) -> int:
    return sum(1 for m in request["messages"] if m["role"] == "tool")


def script(request: dict[str, Any]) -> Reply:
    done = tool_results(request)
    if done == 0:
        return Reply(reasoning="Echo first.", tool_calls=[Call("mcp__fake__echo", '{"text": "one"}')])
    if done == 1:
        return Reply(reasoning="Then the slow one.", tool_calls=[Call("mcp__fake__slow", '{"seconds": 2}')])
    return Reply(reasoning="Both are back.", content="Both done: echo and slow.")


async def test_kill_9_while_a_tool_runs_resumes_after_the_last_finished_step_and_shows_one_answer(
    stack: Stack,
) -> None:
    slack, kimi = stack.slack, stack.kimi
    config = stack.directory / "mcp.json"
    config.write_text(
        json.dumps({"mcpServers": {"fake": {"command": sys.executable, "args": [str(MCP_SERVER)]}}})
    )
    kimi.responder = script
    root = "1700000900.000100"
    seed_thread(slack, root)
    first = await stack.start(MCP_CONFIG=str(config), **FAST_LEASE)
    await until(lambda: "tools ready" in first.output(), 20, "the MCP server connected", stack)
    assert await first.post(stack.session, envelope(mention("two lookups", root))) == 200
    await until(lambda: 1 in kimi.finished, 20, "step 2 asked", stack)  # the slow call is running now
    await until(lambda: bool(slack.cards(CHANNEL, root)), 10, "cards shown", stack)
    await first.kill()

    second = await stack.start(MCP_CONFIG=str(config), **FAST_LEASE)
    await until(
        lambda: "Both done: echo and slow." in "".join(slack.answer_parts(CHANNEL, root)),
        40,
        "the answer",
        stack,
    )
    await until(lambda: not slack.cards_left_open(CHANNEL), 10, "cards closed", stack)
    assert second.process.poll() is None
    assert kimi.rejected == []
    assert [tool_results(r) for r in kimi.requests] == [0, 1, 1, 2]  # step 1 was not asked (nor run) again
    resumed = kimi.requests[2]["messages"]
    assert [m.get("reasoning_content") for m in resumed if m["role"] == "assistant"] == ["Echo first."]
    assert "".join(slack.answer_parts(CHANNEL, root)).count("Both done: echo and slow.") == 1
    states = [(c["title"], c["status"]) for c in slack.cards(CHANNEL, root)]
    assert [s for _, s in states] == ["complete", "complete"] and len(set(states)) == 2
    assert slack.problems == []
