"""A small MCP server for the tests, built with the official SDK (MCPServer, once FastMCP).

    python tests/fakes/mcp_server.py                  # stdio
    python tests/fakes/mcp_server.py http PORT        # streamable HTTP on 127.0.0.1:PORT, path /mcp

Tools: `echo` (read-only), `write_note` (no annotations: a write), `boom` (fails: isError), `media`
(text, an image, an embedded resource and a resource link), `slow` (sleeps), `pid` (the process id, so a
test can kill it), `env` (one environment variable), `grow` (adds a tool and sends
notifications/tools/list_changed), and two names that need mangling. In HTTP mode, when
FAKE_MCP_TOKEN is set, requests without `Authorization: Bearer <token>` get 401.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from mcp.types import EmbeddedResource, ResourceLink, TextResourceContents, ToolAnnotations

READ_ONLY = ToolAnnotations(read_only_hint=True)
LONG_NAME = "a_tool_whose_name_is_far_too_long_to_fit_in_sixty_four_characters_once_prefixed"


def build() -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer(name="fake", log_level="WARNING")

    @server.tool(annotations=READ_ONLY, description="Say the text back.")
    def echo(text: str) -> str:
        return f"echo: {text}"

    @server.tool(description="Write a note somewhere (a write: no read-only hint).")
    def write_note(note: str) -> str:
        return f"noted: {note}"

    @server.tool(annotations=READ_ONLY)
    def boom() -> str:
        raise ToolError("kaboom")

    @server.tool(annotations=READ_ONLY, structured_output=False)
    def media() -> list[Any]:
        return [
            "a caption",
            Image(data=b"\x89PNG fake", format="png"),
            EmbeddedResource(
                type="resource",
                resource=TextResourceContents(uri="file:///notes.txt", mime_type="text/plain", text="a note"),
            ),
            ResourceLink(type="resource_link", uri="https://example.com/report", name="report"),
        ]

    @server.tool(annotations=READ_ONLY)
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @server.tool(annotations=READ_ONLY)
    def pid() -> str:
        return str(os.getpid())

    @server.tool(annotations=READ_ONLY)
    def env(name: str) -> str:
        return os.environ.get(name, "<unset>")

    @server.tool(description="Add a tool named `name`, and tell the client the tool list changed.")
    async def grow(name: str, ctx: Context) -> str:
        server.add_tool(lambda: f"new {name}", name=name, annotations=READ_ONLY)
        await ctx.session.send_tool_list_changed()
        return "grown"

    def odd() -> str:
        return "odd"

    server.add_tool(odd, name="odd.name/with spaces", annotations=READ_ONLY)
    server.add_tool(odd, name=LONG_NAME, annotations=READ_ONLY)
    return server


def serve_http(server: MCPServer[Any], port: int) -> None:
    import uvicorn
    from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response

    app = server.streamable_http_app()
    token = os.environ.get("FAKE_MCP_TOKEN", "")

    async def check(request: Request, call_next: RequestResponseEndpoint) -> Response:
        if token and request.headers.get("authorization") != f"Bearer {token}":
            return PlainTextResponse("unauthorised", status_code=401)
        return await call_next(request)

    if token:
        app.add_middleware(BaseHTTPMiddleware, dispatch=check)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "http":
        serve_http(build(), int(sys.argv[2]))
    else:
        build().run()
