"""Kimi and Slack failures: retried when worth it, otherwise one plain sentence and a reference id."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import CHANNEL, mention, message, thread_key

REF = re.compile(r"\(ref `([0-9a-f]{8})`\)")


def thread_texts(fake_slack: FakeSlack, ts: str) -> list[str]:
    return fake_slack.bodies(CHANNEL, ts)


async def ask(bot: BotHarness, ts: str, text: str = "question") -> None:
    await bot.send_event(mention(text, ts))
    await bot.settle()


@pytest.mark.parametrize(
    "failure",
    [
        Reply(
            status=429,
            error_type="engine_overloaded_error",
            error_message="The engine is currently overloaded",
        ),
        Reply(
            status=429, error_type="rate_limit_reached_error", error_message="rate limit", retry_after=0.05
        ),
        Reply(status=500, error_type="server_error", error_message="boom"),
        Reply(status=503, error_type="server_unavailable", error_message="down"),
        Reply(cut_after_chunks=1, content="a long answer that will be cut after its first chunk " * 3),
        Reply(reset_after_chunks=1, content="an answer whose connection resets after its first chunk " * 3),
        Reply(
            error_in_stream={
                "message": "The engine is currently overloaded",
                "type": "engine_overloaded_error",
            }
        ),
        Reply(reasoning="thinking...", content="", finish_reason="stop", cut_after_chunks=0),
        Reply(garbage_in_stream=True),
    ],
    ids=[
        "overloaded",
        "rate-limited",
        "500",
        "503",
        "stream-cut",
        "connection-reset",
        "error-mid-stream",
        "reasoning-only",
        "garbled-chunk",
    ],
)
async def test_transient_kimi_failures_are_retried_and_answered_once(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, failure: Reply
) -> None:
    # Nothing is shown before the retry however slow the machine (the first chunk of a cut stream would
    # otherwise go out after FAST_PACE's 50 ms, and the answer start again below a note: other tests).
    bot.deps.pace = dataclasses.replace(bot.deps.pace, first_flush_s=60.0)
    fake_kimi.script(failure, Reply(content="the full answer"))
    await ask(bot, "1700000002.000100")
    texts = thread_texts(fake_slack, "1700000002.000100")
    assert len(texts) == 1
    assert texts[0].startswith("the full answer")
    assert len(fake_kimi.requests) == 2
    state = await bot.deps.threads.load(thread_key("1700000002.000100"))
    entries, _ = state.entries, state.meta
    assert [e["content"] for e in entries if e["role"] == "assistant"] == ["the full answer"]


@pytest.mark.parametrize(
    ("failure", "sentence"),
    [
        (
            Reply(
                status=429,
                error_type="exceeded_current_quota_error",
                error_message="Your account org<ak> is suspended, please check your plan and billing details",
            ),
            "run out of credit",
        ),
        (
            Reply(
                status=401, error_type="invalid_authentication_error", error_message="Invalid Authentication"
            ),
            "MOONSHOT_API_KEY",
        ),
        (
            Reply(status=404, error_type="resource_not_found_error", error_message="Not found the model"),
            "KIMI_MODEL",
        ),
        (
            Reply(status=400, error_type="content_filter", error_message="considered high risk"),
            "content filter",
        ),
        (
            Reply(status=400, error_type="invalid_request_error", error_message="invalid temperature"),
            "rejected",
        ),
    ],
    ids=["quota", "auth", "model", "content-filter", "bad-request"],
)
async def test_final_kimi_failures_are_not_retried_and_explained_plainly(
    bot: BotHarness,
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    failure: Reply,
    sentence: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake_kimi.script(failure)
    with caplog.at_level(logging.INFO):
        await ask(bot, "1700000002.000200")
    assert len(fake_kimi.requests) == 1
    texts = thread_texts(fake_slack, "1700000002.000200")
    assert len(texts) == 1 and sentence in texts[0]
    reference = REF.search(texts[0])
    assert reference, texts[0]
    assert failure.error_message not in texts[0]  # never the raw error
    logged = [r for r in caplog.records if getattr(r, "reference", None) == reference.group(1)]
    assert logged and failure.error_message in logged[0].detail  # type: ignore[attr-defined]


async def test_retries_that_run_out_end_in_a_friendly_message_and_the_question_is_kept(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_kimi.script(*[Reply(status=500, error_type="server_error", error_message="Traceback: boom")] * 4)
    await ask(bot, "1700000002.000300", "an important question")
    texts = thread_texts(fake_slack, "1700000002.000300")
    assert len(texts) == 1
    assert "couldn't reach Kimi" in texts[0] and REF.search(texts[0])
    assert "Traceback" not in texts[0] and "boom" not in texts[0]
    assert len(fake_kimi.requests) == bot.settings.kimi_max_attempts
    # Nothing lost: the question is in the thread's history and the next turn sees it.
    await bot.send_event(message("did you get it?", "1700000002.000301", thread_ts="1700000002.000300"))
    await bot.settle()
    contents = [m["content"] for m in fake_kimi.requests[-1]["messages"]]
    assert "alice: an important question" in contents


async def test_thinking_that_uses_the_whole_budget_says_so(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_kimi.script(Reply(content="", finish_reason="length"))
    await ask(bot, "1700000002.000400")
    texts = thread_texts(fake_slack, "1700000002.000400")
    assert len(texts) == 1 and "output budget thinking" in texts[0]


async def test_a_placeholder_shows_at_once_and_is_replaced_by_the_answer_or_the_error(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_kimi.script(
        Reply(content="fine answer"), Reply(status=401, error_type="invalid_authentication_error")
    )
    await ask(bot, "1700000002.000500")
    await ask(bot, "1700000002.000600")
    placeholders = [c for c in fake_slack.calls_of("chat.postMessage") if c.args.get("text") == "Thinking…"]
    assert len(placeholders) == 2
    answers = [c for c in fake_slack.calls_of("chat.update") if c.args.get("text") != "Thinking…"]
    assert placeholders[0].at < answers[0].at and placeholders[1].at < answers[1].at
    answered, failed = (
        fake_slack.bodies(CHANNEL, "1700000002.000500"),
        fake_slack.bodies(CHANNEL, "1700000002.000600"),
    )
    assert len(answered) == 1 and answered[0].startswith("fine answer") and "Thinking" not in answered[0]
    assert len(failed) == 1 and "MOONSHOT_API_KEY" in failed[0] and "Thinking" not in failed[0]


async def test_slack_rate_limit_on_post_is_waited_out(bot: BotHarness, fake_slack: FakeSlack) -> None:
    fake_slack.fail("chat.postMessage", status=429, retry_after=1)
    await ask(bot, "1700000002.000700")
    texts = thread_texts(fake_slack, "1700000002.000700")
    assert len(texts) == 1 and "You said" in texts[0]
    assert bot.deps.metrics.snapshot()["slack_429s_by_method"] == {"chat.postMessage": 1}


async def test_slack_server_errors_are_retried(bot: BotHarness, fake_slack: FakeSlack) -> None:
    fake_slack.fail("chat.postMessage", status=503)
    await ask(bot, "1700000002.000800")
    assert len(thread_texts(fake_slack, "1700000002.000800")) == 1


async def test_slack_refusing_every_write_does_not_crash_the_bot(
    bot: BotHarness, fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    for method in ("chat.postMessage", "chat.startStream", "chat.update"):
        fake_slack.fail(method, "is_archived", times=2)
    with caplog.at_level(logging.WARNING):
        await ask(bot, "1700000002.000900")
    assert any(
        getattr(r, "reference", None) for r in caplog.records
    )  # the failure is logged with its reference
    await ask(bot, "1700000002.001000")  # the next question is answered normally
    assert len(thread_texts(fake_slack, "1700000002.001000")) == 1


async def test_unknown_users_fall_back_to_their_id(bot: BotHarness, fake_kimi: FakeKimi) -> None:
    await bot.send_event(mention("who am I?", "1700000002.001100", user="U0STRANGER"))
    await bot.settle()
    assert fake_kimi.requests[0]["messages"][-1]["content"] == "U0STRANGER: who am I?"


async def test_wrong_api_key_is_reported_as_auth(make_bot: Callable[..., Any], fake_slack: FakeSlack) -> None:
    bad: BotHarness = await make_bot(moonshot_api_key="sk-wrong")
    await ask(bad, "1700000002.001200")
    texts = thread_texts(fake_slack, "1700000002.001200")
    assert len(texts) == 1 and "MOONSHOT_API_KEY" in texts[0]


async def test_when_retries_run_out_a_retry_button_asks_again(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from bot.slack.blocks import ACTION_RETRY

    fake_kimi.script(
        *[Reply(status=429, error_type="engine_overloaded_error", error_message="busy")] * 4,
        Reply(content="Here it is after all."),
    )
    await ask(bot, "1700000002.001300", "the question")
    failed = fake_slack.replies(CHANNEL, "1700000002.001300")
    assert len(failed) == 1 and "overloaded" in FakeSlack.body_of(failed[0]) + str(failed[0]["blocks"])
    status, _ = await bot.click(failed[0], ACTION_RETRY)
    assert status == 200
    await bot.settle()
    bodies = thread_texts(fake_slack, "1700000002.001300")
    assert bodies[-1].startswith("Here it is after all.")
    assert fake_kimi.requests[-1]["messages"][-1]["content"] == "alice: the question"


async def test_quota_failures_have_no_retry_button(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_kimi.script(Reply(status=429, error_type="exceeded_current_quota_error", error_message="suspended"))
    await ask(bot, "1700000002.001400")
    message = fake_slack.replies(CHANNEL, "1700000002.001400")[0]
    assert not [b for b in message["blocks"] if b["type"] == "actions"]
