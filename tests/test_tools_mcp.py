"""MCP servers as tools: MCP_CONFIG, name mangling, a stdio and a streamable-HTTP server of our own
(tests/fakes/mcp_server.py), broken servers left out, reconnects, timeouts, results. Loopback only."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from bot.settings import SettingsError, load_settings
from bot.tools.base import ToolContext, ToolResult
from bot.tools.mcp import (
    NAME_PATTERN,
    McpConfigError,
    McpServerConfig,
    McpTool,
    McpTools,
    load_config,
    parse_config,
    to_result,
    tool_names,
)
from tests.fakes.mcp_server import LONG_NAME

FAKE = str(Path(__file__).resolve().parent / "fakes" / "mcp_server.py")
CTX = ToolContext(
    team_id="T1", user="U1", channel="C1", thread_ts="1.0", slack=cast(Any, None), redis=cast(Any, None)
)
FAST = {"connect_timeout": 15.0, "ping_interval": 0.3, "backoff": (0.05, 0.3)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(check: Callable[[], bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def stdio(name: str = "fake", **extra: Any) -> McpServerConfig:
    return McpServerConfig(name=name, command=sys.executable, args=(FAKE,), **extra)


def by_name(tools: McpTools) -> dict[str, McpTool]:
    return {tool.name: cast(McpTool, tool) for tool in tools.tools()}


@pytest.fixture
async def running() -> AsyncIterator[Callable[..., Any]]:
    """Start McpTools for a list of servers; every one started is closed at the end."""
    started: list[McpTools] = []

    async def start(servers: list[McpServerConfig], **options: Any) -> McpTools:
        tools = McpTools(servers, **{**FAST, **options})
        started.append(tools)
        await tools.start()
        return tools

    yield start
    for tools in started:
        await tools.close()


def start_http_server(port: int, token: str = "") -> subprocess.Popen[bytes]:
    """The fake server over streamable HTTP on 127.0.0.1:port (path /mcp), once it accepts connections."""
    process = subprocess.Popen(
        [sys.executable, FAKE, "http", str(port)],
        env={**os.environ, "FAKE_MCP_TOKEN": token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the fake MCP HTTP server did not start") from None
            time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    """The fake server over streamable HTTP, wanting `Authorization: Bearer sesame`."""
    port = free_port()
    process = start_http_server(port, token="sesame")
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop(process)


# --- Names ---------------------------------------------------------------------------------------------


def test_offered_names_are_mcp_server_tool_with_other_characters_as_underscores() -> None:
    names = tool_names("git hub", ["create_issue", "odd.name/with spaces", "list-repos"])
    assert names == {
        "create_issue": "mcp__git_hub__create_issue",
        "odd.name/with spaces": "mcp__git_hub__odd_name_with_spaces",
        "list-repos": "mcp__git_hub__list-repos",
    }
    assert tool_names("ünï", ["ça"]) == {"ça": "mcp___n____a"}
    assert all(NAME_PATTERN.match(name) for name in names.values())


def test_long_and_clashing_names_are_shortened_the_same_way_every_time() -> None:
    tools = [LONG_NAME, LONG_NAME + "_2", "a.b", "a_b", "a b"]
    names = tool_names("server", tools)
    assert names == tool_names("server", list(reversed(tools)))  # the listing's order does not matter
    assert len(set(names.values())) == len(tools)
    assert all(NAME_PATTERN.match(name) and len(name) <= 64 for name in names.values())
    assert names["a_b"] == "mcp__server__a_b"  # the name that needed no replacing keeps the plain form
    assert names[LONG_NAME].startswith("mcp__server__a_tool_whose_name")
    assert names[LONG_NAME] != names[LONG_NAME + "_2"]


# --- MCP_CONFIG ----------------------------------------------------------------------------------------


def test_config_reads_stdio_and_http_servers_with_environment_references() -> None:
    servers = parse_config(
        {
            "mcpServers": {
                "files": {"command": "npx", "args": ["-y", "server", "${HOME_DIR}"], "env": {"K": "${KEY}"}},
                "tickets": {
                    "url": "https://mcp.example.com/mcp",
                    "headers": {"Authorization": "Bearer ${TOKEN}", "X-Team": "${TEAM:-core}"},
                    "trusted": True,
                    "timeout": 5,
                },
                "off": {"command": "nothing", "disabled": True},
            }
        },
        environ={"HOME_DIR": "/srv", "KEY": "k1", "TOKEN": "t0k"},
    )
    assert servers == [
        McpServerConfig(name="files", command="npx", args=("-y", "server", "/srv"), env={"K": "k1"}),
        McpServerConfig(
            name="tickets",
            url="https://mcp.example.com/mcp",
            headers={"Authorization": "Bearer t0k", "X-Team": "core"},
            trusted=True,
            timeout=5.0,
        ),
    ]
    assert [server.transport for server in servers] == ["stdio", "http"]
    assert load_config("") == []


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "is not valid JSON"),
        ("[]", 'must be a JSON object with "mcpServers"'),
        ('{"mcpServers": []}', '"mcpServers" must be an object'),
        ('{"mcpServers": {"a": "npx"}}', "mcpServers.a must be an object"),
        ('{"mcpServers": {"a": {"args": []}}}', 'mcpServers.a needs either "command"'),
        (
            '{"mcpServers": {"a": {"command": "x", "url": "https://h"}}}',
            'mcpServers.a needs either "command"',
        ),
        ('{"mcpServers": {"a": {"command": "x", "args": "-y"}}}', "mcpServers.a.args must be a list"),
        ('{"mcpServers": {"a": {"command": "x", "env": {"K": 1}}}}', "mcpServers.a.env must be an object"),
        ('{"mcpServers": {"a": {"url": "ftp://h"}}}', "mcpServers.a.url must be an http(s) URL"),
        ('{"mcpServers": {"a": {"url": "https://h", "env": {}}}}', "mcpServers.a.env is for stdio servers"),
        ('{"mcpServers": {"a": {"command": "x", "trusted": "yes"}}}', "mcpServers.a.trusted must be true"),
        ('{"mcpServers": {"a": {"command": "x", "timeout": 0}}}', "mcpServers.a.timeout must be a number"),
        ('{"mcpServers": {"a": {"type": "sse", "url": "https://h"}}}', "only stdio and streamable HTTP"),
        ('{"mcpServers": {"a": {"type": "http", "command": "x"}}}', "does not fit its command"),
        ('{"mcpServers": {"a": {"url": "https://h/${NOPE_UNSET}"}}}', "uses ${NOPE_UNSET}, which is not set"),
        ('{"mcpServers": {"a.b": {"command": "x"}, "a_b": {"command": "y"}}}', "same tool prefix mcp__a_b__"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_mcp_config(tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(content)
    with pytest.raises(McpConfigError) as raised:
        load_config(str(path))
    message = str(raised.value)
    assert message.startswith(f"MCP_CONFIG ({path})") and says in message, message
    assert "\n" not in message


def test_start_up_refuses_a_bad_or_missing_mcp_config(tmp_path: Path) -> None:
    required = {"slack_bot_token": "xoxb-1", "slack_signing_secret": "s", "moonshot_api_key": "sk-1"}
    bad = tmp_path / "mcp.json"
    bad.write_text('{"mcpServers": {"a": {}}}')
    for path, says in (
        (bad, 'mcpServers.a needs either "command"'),
        (tmp_path / "nope.json", "cannot be read"),
    ):
        with pytest.raises(SettingsError) as raised:
            load_settings(_env_file=None, mcp_config=str(path), **required)
        [problem] = raised.value.problems
        assert problem.startswith("MCP_CONFIG") and says in problem, problem
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"mcpServers": {"a": {"command": "x"}}}))
    assert load_settings(_env_file=None, mcp_config=str(good), **required).mcp_config == str(good)
    assert load_settings(_env_file=None, **required).mcp_config == ""


def test_the_sdk_is_not_loaded_without_mcp_servers() -> None:
    code = "import sys, bot.tools.mcp; assert 'mcp' not in sys.modules and 'mcp_types' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=Path(__file__).parents[1])


# --- Results -------------------------------------------------------------------------------------------


def test_results_join_text_summarise_the_rest_and_turn_is_error_into_not_ok() -> None:
    from mcp_types import CallToolResult, ImageContent, TextContent

    ok = to_result(
        CallToolResult(
            content=[
                TextContent(type="text", text="one"),
                ImageContent(type="image", data="A" * 4000, mime_type="image/png"),
                TextContent(type="text", text="two"),
            ]
        )
    )
    assert ok == ToolResult(text="one\n[image: image/png, 2.9 kB]\ntwo")
    failed = to_result(CallToolResult(content=[TextContent(type="text", text="no such repo")], is_error=True))
    assert failed == ToolResult(text="no such repo", ok=False)
    assert to_result(CallToolResult(content=[], structured_content={"n": 1})).text == '{"n": 1}'
    assert to_result(CallToolResult(content=[])).text == "(no output)"


# --- A stdio server --------------------------------------------------------------------------------------


async def test_a_stdio_servers_tools_are_offered_and_called(running: Callable[..., Any]) -> None:
    tools: McpTools = await running([stdio(env={"FAKE_GREETING": "hello"})])
    offered = by_name(tools)
    long_name = next(iter(offered))
    assert long_name.startswith("mcp__fake__a_tool_whose_name_is_far") and len(long_name) == 64
    assert list(offered) == [
        long_name,
        "mcp__fake__boom",
        "mcp__fake__echo",
        "mcp__fake__env",
        "mcp__fake__grow",
        "mcp__fake__media",
        "mcp__fake__odd_name_with_spaces",
        "mcp__fake__pid",
        "mcp__fake__slow",
        "mcp__fake__write_note",
    ]
    echo, write = offered["mcp__fake__echo"], offered["mcp__fake__write_note"]
    assert (echo.read_only, echo.trusted, echo.server, echo.remote_name) == (True, False, "fake", "echo")
    assert write.read_only is False  # no readOnlyHint: the loop asks the asker first
    assert echo.description == "Say the text back."
    assert echo.parameters["properties"]["text"]["type"] == "string"
    assert echo.title({"text": "x"}) == "Running echo on fake"

    result = await echo.run({"text": "hi"}, CTX)
    assert (result.ok, result.text, result.title) == (True, "echo: hi", "Running echo on fake")
    assert (await offered["mcp__fake__odd_name_with_spaces"].run({}, CTX)).text == "odd"
    boom = await offered["mcp__fake__boom"].run({}, CTX)
    assert not boom.ok and "kaboom" in boom.text
    bad_args = await echo.run({}, CTX)
    assert not bad_args.ok
    media = await offered["mcp__fake__media"].run({}, CTX)
    assert media.ok
    assert media.text.splitlines() == [
        "a caption",
        "[image: image/png, 9 bytes]",
        "[resource file:///notes.txt (text/plain)]",
        "a note",
        "[link: report <https://example.com/report>]",
    ]
    assert media.sources == ("https://example.com/report",)
    # The config's env reaches the server; the bot's own environment (its secrets) does not.
    env = offered["mcp__fake__env"]
    assert (await env.run({"name": "FAKE_GREETING"}, CTX)).text == "hello"
    os.environ["KIMIBOT_TEST_SECRET"] = "xoxb-secret"
    try:
        assert (await env.run({"name": "KIMIBOT_TEST_SECRET"}, CTX)).text == "<unset>"
    finally:
        del os.environ["KIMIBOT_TEST_SECRET"]
    # The same objects, in the same order, request after request.
    assert tools.tools() == tools.tools()


async def test_a_trusted_server_says_so_on_its_tools(running: Callable[..., Any]) -> None:
    tools: McpTools = await running([stdio("ops", trusted=True)])
    write = by_name(tools)["mcp__ops__write_note"]
    assert (write.read_only, write.trusted, write.timeout) == (False, True, 60.0)
    assert (await write.run({"note": "x"}, CTX)).text == "noted: x"


async def test_a_server_that_says_its_tools_changed_is_listed_again(running: Callable[..., Any]) -> None:
    tools: McpTools = await running([stdio()], ping_interval=60.0)
    assert "mcp__fake__fresh_tool" not in by_name(tools)
    assert (await by_name(tools)["mcp__fake__grow"].run({"name": "fresh.tool"}, CTX)).text == "grown"
    await until(lambda: "mcp__fake__fresh_tool" in by_name(tools), within=5)
    assert (await by_name(tools)["mcp__fake__fresh_tool"].run({}, CTX)).text == "new fresh.tool"


async def test_parallel_calls_to_one_server_run_at_once(running: Callable[..., Any]) -> None:
    tools: McpTools = await running([stdio()])
    slow = by_name(tools)["mcp__fake__slow"]
    started = time.monotonic()
    results = await asyncio.gather(*(slow.run({"seconds": 0.5}, CTX) for _ in range(5)))
    assert [r.text for r in results] == ["done"] * 5
    assert time.monotonic() - started < 2.0


async def test_a_call_past_its_timeout_fails_and_the_server_stays_usable(running: Callable[..., Any]) -> None:
    tools: McpTools = await running([stdio(timeout=0.5)])
    offered = by_name(tools)
    started = time.monotonic()
    result = await offered["mcp__fake__slow"].run({"seconds": 10}, CTX)
    assert not result.ok and "did not answer within 0.5 s" in result.text
    assert time.monotonic() - started < 2.0
    assert (await offered["mcp__fake__echo"].run({"text": "still here"}, CTX)).text == "echo: still here"
    assert tools.status() == {"fake": True}


async def test_a_stopped_call_is_abandoned_and_the_server_stays_usable(running: Callable[..., Any]) -> None:
    tools: McpTools = await running([stdio()])
    offered = by_name(tools)
    call = asyncio.create_task(offered["mcp__fake__slow"].run({"seconds": 10}, CTX))
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (await offered["mcp__fake__echo"].run({"text": "after"}, CTX)).text == "echo: after"


async def test_a_stdio_server_that_dies_is_left_out_then_reconnected(running: Callable[..., Any]) -> None:
    tools: McpTools = await running([stdio()])
    offered = by_name(tools)
    first_pid = int((await offered["mcp__fake__pid"].run({}, CTX)).text)
    os.kill(first_pid, signal.SIGKILL)
    await until(lambda: tools.status() == {"fake": False}, within=5)
    assert tools.tools() == []
    # A tool taken before the server died answers with a refusal, not an exception.
    down = await offered["mcp__fake__echo"].run({"text": "x"}, CTX)
    assert not down.ok and "not connected" in down.text
    await until(lambda: tools.status() == {"fake": True})
    again = by_name(tools)
    assert list(again) == list(offered)  # the same names and order after the reconnect
    second_pid = int((await again["mcp__fake__pid"].run({}, CTX)).text)
    assert second_pid != first_pid
    assert (await offered["mcp__fake__echo"].run({"text": "back"}, CTX)).text == "echo: back"


async def test_close_ends_the_stdio_server(running: Callable[..., Any]) -> None:
    tools: McpTools = await running([stdio()])
    pid = int((await by_name(tools)["mcp__fake__pid"].run({}, CTX)).text)
    await tools.close()
    assert tools.tools() == []
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)  # still there (a zombie not yet reaped counts too, briefly)
            await asyncio.sleep(0.05)
    await tools.close()  # twice is fine


# --- Over HTTP, and broken servers -------------------------------------------------------------------------


async def test_a_streamable_http_server_is_offered_and_called_with_its_headers(
    running: Callable[..., Any], http_server: str
) -> None:
    config = {
        "mcpServers": {
            "remote": {"url": http_server, "headers": {"Authorization": "Bearer ${FAKE_TOKEN}"}},
            "no-auth": {"url": http_server},
        }
    }
    servers = parse_config(config, environ={"FAKE_TOKEN": "sesame"})
    tools: McpTools = await running(servers)
    assert tools.status() == {"no-auth": False, "remote": True}
    offered = by_name(tools)
    assert {tool.server for tool in offered.values()} == {"remote"}
    assert (await offered["mcp__remote__echo"].run({"text": "over http"}, CTX)).text == "echo: over http"
    assert offered["mcp__remote__write_note"].read_only is False


async def test_broken_servers_are_left_out_without_breaking_the_others(
    running: Callable[..., Any], http_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    exits = McpServerConfig(
        name="exits",
        command=sys.executable,
        args=("-c", "import sys; sys.stderr.write('cannot start: no token\\n'); sys.exit(3)"),
    )
    missing = McpServerConfig(name="missing", command="/nonexistent/mcp-server")
    refused = McpServerConfig(name="refused", url=f"http://127.0.0.1:{free_port()}/mcp")
    good = stdio("good")
    with caplog.at_level(logging.INFO, logger="bot.tools.mcp"):
        started = time.monotonic()
        tools: McpTools = await running([exits, missing, refused, good])
        assert time.monotonic() - started < 15
        assert tools.status() == {"exits": False, "missing": False, "refused": False, "good": True}
        offered = by_name(tools)
        assert {tool.server for tool in offered.values()} == {"good"}
        assert (await offered["mcp__good__echo"].run({"text": "fine"}, CTX)).text == "echo: fine"
        await until(
            lambda: any(getattr(r, "line", "") == "cannot start: no token" for r in caplog.records), within=5
        )
    down = {
        r.server: r.error  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage().startswith("mcp server unavailable")
    }
    assert set(down) == {"exits", "missing", "refused"}
    assert down["refused"] == "ConnectError: All connection attempts failed"
    assert "No such file or directory" in down["missing"]
    assert "Connection closed" in down["exits"]


async def test_an_http_server_that_goes_away_is_left_out_until_it_is_back(
    running: Callable[..., Any],
) -> None:
    port = free_port()
    process = start_http_server(port)
    try:
        tools: McpTools = await running([McpServerConfig(name="web", url=f"http://127.0.0.1:{port}/mcp")])
        echo = by_name(tools)["mcp__web__echo"]
        assert (await echo.run({"text": "1"}, CTX)).text == "echo: 1"
        stop(process)
        await until(lambda: tools.status() == {"web": False}, within=10)  # the next ping fails
        assert tools.tools() == []
        refused = await echo.run({"text": "2"}, CTX)
        assert not refused.ok
        process = start_http_server(port)
        await until(lambda: tools.status() == {"web": True})
        assert (await by_name(tools)["mcp__web__echo"].run({"text": "3"}, CTX)).text == "echo: 3"
    finally:
        stop(process)


async def test_a_server_that_comes_up_later_is_offered_then(
    running: Callable[..., Any], tmp_path: Path
) -> None:
    flag = tmp_path / "ready"
    script = (
        f"import os, runpy, sys; os.path.exists({str(flag)!r}) or sys.exit(1); "
        f"runpy.run_path({FAKE!r}, run_name='__main__')"
    )
    late = McpServerConfig(name="late", command=sys.executable, args=("-c", script))
    tools: McpTools = await running([late])
    assert tools.tools() == []
    flag.touch()
    await until(lambda: tools.status() == {"late": True})
    assert "mcp__late__echo" in by_name(tools)


async def test_no_servers_means_no_tools() -> None:
    tools = McpTools.from_file("")
    await tools.start()
    assert tools.tools() == []
    await tools.close()
