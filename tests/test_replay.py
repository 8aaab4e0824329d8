"""A job's kept finished answer (bot/pipeline.py dump_finished / finished_answer): what a re-run after a crash
between the last Slack write and the record delivers instead of asking Kimi again; the pure parts, then
end to end through the Bolt app with a worker killed as its answer lands."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from bot.agent.loop import Cap
from bot.kimi.events import Accumulator, Usage
from bot.pipeline import dump_finished, finished_answer, saved_accumulator
from bot.slack.blocks import ACTION_STOP
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE, CHANNEL, mention, message, thread_key
from tests.test_compaction import QUESTION, WINDOW_SETTINGS, Kimi, follow_ups_until, is_summary


def test_a_kept_answer_comes_back_as_the_same_message_usage_and_cap() -> None:
    acc = Accumulator(
        reasoning=["think ", "hard"],
        content=["Four", " — ✓"],
        usage=Usage(100, 20, 64),
        finish_reason="length",
        saw_reasoning_field=True,
    )
    kept = dump_finished(
        acc, 3.5, 1.25, cap=Cap.STEPS, left_out=4, shown_left_out=1, notes=("a note",), estimated=900
    )
    saved = finished_answer({"final": kept})
    assert saved is not None and saved["cap"] == "steps" and saved["elapsed_s"] == 3.5
    assert (saved["left_out"], saved["shown_left_out"], saved["notes"], saved["estimated"]) == (
        4,
        1,
        ["a note"],
        900,
    )
    again = saved_accumulator(saved)
    assert again.message() == acc.message()  # replayed into the history byte for byte
    assert again.usage == acc.usage and again.finish_reason == "length"


def test_an_empty_reasoning_field_stays_in_the_replayed_message() -> None:
    acc = Accumulator(content=["hi"], saw_reasoning_field=True)
    saved = finished_answer(
        {"final": dump_finished(acc, 1.0, None, left_out=0, shown_left_out=0, notes=(), estimated=1)}
    )
    assert saved is not None and saved_accumulator(saved).message() == {
        "role": "assistant",
        "content": "hi",
        "reasoning_content": "",
    }


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "{oops",
        "[]",
        "null",
        json.dumps({"message": "x"}),
        json.dumps({"message": {"content": 5}}),
        json.dumps({"message": {"content": "hi"}}),  # kept by an older version: no window facts
        json.dumps(
            {
                "message": {"content": "hi"},
                "left_out": 0,
                "shown_left_out": 0,
                "estimated": 1,
                "notes": [],
                "cap": "no-such-cap",
            }
        ),
        json.dumps(
            {
                "message": {"content": "hi"},
                "left_out": 0,
                "shown_left_out": 0,
                "estimated": 1,
                "notes": [],
                "usage": {"tokens": 3},
            }
        ),
    ],
)
def test_nothing_or_something_unreadable_kept_means_ask_kimi_again(raw: str) -> None:
    assert finished_answer({"final": raw} if raw else {}) is None


# ---- end to end: a run killed as its answer lands, re-run by a new worker --------------------------------
async def wait_until(predicate: Callable[[], bool], limit_s: float = 20.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_stop_pressed_after_kimi_finished_does_not_replace_the_kept_answer(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_kimi.script(Reply(content="KEPT answer", reasoning="hm"))
    hold = fake_slack.hold("chat.update", when=lambda args: "KEPT" in str(args.get("text") or ""))
    first: BotHarness = await make_bot()
    ts = "1700000963.000000"
    await first.send_event(mention("question", ts))
    await hold.wait()  # Slack shows the whole answer; the worker has not heard back
    await first.deps.stops.request(CHANNEL, ts, ALICE)  # Stop, pressed as the answer landed
    await first.worker.drain(grace_s=0)  # and the worker dies before recording it
    hold.release()
    second: BotHarness = await make_bot()
    await second.settle(30)
    bodies = fake_slack.bodies(CHANNEL, ts)
    assert len(fake_kimi.requests) == 1
    assert len(bodies) == 1 and bodies[0].startswith("KEPT answer"), bodies
    state = await second.deps.threads.load(thread_key(ts))
    assert [e["content"] for e in state.entries if e["role"] == "assistant"] == ["KEPT answer"]


async def test_a_replayed_answer_asks_kimi_nothing_not_even_a_summary(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    kimi.fail_summaries = True  # the first run's summary fails: it answers without one

    def answer(body: dict[str, Any]) -> Reply:
        if kimi.summary_requests and not any("REPLAYME" in str(r) for r in fake_slack.calls):
            return Reply(content="REPLAYME ok", reasoning="hm")
        return Reply(content="ok", reasoning="hm")

    kimi.answer = answer
    hold = fake_slack.hold("chat.update", when=lambda args: "REPLAYME" in str(args.get("text") or ""))
    first: BotHarness = await make_bot(**WINDOW_SETTINGS)
    root = "1700000961.000000"
    await first.send_event(mention("let us begin", root))
    await first.settle()
    await follow_ups_until(first, root, 40, hold.reached)
    assert kimi.summary_requests
    await first.worker.drain(grace_s=0)  # killed at the last Slack write: Kimi's answer is kept
    hold.release()
    asked = len(fake_kimi.requests)

    kimi.fail_summaries = False
    second: BotHarness = await make_bot(**WINDOW_SETTINGS)
    await second.settle(30)
    footer = fake_slack.bodies(CHANNEL, root)[-1]
    assert "REPLAYME ok" in footer  # replayed
    assert fake_kimi.requests[asked:] == []  # neither the answer nor a summary asked again
    assert "could not be summarised" in footer  # the footer the first run's answer had


async def test_stop_pressed_during_the_summary_request_means_kimi_is_not_asked_for_the_answer(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    kimi = Kimi(fake_kimi)
    inner = kimi.reply

    def reply(body: dict[str, Any]) -> Reply:
        r = inner(body)
        if is_summary(body):
            r.first_byte_delay = 3.0  # a summary takes a while
        return r

    fake_kimi.responder = reply
    bot: BotHarness = await make_bot(**WINDOW_SETTINGS)
    root = "1700000960.000000"
    await bot.send_event(mention("let us begin", root))
    await bot.settle()
    summary_at = -1
    for i in range(40):
        n = len(fake_kimi.requests)
        await bot.send_event(message(f"q{i} " + "x" * QUESTION, f"1700000960.{i + 1:06d}", thread_ts=root))
        await wait_until(lambda n=n: len(fake_kimi.requests) > n)  # type: ignore[misc]
        if is_summary(fake_kimi.requests[-1]):
            summary_at = len(fake_kimi.requests) - 1
            break
        await bot.settle()
    assert summary_at >= 0

    def placeholder() -> dict[str, Any] | None:
        for m in reversed(fake_slack.replies(CHANNEL, root)):
            for b in m.get("blocks") or []:
                if b.get("type") == "actions" and any(
                    e.get("action_id") == ACTION_STOP for e in b.get("elements") or []
                ):
                    return m
        return None

    await wait_until(lambda: placeholder() is not None)
    status, _ = await bot.click(placeholder(), ACTION_STOP)  # type: ignore[arg-type]
    assert status == 200
    await bot.settle(30)
    # Stop was pressed before the answer was asked for: Kimi is not asked (nor paid) for it.
    assert len(fake_kimi.requests) == summary_at + 1
    assert "Stopped" in fake_slack.bodies(CHANNEL, root)[-1]
