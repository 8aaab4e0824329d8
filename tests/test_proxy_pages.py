"""Slack calls answered by something in front of Slack (an Envoy 503, a corporate proxy's HTML 403,
a load balancer's 404/405 text): no job dies of it. The answer goes out without the nicety that
failed, or the user gets one sentence with a reference id."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.reply import describe, slack_error
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import TOKEN, FakeSlack
from tests.slack_requests import ALICE, CHANNEL, mention

REF = re.compile(r"\(ref `[0-9a-f]{8}`\)")
LONG = "\n\n".join(f"Paragraph {i}: " + "lorem ipsum dolor sit amet " * 12 for i in range(12))

# (status, body, Content-Type) as proxies and load balancers really answer.
PAGES: dict[str, tuple[int, str | bytes, str]] = {
    "envoy-503": (
        503,
        "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
        "text/plain",
    ),
    "html-403": (
        403,
        "<!DOCTYPE html><html><head><title>Access denied</title></head>"
        "<body><h1>Blocked by corporate proxy</h1></body></html>",
        "text/html",
    ),
    "html-502": (502, "<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>", "text/html"),
    "text-404": (404, "404 page not found", "text/plain"),
    "text-405": (405, "Method Not Allowed", "text/plain"),
    "empty-504": (504, "", "text/plain"),
    "html-as-json-500": (500, "<html><body>Internal Server Error</body></html>", "application/json"),
    "text-200": (200, "OK", "text/plain"),
    "binary-502": (502, b"\x1f\x8b\x08\x00garbage", "application/gzip"),
}
STATUSES_RETRIED = (500, 503)  # slack_sdk's AsyncServerErrorRetryHandler; the bot allows two retries


def attempts(page: tuple[int, str | bytes, str]) -> int:
    """How many requests one call of the bot makes when every one of them gets this page: slack_sdk
    retries 500 and 503, except a body it fails to parse as the JSON its Content-Type promised."""
    status, _, content_type = page
    return 3 if status in STATUSES_RETRIED and content_type != "application/json" else 1


@pytest.fixture(params=list(PAGES), ids=list(PAGES))
def page(request: pytest.FixtureRequest) -> tuple[int, str | bytes, str]:
    return PAGES[request.param]


async def test_what_slack_sdk_raises_for_a_proxy_page_is_read_without_a_second_error(
    fake_slack: FakeSlack, page: tuple[int, str | bytes, str]
) -> None:
    """slack_sdk 3.48 raises SlackApiError whose `response` holds a str, bytes, {} or an aiohttp
    response, or (200 with text) an AttributeError of its own: slack_error/describe read them all."""
    status, body, content_type = page
    fake_slack.fail_raw("users.info", status, body, content_type)
    client = AsyncWebClient(token=TOKEN, base_url=fake_slack.api_url)  # no retry handlers: one request
    with pytest.raises(Exception) as caught:
        await client.users_info(user=ALICE)
    code = describe(caught.value)
    assert slack_error(caught.value) in (f"http_{status}", "unknown_error")
    if isinstance(body, bytes):  # slack_sdk fails formatting its own SlackApiError
        assert code == "ValueError"
    elif status != 200:
        assert code == f"http_{status}"
    else:  # 200 with a text body: slack_sdk's validate() calls .get on the str
        assert code == "AttributeError"


@pytest.mark.parametrize(
    "response",
    [None, "text", b"bytes", {}, {"ok": False, "error": "not_in_channel"}, 42],
    ids=["none", "str", "bytes", "empty", "slack-json", "odd"],
)
def test_slack_error_reads_any_response_body(response: Any) -> None:
    from slack_sdk.errors import SlackApiError

    code = slack_error(SlackApiError("failed", response))  # type: ignore[no-untyped-call]
    assert code == ("not_in_channel" if isinstance(response, dict) and response else "unknown_error")


async def ask(bot: BotHarness, ts: str, text: str = "question", **kwargs: Any) -> None:
    await bot.send_event(mention(text, ts, **kwargs))
    await bot.settle()


def job_crashes(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Log records of a job that died outside the pipeline's own failure handling."""
    return [r for r in caplog.records if r.getMessage() in ("job failed", "answer failed")]


def answered_or_told(fake_slack: FakeSlack, ts: str, answer: str) -> str:
    """The thread holds exactly one reply: the answer, or one sentence with a reference id."""
    bodies = fake_slack.bodies(CHANNEL, ts)
    assert len(bodies) == 1, bodies
    assert answer in bodies[0] or REF.search(bodies[0]), bodies[0]
    return bodies[0]


