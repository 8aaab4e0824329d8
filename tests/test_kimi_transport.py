"""The Kimi client's HTTP transport: the SDK's aiohttp one (bot/kimi/client.py openai_client), and what its
network failures are sorted into. The bot's own client (build_deps) against the fake Kimi over loopback."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.deps import Deps, build_deps
from bot.errors import AnswerError, Reason
from bot.kimi.client import KimiClient, verdict_for
from bot.settings import Settings
from tests.fakes.kimi_api import FakeKimi, Reply

QUESTION = [{"role": "user", "content": "alice: how are streams read?"}]
LONG = "An answer long enough to come in many chunks. " * 8


def causes(exc: BaseException) -> list[BaseException]:
    """exc and what raised it, down the chain."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def from_aiohttp(exc: BaseException) -> bool:
    return any(type(e).__module__.startswith("aiohttp") for e in causes(exc))


@pytest.fixture
async def deps(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Deps]]:
    """The bot's Deps (so its Kimi client) as build_deps makes them; closed after the test, which then
    checks that nothing was left open (aiohttp reports an unclosed session when it is collected)."""
    made: list[Deps] = []
    unclosed: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unclosed.append(context))

    def make(**overrides: Any) -> Deps:
        made.append(build_deps(make_settings(kimi_retry_base_delay=0.01, **overrides)))
        return made[-1]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield make
        for each in made:
            await each.close()
        gc.collect()
        await asyncio.sleep(0)
    assert unclosed == []
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


async def fails_from_aiohttp_then_is_retried(
    kimi: KimiClient, fake_kimi: FakeKimi, failing: Reply, recovering: Reply
) -> None:
    """With one attempt `failing` is an unavailable answer, raised from aiohttp (not httpx2's own transport)
    and worth another try; with two, `failing` then `recovering` gives the answer."""
    fake_kimi.script(failing)
    with pytest.raises(AnswerError) as failed:
        await kimi.complete(QUESTION)
    assert failed.value.reason is Reason.UNAVAILABLE
    assert failed.value.__cause__ is not None and from_aiohttp(failed.value.__cause__)
    assert verdict_for(failed.value.__cause__).retryable

    kimi.max_attempts = 2
    fake_kimi.script(failing, recovering)
    answer = await kimi.complete(QUESTION)
    assert answer.text == LONG and len(fake_kimi.requests) == 3


async def test_a_connection_dropped_mid_stream_is_read_through_aiohttp_and_retried(
    deps: Callable[..., Deps], fake_kimi: FakeKimi
) -> None:
    dropped = Reply(content=LONG, chunk_chars=20, reset_after_chunks=2)
    await fails_from_aiohttp_then_is_retried(
        deps(kimi_max_attempts=1).kimi, fake_kimi, dropped, Reply(content=LONG)
    )


async def test_a_stream_stalled_past_the_idle_timeout_is_read_through_aiohttp_and_retried(
    deps: Callable[..., Deps], fake_kimi: FakeKimi
) -> None:
    """KIMI_IDLE_TIMEOUT (read=) is the longest wait for the next byte: a stream that falls silent after
    its first event is given up and asked again; a slow one that keeps sending is not cut."""
    await fails_from_aiohttp_then_is_retried(
        deps(kimi_idle_timeout=0.4, kimi_max_attempts=1).kimi,
        fake_kimi,
        Reply(content=LONG, chunk_delay=5.0),  # silent after the first event
        Reply(content=LONG, chunk_chars=20, chunk_delay=0.05),  # longer than 0.4 s in all, never silent
    )


async def test_kimi_unreachable_is_retryable(deps: Callable[..., Deps]) -> None:
    kimi = deps(kimi_base_url="http://127.0.0.1:9/v1", kimi_max_attempts=2).kimi
    with pytest.raises(AnswerError) as failed:
        await kimi.complete(QUESTION)
    assert failed.value.reason is Reason.UNAVAILABLE
    assert failed.value.__cause__ is not None and from_aiohttp(failed.value.__cause__)


@pytest.mark.parametrize(
    ("status", "reason"), [(200, Reason.UNAVAILABLE), (502, Reason.UNAVAILABLE), (403, Reason.AUTH)]
)
async def test_a_proxy_page_instead_of_a_stream_is_sorted_as_before(
    deps: Callable[..., Deps], status: int, reason: Reason
) -> None:
    """An HTML page from something in front of Kimi: a 200 one is a stream with no answer (tried again), a
    5xx one Kimi unavailable, a 403 one an auth failure (as with httpx2's transport)."""

    async def page(_: web.Request) -> web.Response:
        body = "<html><body><h1>Access denied by the proxy</h1></body></html>"
        return web.Response(status=status, text=body, content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", page)
    proxy = TestServer(app, host="127.0.0.1")
    await proxy.start_server()
    try:
        kimi = deps(kimi_base_url=str(proxy.make_url("/v1")), kimi_max_attempts=1).kimi
        with pytest.raises(AnswerError) as failed:
            await kimi.complete(QUESTION)
        assert failed.value.reason is reason
    finally:
        await proxy.close()
