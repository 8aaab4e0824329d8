"""The tools a worker offers: the built-ins (bot/tools/builtin.py) and the MCP servers' tools
(bot/tools/mcp.py). Started once per process (the web-search formula's definition is read, the MCP
servers connected), asked per turn (an MCP server that is down is simply not in the list), closed at
shutdown. `Deps.tools` holds one; without it, answers are single Kimi requests without tools."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from bot.settings import Settings
from bot.tools.base import Tool, ToolContext
from bot.tools.builtin import builtin_tools, load_web_search_definition
from bot.tools.mcp import McpTools

log = logging.getLogger(__name__)


class ToolBox:
    def __init__(
        self, settings: Settings, *, builtins: Sequence[Tool] | None = None, mcp: McpTools | None = None
    ) -> None:
        self.settings = settings
        self.builtins: list[Tool] = list(builtins) if builtins is not None else []
        self.mcp = mcp
        self.started = builtins is not None

    async def start(self) -> None:
        """Never raises for a tool family that cannot start: it is logged and left out."""
        if self.started:
            return
        self.started = True
        definition = await load_web_search_definition(self.settings)
        self.builtins = builtin_tools(self.settings, web_search_definition=definition)
        if self.settings.mcp_config and self.mcp is None:
            try:
                self.mcp = McpTools.from_file(self.settings.mcp_config)
            except Exception as exc:  # checked at start-up already; a file changed since is logged
                log.error(
                    "MCP_CONFIG unreadable; no MCP tools", extra={"error": f"{type(exc).__name__}: {exc}"}
                )
        if self.mcp is not None:
            await self.mcp.start()
        log.info(
            "tools ready",
            extra={
                "builtin": [t.name for t in self.builtins],
                "mcp_servers": self.mcp.status() if self.mcp is not None else {},
            },
        )

    async def __call__(self, ctx: ToolContext) -> list[Tool]:
        mcp = self.mcp.tools() if self.mcp is not None else []
        return [*self.builtins, *mcp]

    async def close(self) -> None:
        if self.mcp is not None:
            await self.mcp.close()
