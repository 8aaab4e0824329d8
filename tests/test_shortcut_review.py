"""Message shortcuts under failure: a re-run in the thread, a long thread, a thread Slack won't let the bot
read, a slow Redis behind the Ask form, and a re-run whose search for its "asked" post fails."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

import bot.pipeline as pipeline
import handlers.shortcuts as hs
from bot.errors import USER_MESSAGES, Reason
from bot.pipeline import ANNOUNCEMENT_EVENTS, recover_orphans, stop_value
from bot.shortcuts import (
    ANNOUNCE_SKEW_S,
    SHORTCUT_EVENT,
    SUMMARY,
    announce_in_thread,
    announcement,
    announcing_now,
    search_from,
)
from bot.slack.blocks import ACTION_RETRY, ACTION_STOP
from bot.slack.reply import QUESTION_EVENT, announce_question
from bot.store import ShortcutMessages
from bot.turn import Source, ThreadKey, Turn
from handlers.shortcuts import ASK_ABOUT_MESSAGE, FORM_UNAVAILABLE, NOT_TAKEN, SUMMARIZE_THREAD
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import BOT_ID, BOT_USER_ID, TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, BOB, CHANNEL
from tests.test_metrics import scrape, value
from tests.test_shortcuts import announcements, ask, kimi_saw, seeded, shortcut_payload

# What a run that is about to post saves as `announcing` (announcing_now(): now, less the skew); the fake
# Slack's clock starts at 1,760,000,000, so the tests save a time just before it.
ANNOUNCING = "1759999999.000000"
ACK_BOUND_S = 3.0  # Slack's wait for an ack; generous here, the point is that nothing hangs past it


def _dead_run(fake_slack: FakeSlack, root: str) -> tuple[Turn, str]:
    """A mention in thread `root` whose run died: its placeholder (with this turn's Stop button) is there."""
    fake_slack.seed(CHANNEL, user=ALICE, text="<@U07F3N1BOTX> plan the launch", ts=root)
    turn = Turn(Source.MENTION, TEAM_ID, CHANNEL, ALICE, "plan the launch", ts=root, thread_ts=root)
    placeholder = fake_slack.seed(
        CHANNEL,
        user=BOT_USER_ID,
        bot_id=BOT_ID,
        text="Thinking…",
        thread_ts=root,
        blocks=[{"type": "actions", "elements": [{"action_id": ACTION_STOP, "value": stop_value(turn)}]}],
    )
    return turn, placeholder


# ---- F1: a re-run's recovery leaves the "asked" posts alone ---------------------------------------


async def test_a_rerun_in_the_thread_does_not_take_back_a_shortcuts_asked_post(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    """Shortcut jobs run in queues of their own, so their "asked" post can land after a dead run's
    placeholder; the re-run must not take it for its partial answer (and chat.delete it)."""
    root = "1700000600.000100"
    turn, placeholder = _dead_run(fake_slack, root)
    asked = await announce_in_thread(bot.deps, CHANNEL, root, announcement(SUMMARY, BOB, ""), "trigger-1")
    partial = fake_slack.seed(CHANNEL, user=BOT_USER_ID, bot_id=BOT_ID, text="Half an ans", thread_ts=root)
    assert asked is not None and float(placeholder) < float(asked) < float(partial)
    recovered = await recover_orphans(bot.deps, turn, {"started": "1", "placeholder_ts": placeholder})
    assert json.loads(recovered.get("answer_ts") or "[]") == [partial]  # its own partial answer, only


async def test_a_rerun_in_the_thread_does_not_take_back_a_kimi_question(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    """The /kimi "asked" post carries its own metadata type; both are recognised."""
    assert {SHORTCUT_EVENT, QUESTION_EVENT} <= ANNOUNCEMENT_EVENTS
    root = "1700000600.000200"
    turn, placeholder = _dead_run(fake_slack, root)
    fake_slack.seed(
        CHANNEL,
        user=BOT_USER_ID,
        bot_id=BOT_ID,
        text="<@U04RZ8N2PQM> asked: something",
        thread_ts=root,
        metadata={"event_type": QUESTION_EVENT, "event_payload": {"trigger_id": "t"}},
    )
    recovered = await recover_orphans(bot.deps, turn, {"started": "1", "placeholder_ts": placeholder})
    assert "answer_ts" not in recovered


# ---- F2: a thread longer than the read limit ------------------------------------------------------


async def test_summarize_a_thread_longer_than_the_read_limit_reads_its_parent_and_newest_messages(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slack pages a thread oldest first: the newest messages must be the ones kept, and the footer says
    that older ones were left out."""
    monkeypatch.setattr(pipeline, "THREAD_READ_LIMIT", 5)
    root = "1700000601.000100"
    fake_slack.seed(CHANNEL, user=ALICE, text="kick-off", ts=root)
    for i in range(1, 9):
        fake_slack.seed(
            CHANNEL, user=BOB, text=f"reply number {i}", ts=f"1700000601.00010{i}", thread_ts=root
        )
    target = fake_slack.find(CHANNEL, root)
    assert target is not None
    await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, {**target}))
    await bot.settle()
    saw = kimi_saw(fake_kimi)
    assert "kick-off" in saw  # the parent says what the thread is about
    assert all(f"reply number {i}" in saw for i in range(5, 9))
    assert not any(f"reply number {i}" in saw for i in range(1, 5))
    assert "4 older messages of the thread left out" in json.dumps(fake_slack.messages[CHANNEL])


async def test_summarize_a_thread_within_the_limit_leaves_nothing_out(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000601.000200"
    target = seeded(fake_slack, root, user=ALICE, text="kick-off")
    fake_slack.seed(CHANNEL, user=BOB, text="only reply", ts="1700000601.000300", thread_ts=root)
    await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    await bot.settle()
    assert "kick-off" in kimi_saw(fake_kimi) and "only reply" in kimi_saw(fake_kimi)
    assert "left out" not in json.dumps(fake_slack.posts(CHANNEL, root))


# ---- F3: Slack cannot read the thread -------------------------------------------------------------


async def test_summarize_when_slack_cannot_read_the_thread_says_so_with_a_retry_and_kimi_is_not_asked(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000602.000100"
    target = seeded(fake_slack, root, user=ALICE, text="We ship on Friday")
    fake_slack.seed(CHANNEL, user=BOB, text="Agreed, Friday", ts="1700000602.000200", thread_ts=root)
    fake_slack.fail("conversations.replies", "internal_error", times=20)
    await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    await bot.settle()
    assert fake_kimi.requests == []
    texts = fake_slack.bodies(CHANNEL, root)
    assert any(USER_MESSAGES[Reason.THREAD_UNREADABLE] in t for t in texts), texts
    assert not any("nothing to summarize" in t.lower() for t in texts)
    assert ACTION_RETRY in json.dumps(fake_slack.messages[CHANNEL])  # asking again may work
    # The question stays recorded with the thread, as any question that was not answered.
    state = await bot.deps.threads.load(ThreadKey(TEAM_ID, CHANNEL, root))
    assert any(e.get("role") == "user" for e in state.entries)
    samples, _ = await scrape(bot)
    assert value(samples, "kimibot_answers_total", outcome="thread_unreadable") == 1


# ---- F4: the Ask form with a slow or failing Redis ------------------------------------------------


async def test_ask_form_is_acked_in_time_and_the_user_told_when_the_stash_hangs(
    bot: BotHarness, fake_slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis holding the stash write (and Slack slow at its membership check) cannot hold the ack: the
    user sees a sentence in place of the form."""
    never = asyncio.Event()

    async def hung_put(self: ShortcutMessages, token: str, message: dict[str, Any]) -> None:
        await never.wait()

    async def slow_info(deps: Any, channel: str) -> bool:
        await asyncio.sleep(hs.ACCESS_CHECK_S)  # conversations.info at its bound
        return False

    monkeypatch.setattr(ShortcutMessages, "put", hung_put)
    monkeypatch.setattr(hs, "_bot_absent", slow_info)
    target = seeded(fake_slack, "1700000603.000100", user=BOB, text="hello")
    started = time.monotonic()
    status, _ = await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, target))
    assert status == 200 and time.monotonic() - started < ACK_BOUND_S
    assert FORM_UNAVAILABLE in json.dumps(fake_slack.views[-1])


async def test_ask_form_with_redis_failing_tells_the_user(
    bot: BotHarness, fake_slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_put(self: ShortcutMessages, token: str, message: dict[str, Any]) -> None:
        raise RedisConnectionError("down")

    monkeypatch.setattr(ShortcutMessages, "put", failing_put)
    target = seeded(fake_slack, "1700000603.000200", user=BOB, text="hello")
    status, _ = await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, target))
    assert status == 200
    assert FORM_UNAVAILABLE in json.dumps(fake_slack.views[-1])


async def test_ask_form_with_a_slow_stash_still_opens_when_it_answers_within_the_checks(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stash is written while the checks run, not after them."""
    real_put = ShortcutMessages.put

    async def slowish_put(self: ShortcutMessages, token: str, message: dict[str, Any]) -> None:
        await asyncio.sleep(0.2)
        await real_put(self, token, message)

    monkeypatch.setattr(ShortcutMessages, "put", slowish_put)
    root = "1700000603.000300"
    target = seeded(fake_slack, root, user=BOB, text="Revenue was 42k")
    assert await ask(bot, fake_slack, target, "Is that good?") is None  # an empty ack: the form closes
    await bot.settle()
    assert "Is that good?" in kimi_saw(fake_kimi)


async def test_ask_submission_acks_in_time_with_a_sentence_when_redis_hangs_and_works_when_sent_again(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = "1700000603.000400"
    target = seeded(fake_slack, root, user=BOB, text="Revenue was 42k")
    status, _ = await bot.interact(shortcut_payload(fake_slack, ASK_ABOUT_MESSAGE, target))
    assert status == 200
    view = fake_slack.views[-1]
    values = {"question": {"question": {"type": "plain_text_input", "value": "Is that good?"}}}
    real_get = ShortcutMessages.get
    never = asyncio.Event()

    async def hung_get(self: ShortcutMessages, token: str) -> Any:
        await never.wait()

    monkeypatch.setattr(hs, "SUBMIT_DEADLINE_S", 0.5)
    monkeypatch.setattr(ShortcutMessages, "get", hung_get)
    started = time.monotonic()
    status, acked = await bot.submit_view(view, values)
    assert status == 200 and time.monotonic() - started < ACK_BOUND_S
    assert (
        acked is not None and acked["errors"]["question"] == NOT_TAKEN
    )  # the form stays open, with a sentence
    monkeypatch.setattr(ShortcutMessages, "get", real_get)
    status, acked = await bot.submit_view(view, values)
    assert status == 200 and acked is None
    await bot.settle()
    assert "Is that good?" in kimi_saw(fake_kimi)


# ---- F5: the search for an earlier "asked" post fails ---------------------------------------------


@pytest.mark.parametrize("clock", ["in step", "ours ahead of Slack's"])
async def test_a_rerun_that_cannot_search_the_thread_does_not_post_the_asked_line_twice(
    make_bot: Any, fake_slack: FakeSlack, fake_kimi: FakeKimi, clock: str
) -> None:
    """A kill -9 between the "asked" post and its note, then one failed conversations.replies: unknown is
    not "never posted"; the job runs again later, finds the post, and answers under it. When our clock is
    ahead of Slack's (announcing_now() is after the fake's timestamps) the whole thread is searched."""
    announcing = ANNOUNCING if clock == "in step" else announcing_now()
    root = "1700000604.000100"
    target = seeded(fake_slack, root, user=BOB, text="A long debate")
    paused: BotHarness = await make_bot(start_worker=False, job_visibility_timeout=0.5)
    await paused.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    thread, dead, job = await paused.claim_queued()
    await dead.save_progress(job, announcing=announcing)
    await announce_in_thread(paused.deps, CHANNEL, root, announcement(SUMMARY, ALICE, ""), job.data["key"])
    await paused.deps.redis.delete(f"kimibot:thread:{{{thread}}}:lease")
    fake_slack.fail("conversations.replies", "internal_error")  # the re-run's first search fails
    await paused.deps.queue.notify(thread)
    paused.run_worker()
    await paused.settle()
    assert len(announcements(fake_slack, root)) == 1
    assert len(fake_kimi.requests) == 1  # answered once, under that post
    # The search starts at the time the run was about to post, not at the thread's first message.
    assert {c.args.get("oldest") for c in fake_slack.calls_of("conversations.replies")} >= {announcing}


async def test_a_kimi_rerun_that_cannot_search_the_channel_does_not_post_the_question_twice(
    make_bot: Any, fake_slack: FakeSlack
) -> None:
    fake_slack.add_conversation(CHANNEL, "general")
    paused: BotHarness = await make_bot(start_worker=False, job_visibility_timeout=0.5)
    assert (await paused.command("What is 2+2?"))[0] == 200
    thread, dead, job = await paused.claim_queued()
    await dead.save_progress(job, announcing=ANNOUNCING)
    trigger = job.data["command"]["trigger_id"]
    await announce_question(paused.deps.slack, CHANNEL, ALICE, "What is 2+2?", trigger)
    await paused.deps.redis.delete(f"kimibot:thread:{{{thread}}}:lease")
    fake_slack.fail("conversations.history", "internal_error")
    await paused.deps.queue.notify(thread)
    paused.run_worker()
    await paused.settle()
    asked = [p for p in fake_slack.posts(CHANNEL) if "thread_ts" not in p]
    assert len(asked) == 1
    assert {c.args.get("oldest") for c in fake_slack.calls_of("conversations.history")} >= {ANNOUNCING}
    assert len(fake_slack.bodies(CHANNEL, asked[0]["_result"]["ts"])) == 1


def test_the_announcing_mark_is_a_time_a_little_before_now_and_an_old_mark_searches_everything() -> None:
    since = float(search_from(announcing_now()))
    assert time.time() - 2 * ANNOUNCE_SKEW_S < since < time.time()
    assert search_from("1") == "" and search_from("junk") == ""


async def test_summarize_a_thread_beyond_the_page_cap_says_only_its_first_pages_were_read(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "THREAD_READ_PAGES", 1)
    monkeypatch.setattr(pipeline, "THREAD_READ_LIMIT", 5)
    root = "1700000605.000100"
    target = seeded(fake_slack, root, user=ALICE, text="kick-off")
    for i in range(1, 206):
        fake_slack.seed(CHANNEL, user=BOB, text=f"reply {i}.", ts=f"1700000605.{100 + i:06d}", thread_ts=root)
    await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    await bot.settle()
    assert "reply 199." in kimi_saw(fake_kimi) and "reply 200." not in kimi_saw(fake_kimi)
    shown = json.dumps(fake_slack.messages[CHANNEL])
    assert "195 older messages of the thread left out" in shown
    assert "only the thread's first 200 messages read" in shown
