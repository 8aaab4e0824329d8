"""Threads longer than the model's window: the turns that leave it are summarised (one quick Kimi request,
cached per range), the summary leads the window, and the prompt prefix stays byte-stable between
compactions. Pure rules first, then whole threads through the Bolt app with real Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from bot.compaction import (
    HEAD_LABEL,
    SUMMARY_INSTRUCTION,
    SUMMARY_MAX_TOKENS,
    Compaction,
    Summary,
    plan,
    summary_output_cap,
    summary_request,
    summary_room,
    summary_text,
    window,
)
from bot.context import CHARS_PER_TOKEN, TRIM_HEADROOM, estimate_tokens, user_entry
from bot.kimi.client import ModelCall
from bot.kimi.profiles import profile_for
from bot.store import ThreadSummaries
from bot.summaries import quick_call
from bot.usage import day_of
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import TEAM_ID, FakeSlack
from tests.slack_requests import CHANNEL, mention, message, thread_key
from tests.test_agent_loop import Probe, give


def turns(n: int, size: int = 600, first: int = 0) -> list[dict[str, Any]]:
    """n question/answer pairs (the answer of the last one too)."""
    entries: list[dict[str, Any]] = []
    for i in range(first, first + n):
        entries.append(user_entry("alice", f"q{i} " + "x" * size, ts=f"{i}.1", user="U1"))
        entries.append({"role": "assistant", "content": f"a{i} " + "y" * size, "ts": f"{i}.2"})
    return entries


def cost(messages: list[dict[str, Any]]) -> int:
    return sum(estimate_tokens(m) for m in messages)


# ---- the rules (pure) ------------------------------------------------------------------------------
def test_a_window_that_fits_is_left_alone_with_its_summary_at_the_head() -> None:
    entries = turns(3)
    head = Summary(0, 10, "Alice asked about deploys.")
    chosen = plan("sys", entries, start=0, offset=10, head=head, budget_tokens=100_000)
    assert chosen.start == 0 and chosen.head == head and chosen.compaction is None
    fitted = window("sys", entries, start=0, summary=head, budget_tokens=100_000)
    assert fitted.messages[0] == {"role": "system", "content": "sys"}
    assert fitted.messages[1] == head.message()
    assert fitted.messages[1]["content"].startswith(HEAD_LABEL.format(first=1, end=10))
    assert fitted.messages[2]["content"].startswith("alice: q0")
    assert fitted.summarised == 10 and "10 earlier messages summarised" in fitted.notes[0]


def test_a_summary_that_does_not_end_where_the_window_begins_is_not_used() -> None:
    chosen = plan("sys", turns(3), start=0, offset=10, head=Summary(0, 8, "stale"), budget_tokens=100_000)
    assert chosen.head is None and chosen.compaction is None


def test_an_overflowing_window_compacts_with_headroom_at_a_user_turn() -> None:
    entries = turns(20)
    entries.insert(7, {"role": "tool", "content": "result", "tool_call_id": "t1"})  # inside an exchange
    entries.append(user_entry("bob", "latest", ts="99.1", user="U2"))
    budget = cost([{"role": "system", "content": "sys"}, *entries]) // 2
    chosen = plan("sys", entries, start=0, offset=4, head=None, budget_tokens=budget)
    assert chosen.compaction is not None and chosen.head is None
    assert entries[chosen.start]["role"] == "user"  # never inside a tool-call exchange
    assert chosen.compaction.first == 4 and chosen.compaction.end == 4 + chosen.start
    assert chosen.compaction.dropped == tuple(entries[: chosen.start])
    kept = cost([{"role": "system", "content": "sys"}, *entries[chosen.start :]])
    assert kept <= budget * TRIM_HEADROOM - summary_room(budget)  # room for the summary, and headroom


def test_a_new_summary_folds_in_the_one_at_the_head() -> None:
    entries = turns(20)
    budget = cost(entries) // 2
    head = Summary(0, 30, "the story so far")
    chosen = plan("sys", entries, start=0, offset=30, head=head, budget_tokens=budget)
    assert chosen.compaction is not None
    assert chosen.compaction.first == 0 and chosen.compaction.previous == head
    request = summary_request(chosen.compaction, budget_tokens=budget, input_tokens=100_000)
    assert request[0]["content"] == SUMMARY_INSTRUCTION.format(words=int(summary_room(budget) * 3.0 / 6))
    assert "Summary of messages 1 to 30:\nthe story so far" in request[1]["content"]
    assert f"Messages 31 to {chosen.compaction.end}:\nalice: q0" in request[1]["content"]


def test_the_question_is_never_left_out_and_the_start_never_moves_back() -> None:
    huge = [user_entry("alice", "z" * 30_000, ts="1.1", user="U1")]
    chosen = plan("sys", huge, start=0, offset=0, head=None, budget_tokens=1_000)
    assert chosen.compaction is None and chosen.start == 0
    assert window("sys", huge, start=0, summary=None, budget_tokens=1_000).too_long
    chosen = plan("sys", turns(3), start=4, offset=0, head=None, budget_tokens=100_000)
    assert chosen.start == 4


def test_a_summary_that_does_not_fit_beside_the_question_gives_way() -> None:
    question = [user_entry("alice", "z" * 2_400, ts="1.1", user="U1")]
    summary = Summary(0, 5, "s" * 3_000)
    fitted = window("sys", question, start=0, summary=summary, budget_tokens=1_000)
    assert not fitted.too_long and fitted.summarised == 0 and len(fitted.messages) == 2


def test_the_prefix_stays_byte_stable_between_compactions_over_three_windows() -> None:
    """A thread three times the window, turn by turn: the head summary and the kept turns change only at a
    compaction; every other request begins with the whole previous request, byte for byte."""
    budget = 4_000
    history: list[dict[str, Any]] = []
    start, head, previous = 0, None, None
    compactions = stable = 0
    for i in range(60):
        history += [user_entry("alice", f"q{i} " + "x" * 600, ts=f"{i}.1", user="U1")]
        chosen = plan("sys", history[start:], start=0, offset=start, head=head, budget_tokens=budget)
        if chosen.compaction is not None:
            compactions += 1
            c = chosen.compaction
            assert c.first == 0 and (c.previous == head)  # folded: the head is always one summary from 0
            head = Summary(
                c.first, c.end, summary_text(f"summary {compactions} " * 400, budget_tokens=budget)
            )
        else:
            head = chosen.head
        fitted = window("sys", history[start:], start=chosen.start, summary=head, budget_tokens=budget)
        start += chosen.start
        assert not fitted.too_long and cost(fitted.messages) <= budget
        dumped = [json.dumps(m) for m in fitted.messages]
        if previous is not None and chosen.compaction is None:
            assert dumped[: len(previous)] == previous
            stable += 1
        previous = dumped
        history.append({"role": "assistant", "content": f"a{i}", "ts": f"{i}.2"})
    assert sum(estimate_tokens(e) for e in history) > 3 * budget
    assert compactions >= 3 and stable >= 2 * compactions


def test_summary_text_is_cut_to_the_room_kept_for_it() -> None:
    text = summary_text("w " * 50_000, budget_tokens=200_000)
    assert estimate_tokens(Summary(0, 1, text).message()) <= SUMMARY_MAX_TOKENS
    assert summary_text("  short  ", budget_tokens=200_000) == "short"


def test_the_summary_request_reads_tool_calls_and_images_as_a_transcript_within_its_room() -> None:
    dropped = (
        user_entry("alice", "look this up", ts="1.1", user="U1"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "found it", "tool_call_id": "c1"},
        {"role": "user", "content": [{"type": "text", "text": "bob: see"}, {"type": "image_url"}]},
        {"role": "assistant", "content": "x" * 90_000},
    )
    request = summary_request(Compaction(0, 5, None, dropped), budget_tokens=4_000, input_tokens=11_000)
    text = request[1]["content"]
    assert "alice: look this up\n\nAssistant: [used tools: lookup]\n\n[tool result] found it" in text
    assert "bob: see [attachment]" in text and "[…]" in text
    assert len(text) <= (11_000 - 1_000) * CHARS_PER_TOKEN


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        "[]",
        '{"first": 0, "end": 0, "text": "x"}',
        '{"first": 0, "end": 3, "text": " "}',
        '{"first": "0", "end": 3, "text": "x"}',
        '{"first": 0, "end": 3}',
    ],
)
def test_a_stored_summary_that_is_not_one_is_ignored(raw: str) -> None:
    assert Summary.load(raw) is None


def test_a_summary_round_trips() -> None:
    summary = Summary(2, 9, "naïve ✓")
    assert Summary.load(summary.dump()) == summary


def test_the_summary_request_thinks_as_little_as_each_model_allows() -> None:
    def params(model: str) -> dict[str, Any]:
        call = quick_call(ModelCall(model, profile_for(model), "high", True))
        return call.profile.request_params(call.reasoning_effort, 100, thinking=call.thinking)

    for model in ("kimi-k2.6", "kimi-k2.5"):
        assert params(model)["extra_body"] == {"thinking": {"type": "disabled"}}
    assert params("kimi-k3")["reasoning_effort"] == params("kimi-k3.1-pro")["reasoning_effort"] == "low"
    for model in ("kimi-k2.7-code", "kimi-k2-thinking"):  # think whatever is sent: nothing to earn a 400
        always = params(model)
        assert "extra_body" not in always and "reasoning_effort" not in always


# ---- whole threads through the app ---------------------------------------------------------------
# kimi-k2.6 (262,144 tokens) with a 255,000-token output budget leaves 7,144 tokens for the prompt.
WINDOW_SETTINGS: dict[str, Any] = {"kimi_model": "kimi-k2.6", "kimi_max_completion_tokens": 255_000}
BUDGET = 262_144 - 255_000
QUESTION = 3_000  # characters: about 1,000 tokens by our estimate, 750 by the fake's count


def is_summary(request: dict[str, Any]) -> bool:
    return str(request["messages"][0]["content"]).startswith(SUMMARY_INSTRUCTION[:40])


class Kimi:
    """Answers the fake's requests: summaries as SUMMARY-n, answers briefly (or as a test says)."""

    def __init__(self, fake: FakeKimi) -> None:
        self.fake = fake
        self.summaries = 0
        self.fail_summaries = False
        self.answer: Callable[[dict[str, Any]], Reply] = lambda body: Reply(content="ok", reasoning="hm")
        fake.responder = self.reply

    def reply(self, body: dict[str, Any]) -> Reply:
        if is_summary(body):
            if self.fail_summaries:
                return Reply(
                    status=400, error_type="invalid_request_error", error_message="no summaries today"
                )
            self.summaries += 1
            return Reply(content=f"SUMMARY-{self.summaries}: alice asked questions.", reasoning="")
        return self.answer(body)

    @property
    def answers(self) -> list[tuple[int, dict[str, Any]]]:
        return [(i, r) for i, r in enumerate(self.fake.requests) if not is_summary(r)]

    @property
    def summary_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.fake.requests if is_summary(r)]


