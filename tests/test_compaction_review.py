"""Long-thread compaction, the review's findings (tests/test_compaction.py has the rest): a summary is paid
for once even when the answer after it fails; a failed fold keeps what was summarised before; the head
summary expires with its thread, not 30 days after it was made; a question too long on its own pays for
no summary. Pure rules first, then whole threads through the Bolt app with real Redis."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from bot.compaction import (
    GAP_LINE,
    SUMMARY_MAX_TOKENS,
    Compaction,
    Summary,
    kept_summary,
    plan,
    window,
)
from bot.context import estimate_tokens, user_entry
from bot.store import ThreadKeys, ThreadStore, ThreadSummaries
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import CHANNEL, mention, message, thread_key
from tests.test_compaction import BUDGET, WINDOW_SETTINGS, Kimi, ask, is_summary, turns

HEAD = "Summary of the earlier conversation"


# ---- the rules (pure) ------------------------------------------------------------------------------
def test_a_question_too_long_alone_makes_no_summary_request() -> None:
    entries = [*turns(3), user_entry("alice", "z" * 30_000, ts="9.1", user="U1")]
    head = Summary(0, 4, "the story so far")
    for offset, known in ((0, None), (4, head)):
        chosen = plan("sys", entries, start=0, offset=offset, head=known, budget_tokens=4_000)
        assert chosen.compaction is None  # no summary paid for a turn that is refused anyway
        assert chosen.start == 0 and chosen.head == known
        assert window("sys", entries, start=chosen.start, summary=known, budget_tokens=4_000).too_long


def test_a_question_that_fits_alone_still_compacts_the_history_before_it() -> None:
    entries = [*turns(3), user_entry("alice", "z" * 9_000, ts="9.1", user="U1")]  # ~3,000 of 4,000 tokens
    chosen = plan("sys", entries, start=0, offset=0, head=None, budget_tokens=4_000)
    assert chosen.compaction is not None and chosen.start == len(entries) - 1
    assert not window("sys", entries, start=chosen.start, summary=None, budget_tokens=4_000).too_long


def test_a_failed_fold_keeps_the_summary_so_far_under_the_new_end_saying_what_it_lacks() -> None:
    previous = Summary(0, 10, "s " * 20_000)  # longer than the room: the kept one is cut to fit
    dropped = tuple(turns(3))
    kept = kept_summary(Compaction(0, 16, previous, dropped), budget_tokens=200_000)
    assert kept is not None and (kept.first, kept.end, kept.missing) == (0, 16, 6)
    assert kept.text.startswith("s s ") and kept.text.endswith("\n" + GAP_LINE.format(first=11, end=16))
    assert estimate_tokens(kept.message()) <= SUMMARY_MAX_TOKENS  # the room the window counted on
    assert Summary.load(kept.dump()) == kept

    # Kept again through a second failure: the count of what it lacks adds up; no summary, nothing kept.
    again = kept_summary(Compaction(0, 20, kept, tuple(turns(2))), budget_tokens=200_000)
    assert again is not None and again.missing == 10 and again.summarised == 10
    assert kept_summary(Compaction(10, 16, None, dropped), budget_tokens=200_000) is None

    # The footer counts only what the text stands for.
    fitted = window("sys", turns(1), start=0, summary=kept, budget_tokens=200_000)
    assert fitted.summarised == 10 and fitted.notes == (
        "10 earlier messages summarised to fit the context window",
    )


def test_a_stored_summary_with_a_bad_missing_count_is_ignored() -> None:
    for missing in ("1", -1, 5, True):
        raw = f'{{"first": 0, "end": 5, "text": "x", "missing": {json_value(missing)}}}'
        assert Summary.load(raw) is None
    assert Summary.load('{"first": 0, "end": 5, "text": "x", "missing": 4}') == Summary(0, 5, "x", 4)
    assert '"missing"' not in Summary(0, 5, "x").dump()  # summaries without a gap are stored as before


def json_value(value: object) -> str:
    return "true" if value is True else f'"{value}"' if isinstance(value, str) else str(value)


# ---- whole threads through the app ---------------------------------------------------------------
async def begin(bot: BotHarness, root: str) -> None:
    await bot.send_event(mention("let us begin", root))
    await bot.settle()


async def test_a_failed_answer_after_a_summary_does_not_make_the_next_turn_pay_for_it_again(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    failed: list[int] = []

    def answer(body: dict[str, Any]) -> Reply:
        if kimi.summaries == 1 and not failed:  # the answer right after the first summary fails
            failed.append(1)
            return Reply(status=400, error_type="invalid_request_error", error_message="nope")
        return Reply(content="ok", reasoning="hm")

    kimi.answer = answer
    bot: BotHarness = await make_bot(**WINDOW_SETTINGS)
    root = "1700000964.000000"
    await begin(bot, root)
    i = 0
    while not failed:
        await ask(bot, root, i)
        i += 1
    assert kimi.summaries == 1
    assert not fake_slack.bodies(CHANNEL, root)[-1].startswith("ok")  # that turn failed
    stored = await bot.deps.redis.hgetall(ThreadSummaries.key(thread_key(root)))
    (end,) = stored
    meta = await bot.deps.redis.hgetall(ThreadKeys(thread_key(root)).meta)
    assert meta["start"] == end  # the thread's window now begins where the summary ends

    await ask(bot, root, i)  # the next question (or Retry)
    assert kimi.summaries == 1 and len(kimi.summary_requests) == 1, "summarised (and paid for) twice"
    last = fake_kimi.requests[-1]["messages"]
    assert not is_summary(fake_kimi.requests[-1])
    assert last[1]["content"].startswith(f"{HEAD} (messages 1 to {end},")
    assert last[1]["content"].endswith("SUMMARY-1: alice asked questions.")
    assert fake_slack.bodies(CHANNEL, root)[-1].startswith("ok")
    assert f"{end} earlier messages summarised" in fake_slack.bodies(CHANNEL, root)[-1]


async def test_a_failed_fold_keeps_the_earlier_summary(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    bot: BotHarness = await make_bot(**WINDOW_SETTINGS)
    root = "1700000965.000000"
    await begin(bot, root)
    i = 0
    while not kimi.summaries:
        await ask(bot, root, i)
        i += 1
    first_end = int(re.findall(r"messages 1 to (\d+),", fake_kimi.requests[-1]["messages"][1]["content"])[0])
    kimi.fail_summaries = True  # one transient failure at the next compaction
    while len(kimi.summary_requests) == 1:
        await ask(bot, root, i)
        i += 1
    kimi.fail_summaries = False
    # The turn whose fold failed: answered, with the earlier summary still at the head, carried over the gap.
    failing = fake_kimi.requests[-1]["messages"][1]["content"]
    second_end = int(re.findall(r"messages 1 to (\d+),", failing)[0])
    assert second_end > first_end and "SUMMARY-1: alice asked questions." in failing
    assert failing.endswith(GAP_LINE.format(first=first_end + 1, end=second_end))
    footer = fake_slack.bodies(CHANNEL, root)[-1]
    gap = second_end - first_end
    assert footer.startswith("ok")
    assert (
        f"{gap} earlier messages left out to fit the context window; they could not be summarised; "
        f"{first_end} earlier messages summarised to fit the context window"
    ) in footer

    await ask(bot, root, i)
    i += 1
    last = fake_kimi.requests[-1]["messages"]
    assert "SUMMARY-1" in str(last[1]["content"]), "what SUMMARY-1 held is gone from the thread for good"
    assert last[1]["content"] == failing  # the stored head: the prompt prefix stays byte-stable

    # The next fold folds the kept summary in (its gap line too) and still does not count the gap.
    while kimi.summaries == 1:
        await ask(bot, root, i)
        i += 1
    request = kimi.summary_requests[-1]["messages"][1]["content"]
    assert "SUMMARY-1" in request and GAP_LINE.format(first=first_end + 1, end=second_end) in request
    third = fake_kimi.requests[-1]["messages"][1]["content"]
    third_end = int(re.findall(r"messages 1 to (\d+),", third)[0])
    assert third.endswith("SUMMARY-2: alice asked questions.")
    footer = fake_slack.bodies(CHANNEL, root)[-1]
    assert f"{gap} earlier messages left out to fit the context window" in footer
    assert f"{third_end - gap} earlier messages summarised to fit the context window" in footer
    assert "could not" not in footer


async def test_the_head_summary_lives_as_long_as_the_thread_it_leads(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    bot: BotHarness = await make_bot(**WINDOW_SETTINGS)
    root = "1700000962.000000"
    await begin(bot, root)
    i = 0
    while not kimi.summaries:
        await ask(bot, root, i)
        i += 1
    key = ThreadSummaries.key(thread_key(root))
    await bot.deps.redis.expire(key, 3_600)  # 29 days and 23 hours later, say
    await ask(bot, root, i)  # the thread is still in use: its history and metadata live 30 more days
    assert kimi.summaries == 1
    history_ttl = await bot.deps.redis.ttl(ThreadKeys(thread_key(root)).history)
    assert history_ttl > 29 * 86_400
    assert await bot.deps.redis.ttl(key) >= history_ttl - 60, "the summary expires an hour from now"

    # Metadata written outside a job (ThreadStore.append: e.g. an assistant thread opened) pushes it too.
    await bot.deps.redis.expire(key, 3_600)
    await ThreadStore(bot.deps.redis, bot.deps.threads.ttl).append(thread_key(root), answered=1)
    assert await bot.deps.redis.ttl(key) > 29 * 86_400
    # A thread without summaries gets no summaries key from it.
    other = thread_key("1700000962.500000")
    await ThreadStore(bot.deps.redis, bot.deps.threads.ttl).append(other, answered=1)
    assert await bot.deps.redis.exists(ThreadSummaries.key(other)) == 0


async def test_a_question_too_long_alone_in_a_long_thread_is_refused_without_a_summary(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    bot: BotHarness = await make_bot(**WINDOW_SETTINGS)
    root = "1700000966.000000"
    await begin(bot, root)
    for i in range(2):
        await ask(bot, root, i)
    asked = len(fake_kimi.requests)
    huge = "z" * (BUDGET * 4)  # more tokens than the whole prompt budget, by any estimate
    await bot.send_event(message(huge, "1700000966.000900", thread_ts=root))
    await bot.settle()
    assert fake_kimi.requests[asked:] == [] and kimi.summary_requests == []
    assert "too long for the model's context window" in fake_slack.bodies(CHANNEL, root)[-1]
    assert await bot.deps.redis.exists(ThreadSummaries.key(thread_key(root))) == 0
