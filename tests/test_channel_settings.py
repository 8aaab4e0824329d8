"""Per-channel settings, the pure part: resolution (channel > workspace > env), validation of the form,
what is saved, the modal's Block Kit against Slack's limits, and the Home view."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal

from bot.channel_settings import (
    SYSTEM_PROMPT_LIMIT,
    ChannelConfig,
    SettingsKeys,
    differences,
    env_config,
    name_list,
    overrides_to_save,
    pin,
    pinned,
    resolve,
    validate,
)
from bot.kimi.profiles import PROFILES
from bot.settings import Settings
from bot.slack.settings_view import (
    CALLBACK_SETTINGS,
    WORKSPACE,
    form_hidden_tools,
    form_target,
    form_tools,
    home_view,
    read_state,
    redrawn,
    settings_modal,
    shown_tools,
)
from tests.fakes.slack_api import input_problems, view_problems

TOOLS = ["fetch_url", "slack_search", "web_search"]


def form(**overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "model": "kimi-k2.6",
        "thinking": "on",
        "effort": None,
        "system_prompt": "",
        "tools_on": list(TOOLS),
        "followups": "all",
        "budget_usd": "",
    }
    values.update(overrides)
    return values


def test_channel_overrides_beat_workspace_defaults_which_beat_the_env(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(kimi_model="kimi-k2.6", kimi_reasoning_effort="high")
    assert resolve(settings, {}, {}) == env_config(settings)
    workspace = {"model": "kimi-k3", "effort": "low", "system_prompt": "Be brief.", "budget_usd": "9"}
    channel = {"model": "kimi-k2.7-code", "tools_off": '["web_search"]', "followups": "mentions"}
    config = resolve(settings, workspace, channel)
    assert config.model == "kimi-k2.7-code"  # the channel's
    assert config.effort == "low" and config.system_prompt_addendum == "Be brief."  # the workspace's
    assert config.tools_off == frozenset({"web_search"}) and config.followups == "mentions"
    assert config.budget_usd is None  # a budget is the channel's own, never the workspace hash's
    assert resolve(settings, workspace, {"budget_usd": "12.50"}).budget_usd == Decimal("12.50")
    assert resolve(settings, workspace).model == "kimi-k3"


def test_unreadable_stored_values_are_skipped_not_fatal(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    config = resolve(settings, {}, {"thinking": "maybe", "tools_off": "{not json", "budget_usd": "-3"})
    assert config.thinking is True and config.tools_off == frozenset() and config.budget_usd is None


def test_the_system_prompt_is_byte_stable_and_carries_the_addendum() -> None:
    config = ChannelConfig("kimi-k2.6", True, "high", system_prompt_addendum="Answer in French.\n")
    first, second = config.system_prompt("BASE"), config.system_prompt("BASE")
    assert first == second == "BASE\n\nAnswer in French."
    assert ChannelConfig("kimi-k2.6", True, "high").system_prompt("BASE") == "BASE"


def test_validation_errors_name_the_field() -> None:
    def errors(**overrides: object) -> dict[str, str]:
        return validate(form(**overrides), offered_tools=TOOLS).errors  # type: ignore[arg-type]

    assert errors() == {}
    assert "budget_usd" in errors(budget_usd="-5")
    assert "budget_usd" in errors(budget_usd="ten dollars")
    assert "budget_usd" in errors(budget_usd="NaN")
    assert "thinking" in errors(model="kimi-k2.7-code", thinking="off")  # always thinks
    assert "thinking" in errors(model="kimi-k3", thinking="off")
    assert errors(model="kimi-k2.6", thinking="off") == {}
    assert "effort" in errors(model="kimi-k2.6", effort="high")  # no reasoning_effort on K2
    assert errors(model="kimi-k3", effort="max") == {}
    assert "effort" in errors(model="kimi-k3", effort="medium")  # K3 takes low|high|max
    assert "system_prompt" in errors(system_prompt="x" * (SYSTEM_PROMPT_LIMIT + 1))
    assert errors(system_prompt="x" * SYSTEM_PROMPT_LIMIT) == {}
    assert "model" in errors(model="gpt-4o")
    assert "followups" in errors(followups="sometimes")


def test_tools_off_are_the_unchecked_ones_and_unlisted_ones_keep_their_state() -> None:
    checked = validate(
        form(tools_on=["fetch_url"]),  # type: ignore[arg-type]
        offered_tools=TOOLS,
        previous_off=frozenset({"mcp_tool_not_listed", "web_search"}),
    )
    assert json.loads(checked.values["tools_off"]) == ["mcp_tool_not_listed", "slack_search", "web_search"]


def test_a_valid_budget_is_kept_and_the_workspace_form_has_none() -> None:
    assert validate(form(budget_usd="25.5"), offered_tools=TOOLS).values["budget_usd"] == "25.5"  # type: ignore[arg-type]
    assert validate(form(budget_usd="1e2"), offered_tools=TOOLS).values["budget_usd"] == "100"  # type: ignore[arg-type]
    # More decimals than cents are rounded to cents (the README says so), whatever the notation typed.
    assert validate(form(budget_usd="2.345"), offered_tools=TOOLS).values["budget_usd"] == "2.34"  # type: ignore[arg-type]
    assert validate(form(budget_usd="0.0049"), offered_tools=TOOLS).values["budget_usd"] == "0.00"  # type: ignore[arg-type]
    assert validate(form(budget_usd="1e-999999999"), offered_tools=TOOLS).values["budget_usd"] == "0.00"  # type: ignore[arg-type]
    workspace = validate(form(budget_usd="-1"), offered_tools=TOOLS, workspace=True)  # type: ignore[arg-type]
    assert workspace.errors == {} and "budget_usd" not in workspace.values


def test_only_what_differs_from_the_inherited_settings_is_saved() -> None:
    inherited = ChannelConfig("kimi-k2.6", True, "high")
    submitted = validate(
        form(model="kimi-k3", effort="high", system_prompt="Legal tone."),  # type: ignore[arg-type]
        offered_tools=TOOLS,
    ).values
    changes = overrides_to_save(inherited, submitted)
    assert changes["model"] == "kimi-k3" and changes["system_prompt"] == "Legal tone."
    assert changes["effort"] is None and changes["thinking"] is None and changes["followups"] is None
    assert changes["tools_off"] is None  # all on, as inherited
    assert changes["budget_usd"] is None  # empty: no budget


def test_keys_carry_the_team_id_as_hash_tag() -> None:
    keys = SettingsKeys("T123")
    assert keys.channel("C9") == "kimibot:settings:{T123}:channel:C9"
    assert keys.workspace == "kimibot:settings:{T123}:workspace"
    assert all("{T123}" in k for k in (keys.channels, keys.version))


def test_the_modal_keeps_slacks_limits_and_reads_back(make_settings: Callable[..., Settings]) -> None:
    config = ChannelConfig(
        "kimi-k3", True, "max", "Be formal.", frozenset({"web_search"}), "mentions", Decimal("20")
    )
    many_tools = [f"mcp_tool_{i:02d}" for i in range(63)]
    view = settings_modal("C123", config, many_tools, team="T123")
    assert view["callback_id"] == CALLBACK_SETTINGS and view["private_metadata"] == "T123:C123"
    assert view_problems(view, "modal") == []
    for block in view["blocks"]:
        if block["type"] == "input":
            assert input_problems(block) == [], block["block_id"]
    by_id = {b.get("block_id"): b for b in view["blocks"]}
    assert [o["value"] for o in by_id["model"]["element"]["options"]] == list(PROFILES)
    assert by_id["effort"]["element"]["initial_option"]["value"] == "max"
    assert "thinking" not in by_id  # K3 always thinks: nothing to switch
    k26 = {
        b.get("block_id")
        for b in settings_modal("C123", ChannelConfig("kimi-k2.6", False, "high"), [], team="T123")["blocks"]
    }
    assert "thinking" in k26 and "effort" not in k26
    assert by_id["system_prompt"]["element"]["multiline"] is True
    assert by_id["budget_usd"]["element"]["type"] == "number_input"
    tool_blocks = [b for b in view["blocks"] if str(b.get("block_id", "")).startswith("tools_")]
    assert len(tool_blocks) == 5 and all(b["element"]["action_id"] == "tools" for b in tool_blocks)
    assert len(shown_tools(many_tools)) == 50
    assert any("13 more tools are not listed" in json.dumps(b) for b in view["blocks"])
    workspace = settings_modal(WORKSPACE, config, TOOLS, team="T123")
    assert "budget_usd" not in {b.get("block_id") for b in workspace["blocks"]}
    assert workspace["private_metadata"] == f"T123:{WORKSPACE}" and view_problems(workspace, "modal") == []
    state = {
        "model": {"model": {"type": "static_select", "selected_option": {"value": "kimi-k2.6"}}},
        "thinking": {"thinking": {"type": "radio_buttons", "selected_option": {"value": "off"}}},
        "effort": {"effort": {"type": "static_select", "selected_option": None}},
        "system_prompt": {"system_prompt": {"type": "plain_text_input", "value": "Hi"}},
        "tools_0": {"tools": {"type": "checkboxes", "selected_options": [{"value": "fetch_url"}]}},
        "followups": {"followups": {"type": "radio_buttons", "selected_option": {"value": "all"}}},
        "budget_usd": {"budget_usd": {"type": "number_input", "value": "3.5"}},
    }
    assert read_state(state) == {
        "model": "kimi-k2.6",
        "thinking": "off",
        "effort": None,
        "system_prompt": "Hi",
        "tools_on": ["fetch_url"],
        "followups": "all",
        "budget_usd": "3.5",
    }


def test_a_form_says_which_tools_it_offered() -> None:
    many_tools = [f"tool_{i:02d}" for i in range(63)]
    view = settings_modal("C123", ChannelConfig("kimi-k2.6", True, "high"), many_tools, team="T1")
    assert form_tools(view["blocks"]) == shown_tools(many_tools) and form_hidden_tools(view["blocks"]) == 13
    k3 = ChannelConfig("kimi-k3", True, "high")
    again = settings_modal("C123", k3, form_tools(view["blocks"]), team="T1", hidden=13)
    assert form_tools(again["blocks"]) == shown_tools(many_tools) and form_hidden_tools(again["blocks"]) == 13
    bare = settings_modal("C123", ChannelConfig("kimi-k2.6", True, "high"), [], team="T1")
    assert form_tools(bare["blocks"]) == [] and form_hidden_tools(bare["blocks"]) == 0


def test_a_form_names_the_team_and_target_it_was_opened_for() -> None:
    assert form_target("T123:C0LEGAL") == ("T123", "C0LEGAL")
    assert form_target(f"E0ORG:{WORKSPACE}") == ("E0ORG", WORKSPACE)
    for forged in ("C0LEGAL", "T123:", ":C0LEGAL", "T123:general", "x:C0LEGAL", "T123:C0LEGAL:x"):
        assert form_target(forged) is None, forged


def test_a_redrawn_form_keeps_what_was_typed() -> None:
    base = ChannelConfig("kimi-k2.6", True, "high", tools_off=frozenset({"unlisted"}))
    raw: dict[str, str | list[str] | None] = {
        "model": "kimi-k3",
        "system_prompt": "Typed before switching.",
        "tools_on": ["fetch_url"],
        "followups": "mentions",
        "budget_usd": "7",
    }
    config = redrawn(base, raw, TOOLS)
    assert config.model == "kimi-k3" and config.system_prompt_addendum == "Typed before switching."
    assert config.tools_off == frozenset({"unlisted", "slack_search", "web_search"})
    assert config.followups == "mentions" and config.budget_usd == Decimal("7")


def test_the_home_view_lists_defaults_and_what_channels_change() -> None:
    defaults = ChannelConfig("kimi-k2.6", True, "high")
    legal = ChannelConfig("kimi-k3", True, "high", "Legal tone.", budget_usd=Decimal("50"))
    changes = differences(defaults, legal)
    assert changes == ["model kimi-k3", "own system prompt addendum", "budget $50/month"]
    view = home_view(defaults, [("C0LEGAL", changes)], admin=True, usage=[])
    text = json.dumps(view)
    assert view["type"] == "home" and "kimi-k2.6" in text and "<#C0LEGAL>: model kimi-k3" in text
    assert "kimi_edit_workspace_defaults" in text
    assert "kimi_edit_workspace_defaults" not in json.dumps(home_view(defaults, [], admin=False, usage=[]))


def test_a_job_pins_model_thinking_effort_and_tools_for_its_re_run() -> None:
    first = ChannelConfig("kimi-k3", True, "low", "Prompt.", frozenset({"web_search"}), "mentions")
    now = ChannelConfig("kimi-k2.6", False, "high", "New prompt.", frozenset(), "all")
    again = pinned(now, pin(first))
    assert (again.model, again.thinking, again.effort, again.tools_off) == (
        "kimi-k3",
        True,
        "low",
        frozenset({"web_search"}),
    )
    assert again.system_prompt_addendum == "New prompt." and again.followups == "all"  # not pinned
    assert pinned(now, "{not json") == now and pinned(now, "[1]") == now


def test_the_home_view_shows_a_long_list_of_tools_off_as_a_count() -> None:
    many = frozenset(f"mcp_server_{i:03d}__a_rather_long_tool_name" for i in range(300))
    defaults = ChannelConfig("kimi-k2.6", True, "high", tools_off=many)
    view = home_view(
        defaults,
        [("C0LEGAL", differences(ChannelConfig("kimi-k2.6", True, "high"), defaults))],
        admin=True,
        usage=[],
    )
    sections = [b["text"]["text"] for b in view["blocks"] if b["type"] == "section"]
    assert sections and all(len(text) <= 1_000 for text in sections)
    assert all("mcp_server_000__a_rather_long_tool_name" in text for text in sections)
    assert all(re.search(r"and \d+ more", text) for text in sections)
    assert name_list(frozenset({"b", "a"})) == "a, b" and name_list(frozenset({"x" * 700})) == "1 tools"


def test_hostile_numbers_and_nesting_neither_hang_nor_crash(make_settings: Callable[..., Settings]) -> None:
    checked = validate(form(budget_usd="1e-999999999999"), offered_tools=TOOLS)
    assert checked.errors == {} and checked.values["budget_usd"] == "0.00"  # rounded to cents
    assert validate(form(budget_usd="12.345"), offered_tools=TOOLS).values["budget_usd"] == "12.34"
    assert validate(form(budget_usd="40"), offered_tools=TOOLS).values["budget_usd"] == "40"
    assert set(validate(form(budget_usd="1e999999999999"), offered_tools=TOOLS).errors) == {"budget_usd"}
    nested = "[" * 200_000 + "]" * 200_000
    config = resolve(make_settings(), {"tools_off": nested}, {"budget_usd": "1e999999999999"})
    assert config.tools_off == frozenset() and config.budget_usd is None
    assert resolve(make_settings(), {}, {"tools_off": '["a", ["b"], 3]'}).tools_off == frozenset({"a"})
    assert pinned(config, nested) == config


def test_the_form_lists_an_unknown_kimi_model_and_shows_thinking_only_where_it_switches() -> None:
    third_party = ChannelConfig("vendor/kimi-k2-thinking", True, "high", "", frozenset(), "all", None)
    view = settings_modal("C123", third_party, [], team="T123")
    by_id = {b.get("block_id"): b for b in view["blocks"]}
    options = [o["value"] for o in by_id["model"]["element"]["options"]]
    assert options == ["vendor/kimi-k2-thinking", *PROFILES]  # KIMI_MODEL from another host, then the table
    for model in PROFILES:
        config = ChannelConfig(model, False, "high", "", frozenset(), "all", None)
        shown = {b.get("block_id") for b in settings_modal("C123", config, [], team="T123")["blocks"]}
        assert ("thinking" in shown) is (model in ("kimi-k2.5", "kimi-k2.6")), model
        assert ("effort" in shown) is model.startswith("kimi-k3"), model
