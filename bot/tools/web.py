"""The web tools: `fetch_url` (a page as readable Markdown, SSRF-guarded, paged) and `web_search` (Moonshot's
official web-search formula, which works with thinking on, unlike the `$web_search` builtin).

Moonshot's formulas ("official tools"): `GET {KIMI_BASE_URL}/formulas/{uri}/tools` gives the formula's
function definitions (`{"object": "list", "tools": [{"type": "function", "function": {...}}]}`);
`POST {KIMI_BASE_URL}/formulas/{uri}/fibers` with `{"name": <function name>, "arguments": <JSON string>}`
runs one call and answers `{"id", "status": "succeeded" | ..., "context": {"output" | "encrypted_output"}}`.
web-search answers in `context.encrypted_output`, an envelope only the model side can read: it goes back
to the model unchanged (`ToolResult.verbatim`), never cut or paged.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from bot.tools.base import ToolContext, ToolResult
from bot.tools.net import FetchFailed, FetchRefused, guarded_get
from bot.tools.registry import page_text

log = logging.getLogger(__name__)

WEB_SEARCH_FORMULA = "moonshot/web-search:latest"

# The web-search formula's own definition (as GET .../tools answered in 2026, description in English),
# used until (or unless) `load_formula_tools` fetched the live one.
WEB_SEARCH_FALLBACK: dict[str, Any] = {
    "name": "web_search",
    "description": "Search the web for information.",
    "parameters": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to search for."},
            "classes": {
                "type": "array",
                "description": "Search domains to focus on; 'all' when not given.",
                "items": {
                    "type": "string",
                    "enum": [
                        "all",
                        "academic",
                        "social",
                        "library",
                        "finance",
                        "code",
                        "ecommerce",
                        "medical",
                    ],
                },
            },
        },
        "required": ["query"],
    },
}

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})


# ---- fetch_url -----------------------------------------------------------------------------------


def readable_text(body: bytes, content_type: str, charset: str | None, url: str) -> str | None:
    """A page as Markdown (HTML via trafilatura), or the text itself for text, JSON and XML; None when
    the content type is not text (images, PDFs, archives...)."""
    text = body.decode(charset or "utf-8", errors="replace")
    kind = content_type.lower()
    # Imported on first use (this runs in a worker thread): with lxml, justext, htmldate and their data it
    # is ~9 MB of the bot's memory at rest, and many installs never fetch a page.
    import trafilatura

    if kind in HTML_TYPES or (kind in ("", "application/octet-stream") and "<html" in text[:2000].lower()):
        markdown = trafilatura.extract(
            text,
            url=url,
            output_format="markdown",
            include_links=True,
            include_tables=True,
            include_comments=False,
            favor_recall=True,
        )
        if not markdown:
            markdown = trafilatura.html2txt(text) or ""
        metadata = trafilatura.extract_metadata(text, default_url=url)
        title = metadata.title if metadata is not None and metadata.title else ""
        return (f"# {title}\n\n" if title and title not in markdown[:200] else "") + markdown.strip()
    if kind.startswith("text/") or kind.endswith(("json", "xml")) or kind in ("application/javascript",):
        return text
    return None


class FetchUrl:
    name = "fetch_url"
    description = (
        "Fetch a web page (http or https) and return its readable content as Markdown. Long pages come in "
        "parts: the note at the end of a part names the start_index that continues. Private and internal "
        "addresses are refused."
    )
    PARAMETERS: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "url": {"type": "string", "description": "The page's http(s) URL."},
            "start_index": {
                "type": "integer",
                "minimum": 0,
                "description": "Character offset to start from, to continue a page that was cut (default 0).",
            },
            "max_length": {
                "type": "integer",
                "minimum": 100,
                "description": "Most characters to return (default and upper bound: the bot's result cap).",
            },
        },
        "required": ["url"],
    }
    read_only = True

    def __init__(
        self,
        *,
        allowed_hosts: frozenset[str] = frozenset(),
        timeout_s: float = 20.0,
        max_bytes: int = 5_000_000,
        max_chars: int = 20_000,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.allowed_hosts = allowed_hosts
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_chars = max_chars
        self.resolver = resolver  # tests map names to addresses without DNS
        self.parameters: dict[str, Any] = copy.deepcopy(self.PARAMETERS)

    def title(self, args: dict[str, Any]) -> str:
        try:
            host = urlsplit(str(args.get("url") or "")).hostname
        except ValueError:
            host = None
        return f"Reading {host}" if host else "Reading a web page"

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        url = str(args.get("url") or "").strip()
        title = self.title(args)
        try:
            page = await guarded_get(
                url,
                allowed_hosts=self.allowed_hosts,
                timeout_s=self.timeout_s,
                max_bytes=self.max_bytes,
                resolver=self.resolver,
            )
        except FetchRefused as exc:
            return ToolResult(text=f"not allowed: {exc}", ok=False, title=title)
        except FetchFailed as exc:
            return ToolResult(text=f"could not fetch {url}: {exc}", ok=False, title=title)
        except ValueError as exc:
            return ToolResult(text=f"not a valid URL: {url!r} ({exc})", ok=False, title=title)
        text = await asyncio.to_thread(readable_text, page.body, page.content_type, page.charset, page.url)
        if text is None:
            return ToolResult(
                text=f"could not read {page.url}: its content type {page.content_type} is not text",
                ok=False,
                title=title,
                sources=(page.url,),
            )
        if page.truncated:
            text += f"\n\n[The page was larger than {self.max_bytes} bytes; only its beginning was read.]"
        try:
            start = max(0, int(args.get("start_index") or 0))
            length = int(args.get("max_length") or self.max_chars)
        except (TypeError, ValueError):
            start, length = 0, self.max_chars
        body = page_text(
            text, start_index=start, max_length=max(100, min(length, self.max_chars)), tool_name=self.name
        )
        return ToolResult(text=f"Contents of {page.url}:\n{body}", title=title, sources=(page.url,))


# ---- web_search (Moonshot's formula) -------------------------------------------------------------


class FormulaError(Exception):
    """The formulas endpoint failed (network, 5xx): an outage, left to the loop."""


def formulas_url(base_url: str, uri: str, what: str) -> str:
    return f"{base_url.rstrip('/')}/formulas/{uri}/{what}"


async def load_formula_tools(
    base_url: str, api_key: str, uri: str = WEB_SEARCH_FORMULA, *, timeout_s: float = 15.0
) -> list[dict[str, Any]]:
    """The formula's function definitions (`GET .../tools`): each `{"name", "description", "parameters"}`.
    FormulaError when the endpoint cannot be read."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(
                formulas_url(base_url, uri, "tools"), headers={"Authorization": f"Bearer {api_key}"}
            ) as response,
        ):
            if response.status != 200:
                raise FormulaError(f"GET formula tools for {uri}: HTTP {response.status}")
            payload = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        raise FormulaError(f"GET formula tools for {uri}: {exc or type(exc).__name__}") from exc
    functions = []
    for entry in payload.get("tools") or []:
        if (
            isinstance(entry, dict)
            and entry.get("type") == "function"
            and isinstance(entry.get("function"), dict)
        ):
            functions.append(dict(entry["function"]))
    return functions


