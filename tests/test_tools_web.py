"""fetch_url (readable Markdown, paged, SSRF-guarded) against a local site, web_search through the fake
Kimi's formulas endpoint, and the built-in tool factory."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.settings import Settings
from bot.tools.base import ToolContext
from bot.tools.builtin import BUILTIN_NAMES, builtin_tools, load_web_search_definition
from bot.tools.registry import build_registry, cap_tool_result
from bot.tools.web import (
    WEB_SEARCH_FALLBACK,
    FetchUrl,
    FormulaError,
    WebSearch,
    fiber_result,
    readable_text,
)
from tests.fakes.kimi_api import API_KEY, FakeKimi, encrypted_output
from tests.test_tools_net import MapResolver

ARTICLE = """<!doctype html><html><head><title>Vendor status: all systems operational</title></head>
<body><nav><a href="/">Home</a> | <a href="/pricing">Pricing</a></nav>
<article><h1>Vendor status: all systems operational</h1>
<p>All systems are <b>operational</b> as of 05:00 UTC. The incident of 29 November (elevated API errors)
was resolved at 11:05 after a rollback of release 4.2.</p>
<h2>Components</h2><ul><li>API: operational</li><li>Dashboard: operational</li></ul>
<p>Details in the <a href="https://status.vendor.example/incidents/42">incident report</a>.</p>
</article><footer>© Vendor Inc. Cookie settings</footer></body></html>"""


def long_article() -> str:
    paragraphs = "".join(
        f"<p>Paragraph {n:03d}: " + "lorem ipsum dolor sit amet " * 8 + "</p>" for n in range(80)
    )
    head = "<html><head><title>Long read</title></head>"
    return f"{head}<body><article><h1>Long read</h1>{paragraphs}</article></body></html>"


@pytest.fixture
async def site() -> AsyncIterator[int]:
    async def article(request: web.Request) -> web.Response:
        return web.Response(text=ARTICLE, content_type="text/html")

    async def long(request: web.Request) -> web.Response:
        return web.Response(text=long_article(), content_type="text/html")

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG\r\n\x1a\n", content_type="image/png")

    async def data(request: web.Request) -> web.Response:
        return web.json_response({"status": "green", "components": 2})

    async def metadata_hop(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    app = web.Application()
    app.router.add_get("/status", article)
    app.router.add_get("/long", long)
    app.router.add_get("/logo.png", image)
    app.router.add_get("/api/status.json", data)
    app.router.add_get("/redirect", metadata_hop)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    yield server.port
    await server.close()


def fetcher(**kwargs: Any) -> FetchUrl:
    return FetchUrl(
        allowed_hosts=frozenset({"status.vendor.test"}),
        resolver=MapResolver({"status.vendor.test": "127.0.0.1", "evil.test": "127.0.0.1"}),
        **kwargs,
    )


CTX = ToolContext(team_id="T", user="U", channel="D", thread_ts="1.1", slack=None, redis=None)  # type: ignore[arg-type]


async def test_a_page_comes_back_as_readable_markdown(site: int) -> None:
    url = f"http://status.vendor.test:{site}/status"
    result = await fetcher().run({"url": url}, CTX)
    assert result.ok, result.text
    assert result.text.startswith(f"Contents of {url}:\n")
    assert "# Vendor status: all systems operational" in result.text
    assert "**operational**" in result.text
    assert "resolved at 11:05 after a rollback of release 4.2" in result.text
    assert "- API: operational" in result.text
    assert "[incident report](https://status.vendor.example/incidents/42)" in result.text
    assert "Cookie settings" not in result.text and "Pricing" not in result.text  # boilerplate gone
    assert result.sources == (url,)
    assert result.title == "Reading status.vendor.test"


async def test_a_long_page_is_paged_with_start_index(site: int) -> None:
    url = f"http://status.vendor.test:{site}/long"
    tool = fetcher(max_chars=3_000)
    first = await tool.run({"url": url}, CTX)
    assert "Paragraph 000" in first.text and "Paragraph 079" not in first.text
    assert "Call the fetch_url tool with a start_index of 3000 to get more content." in first.text
    second = await tool.run({"url": url, "start_index": 3000}, CTX)
    assert "Paragraph 000" not in second.text and "start_index of 6000" in second.text
    short = await tool.run({"url": url, "max_length": 500}, CTX)
    assert "start_index of 500" in short.text
    capped = await tool.run({"url": url, "max_length": 1_000_000}, CTX)
    assert "start_index of 3000" in capped.text  # never past the bot's cap


async def test_json_passes_through_and_images_are_refused(site: int) -> None:
    data = await fetcher().run({"url": f"http://status.vendor.test:{site}/api/status.json"}, CTX)
    assert data.ok and json.loads(data.text.split("\n", 1)[1]) == {"status": "green", "components": 2}
    image = await fetcher().run({"url": f"http://status.vendor.test:{site}/logo.png"}, CTX)
    assert not image.ok and "image/png is not text" in image.text


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:{port}/status", "loopback"),
        ("http://evil.test:{port}/status", "evil.test is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "unique local"),
        ("http://status.vendor.test:{port}/redirect", "169.254.169.254 is a link-local address"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
async def test_fetch_url_refuses_internal_addresses_as_a_plain_result(site: int, url: str, why: str) -> None:
    result = await fetcher().run({"url": url.format(port=site)}, CTX)
    assert not result.ok
    assert result.text.startswith("not allowed: ") and why in result.text


async def test_an_unreachable_page_is_a_plain_failure() -> None:
    result = await fetcher().run({"url": "http://nowhere.test/"}, CTX)
    assert not result.ok and result.text.startswith("could not fetch http://nowhere.test/")


def test_readable_text_handles_text_types_and_refuses_binary() -> None:
    assert readable_text(b"plain words", "text/plain", None, "u") == "plain words"
    assert readable_text("café".encode("latin-1"), "text/plain", "latin-1", "u") == "café"
    assert readable_text(b"%PDF-1.7", "application/pdf", None, "u") is None
    sniffed = readable_text(
        ARTICLE.encode(), "application/octet-stream", None, "https://status.vendor.example/"
    )
    assert sniffed is not None and "operational" in sniffed


# ---- web_search through the formulas endpoint ----------------------------------------------------


async def test_web_search_loads_the_formula_and_hands_back_encrypted_output_unchanged(
    fake_kimi: FakeKimi, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    definition = await load_web_search_definition(settings)
    assert definition is not None and definition["name"] == "web_search"
    assert definition["description"] == "用于信息检索的网络搜索"  # the formula's own, not the fallback
    tool = next(
        t for t in builtin_tools(settings, web_search_definition=definition) if t.name == "web_search"
    )
    assert tool.parameters["required"] == ["query"]
    result = await tool.run({"query": "vendor status page", "classes": ["all"]}, CTX)
    assert result.ok and result.verbatim
    sent = fake_kimi.fiber_requests[0]
    assert sent["uri"] == "moonshot/web-search:latest"
    assert sent["body"]["name"] == "web_search"
    assert isinstance(sent["body"]["arguments"], str)
    assert json.loads(sent["body"]["arguments"]) == {"query": "vendor status page", "classes": ["all"]}
    assert result.text == encrypted_output(sent["body"]["arguments"])
    assert cap_tool_result(result, 10) is result  # the loop's cap never cuts it
    assert result.title == "Searched the web for “vendor status page”"


async def test_web_search_failures(fake_kimi: FakeKimi, make_settings: Callable[..., Settings]) -> None:
    tool = WebSearch(base_url=fake_kimi.base_url, api_key=API_KEY)
    fake_kimi.fiber_replies.append((200, {"id": "f1", "status": "failed", "error": {"message": "quota"}}))
    failed = await tool.run({"query": "x"}, CTX)
    assert not failed.ok and failed.text == "web search failed (failed): quota" and not failed.verbatim
    fake_kimi.fiber_replies.append(
        (400, {"error": {"message": "bad arguments", "type": "invalid_request_error"}})
    )
    refused = await tool.run({"query": "x"}, CTX)
    assert not refused.ok and "bad arguments" in refused.text
    fake_kimi.fiber_replies.append((503, {"error": {"message": "overloaded", "type": "server_error"}}))
    with pytest.raises(FormulaError, match="HTTP 503"):  # an outage: the loop makes it an error result
        await tool.run({"query": "x"}, CTX)
    wrong_key = WebSearch(base_url=fake_kimi.base_url, api_key="sk-wrong")
    assert not (await wrong_key.run({"query": "x"}, CTX)).ok


def test_fiber_results_prefer_encrypted_output() -> None:
    assert fiber_result({"status": "succeeded", "context": {"encrypted_output": "E", "output": "O"}}) == (
        True,
        "E",
    )
    assert fiber_result({"status": "succeeded", "context": {"output": {"a": 1}}}) == (True, '{"a": 1}')
    assert fiber_result({"status": "succeeded", "context": {}})[0] is False


async def test_an_unreadable_formula_falls_back_to_the_built_in_definition(
    fake_kimi: FakeKimi, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(kimi_base_url=fake_kimi.url + "/nowhere")
    assert await load_web_search_definition(settings) is None
    tool = next(t for t in builtin_tools(settings) if t.name == "web_search")
    assert tool.description == WEB_SEARCH_FALLBACK["description"]


# ---- the factory -----------------------------------------------------------------------------------


async def test_builtin_tools_are_the_issues_seven_and_pass_the_registry_byte_stably(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    tools = builtin_tools(settings)
    assert tuple(t.name for t in tools) == BUILTIN_NAMES
    assert all(t.read_only for t in tools)
    registry = build_registry(tools)
    assert set(registry.names) == set(BUILTIN_NAMES)
    assert build_registry(builtin_tools(settings)).definitions_json() == registry.definitions_json()
    for tool, definition in zip(registry.tools, registry.definitions, strict=True):
        assert definition["function"]["parameters"] == tool.parameters, tool.name  # nothing to sanitise
        assert tool.title({}) and tool.description
    off = builtin_tools(make_settings(web_search_enabled=False, fetch_allowed_hosts="wiki.corp, *.intra"))
    assert "web_search" not in [t.name for t in off]
    fetch = next(t for t in off if isinstance(t, FetchUrl))
    assert fetch.allowed_hosts == frozenset({"wiki.corp", "*.intra"})
