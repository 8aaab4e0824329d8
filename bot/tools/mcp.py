"""MCP servers as tools: `MCP_CONFIG` names a JSON file of servers; their tools are offered as
`mcp__<server>__<tool>`.

One owner task per server holds its one long-lived ClientSession (the SDK's anyio cancel scopes must be
entered and exited in the same task): it connects, lists the tools, runs the calls other tasks hand it
through a queue (each answered through a future), pings, and reconnects with backoff when the server goes
away. While a server is down its tools are left out of `McpTools.tools()` and the reason is logged; a down
server never breaks an answer, and a call that fails is a ToolResult with `ok=False`, never an exception.

The config parsing, name mangling and result conversion are pure functions. The SDK (slow to import) is
imported only when a server is actually connected, so a bot without MCP_CONFIG never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from bot.tools.base import Tool, ToolContext, ToolResult

if TYPE_CHECKING:
    from mcp import ClientSession
    from mcp.client.session import IncomingMessage
    from mcp_types import CallToolResult
    from mcp_types import Tool as RemoteTool

log = logging.getLogger(__name__)

SETTING = "MCP_CONFIG"
NAME_PATTERN = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{2,63}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_NAME = 64
DEFAULT_CALL_TIMEOUT = 60.0  # seconds one tool call may take (a server's "timeout" overrides it)
MAX_TOOL_PAGES = 50  # tools/list pages read per server (a server that pages forever is cut off)
STABLE_AFTER = 30.0  # seconds a session must last for the reconnect backoff to start again from its base
STDERR_LINE_LIMIT = 2000


# --- The config file -------------------------------------------------------------------------------


class McpConfigError(Exception):
    """MCP_CONFIG cannot be used: the message is one line naming MCP_CONFIG and what is wrong."""


@dataclass(frozen=True)
class McpServerConfig:
    """One entry of `mcpServers`: a stdio server (`command`) or a streamable HTTP one (`url`)."""

    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = ""
    url: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    trusted: bool = False  # its write tools run without the asker's Approve/Deny
    timeout: float = DEFAULT_CALL_TIMEOUT

    @property
    def transport(self) -> str:
        return "http" if self.url else "stdio"


def _expand(value: str, where: str, environ: Mapping[str, str]) -> str:
    """`${NAME}` and `${NAME:-default}` from the environment, so secrets can stay out of the file."""

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise McpConfigError(f"{where} uses ${{{name}}}, which is not set in the environment")

    return _ENV_REF.sub(one, value)


def _strings(value: object, where: str, environ: Mapping[str, str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise McpConfigError(f"{where} must be a list of strings")
    return tuple(_expand(item, where, environ) for item in value)


def _string_map(value: object, where: str, environ: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    ):
        raise McpConfigError(f'{where} must be an object of strings ({{"NAME": "value"}})')
    return {key: _expand(item, f"{where}.{key}", environ) for key, item in value.items()}


def _server(name: str, entry: object, environ: Mapping[str, str]) -> McpServerConfig | None:
    where = f"mcpServers.{name}"
    if not name.strip():
        raise McpConfigError("mcpServers has a server with an empty name")
    if not isinstance(entry, dict):
        raise McpConfigError(f"{where} must be an object")
    if entry.get("disabled") is True:
        return None
    kind = entry.get("type", entry.get("transport"))
    if kind in ("sse",):
        raise McpConfigError(f"{where} is an SSE server: only stdio and streamable HTTP are supported")
    if kind not in (None, "stdio", "http", "streamable-http", "streamable_http", "streamableHttp"):
        raise McpConfigError(f'{where}.type must be "stdio" or "http", not {kind!r}')
    trusted = entry.get("trusted", False)
    if not isinstance(trusted, bool):
        raise McpConfigError(f"{where}.trusted must be true or false")
    timeout = entry.get("timeout", DEFAULT_CALL_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise McpConfigError(f"{where}.timeout must be a number of seconds between 0 and 3600")
    has_command, has_url = "command" in entry, "url" in entry
    if has_command == has_url:
        raise McpConfigError(f'{where} needs either "command" (a stdio server) or "url" (streamable HTTP)')
    if kind is not None and (kind == "stdio") != has_command:
        given = "command" if has_command else "url"
        raise McpConfigError(f"{where}.type is {kind!r}, which does not fit its {given}")
    if has_command:
        command = entry["command"]
        if not isinstance(command, str) or not command.strip():
            raise McpConfigError(f"{where}.command must be a non-empty string")
        cwd = entry.get("cwd", "")
        if not isinstance(cwd, str):
            raise McpConfigError(f"{where}.cwd must be a string")
        for key in ("url", "headers"):
            if key in entry:
                raise McpConfigError(f'{where}.{key} is for HTTP servers, and this one has a "command"')
        return McpServerConfig(
            name=name,
            command=_expand(command, f"{where}.command", environ),
            args=_strings(entry.get("args", []), f"{where}.args", environ),
            env=_string_map(entry.get("env", {}), f"{where}.env", environ),
            cwd=_expand(cwd, f"{where}.cwd", environ),
            trusted=trusted,
            timeout=float(timeout),
        )
    url = entry["url"]
    if not isinstance(url, str):
        raise McpConfigError(f"{where}.url must be a string")
    url = _expand(url, f"{where}.url", environ)
    if not re.match(r"^https?://[^/\s]+", url):
        raise McpConfigError(f"{where}.url must be an http(s) URL, not {url!r}")
    for key in ("args", "env", "cwd"):
        if key in entry:
            raise McpConfigError(f'{where}.{key} is for stdio servers, and this one has a "url"')
    return McpServerConfig(
        name=name,
        url=url,
        headers=_string_map(entry.get("headers", {}), f"{where}.headers", environ),
        trusted=trusted,
        timeout=float(timeout),
    )


def parse_config(data: object, environ: Mapping[str, str] | None = None) -> list[McpServerConfig]:
    """The servers in a parsed MCP_CONFIG document, in file order; McpConfigError names what is wrong."""
    environ = os.environ if environ is None else environ
    if not isinstance(data, dict) or "mcpServers" not in data:
        raise McpConfigError('the file must be a JSON object with "mcpServers"')
    servers = data["mcpServers"]
    if not isinstance(servers, dict):
        raise McpConfigError('"mcpServers" must be an object of servers by name')
    found: list[McpServerConfig] = []
    names: dict[str, str] = {}
    for name, entry in servers.items():
        server = _server(name, entry, environ)
        if server is None:
            continue
        safe = _UNSAFE.sub("_", name)
        if safe in names:
            raise McpConfigError(
                f"mcpServers.{name} and mcpServers.{names[safe]} give the same tool prefix mcp__{safe}__: "
                "rename one"
            )
        names[safe] = name
        found.append(server)
    return found


def load_config(path: str, environ: Mapping[str, str] | None = None) -> list[McpServerConfig]:
    """Read and check MCP_CONFIG's file (empty path: no servers). Raises McpConfigError (one line)."""
    if not path:
        return []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise McpConfigError(f"{SETTING} names a file that cannot be read ({path}: {reason})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise McpConfigError(
            f"{SETTING} ({path}) is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    try:
        return parse_config(data, environ)
    except McpConfigError as exc:
        raise McpConfigError(f"{SETTING} ({path}): {exc}") from None


def config_problem(path: str) -> str:
    """For the start-up check: one line naming MCP_CONFIG and what is wrong, or "" when it is fine."""
    try:
        load_config(path)
    except McpConfigError as exc:
        return str(exc)
    return ""


# --- Names and results (pure) ----------------------------------------------------------------------


def _hashed(name: str, server: str, tool: str) -> str:
    digest = hashlib.sha256(f"{server}\x00{tool}".encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9]}_{digest}"


