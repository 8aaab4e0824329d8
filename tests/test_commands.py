"""/kimi: help, a question answered in the thread of "@user asked", and the off-channel fallback."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BotHarness
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE, CHANNEL


@pytest.mark.parametrize("text", ["", "help", "  HELP  "])
async def test_kimi_alone_or_help_shows_usage_privately(
    bot: BotHarness, fake_slack: FakeSlack, text: str
) -> None:
    status, body = await bot.command(text)
    assert status == 200
    reply = json.loads(body)
    assert reply["response_type"] == "ephemeral"
    assert "/kimi <question>" in reply["text"]
    await bot.settle()
    assert fake_slack.posts() == []


async def test_kimi_question_is_posted_and_answered_in_its_thread(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    status, body = await bot.command("What is the capital of France?")
    assert status == 200 and body == ""
    await bot.settle()
    asked = [p for p in fake_slack.posts(CHANNEL) if "thread_ts" not in p]
    assert len(asked) == 1
    assert asked[0]["text"] == f"<@{ALICE}> asked: What is the capital of France?"
    thread = asked[0]["_result"]["ts"]
    answers = fake_slack.bodies(CHANNEL, thread)
    assert len(answers) == 1
    assert "alice: What is the capital of France?" in answers[0]


async def test_follow_up_in_a_command_thread_is_answered_with_context(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    from tests.slack_requests import message

    await bot.command("Pick a colour")
    await bot.settle()
    thread = next(p for p in fake_slack.posts(CHANNEL) if "thread_ts" not in p)["_result"]["ts"]
    await bot.send_event(message("Why that one?", "1800000000.000001", thread_ts=thread))
    await bot.settle()
    answers = fake_slack.bodies(CHANNEL, thread)
    assert len(answers) == 2
    assert "I saw 4 messages" in answers[1]  # system, question, answer, follow-up


async def test_kimi_where_the_bot_is_not_a_member_answers_through_response_url(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    fake_slack.not_member_of.add("C0PRIVATE1")
    status, _ = await bot.command("secret question", channel="C0PRIVATE1")
    assert status == 200
    await bot.settle()
    assert fake_slack.posts("C0PRIVATE1") == []
    assert len(fake_slack.responses) == 1
    response = fake_slack.responses[0]
    assert response["response_type"] == "ephemeral"
    assert "alice: secret question" in response["blocks"][0]["text"]
    assert fake_slack.problems == []
