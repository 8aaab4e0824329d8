"""Window fitting and message building (pure)."""

from __future__ import annotations

from bot.context import TRIM_HEADROOM, calibrate, estimate_tokens, fit, to_messages, user_entry


def history(n: int, size: int = 300) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    for i in range(n):
        entries.append(user_entry("alice", f"q{i} " + "x" * size, ts=f"{i}.1", user="U1"))
        entries.append(
            {
                "role": "assistant",
                "content": f"a{i} " + "y" * size,
                "reasoning_content": "r",
                "ts": f"{i}.2",
                "usage": {"prompt_tokens": 1},
            }
        )
    entries.append(user_entry("bob", "latest question", ts="99.1", user="U2"))
    return entries


def test_messages_carry_only_api_fields_and_keep_reasoning() -> None:
    messages = to_messages("sys", history(1))
    assert messages[0] == {"role": "system", "content": "sys"}
    assert set(messages[2]) == {"role", "content", "reasoning_content"}
    assert messages[1]["content"].startswith("alice: q0")


def test_everything_is_sent_when_it_fits() -> None:
    result = fit("sys", history(3), start=0, budget_tokens=100_000)
    assert result.start == 0 and result.left_out == 0 and not result.too_long
    assert len(result.messages) == 1 + 7


def test_oldest_turns_are_dropped_first_with_headroom_and_start_at_a_user_turn() -> None:
    entries = history(20)
    total = sum(estimate_tokens(m) for m in to_messages("sys", entries))
    budget = total // 2
    result = fit("sys", entries, start=0, budget_tokens=budget)
    assert 0 < result.start < len(entries) - 1
    assert entries[result.start]["role"] == "user"
    assert result.messages[-1]["content"] == "bob: latest question"
    sent = sum(estimate_tokens(m) for m in result.messages)
    assert sent <= budget * TRIM_HEADROOM + 200


def test_start_never_moves_back_so_the_prefix_stays_stable() -> None:
    entries = history(20)
    first = fit("sys", entries, start=0, budget_tokens=4_000)
    entries.append({"role": "assistant", "content": "short"})
    entries.append(user_entry("alice", "one more", ts="100.1", user="U1"))
    second = fit("sys", entries, start=first.start, budget_tokens=4_000)
    assert second.start == first.start  # headroom absorbed the new turn: same prefix, cache stays warm
    assert second.messages[: len(first.messages) - 1] == first.messages[:-1]


def test_a_single_message_too_big_for_the_window_is_flagged() -> None:
    entries = [user_entry("alice", "z" * 30_000, ts="1.1", user="U1")]
    assert fit("sys", entries, start=0, budget_tokens=1_000).too_long


def test_calibration_follows_the_real_prompt_token_count_within_bounds() -> None:
    assert calibrate(1000, 500) == 0.5
    assert calibrate(1000, 100_000) == 4.0
    assert calibrate(0, 10) == 1.0
    message = {"role": "user", "content": "x" * 3000}
    assert estimate_tokens(message, 2.0) > 1.9 * estimate_tokens(message)


def test_a_model_that_ignores_earlier_reasoning_is_not_sent_it_except_behind_tool_calls() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    entries = [
        *history(1),
        {"role": "assistant", "content": "", "reasoning_content": "why lookup", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "found"},
        user_entry("bob", "next", ts="100.1", user="U2"),
    ]
    sent = to_messages("sys", entries, replays_reasoning=False)
    assert "reasoning_content" not in sent[2]  # a K3 answer, now sent to a model that ignores it
    assert sent[4]["reasoning_content"] == "why lookup"  # a thinking model needs it behind its tool call
    assert to_messages("sys", entries)[2]["reasoning_content"] == "r"  # replayed by models that replay it
    fitted = fit("sys", entries, start=0, budget_tokens=100_000, replays_reasoning=False)
    assert fitted.messages == sent