def tool_names(server: str, tools: list[str]) -> dict[str, str]:
    """The offered name of each of a server's tools: `mcp__<server>__<tool>`, with characters outside
    `[A-Za-z0-9_-]` as `_`. A name longer than 64 characters, or one that would clash with another tool's
    after the replacement, keeps a prefix and ends in a hash of the original names: the same inputs always
    give the same names, whatever order the server lists them in."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    plain = {tool: f"mcp__{_UNSAFE.sub('_', server)}__{_UNSAFE.sub('_', tool)}" for tool in tools}
    # A tool whose name needed no replacing keeps its plain name before any that did.
    for tool in sorted(set(tools), key=lambda t: (_UNSAFE.search(t) is not None, t)):
        name = plain[tool]
        if len(name) > MAX_NAME or name in taken:
            name = _hashed(name, server, tool)
        names[tool] = name
        taken.add(name)
    return names


def _size(data: str) -> str:
    size = len(data) * 3 // 4  # base64
    return f"{size / 1024:.1f} kB" if size >= 1024 else f"{size} bytes"


def _block_text(block: Any, sources: list[str]) -> str:
    """One content block as text: text as is, images/audio/resources summarised."""
    kind = getattr(block, "type", "")
    if kind == "text":
        return str(block.text)
    if kind in ("image", "audio"):
        return f"[{kind}: {block.mime_type}, {_size(block.data)}]"
    if kind == "resource":
        resource = block.resource
        mime = getattr(resource, "mime_type", None) or "unknown type"
        text = getattr(resource, "text", None)
        if text is not None:
            return f"[resource {resource.uri} ({mime})]\n{text}"
        return f"[resource {resource.uri}: {mime}, {_size(getattr(resource, 'blob', ''))}]"
    if kind == "resource_link":
        uri = str(block.uri)
        if uri.startswith(("http://", "https://")):
            sources.append(uri)
        label = getattr(block, "title", None) or getattr(block, "name", None) or uri
        return f"[link: {label} <{uri}>]" if label != uri else f"[link: <{uri}>]"
    return f"[{kind or 'unknown'} content]"


def to_result(result: CallToolResult, title: str = "") -> ToolResult:
    """A tools/call result as a ToolResult: text joined, the rest summarised, isError -> ok=False."""
    sources: list[str] = []
    parts = [_block_text(block, sources) for block in result.content]
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(parts)
    if result.is_error:
        return ToolResult(text=text or "The tool reported an error.", ok=False, title=title)
    return ToolResult(text=text or "(no output)", title=title, sources=tuple(dict.fromkeys(sources)))


def _describe(exc: BaseException) -> str:
    """The first real error inside (possibly nested) exception groups, as one short line."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = next((e for e in exc.exceptions if isinstance(e, _Lost)), exc.exceptions[0])
    if isinstance(exc, _Lost):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and message:
        text = message
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- The tools --------------------------------------------------------------------------------------


