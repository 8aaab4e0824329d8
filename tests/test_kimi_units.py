"""Model profiles, stream accumulation and error classification (pure)."""

from __future__ import annotations

import pytest

from bot.errors import Reason
from bot.kimi.client import KimiClient, ModelCall, classify
from bot.kimi.events import Accumulator, Reasoning, Text
from bot.kimi.profiles import CONSERVATIVE, PROFILES, profile_for


def test_k26_switches_thinking_on_through_extra_body_and_sends_no_sampling() -> None:
    params = profile_for("kimi-k2.6").request_params("high")
    assert params["extra_body"] == {"thinking": {"type": "enabled"}}
    assert "temperature" not in params and "top_p" not in params
    assert params["max_completion_tokens"] == 32_768


def test_k2_thinking_thinks_by_id_with_temperature_one_also_on_third_party_hosts() -> None:
    for model in ("kimi-k2-thinking", "kimi-k2-thinking-turbo", "moonshotai/Kimi-K2-Thinking"):
        params = profile_for(model).request_params("high")
        assert params["temperature"] == 1.0 and "extra_body" not in params


def test_k3_family_gets_reasoning_effort_and_a_million_token_window() -> None:
    for model in ("kimi-k3", "kimi-k3.1-pro", "kimi-k3.2-preview"):
        profile = profile_for(model)
        assert profile.context_window == 1_048_576
        assert profile.request_params("low")["reasoning_effort"] == "low"


def test_k27_code_always_thinks_and_needs_no_switch() -> None:
    params = profile_for("kimi-k2.7-code-highspeed").request_params("high", 8_000)
    assert params == {"max_completion_tokens": 8_000}


def test_unknown_models_get_a_conservative_profile() -> None:
    assert profile_for("gpt-something") is CONSERVATIVE
    assert not CONSERVATIVE.known
    assert CONSERVATIVE.request_params("high") == {"max_completion_tokens": 16_384}


def test_no_k25_or_newer_profile_sends_sampling_parameters() -> None:
    for model_id, profile in PROFILES.items():
        if "k2-thinking" not in model_id:
            assert not profile.fixed_sampling, model_id


def test_cost_uses_cached_price_for_cached_tokens() -> None:
    k26 = profile_for("kimi-k2.6")
    assert k26.cost_usd(1_000_000, 500_000, 0) == pytest.approx(0.5 * 0.95 + 0.5 * 0.16)


def test_accumulator_builds_the_whole_message_with_usage_from_choices() -> None:
    acc = Accumulator()
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "think "}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "more"}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "functions.search:0",
                                "type": "function",
                                "function": {"name": "search", "arguments": '{"q":'},
                            }
                        ]
                    },
                }
            ]
        },
        {
            "choices": [
                {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}}
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {},
                    "finish_reason": "tool_calls",
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 4},
                }
            ]
        },
    ]
    events = [e for c in chunks for e in acc.feed(c)]
    assert events == [Reasoning("think "), Reasoning("more"), Text("Hel"), Text("lo")]
    assert acc.message() == {
        "role": "assistant",
        "content": "Hello",
        "reasoning_content": "think more",
        "tool_calls": [
            {
                "id": "functions.search:0",
                "type": "function",
                "function": {"name": "search", "arguments": '{"q":"x"}'},
            }
        ],
    }
    assert acc.usage is not None and acc.usage.cached_tokens == 4 and acc.finish_reason == "tool_calls"


def test_empty_reasoning_field_is_kept_for_replay() -> None:
    acc = Accumulator()
    acc.feed({"choices": [{"delta": {"reasoning_content": "", "content": "ok"}, "finish_reason": "stop"}]})
    assert acc.message()["reasoning_content"] == ""


def test_openai_style_usage_details_are_read_too() -> None:
    acc = Accumulator()
    acc.feed(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 7,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": 3},
            },
        }
    )
    assert acc.usage is not None and acc.usage.cached_tokens == 3


