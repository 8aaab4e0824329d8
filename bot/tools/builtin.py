"""The built-in tools, built from the settings: what the agent loop offers besides MCP tools.

    tools = builtin_tools(settings)                                  # sync; web_search's fallback schema
    tools = builtin_tools(settings, web_search_definition=await load_web_search_definition(settings))

Order is the offer's priority when the registry must cut to 128 (the registry then sorts by name).
`slack_search` is in the list always and says per turn whether it is usable (`registry.offered`).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.abc import AbstractResolver

from bot.settings import Settings
from bot.tools.base import Tool
from bot.tools.net import parse_allowed_hosts
from bot.tools.slack import CurrentTime, SlackChannelHistory, SlackReadThread, SlackSearch, SlackUserInfo
from bot.tools.web import WEB_SEARCH_FORMULA, FetchUrl, FormulaError, WebSearch, load_formula_tools

log = logging.getLogger(__name__)

BUILTIN_NAMES = (
    "current_time",
    "slack_user_info",
    "slack_read_thread",
    "slack_channel_history",
    "slack_search",
    "web_search",
    "fetch_url",
)


async def load_web_search_definition(settings: Settings) -> dict[str, Any] | None:
    """The web-search formula's live definition (`GET {KIMI_BASE_URL}/formulas/.../tools`), or None (logged)
    when it cannot be read: `builtin_tools` then uses the built-in copy. Call it once per process."""
    if not settings.web_search_enabled:
        return None
    try:
        functions = await load_formula_tools(
            settings.kimi_base_url, settings.moonshot_api_key, WEB_SEARCH_FORMULA, timeout_s=15.0
        )
    except FormulaError as exc:
        log.warning(
            "web_search: formula definition not loaded; using the built-in one", extra={"error": str(exc)}
        )
        return None
    if not functions:
        log.warning("web_search: the formula lists no function; using the built-in definition")
        return None
    return functions[0]


PAGE_NOTE_ROOM = 1_000  # characters left under the loop's cap for a built-in tool's own paging note


def builtin_cap(loop_cap: int) -> int:
    return max(loop_cap - PAGE_NOTE_ROOM, loop_cap // 2)


def builtin_tools(
    settings: Settings,
    *,
    web_search_definition: dict[str, Any] | None = None,
    resolver: AbstractResolver | None = None,
) -> list[Tool]:
    """current_time, the Slack readers, web_search (when WEB_SEARCH_ENABLED) and fetch_url."""
    cache_s = settings.slack_access_cache_seconds
    # A few hundred characters below the loop's cap: a tool's own page and its note fit within it, so the
    # loop never pages a page again.
    cap = builtin_cap(settings.tool_result_max_chars)
    tools: list[Tool] = [
        CurrentTime(cache_s=cache_s, max_chars=cap),
        SlackUserInfo(cache_s=cache_s, max_chars=cap),
        SlackReadThread(cache_s=cache_s, max_chars=cap),
        SlackChannelHistory(cache_s=cache_s, max_chars=cap),
        SlackSearch(cache_s=cache_s, max_chars=cap),
    ]
    if settings.web_search_enabled:
        tools.append(
            WebSearch(
                base_url=settings.kimi_base_url,
                api_key=settings.moonshot_api_key,
                definition=web_search_definition,
                timeout_s=settings.tool_call_timeout,
            )
        )
    tools.append(
        FetchUrl(
            allowed_hosts=parse_allowed_hosts(settings.fetch_allowed_hosts),
            timeout_s=min(settings.tool_call_timeout, 30.0),
            max_bytes=settings.fetch_max_bytes,
            max_chars=cap,
            resolver=resolver,
        )
    )
    return tools