@dataclass(eq=False)
class McpTool:
    """One tool of one MCP server, as a bot.tools.base.Tool."""

    name: str
    description: str
    parameters: dict[str, Any]
    read_only: bool  # the server's annotation says readOnlyHint: true
    trusted: bool  # the server is marked "trusted": write tools run without the asker's approval
    server: str
    remote_name: str  # the tool's own name on its server
    display: str
    timeout: float  # seconds one call may take (the server's "timeout"; default 60)
    link: _ServerLink = field(repr=False)

    def title(self, args: dict[str, Any]) -> str:
        return f"Running {self.display} on {self.server}"

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        return await self.link.call(self, args)


def _parameters(schema: object) -> dict[str, Any]:
    if isinstance(schema, dict) and schema.get("type") == "object":
        return copy.deepcopy(schema)
    return {"type": "object", "properties": {}}


class _CallFailed(Exception):
    """A call the server never answered (connection lost, transport error): the sentence for the model."""


class _Lost(Exception):
    """The session is gone (closed, ping failed): reconnect."""


@dataclass(eq=False)
class _Job:
    tool: McpTool
    args: dict[str, Any]
    future: asyncio.Future[ToolResult]


class _ServerLink:
    """One server: its owner task, the session it holds, and the tools it currently offers."""

    def __init__(
        self,
        config: McpServerConfig,
        *,
        connect_timeout: float,
        ping_interval: float,
        backoff: tuple[float, float],
    ) -> None:
        self.config = config
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.backoff_base, self.backoff_max = backoff
        self.offered: list[McpTool] = []
        self.up = False
        self.settled = asyncio.Event()  # the first connection attempt has ended (connected or failed)
        self.connections = 0  # sessions attempted so far
        self.task: asyncio.Task[None] | None = None
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._scope: anyio.CancelScope | None = None  # the owner task's; close() cancels it
        self._closing = False
        self._up_since: float | None = None
        self._wake: anyio.Event | None = None
        self._lost_reason = ""
        self._relist = False

    # Called from any task.

    async def call(self, tool: McpTool, args: dict[str, Any]) -> ToolResult:
        """Hand the call to the owner task and wait for its answer (at most the server's timeout)."""
        title = tool.title(args)
        if not self.up:
            return ToolResult(
                text=f"not available: the MCP server {self.config.name!r} is not connected right now.",
                ok=False,
                title=title,
            )
        future: asyncio.Future[ToolResult] = asyncio.get_running_loop().create_future()
        self._jobs.put_nowait(_Job(tool, args, future))
        try:
            async with asyncio.timeout(self.config.timeout):
                return await future  # cancelling this wait (timeout, Stop) cancels the call too
        except TimeoutError:
            log.warning(
                "mcp tool call timed out",
                extra={"server": self.config.name, "tool": tool.remote_name, "limit_s": self.config.timeout},
            )
            return ToolResult(
                text=f"{tool.remote_name} on MCP server {self.config.name!r} did not answer within "
                f"{self.config.timeout:g} s.",
                ok=False,
                title=title,
            )
        except _CallFailed as exc:
            return ToolResult(text=str(exc), ok=False, title=title)

    def close(self) -> None:
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()

    # The owner task: everything below runs in it (or in task groups it entered).

    async def own(self) -> None:
        attempt = 0
        with anyio.CancelScope() as self._scope:
            if self._closing:
                self._scope.cancel()
            while True:
                self.connections += 1
                self._up_since = None
                try:
                    await self._session()
                    reason = self._lost_reason or "the connection closed"
                except Exception as exc:
                    reason = _describe(exc)
                finally:
                    self._down()
                self.settled.set()
                if self._up_since is not None and anyio.current_time() - self._up_since >= STABLE_AFTER:
                    attempt = 0  # it worked for a good while: start the backoff again
                delay = min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.8, 1.2)
                attempt += 1
                log.warning(
                    "mcp server unavailable; its tools are left out until it is back",
                    extra={
                        "server": self.config.name,
                        "transport": self.config.transport,
                        "error": reason,
                        "retry_in_s": round(delay, 2),
                    },
                )
                self._lost_reason = ""
                await anyio.sleep(delay)

    def _down(self) -> None:
        self.up = False
        self.offered = []
        while not self._jobs.empty():
            job = self._jobs.get_nowait()
            if not job.future.done():
                job.future.set_exception(self._failure())

    def _failure(self) -> _CallFailed:
        return _CallFailed(
            f"The MCP server {self.config.name!r} went away before it answered; it may not have run the call."
        )

    async def _session(self) -> None:
        """One connection, from spawning or reaching the server to losing it. The side task group holds
        the message relay and the stderr reader; they get a second to finish after the transport closes,
        so a server that exits at once still has its last words logged."""
        error: Exception | None = None
        async with anyio.create_task_group() as side:
            try:
                async with self._transport(side) as (read, write):
                    await self._serve(read, write, side)
            except Exception as exc:
                error = exc
            side.cancel_scope.deadline = anyio.current_time() + 1.0
        if error is not None:
            raise error

    async def _serve(self, read: Any, write: Any, side: anyio.abc.TaskGroup) -> None:
        from mcp import ClientSession

        inbound_send, inbound = anyio.create_memory_object_stream[Any](0)
        side.start_soon(self._relay, read, inbound_send)
        async with ClientSession(inbound, write, message_handler=self._on_message) as session:
            with anyio.fail_after(self.connect_timeout):
                init = await session.initialize()
                offer = await self._list(session) if init.capabilities.tools is not None else []
            self.offered = offer
            self.up = True
            self._up_since = anyio.current_time()
            self.settled.set()
            log.info(
                "mcp server connected",
                extra={
                    "server": self.config.name,
                    "transport": self.config.transport,
                    "tools": [tool.name for tool in offer],
                },
            )
            async with anyio.create_task_group() as calls:
                calls.start_soon(self._take_calls, session, calls)
                await self._watch(session)

    @contextlib.asynccontextmanager
    async def _transport(self, side: anyio.abc.TaskGroup) -> AsyncIterator[Any]:
        config = self.config
        if config.url:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            # A response may stream for a while (the SDK's default read timeout is 300 s).
            timeout = httpx2.Timeout(self.connect_timeout, read=max(300.0, config.timeout + 5))
            client = httpx2.AsyncClient(headers=dict(config.headers), timeout=timeout)
            async with client, streamable_http_client(config.url, http_client=client) as streams:
                yield streams
            return
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        params = StdioServerParameters(
            command=config.command,
            args=list(config.args),
            env=dict(config.env) or None,
            cwd=config.cwd or None,
        )
        read_fd, write_fd = os.pipe()
        errlog = os.fdopen(write_fd, "w")
        side.start_soon(self._log_stderr, read_fd)
        try:
            async with stdio_client(params, errlog=errlog) as streams:
                errlog.close()  # the server holds its own copy: the reader sees EOF when the server exits
                yield streams
        finally:
            errlog.close()

    async def _log_stderr(self, fd: int) -> None:
        """The server's stderr, one log line per line (our own stderr carries JSON lines only)."""
        pipe = os.fdopen(fd, "rb", 0)
        try:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=1 << 20)
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        except BaseException:
            pipe.close()
            raise
        try:
            while line := await reader.readline():
                log.info(
                    "mcp server stderr",
                    extra={
                        "server": self.config.name,
                        "line": line.decode("utf-8", "replace").rstrip()[:STDERR_LINE_LIMIT],
                    },
                )
        except ValueError:  # a line over the reader's limit: stop relaying rather than fail the session
            pass
        finally:
            transport.close()

    async def _relay(self, read: Any, inbound: anyio.abc.ObjectSendStream[Any]) -> None:
        """Pass the transport's messages to the session, and notice when the transport ends (a stdio
        server that exited): the owner then reconnects at once instead of at the next ping."""
        try:
            async with inbound:
                async for item in read:
                    await inbound.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        self._lost("the server closed the connection")

    def _lost(self, reason: str) -> None:
        if not self._lost_reason:
            self._lost_reason = reason
        if self._wake is not None:
            self._wake.set()

    async def _on_message(self, message: IncomingMessage) -> None:
        if getattr(message, "method", "") == "notifications/tools/list_changed":
            self._relist = True
            if self._wake is not None:
                self._wake.set()

    async def _list(self, session: ClientSession) -> list[McpTool]:
        from mcp_types import PaginatedRequestParams

        listed: list[RemoteTool] = []
        cursor: str | None = None
        for _ in range(MAX_TOOL_PAGES):
            page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
            listed.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return self._wrap(listed)

    def _wrap(self, listed: list[RemoteTool]) -> list[McpTool]:
        names = tool_names(self.config.name, [tool.name for tool in listed])
        offer: list[McpTool] = []
        seen: set[str] = set()
        for tool in sorted(listed, key=lambda t: t.name):
            if tool.name in seen:
                log.warning("mcp tool listed twice", extra={"server": self.config.name, "tool": tool.name})
                continue
            seen.add(tool.name)
            annotations = tool.annotations
            offer.append(
                McpTool(
                    name=names[tool.name],
                    description=tool.description or tool.title or tool.name,
                    parameters=_parameters(tool.input_schema),
                    read_only=bool(annotations is not None and annotations.read_only_hint is True),
                    trusted=self.config.trusted,
                    server=self.config.name,
                    remote_name=tool.name,
                    display=tool.title or (annotations.title if annotations else None) or tool.name,
                    timeout=self.config.timeout,
                    link=self,
                )
            )
        return offer

    async def _watch(self, session: ClientSession) -> None:
        """Until the session is lost: a ping every ping_interval (or at once after a failed call), and a
        new tool listing when the server says its tools changed. Raises _Lost, which ends the session."""
        while True:
            self._wake = anyio.Event()
            if not self._lost_reason:
                with anyio.move_on_after(self.ping_interval):
                    await self._wake.wait()
            if self._lost_reason:
                raise _Lost(self._lost_reason)
            try:
                with anyio.fail_after(self.connect_timeout):
                    if self._relist:
                        self._relist = False
                        self.offered = await self._list(session)
                        log.info(
                            "mcp server tools changed",
                            extra={"server": self.config.name, "tools": [t.name for t in self.offered]},
                        )
                    else:
                        await session.send_ping()
            except Exception as exc:
                self._lost(f"no answer to a ping: {_describe(exc)}")

    async def _take_calls(self, session: ClientSession, calls: anyio.abc.TaskGroup) -> None:
        while True:
            job = await self._jobs.get()
            calls.start_soon(self._call, session, job)

    async def _call(self, session: ClientSession, job: _Job) -> None:
        if job.future.done():  # the caller gave up (timed out, stopped) before it started
            return
        scope = anyio.CancelScope()

        def cancel(_future: asyncio.Future[ToolResult]) -> None:
            scope.cancel()  # the caller stopped waiting (timeout, Stop): abandon the call

        job.future.add_done_callback(cancel)
        try:
            with scope:
                result = await session.call_tool(
                    job.tool.remote_name, job.args, read_timeout_seconds=self.config.timeout + 1
                )
                if not job.future.done():
                    job.future.set_result(to_result(result, job.tool.title(job.args)))
        except Exception as exc:
            log.warning(
                "mcp tool call failed",
                extra={"server": self.config.name, "tool": job.tool.remote_name, "error": _describe(exc)},
            )
            if not job.future.done():
                job.future.set_exception(
                    _CallFailed(f"The MCP server {self.config.name!r} failed the call: {_describe(exc)}")
                )
            if self._wake is not None:
                self._wake.set()  # check the session now rather than at the next ping
        finally:
            job.future.remove_done_callback(cancel)
            if not job.future.done():
                job.future.set_exception(self._failure())


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("mcp server owner task failed", extra={"task": task.get_name()}, exc_info=task.exception())