def fiber_result(fiber: dict[str, Any]) -> tuple[bool, str]:
    """(ok, what the model reads) from a fiber answer: `context.encrypted_output` unchanged when there
    is one, else `context.output`; a failed fiber's error as a sentence."""
    status = str(fiber.get("status") or "unknown")
    context = fiber.get("context") or {}
    if status == "succeeded":
        output = context.get("encrypted_output")
        if output is None:
            output = context.get("output")
        if output is None:
            return False, "web search returned nothing"
        return True, output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
    error = fiber.get("error") or context.get("error") or {}
    detail = error.get("message") if isinstance(error, dict) else str(error)
    return False, f"web search failed ({status}){': ' + str(detail) if detail else ''}"


class WebSearch:
    read_only = True

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        definition: dict[str, Any] | None = None,
        uri: str = WEB_SEARCH_FORMULA,
        timeout_s: float = 60.0,
    ) -> None:
        spec = definition or WEB_SEARCH_FALLBACK
        self.formula_function = str(spec.get("name") or "web_search")
        self.name = "web_search"  # the name, whatever the formula calls its function
        self.description = str(spec.get("description") or WEB_SEARCH_FALLBACK["description"])
        self.parameters: dict[str, Any] = dict(spec.get("parameters") or WEB_SEARCH_FALLBACK["parameters"])
        self.base_url = base_url
        self.api_key = api_key
        self.uri = uri
        self.timeout_s = timeout_s

    def title(self, args: dict[str, Any]) -> str:
        query = str(args.get("query") or "").strip()
        return f"Searching the web for “{query[:60]}”" if query else "Searching the web"

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        title = self.title(args)
        body = {"name": self.formula_function, "arguments": json.dumps(args, ensure_ascii=False)}
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as session,
                session.post(
                    formulas_url(self.base_url, self.uri, "fibers"),
                    json=body,
                    headers={"Authorization": f"Bearer {self.api_key}"},
                ) as response,
            ):
                payload = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise FormulaError(f"web search unavailable: {exc or type(exc).__name__}") from exc
        if status >= 500 or status == 429:
            raise FormulaError(f"web search unavailable: HTTP {status}")
        if status != 200:
            error = payload.get("error") if isinstance(payload, dict) else None
            detail = error.get("message") if isinstance(error, dict) else error
            return ToolResult(
                text=f"web search refused the call: HTTP {status} {detail or ''}".strip(),
                ok=False,
                title=title,
            )
        ok, text = fiber_result(payload if isinstance(payload, dict) else {})
        return ToolResult(text=text, ok=ok, title=title.replace("Searching", "Searched", 1), verbatim=ok)
