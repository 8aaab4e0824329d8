"""The message shortcuts "Ask Kimi about this" and "Summarize thread": each ends with an answer in the
message's thread, once, and refuses privately where the bot is not a member or the asker not allowed."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

import bot.work as work
from bot.shortcuts import NOT_IN_CHANNEL, SUMMARY_QUESTION
from bot.slack.blocks import ACTION_REGENERATE
from bot.turn import Turn
from handlers.shortcuts import ASK_ABOUT_MESSAGE, ASK_VIEW, FORM_GONE, SUMMARIZE_THREAD
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import APP_ID, TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, BOB, CHANNEL, mention

REPORT = {
    "id": "F0REPORT1",
    "name": "report.pdf",
    "title": "Q3 report",
    "mimetype": "application/pdf",
    "filetype": "pdf",
    "size": 1234,
    "url_private_download": "https://files.example/F0REPORT1/download/report.pdf",
    "url_private": "https://files.example/F0REPORT1/report.pdf",
    "mode": "hosted",
    "thumb_360": "dropped",  # not one of FILE_REF_KEYS
}


def shortcut_payload(
    fake_slack: FakeSlack,
    callback_id: str,
    message: dict[str, Any] | None,
    *,
    user: str = ALICE,
    channel: str = CHANNEL,
    trigger: str | None = None,
) -> dict[str, Any]:
    """A message shortcut as Slack sends it (`message_action`)."""
    payload: dict[str, Any] = {
        "type": "message_action",
        "callback_id": callback_id,
        "trigger_id": trigger or f"{time.time_ns()}.738474920.8088930838d88f008e0",
        "action_ts": f"{time.time():.6f}",
        "team": {"id": TEAM_ID, "domain": "fake"},
        "user": {"id": user, "username": "someone", "team_id": TEAM_ID},
        "channel": {"id": channel, "name": "general"},
        "api_app_id": APP_ID,
        "token": "legacy",
        "response_url": fake_slack.response_url("shortcut"),
    }
    if message is not None:
        payload["message_ts"] = message.get("ts")
        payload["message"] = message
    return payload


def seeded(fake_slack: FakeSlack, ts: str, **fields: Any) -> dict[str, Any]:
    """Put a message into the fake workspace and return it as a shortcut payload carries it."""
    fake_slack.seed(CHANNEL, ts=ts, **fields)
    found = fake_slack.find(CHANNEL, ts)
    assert found is not None
    return {**found, "type": "message"}


def kimi_saw(fake_kimi: FakeKimi) -> str:
    return "\n".join(str(m.get("content") or "") for m in fake_kimi.requests[-1]["messages"])


def announcements(fake_slack: FakeSlack, thread: str) -> list[str]:
    return [p["text"] for p in fake_slack.posts(CHANNEL, thread) if "asked" in str(p.get("text"))]


async def ask(bot: BotHarness, fake_slack: FakeSlack, message: dict[str, Any], question: str) -> Any:
    """Use the Ask shortcut on `message` and send its form with `question`."""
    opened = len(fake_slack.views)
    status, _ = await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, message))
    assert status == 200 and len(fake_slack.views) == opened + 1
    view = fake_slack.views[-1]
    assert view["callback_id"] == ASK_VIEW
    values = {"question": {"question": {"type": "plain_text_input", "value": question}}}
    status, acked = await bot.submit_view(view, values)
    assert status == 200
    return acked


async def test_ask_about_a_message_answers_in_its_thread_with_the_message_and_its_files(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered: list[Turn] = []
    real_answer = work.answer

    async def spy(turn: Turn, *args: Any) -> None:
        answered.append(turn)
        await real_answer(turn, *args)

    monkeypatch.setattr(work, "answer", spy)
    fake_slack.add_user(BOB, "bob")
    root = "1700000500.000100"
    seeded(fake_slack, root, user=ALICE, text="Shall we ship on Friday?")
    target = seeded(
        fake_slack, "1700000500.000200", user=BOB, text="Revenue was 42k, see the report", thread_ts=root
    )
    target["files"] = [REPORT]
    assert await ask(bot, fake_slack, target, "Is 42k more than last quarter?") is None
    await bot.settle()

    assert announcements(fake_slack, root) == [
        f"<@{ALICE}> asked about this message: Is 42k more than last quarter?"
    ]
    bodies = fake_slack.bodies(CHANNEL, root)
    assert len(bodies) == 2 and "Is 42k more than last quarter?" in bodies[1]  # the answer, in the thread
    saw = kimi_saw(fake_kimi)
    assert "The message I am asking about, from bob (attached: report.pdf):\n> Revenue was 42k" in saw
    [turn] = answered
    assert turn.thread_ts == root and turn.source == "shortcut"
    assert turn.files == ({k: v for k, v in REPORT.items() if k != "thumb_360"},)
    assert fake_slack.problems == []


async def test_ask_on_a_top_level_message_answers_in_a_new_thread_under_it(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    target = seeded(fake_slack, "1700000501.000100", user=BOB, text="The build is red again")
    await ask(bot, fake_slack, target, "Why?")
    await bot.settle()
    assert announcements(fake_slack, target["ts"]) == [f"<@{ALICE}> asked about this message: Why?"]
    assert len(fake_slack.bodies(CHANNEL, target["ts"])) == 2
    assert "> The build is red again" in kimi_saw(fake_kimi)


async def test_the_ask_form_requires_a_question_and_refuses_an_unknown_form(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    target = seeded(fake_slack, "1700000502.000100", user=BOB, text="hello")
    await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, target))
    view = fake_slack.views[-1]
    block = next(b for b in view["blocks"] if b["type"] == "input")
    assert block.get("optional") is not True  # Slack itself refuses an empty form
    blank = {"question": {"question": {"type": "plain_text_input", "value": "   "}}}
    status, acked = await bot.submit_view(view, blank)
    assert status == 200 and acked["response_action"] == "errors" and "question" in acked["errors"]
    values = {"question": {"question": {"type": "plain_text_input", "value": "What?"}}}
    status, acked = await bot.submit_view({**view, "private_metadata": "not-a-form"}, values)
    assert status == 200 and acked == {"response_action": "errors", "errors": {"question": FORM_GONE}}
    status, acked = await bot.submit_view(view, values, user=BOB)  # not the one who opened it
    assert status == 200 and acked["response_action"] == "errors"
    await bot.settle()
    assert fake_kimi.requests == [] and fake_slack.posts() == []


async def test_summarize_covers_every_message_of_the_thread_even_those_the_bot_never_stored(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot_: BotHarness = await make_bot(backfill_limit=3)
    fake_slack.add_user(BOB, "bob")
    root = "1700000503.000100"
    await bot_.send_event(mention("Let's plan the launch", root))
    await bot_.settle()
    # Replies the bot never saw as events (a channel where it answers mentions only, say): not stored.
    said = [
        (BOB, "I decided we ship on Friday"),
        (ALICE, "Agreed, Friday it is"),
        (BOB, "Open question: who writes the changelog?"),
        (ALICE, "And do we tell the press?"),
        (BOB, "Last word: the docs are ready"),
    ]
    for i, (user, text) in enumerate(said):
        fake_slack.seed(CHANNEL, user=user, text=text, ts=f"1700000503.00020{i}", thread_ts=root)
    target = fake_slack.find(CHANNEL, "1700000503.000201")
    assert target is not None
    status, body = await bot_.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    assert status == 200 and body == ""
    await bot_.settle()

    assert announcements(fake_slack, root) == [f"<@{ALICE}> asked for a summary of this thread."]
    bodies = fake_slack.bodies(CHANNEL, root)
    assert len(bodies) == 3 and SUMMARY_QUESTION[:40] in bodies[2]  # the summary, in the thread
    saw = kimi_saw(fake_kimi)
    assert "alice: Let's plan the launch" in saw
    for user, text in said:  # every message, beyond BACKFILL_LIMIT=3 and beyond what was stored
        assert f"{'bob' if user == BOB else 'alice'}: {text}" in saw
    assert "who decided what" in saw
    # Regenerate makes the summary again from the thread as Slack has it now.
    fake_slack.seed(CHANNEL, user=BOB, text="Late news: Friday moved to Monday", thread_ts=root)
    summary = fake_slack.replies(CHANNEL, root)[-1]
    assert (await bot_.click(summary, ACTION_REGENERATE))[0] == 200
    await bot_.settle()
    saw = kimi_saw(fake_kimi)
    assert "bob: Late news: Friday moved to Monday" in saw and "bob: I decided we ship on Friday" in saw
    # The summary is part of the thread's history: a follow-up sees it.
    await bot_.send_event(mention("Thanks, and what next?", "1700000503.000900", thread_ts=root))
    await bot_.settle()
    sent = [str(m.get("content")) for m in fake_kimi.requests[-1]["messages"]]
    assert any(SUMMARY_QUESTION[:40] in c for c in sent)
    assert fake_slack.problems == []


async def test_summarize_a_thread_too_long_for_the_window_leaves_out_the_oldest_and_says_so(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    # An unknown model (128k window) with a 120k output budget leaves ~8k tokens for the prompt.
    small: BotHarness = await make_bot(kimi_model="mystery-model", kimi_max_completion_tokens=120_000)
    root = "1700000504.000100"
    fake_slack.seed(CHANNEL, user=ALICE, text="first " + "a" * 6_000, ts=root)
    for i in range(1, 8):
        fake_slack.seed(
            CHANNEL, user=ALICE, text=f"reply {i} " + "b" * 6_000, ts=f"1700000504.00010{i}", thread_ts=root
        )
    target = fake_slack.find(CHANNEL, root)
    assert target is not None
    await small.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    await small.settle()
    summary = fake_slack.bodies(CHANNEL, root)[-1]
    assert re.search(r"\d+ earlier messages? left out to fit the context window", summary)
    sent = fake_kimi.requests[-1]["messages"]
    assert "alice: reply 7" in str(sent[-2]["content"]) and SUMMARY_QUESTION in str(sent[-1]["content"])
    assert not any("first aaa" in str(m.get("content")) for m in sent)  # the oldest went
    # The stored history's window is its own: the summary's cut does not move it.
    meta = await small.deps.threads.load(small.thread(root))
    assert int(meta.meta.get("start", "0")) == 0


async def test_a_redelivered_shortcut_or_form_is_answered_once(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000505.000100"
    target = seeded(fake_slack, root, user=BOB, text="Ship it?")
    payload = shortcut_payload(fake_slack, SUMMARIZE_THREAD, target)
    for _ in range(2):
        assert (await bot.interact(payload))[0] == 200
    await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, target))
    view = fake_slack.views[-1]
    values = {"question": {"question": {"type": "plain_text_input", "value": "Really?"}}}
    for _ in range(2):
        assert (await bot.submit_view(view, values))[0] == 200
    await bot.settle()
    assert len(announcements(fake_slack, root)) == 2  # one summary request, one question
    assert len(fake_kimi.requests) == 2
    assert len(fake_slack.bodies(CHANNEL, root)) == 4


async def test_where_the_bot_is_not_a_member_the_asker_is_told_privately(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    # A private channel Slack hides from the bot (conversations.info: channel_not_found): the form opens,
    # and the job, whose post is refused, says so through the shortcut's response_url.
    hidden = "G0HIDDEN01"
    fake_slack.not_member_of.add(hidden)
    message = {"type": "message", "user": BOB, "ts": "1700000506.000100", "text": "Secret plans"}
    await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, message, channel=hidden))
    await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, message, channel=hidden))
    assert fake_slack.views[-1]["callback_id"] == ASK_VIEW
    values = {"question": {"question": {"type": "plain_text_input", "value": "What plans?"}}}
    await bot.submit_view(fake_slack.views[-1], values)
    await bot.settle()
    assert [r["text"] for r in fake_slack.responses] == [NOT_IN_CHANNEL, NOT_IN_CHANNEL]
    assert all(r["response_type"] == "ephemeral" for r in fake_slack.responses)
    assert fake_kimi.requests == [] and fake_slack.posts(hidden) == []


async def test_ask_in_a_channel_slack_says_the_bot_is_not_in_says_so_before_the_question(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    public = "C0NOTMINE1"
    fake_slack.add_conversation(public, "elsewhere")
    fake_slack.not_member_of.add(public)
    message = {"type": "message", "user": BOB, "ts": "1700000506.000200", "text": "Public plans"}
    await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, message, channel=public))
    notice = fake_slack.views[-1]
    assert "callback_id" not in notice and NOT_IN_CHANNEL in json.dumps(notice["blocks"], ensure_ascii=False)
    await bot.settle()
    assert fake_kimi.requests == [] and fake_slack.posts(public) == []
    fake_slack.not_member_of.discard(public)  # invited: the form opens
    await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, message, channel=public))
    assert fake_slack.views[-1]["callback_id"] == ASK_VIEW
    assert fake_slack.problems == []


async def test_a_user_the_access_rules_leave_out_is_told_privately(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    strict: BotHarness = await make_bot(allowed_users=BOB)
    target = seeded(fake_slack, "1700000507.000100", user=BOB, text="Only for Bob")
    await strict.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    await strict.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, target))
    await strict.settle()
    assert [r["text"] for r in fake_slack.responses] == ["kimibot isn't enabled for you here."]
    notice = fake_slack.views[-1]
    assert "callback_id" not in notice and "isn't enabled for you here" in json.dumps(notice["blocks"])
    assert fake_kimi.requests == [] and fake_slack.posts() == []
    # Bob may.
    await strict.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target, user=BOB))
    await strict.settle()
    assert len(fake_kimi.requests) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.pop("message"),
        lambda p: p.update(message={"text": "no ts"}),
        lambda p: p.update(message="not a message"),
        lambda p: p.update(channel=None),
        lambda p: p.update(user={}),
        lambda p: (p.pop("trigger_id"), p.pop("action_ts")),
    ],
)
@pytest.mark.parametrize("callback_id", [ASK_ABOUT_MESSAGE, SUMMARIZE_THREAD])
async def test_malformed_shortcut_payloads_are_acked_and_dropped(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, callback_id: str, change: Any
) -> None:
    payload = shortcut_payload(fake_slack, callback_id, {"type": "message", "ts": "1700000508.000100"})
    change(payload)
    status, _ = await bot.interact(payload)
    assert status == 200
    await bot.settle()
    assert fake_kimi.requests == []


async def test_odd_fields_of_the_message_are_ignored_not_fatal(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000508.000200"
    fake_slack.seed(CHANNEL, user=BOB, text="hi", ts=root)
    odd = {"type": "message", "ts": root, "files": "not a list", "text": 42, "bot_profile": "?"}
    assert (await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, odd)))[0] == 200
    assert (await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, odd)))[0] == 200
    assert "(a message without text)" in json.dumps(fake_slack.views[-1]["blocks"])
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, root)) == 2 and len(fake_kimi.requests) == 1


async def test_a_garbage_form_submission_is_refused_not_a_500(bot: BotHarness, fake_kimi: FakeKimi) -> None:
    status, acked = await bot.submit_view(
        {"type": "modal", "callback_id": ASK_VIEW, "private_metadata": ""}, {}
    )
    assert status == 200 and acked["response_action"] == "errors"
    status, acked = await bot.submit_view(
        {"type": "modal", "callback_id": ASK_VIEW},
        {"question": {"question": {"type": "plain_text_input", "value": "x"}}},
    )
    assert status == 200 and acked == {"response_action": "errors", "errors": {"question": FORM_GONE}}
    await bot.settle()
    assert fake_kimi.requests == []


async def test_an_asked_post_of_a_run_that_died_before_noting_it_is_not_posted_twice(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from bot.shortcuts import SUMMARY, announce_in_thread, announcement

    root = "1700000509.000100"
    target = seeded(fake_slack, root, user=BOB, text="A long debate")
    paused: BotHarness = await make_bot(start_worker=False)
    await paused.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    thread, dead, job = await paused.claim_queued()
    # The dead run: it said it was announcing, posted, and died before noting the post's ts.
    await dead.save_progress(job, announcing="1")
    await announce_in_thread(paused.deps, CHANNEL, root, announcement(SUMMARY, ALICE, ""), job.data["key"])
    await paused.deps.redis.delete(f"kimibot:thread:{{{thread}}}:lease")
    await paused.deps.queue.notify(thread)
    paused.run_worker()
    await paused.settle()
    assert len(announcements(fake_slack, root)) == 1  # found again, not posted twice
    assert len(fake_slack.bodies(CHANNEL, root)) == 2 and len(fake_kimi.requests) == 1


async def test_kimi_help_names_the_shortcuts(bot: BotHarness) -> None:
    status, body = await bot.command("help")
    assert status == 200
    assert "*Ask Kimi about this* and *Summarize thread*" in json.loads(body)["text"]


async def test_slack_failing_to_post_is_not_taken_for_not_a_member_and_the_asker_hears_why(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    target = seeded(fake_slack, "1700000510.000100", user=BOB, text="Anything")
    fake_slack.fail("chat.postMessage", "internal_error")
    await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    await bot.settle()
    [told] = fake_slack.responses
    assert told["response_type"] == "ephemeral" and NOT_IN_CHANNEL not in told["text"]
    assert "(ref `" in told["text"]
    assert fake_kimi.requests == []