async def ask(bot: BotHarness, root: str, i: int) -> None:
    ts = f"{root[:-3]}{i + 1:03d}"
    await bot.send_event(message(f"q{i} " + "x" * QUESTION, ts, thread_ts=root))
    await bot.settle()


async def follow_ups_until(bot: BotHarness, root: str, count: int, reached: asyncio.Event) -> None:
    """Up to `count` long follow-ups in the thread (ts root's seconds .1, .2, ...), each answered before the
    next, until `reached` is set while one is answered."""
    for i in range(count):
        ts = f"{root.split('.')[0]}.{i + 1:06d}"
        await bot.send_event(message(f"q{i} " + "x" * QUESTION, ts, thread_ts=root))
        settled = asyncio.create_task(bot.settle(30))
        waiting = asyncio.create_task(reached.wait())
        await asyncio.wait({settled, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if reached.is_set():
            settled.cancel()
            return
        waiting.cancel()


async def test_a_thread_three_times_the_window_answers_with_a_summary_at_the_head_and_a_stable_prefix(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    bot: BotHarness = await make_bot(**WINDOW_SETTINGS)
    root = "1700000950.000000"
    await bot.send_event(mention("let us begin", root))
    await bot.settle()
    for i in range(22):
        await ask(bot, root, i)
    assert 22 * QUESTION / CHARS_PER_TOKEN > 3 * BUDGET  # the thread is three times the window

    # The last answer: the summary of everything before its window leads it, right after the system prompt.
    last = fake_kimi.requests[-1]["messages"]
    assert last[1]["role"] == "system" and last[1]["content"].startswith(
        "Summary of the earlier conversation"
    )
    assert re.match(
        r"Summary of the earlier conversation \(messages 1 to \d+, no longer shown\):\n", last[1]["content"]
    )
    assert f"SUMMARY-{kimi.summaries}:" in last[1]["content"]
    assert last[2]["role"] == "user" and last[-1]["content"].startswith("alice: q21")
    footer = fake_slack.bodies(CHANNEL, root)[-1]
    assert re.search(r"\d+ earlier messages summarised to fit the context window", footer)
    assert "left out" not in footer

    # Between compactions each request begins with the whole request before it, byte for byte.
    stable = compactions = 0
    answers = kimi.answers
    for (i, before), (j, after) in itertools.pairwise(answers):
        if any(is_summary(r) for r in fake_kimi.requests[i + 1 : j]):
            compactions += 1
            continue
        prefix = before["messages"]
        assert json.dumps(after["messages"][: len(prefix)]) == json.dumps(prefix)
        stable += 1
    assert compactions == kimi.summaries >= 3 and stable >= 2 * compactions

    # Each summary request: thinking off, a bounded output, and the summary before it folded in.
    for n, request in enumerate(kimi.summary_requests, start=1):
        assert request["thinking"] == {"type": "disabled"}
        assert request["max_completion_tokens"] == summary_output_cap(BUDGET)
        assert request["messages"][1]["role"] == "user"
        if n > 1:
            assert "Summary of messages 1 to " in request["messages"][1]["content"]
            assert f"SUMMARY-{n - 1}:" in request["messages"][1]["content"]

    # Cached per range, expiring with the thread.
    key = ThreadSummaries.key(thread_key(root))
    stored = await bot.deps.redis.hgetall(key)
    assert len(stored) == kimi.summaries
    assert 29 * 86_400 < await bot.deps.redis.ttl(key) <= 30 * 86_400
    # Metered like every request: the summaries' tokens are in the usage, and no turn counted twice.
    team = await bot.deps.usage.day(TEAM_ID, dt.date.fromisoformat(day_of(bot.deps.usage.now())))
    assert team["prompt_tokens"] == str(sum(fake_kimi.prompt_tokens(r) for r in fake_kimi.requests))
    assert team["turns"] == str(len(kimi.answers))

    # `forget` deletes them with the rest of the thread.
    await bot.send_event(mention("forget", "1700000950.000900", thread_ts=root))
    await bot.settle()
    assert await bot.deps.redis.exists(key) == 0


async def test_a_failed_summary_leaves_the_turns_out_says_so_and_the_answer_still_comes(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    kimi.fail_summaries = True
    bot: BotHarness = await make_bot(**WINDOW_SETTINGS)
    root = "1700000951.000000"
    await bot.send_event(mention("let us begin", root))
    await bot.settle()
    i = 0
    while not kimi.summary_requests:
        await ask(bot, root, i)
        i += 1
    failed_at = len(fake_kimi.requests) - 1
    assert is_summary(fake_kimi.requests[failed_at - 1])  # asked first (no retry for a 400), then answered
    footer = fake_slack.bodies(CHANNEL, root)[-1]
    assert re.search(
        r"\d+ earlier messages left out to fit the context window; they could not be summarised", footer
    )
    assert fake_slack.bodies(CHANNEL, root)[-1].startswith("ok")
    assert fake_kimi.requests[failed_at]["messages"][1]["role"] == "user"  # no summary at the head
    assert await bot.deps.redis.exists(ThreadSummaries.key(thread_key(root))) == 0

    # Summaries work again: the next compaction summarises from where the dropped turns end.
    kimi.fail_summaries = False
    while not kimi.summaries:
        await ask(bot, root, i)
        i += 1
    head = fake_kimi.requests[-1]["messages"][1]["content"]
    first = int(re.match(r"Summary of the earlier conversation \(messages (\d+) to", head).group(1))  # type: ignore[union-attr]
    assert first > 1
    footer = fake_slack.bodies(CHANNEL, root)[-1]
    assert f"{first - 1} earlier messages left out to fit the context window" in footer
    assert "summarised to fit the context window" in footer and "could not" not in footer


async def test_a_rerun_after_a_crash_reuses_the_cached_summary(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    held = asyncio.Event()

    def answer(body: dict[str, Any]) -> Reply:
        if kimi.summaries == 1 and not held.is_set():  # the answer right after the first summary hangs
            held.set()
            return Reply(content="ok", reasoning="hm", first_byte_delay=2.0)
        return Reply(content="ok", reasoning="hm")

    kimi.answer = answer
    first: BotHarness = await make_bot(**WINDOW_SETTINGS)
    root = "1700000952.000000"
    await first.send_event(mention("let us begin", root))
    await first.settle()
    await follow_ups_until(first, root, 30, held)
    assert held.is_set() and kimi.summaries == 1
    crashed = fake_kimi.requests[-1]
    await first.worker.drain(grace_s=0)  # the worker dies mid-answer: the job goes back on the queue

    second: BotHarness = await make_bot(**WINDOW_SETTINGS)
    await second.settle()
    assert kimi.summaries == 1 and len(kimi.summary_requests) == 1  # not paid for twice
    rerun = fake_kimi.requests[-1]
    assert not is_summary(rerun) and rerun["messages"][1] == crashed["messages"][1]
    assert rerun["messages"][1]["content"].endswith("SUMMARY-1: alice asked questions.")
    assert re.search(r"summarised to fit the context window", fake_slack.bodies(CHANNEL, root)[-1])


async def test_answers_with_tools_get_the_summary_at_the_head_too(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    bot: BotHarness = await make_bot(**WINDOW_SETTINGS)
    give(bot, Probe())
    root = "1700000953.000000"
    await bot.send_event(mention("let us begin", root))
    await bot.settle()
    i = 0
    while not kimi.summaries:
        await ask(bot, root, i)
        i += 1
    request = fake_kimi.requests[-1]
    assert request.get("tools") and not is_summary(request)
    assert request["messages"][1]["content"].startswith("Summary of the earlier conversation")
    assert "summarised to fit the context window" in fake_slack.bodies(CHANNEL, root)[-1]
