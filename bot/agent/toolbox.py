"""The tools a worker offers: the built-ins (bot/tools/builtin.py) and the MCP servers' tools
(bot/tools/mcp.py). Started once per process without holding up the start: the web-search formula's live
definition is read and the MCP servers connect in the background, while greetings and other jobs go on; the
first turns that ask for tools wait for that (bounded: a server that is down has had its first try by then),
so a turn resumed right after a restart is offered the same tools as before. Asked per turn (an MCP server
that is down is simply not in the list), closed at shutdown. `Deps.tools` holds one; without it, answers are
single Kimi requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from bot.settings import Settings
from bot.tools.base import Tool, ToolContext
from bot.tools.builtin import builtin_tools, load_web_search_definition
from bot.tools.mcp import McpTools

log = logging.getLogger(__name__)

WARM_UP_WAIT_S = (
    20.0  # the longest a turn waits for the tools' start (MCP connect ~12 s, formula 15 s at most)
)


class ToolBox:
    def __init__(
        self, settings: Settings, *, builtins: Sequence[Tool] | None = None, mcp: McpTools | None = None
    ) -> None:
        self.settings = settings
        self.builtins: list[Tool] = list(builtins) if builtins is not None else []
        self.mcp = mcp
        self.started = builtins is not None
        self._warming: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Offer the built-ins now; read the formula's definition and connect the MCP servers in the
        background (`ready()` waits for that). Never raises: a family that cannot start is logged."""
        if self.started:
            return
        self.started = True
        self.builtins = builtin_tools(self.settings)  # web_search with its built-in definition, for now
        self._warming = asyncio.create_task(self._warm_up(), name="tools-warm-up")

    async def ready(self) -> None:
        """Until the background start is done (tests; serve does not wait)."""
        if self._warming is not None:
            await asyncio.shield(self._warming)

    async def _warm_up(self) -> None:
        await asyncio.gather(self._load_web_search(), self._connect_mcp())
        log.info(
            "tools ready",
            extra={
                "builtin": [t.name for t in self.builtins],
                "mcp_servers": self.mcp.status() if self.mcp is not None else {},
            },
        )

    async def _load_web_search(self) -> None:
        try:
            definition = await load_web_search_definition(self.settings)
            if definition is not None:
                self.builtins = builtin_tools(self.settings, web_search_definition=definition)
        except Exception as exc:  # the built-in definition stays
            log.warning("web_search definition not loaded", extra={"error": f"{type(exc).__name__}: {exc}"})

    async def _connect_mcp(self) -> None:
        if self.settings.mcp_config and self.mcp is None:
            try:
                self.mcp = McpTools.from_file(self.settings.mcp_config)
            except Exception as exc:  # checked at start-up already; a file changed since is logged
                log.error(
                    "MCP_CONFIG unreadable; no MCP tools", extra={"error": f"{type(exc).__name__}: {exc}"}
                )
        if self.mcp is not None:
            await self.mcp.start()

    async def __call__(self, ctx: ToolContext) -> list[Tool]:
        if self._warming is not None and not self._warming.done():
            with contextlib.suppress(Exception):  # bounded; a turn never waits past this, nor fails for it
                async with asyncio.timeout(WARM_UP_WAIT_S):
                    await asyncio.shield(self._warming)
        mcp = self.mcp.tools() if self.mcp is not None else []
        return [*self.builtins, *mcp]

    async def close(self) -> None:
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._warming
        if self.mcp is not None:
            await self.mcp.close()