class McpTools:
    """Every configured MCP server's tools: `start()` once at start-up, `tools()` per request, `close()`
    at shutdown."""

    def __init__(
        self,
        servers: list[McpServerConfig],
        *,
        connect_timeout: float = 10.0,
        ping_interval: float = 30.0,
        backoff: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        self._links = [
            _ServerLink(server, connect_timeout=connect_timeout, ping_interval=ping_interval, backoff=backoff)
            for server in servers
        ]
        self.connect_timeout = connect_timeout

    @classmethod
    def from_file(cls, path: str, **options: Any) -> McpTools:
        """From MCP_CONFIG's path (empty: no servers). Raises McpConfigError."""
        return cls(load_config(path), **options)

    async def start(self) -> None:
        """One owner task per server; returns once each server has connected or failed its first attempt
        (at most the connect timeout and a little). Never raises: a server that is down is logged and
        retried in the background, its tools offered once it is up."""
        for link in self._links:
            if link.task is None:
                link.task = asyncio.create_task(link.own(), name=f"mcp:{link.config.name}")
                link.task.add_done_callback(_log_crash)
        waits = [asyncio.create_task(link.settled.wait()) for link in self._links]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.connect_timeout + 2)
            for wait in pending:
                wait.cancel()

    def tools(self) -> list[Tool]:
        """The tools of the servers connected now, by server name then tool name: byte-stable between
        requests while the servers' listings stay the same."""
        found: list[McpTool] = []
        for link in sorted(self._links, key=lambda link: link.config.name):
            if link.up:
                found.extend(sorted(link.offered, key=lambda tool: tool.remote_name))
        return list[Tool](found)

    def status(self) -> dict[str, bool]:
        """Server name -> connected now."""
        return {link.config.name: link.up for link in self._links}

    async def close(self) -> None:
        """End every session (a stdio server: stdin closed, then SIGTERM, then SIGKILL); at most ~10 s."""
        tasks = [link.task for link in self._links if link.task is not None]
        for link in self._links:
            link.close()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=8.0)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("mcp servers did not close in time", extra={"count": len(pending)})
                await asyncio.wait(pending, timeout=2.0)
        for link in self._links:
            link.task = None
            link._down()
