"""/kimi: help, a question answered in the thread of "@user asked", and the off-channel fallback."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import BotHarness
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE, CHANNEL, command_body


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


async def test_a_kimi_question_posted_by_a_run_that_died_before_noting_it_is_not_posted_twice(
    make_bot: Any, fake_slack: FakeSlack
) -> None:
    from bot.slack.reply import announce_question
    from bot.work import command_thread

    fake_slack.add_conversation(CHANNEL, "general")
    bot: BotHarness = await make_bot(start_worker=False)
    assert (await bot.command("What is 2+2?"))[0] == 200
    thread, dead, job = await bot.claim_queued()
    assert thread == command_thread(job.data["command"])
    # The dead run: it said it was announcing, posted, and died before noting the message's ts.
    await dead.save_progress(job, announcing="1")
    trigger = job.data["command"]["trigger_id"]
    await announce_question(bot.deps.slack, CHANNEL, ALICE, "What is 2+2?", trigger)
    await bot.deps.redis.delete(f"kimibot:thread:{{{thread}}}:lease")
    await bot.deps.queue.notify(thread)
    bot.run_worker()
    await bot.settle()
    asked = [p for p in fake_slack.posts(CHANNEL) if "thread_ts" not in p]
    assert len(asked) == 1  # found again, not posted twice
    answers = fake_slack.bodies(CHANNEL, asked[0]["_result"]["ts"])
    assert len(answers) == 1 and "What is 2+2?" in answers[0]


async def test_a_redelivered_kimi_command_is_answered_once(bot: BotHarness, fake_slack: FakeSlack) -> None:
    from tests.slack_requests import command_body

    body = command_body("once please", response_url=fake_slack.response_url())
    for _ in range(2):
        assert (await bot.post(body, "application/x-www-form-urlencoded"))[0] == 200
    await bot.settle()
    assert len([p for p in fake_slack.posts(CHANNEL) if "thread_ts" not in p]) == 1


@pytest.mark.parametrize("earlier", ["could-not-post", "died-before-noting"])
async def test_a_private_kimi_answer_run_again_after_a_restart_is_still_answered_privately(
    make_bot: Any, fake_slack: FakeSlack, earlier: str
) -> None:
    """Where the bot is not a member, /kimi answers through response_url. A re-run of that job (a deploy, a
    crash mid-answer) must answer the same way, not wait forever on a search Slack always refuses there
    (conversations.history: not_in_channel)."""
    from bot.work import NOT_POSTED, command_thread

    fake_slack.not_member_of.add("C0PRIVATE1")
    bot: BotHarness = await make_bot(start_worker=False)
    body = command_body("secret question", channel="C0PRIVATE1", response_url=fake_slack.response_url())
    assert (await bot.post(body, "application/x-www-form-urlencoded"))[0] == 200
    thread, dead, job = await bot.claim_queued()
    assert thread == command_thread(job.data["command"])
    # The dead run: it was about to post (or had found it could not, and began answering privately).
    await dead.save_progress(job, announcing="1")
    if earlier == "could-not-post":
        await dead.save_progress(job, announce_ts=NOT_POSTED)
    await bot.deps.redis.delete(f"kimibot:thread:{{{thread}}}:lease")
    await bot.deps.queue.notify(thread)
    bot.run_worker()
    await bot.settle()
    assert fake_slack.posts("C0PRIVATE1") == []
    assert len(fake_slack.responses) == 1
    assert "alice: secret question" in fake_slack.responses[0]["blocks"][0]["text"]


async def test_a_kimi_question_whose_earlier_post_cannot_be_searched_is_not_posted_twice(
    make_bot: Any, fake_slack: FakeSlack
) -> None:
    """A run that died after posting (before noting it), and a search Slack refuses for good (a missing
    history scope) where the bot can post: the re-run answers privately rather than post it a second time."""
    from bot.slack.reply import announce_question

    fake_slack.add_conversation(CHANNEL, "general")
    bot: BotHarness = await make_bot(start_worker=False)
    body = command_body("What is 2+2?", response_url=fake_slack.response_url())
    assert (await bot.post(body, "application/x-www-form-urlencoded"))[0] == 200
    thread, dead, job = await bot.claim_queued()
    await dead.save_progress(job, announcing="1")
    await announce_question(bot.deps.slack, CHANNEL, ALICE, "What is 2+2?", job.data["command"]["trigger_id"])
    await bot.deps.redis.delete(f"kimibot:thread:{{{thread}}}:lease")
    fake_slack.fail("conversations.history", "missing_scope", times=5)
    await bot.deps.queue.notify(thread)
    bot.run_worker()
    await bot.settle()
    assert len([p for p in fake_slack.posts(CHANNEL) if "thread_ts" not in p]) == 1  # not posted again
    assert len(fake_slack.responses) == 1 and "What is 2+2?" in fake_slack.responses[0]["blocks"][0]["text"]
