"""What every tool is, whatever its family (Slack, web, MCP): the contract the agent loop runs against.

A tool gets its arguments (already parsed from the model's JSON) and a ToolContext saying who asked and
where the answer goes; it returns a ToolResult. A refusal (not allowed, not found, bad arguments) is a
ToolResult with `ok=False` and a plain sentence for the model, never an exception: exceptions are bugs or
outages, and the loop turns them into an error result itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from slack_sdk.web.async_client import AsyncWebClient


@dataclass(frozen=True)
class ToolContext:
    """Who is asking and where the answer will be read: the access rules need both."""

    team_id: str
    user: str  # the asker
    channel: str  # where the answer goes
    thread_ts: str
    slack: AsyncWebClient
    redis: Redis
    action_token: str = ""  # from the event, when Slack sends one (assistant.search.context)
    extra: dict[str, Any] = field(default_factory=dict)  # settings or clients a tool family needs


@dataclass(frozen=True)
class ToolResult:
    text: str  # what the model reads (the loop caps and pages it)
    ok: bool = True
    title: str = ""  # a short line for the live view, e.g. "Reading #incidents"
    sources: tuple[str, ...] = ()  # URLs (permalinks, web pages) shown with the task card
    # True: hand `text` to the model unchanged, never cap or page it (web_search's encrypted_output, which
    # only Moonshot can read, breaks if cut). Added for the built-in tools; default False.
    verbatim: bool = False


class Tool(Protocol):
    name: str  # ^[a-zA-Z_][a-zA-Z0-9_-]{2,63}$
    description: str
    parameters: dict[str, Any]  # JSON Schema (the subset Moonshot accepts; the registry sanitises)
    read_only: bool  # False: needs the asker's approval before it runs (unless its server is trusted)

    def title(self, args: dict[str, Any]) -> str:
        """A short present-tense line for the live view before the call finishes ("Searching the web")."""
        ...

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult: ...


class ConditionalTool(Tool, Protocol):
    """A tool offered only on some turns (added for the built-in tools; optional for every other tool).

    `registry.offered(tools, ctx)` keeps a tool without `usable` always, and one with it when it says so:
    `slack_search` is usable only when the event carried an `action_token`, which a bot token needs.
    """

    def usable(self, ctx: ToolContext) -> bool: ...