async def test_users_info_behind_a_proxy_page_still_gets_an_answer(
    bot: BotHarness,
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    page: tuple[int, str | bytes, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, body, content_type = page
    fake_slack.fail_raw("users.info", status, body, content_type, times=attempts(page))
    with caplog.at_level(logging.INFO):
        await ask(bot, "1700000030.000100", "who am I?")
    assert fake_kimi.requests[0]["messages"][-1]["content"] == f"{ALICE}: who am I?"  # the id, not a name
    assert answered_or_told(fake_slack, "1700000030.000100", "You said").startswith("You said")
    assert not job_crashes(caplog)


async def test_backfill_behind_a_proxy_page_answers_without_earlier_messages(
    bot: BotHarness,
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    page: tuple[int, str | bytes, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, body, content_type = page
    thread = fake_slack.seed(CHANNEL, user=ALICE, text="an earlier message the bot never saw")
    fake_slack.fail_raw("conversations.replies", status, body, content_type, times=attempts(page))
    with caplog.at_level(logging.INFO):
        await ask(bot, "1760009999.000001", "what do you make of this?", thread_ts=thread)
    assert len(fake_kimi.requests) == 1
    assert "never saw" not in str(fake_kimi.requests[0]["messages"])
    assert answered_or_told(fake_slack, thread, "You said").startswith("You said")
    assert not job_crashes(caplog)


async def test_a_placeholder_refused_by_a_proxy_page_still_lets_the_answer_through(
    bot: BotHarness,
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    page: tuple[int, str | bytes, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, body, content_type = page
    fake_slack.fail_raw("chat.postMessage", status, body, content_type, times=attempts(page))
    fake_kimi.script(Reply(content="the answer itself"))
    with caplog.at_level(logging.INFO):
        await ask(bot, "1700000030.000300")
    text = answered_or_told(fake_slack, "1700000030.000300", "the answer itself")
    assert "the answer itself" in text
    assert not job_crashes(caplog)


async def test_a_stream_refused_by_a_proxy_page_falls_back_to_post_and_update(
    bot: BotHarness,
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    page: tuple[int, str | bytes, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, body, content_type = page
    fake_slack.fail_raw("chat.startStream", status, body, content_type, times=10 * attempts(page))
    fake_kimi.script(Reply(content=LONG, chunk_chars=200, chunk_delay=0.02))
    with caplog.at_level(logging.INFO):
        await ask(bot, "1700000030.000400")
    parts = fake_slack.answer_parts(CHANNEL, "1700000030.000400")
    assert "".join(parts).count("Paragraph") == LONG.count("Paragraph")  # all of it, nothing twice
    assert not job_crashes(caplog)
    assert fake_slack.problems == []


async def test_an_edit_refused_by_a_proxy_page_ends_in_one_sentence_with_a_reference(
    bot: BotHarness,
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    page: tuple[int, str | bytes, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The short answer replaces the placeholder with chat.update; when that one edit is refused, the
    user still hears back: the answer, or the failure sentence in its place."""
    status, body, content_type = page
    fake_slack.fail_raw("chat.update", status, body, content_type, times=attempts(page))
    fake_kimi.script(Reply(content="short answer"))
    with caplog.at_level(logging.INFO):
        await ask(bot, "1700000030.000500")
    answered_or_told(fake_slack, "1700000030.000500", "short answer")
    assert not [r for r in caplog.records if r.getMessage() == "job failed"]
    await ask(bot, "1700000030.000600")  # the bot goes on answering
    assert fake_slack.bodies(CHANNEL, "1700000030.000600")[0].startswith("You said")


async def test_every_edit_refused_ends_the_job_with_a_clear_log_line(
    bot: BotHarness,
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where even the failure sentence cannot be written, the job still ends (no crash, no hang),
    with the reference in the log, and the next question is answered."""
    fake_slack.fail_raw("chat.update", 403, "<html>Access denied</html>", "text/html", times=20)
    fake_slack.fail_raw("chat.postMessage", 403, "<html>Access denied</html>", "text/html", times=20)
    fake_slack.fail_raw("chat.startStream", 403, "<html>Access denied</html>", "text/html", times=20)
    fake_kimi.script(Reply(content="nobody will see this"))
    with caplog.at_level(logging.INFO):
        await ask(bot, "1700000030.000700")
    assert not [r for r in caplog.records if r.getMessage() == "job failed"]
    told = [r for r in caplog.records if getattr(r, "reference", None)]
    assert told, "the failure was not logged with a reference"
    fake_slack.raw_failures.clear()
    await ask(bot, "1700000030.000800")
    assert fake_slack.bodies(CHANNEL, "1700000030.000800")[0].startswith("You said")


async def test_kimi_command_whose_announcement_meets_a_proxy_page_answers_privately(
    bot: BotHarness,
    fake_slack: FakeSlack,
    page: tuple[int, str | bytes, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, body, content_type = page
    fake_slack.fail_raw("chat.postMessage", status, body, content_type, times=attempts(page))
    with caplog.at_level(logging.INFO):
        await bot.command("what is a proxy?")
        await bot.settle()
    assert not job_crashes(caplog)
    in_channel = fake_slack.posts(CHANNEL)
    answered_in_thread = in_channel and fake_slack.bodies(CHANNEL, in_channel[0]["_result"]["ts"])
    assert len(fake_slack.responses) == 1 or answered_in_thread
    if fake_slack.responses:
        assert "alice: what is a proxy?" in fake_slack.responses[0]["blocks"][0]["text"]