@pytest.mark.parametrize(
    ("status", "kind", "message", "reason", "retry"),
    [
        (429, "engine_overloaded_error", "overloaded", Reason.OVERLOADED, True),
        (429, "rate_limit_reached_error", "", Reason.RATE_LIMITED, True),
        (429, "exceeded_current_quota_error", "Your account is suspended", Reason.QUOTA, False),
        (401, "invalid_authentication_error", "", Reason.AUTH, False),
        (403, "permission_denied_error", "", Reason.AUTH, False),
        (404, "resource_not_found_error", "Not found the model", Reason.MODEL, False),
        (400, "content_filter", "considered high risk", Reason.FILTERED, False),
        (
            400,
            "invalid_request_error",
            "Invalid request: Input token length too long",
            Reason.TOO_LONG,
            False,
        ),
        (400, "invalid_request_error", "invalid temperature", Reason.INVALID, False),
        (500, "server_error", "", Reason.UNAVAILABLE, True),
        (503, "server_unavailable", "", Reason.UNAVAILABLE, True),
        (None, None, "", Reason.UNAVAILABLE, True),
    ],
)
def test_errors_are_sorted_into_reasons(
    status: int | None, kind: str | None, message: str, reason: Reason, retry: bool
) -> None:
    verdict = classify(status, kind, message)
    assert (verdict.reason, verdict.retryable) == (reason, retry)


def test_sse_lines_are_read_as_kimi_sends_them() -> None:
    from bot.kimi.client import DONE, sse_data

    assert sse_data('data: {"choices": []}') == {"choices": []}
    assert sse_data("data:[DONE]") is DONE
    assert sse_data("") is None and sse_data(": keep-alive") is None and sse_data("event: message") is None
    with pytest.raises(ValueError):
        sse_data("data: {oops")


def test_thinking_off_is_sent_only_where_the_model_can_switch_it() -> None:
    assert profile_for("kimi-k2.6").request_params("high", thinking=False)["extra_body"] == {
        "thinking": {"type": "disabled"}
    }
    for model in ("kimi-k2.7-code", "kimi-k3"):
        assert "extra_body" not in profile_for(model).request_params("high", thinking=False)


async def test_each_request_may_name_its_own_model_and_profile() -> None:
    """A channel's model: the request's model, output budget and thinking parameters follow it."""
    client = KimiClient(
        api_key="k", base_url="http://127.0.0.1:9/v1", model="kimi-k2.6", profile=profile_for("kimi-k2.6")
    )
    try:
        default = client.request_kwargs([{"role": "user", "content": "hi"}])
        assert default["model"] == "kimi-k2.6" and default["extra_body"]["thinking"]["type"] == "enabled"
        k3 = client.request_kwargs(
            [{"role": "user", "content": "hi"}], call=ModelCall("kimi-k3", profile_for("kimi-k3"), "max")
        )
        assert k3["model"] == "kimi-k3" and k3["reasoning_effort"] == "max"
        assert k3["max_completion_tokens"] == profile_for("kimi-k3").output_budget and "extra_body" not in k3
    finally:
        await client.close()


async def test_kimi_max_completion_tokens_applies_to_kimi_model_only() -> None:
    """KIMI_MODEL=kimi-k3 with a K3-sized output budget must not leave a kimi-k2.6 channel's window
    without room for input."""
    client = KimiClient(
        api_key="k",
        base_url="http://127.0.0.1:9/v1",
        model="kimi-k3",
        profile=profile_for("kimi-k3"),
        max_completion_tokens=262_144,
    )
    try:
        k3 = ModelCall("kimi-k3", profile_for("kimi-k3"), "high")
        k26 = ModelCall("kimi-k2.6", profile_for("kimi-k2.6"))
        assert client.budget_of(k3) == 262_144
        assert client.budget_of(k26) == profile_for("kimi-k2.6").output_budget
        assert k26.profile.context_window - client.budget_of(k26) > 200_000  # room for the question
        sent = client.request_kwargs([{"role": "user", "content": "hi"}], call=k26)
        assert sent["max_completion_tokens"] == profile_for("kimi-k2.6").output_budget
    finally:
        await client.close()
