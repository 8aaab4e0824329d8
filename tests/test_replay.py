"""A job's kept finished answer (bot/pipeline.py dump_finished / finished_answer): what a re-run after a crash
between the last Slack write and the record delivers instead of asking Kimi again. Pure."""

from __future__ import annotations

import json

import pytest

from bot.agent.loop import Cap
from bot.kimi.events import Accumulator, Usage
from bot.pipeline import dump_finished, finished_answer, saved_accumulator


def test_a_kept_answer_comes_back_as_the_same_message_usage_and_cap() -> None:
    acc = Accumulator(
        reasoning=["think ", "hard"],
        content=["Four", " — ✓"],
        usage=Usage(100, 20, 64),
        finish_reason="length",
        saw_reasoning_field=True,
    )
    saved = finished_answer({"final": dump_finished(acc, 3.5, 1.25, Cap.STEPS)})
    assert saved is not None and saved["cap"] == "steps" and saved["elapsed_s"] == 3.5
    again = saved_accumulator(saved)
    assert again.message() == acc.message()  # replayed into the history byte for byte
    assert again.usage == acc.usage and again.finish_reason == "length"


def test_an_empty_reasoning_field_stays_in_the_replayed_message() -> None:
    acc = Accumulator(content=["hi"], saw_reasoning_field=True)
    saved = finished_answer({"final": dump_finished(acc, 1.0, None)})
    assert saved is not None and saved_accumulator(saved).message() == {
        "role": "assistant",
        "content": "hi",
        "reasoning_content": "",
    }


@pytest.mark.parametrize(
    "raw",
    ["", "{oops", "[]", json.dumps({"message": "x"}), json.dumps({"message": {"content": 5}}), "null"],
)
def test_nothing_or_something_unreadable_kept_means_ask_kimi_again(raw: str) -> None:
    assert finished_answer({"final": raw} if raw else {}) is None
