"""Prices, costs, budget sentences and the usage report's arithmetic: pure, no I/O (bot/budgets.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from bot.budgets import (
    Budget,
    Refusal,
    Scope,
    Snapshot,
    Totals,
    bars,
    budget_warnings,
    days_back,
    estimate_nusd,
    format_usd,
    months_back,
    over_budget_sentence,
    prompt_bound,
    ranked,
    report_blocks,
    report_text,
    totals_from,
    usd_to_nusd,
)
from bot.kimi.profiles import CONSERVATIVE, PROFILES, parse_prices, profile_for
from bot.settings import SettingsError, load_settings


def test_list_prices_per_million_tokens_from_the_profile_table() -> None:
    assert [
        (PROFILES[m].price_in, PROFILES[m].price_cached, PROFILES[m].price_out)
        for m in ("kimi-k2.6", "kimi-k2.7-code", "kimi-k3")
    ] == [(0.95, 0.16, 4.00), (0.95, 0.19, 4.00), (3.00, 0.30, 15.00)]


def test_cost_prices_cached_input_apart_in_exact_nano_usd() -> None:
    k26 = profile_for("kimi-k2.6")
    # 1M prompt tokens of which 400k cached, 100k output: 0.6*0.95 + 0.4*0.16 + 0.1*4.00 USD
    assert k26.cost_nusd(1_000_000, 400_000, 100_000) == usd_to_nusd(0.57 + 0.064 + 0.4)
    assert k26.cost_usd(1_000_000, 400_000, 100_000) == pytest.approx(1.034)
    k3 = profile_for("kimi-k3")
    assert k3.cost_nusd(10, 0, 0) == 30_000  # 10 tokens x $3/1M = 3e-5 USD
    # A usage report with more cached than prompt tokens is not billed twice.
    assert k26.cost_nusd(100, 500, 0) == k26.cost_nusd(100, 100, 0) == 16_000


def test_unknown_models_are_priced_at_the_highest_known_prices_so_budgets_hold() -> None:
    unknown = profile_for("some-new-model")
    assert unknown is CONSERVATIVE and unknown.price_out == max(p.price_out for p in PROFILES.values())
    assert unknown.cost_nusd(0, 0, 1_000) > 0


def test_kimi_prices_override_the_table_for_the_models_they_name() -> None:
    prices = parse_prices('{"kimi-k2.6": [1, 0.5, 2], "Moonshotai/New-Model": [0, 0, 9]}')
    assert profile_for("kimi-k2.6", prices).cost_nusd(10, 4, 1) == 6 * 1000 + 4 * 500 + 2 * 1000
    assert profile_for("kimi-k3", prices) is PROFILES["kimi-k3"]
    assert profile_for("new-model", prices).price_out == 9.0
    assert parse_prices("") == {}


@pytest.mark.parametrize(
    "value",
    ["{not json", "[1, 2, 3]", '{"kimi-k2.6": [1, 2]}', '{"kimi-k2.6": [1, -2, 3]}', '{"x": ["1", 2, 3]}'],
)
def test_a_malformed_kimi_prices_is_one_settings_line(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            _env_file=None,
            slack_bot_token="xoxb-1-2",
            slack_signing_secret="s",
            moonshot_api_key="k",
            kimi_prices=value,
        )
    lines = [p for p in caught.value.problems if "KIMI_PRICES" in p]
    assert len(lines) == 1 and "\n" not in lines[0]


def test_budget_settings_default_to_none_and_empty_means_none() -> None:
    base = {
        "_env_file": None,
        "slack_bot_token": "xoxb-1-2",
        "slack_signing_secret": "s",
        "moonshot_api_key": "k",
    }
    settings = load_settings(**base)
    assert settings.budget_user_daily_usd is None and settings.budget_team_monthly_usd is None
    settings = load_settings(**base, budget_user_daily_usd="", budget_team_monthly_usd="500")
    assert settings.budget_user_daily_usd is None and settings.budget_team_monthly_usd == 500.0
    with pytest.raises(SettingsError) as caught:
        load_settings(**base, budget_user_daily_usd="-1")
    assert any(p.startswith("BUDGET_USER_DAILY_USD") for p in caught.value.problems)


def test_the_reservation_bound_is_the_prompt_at_the_miss_price_plus_the_whole_output_budget() -> None:
    k26 = PROFILES["kimi-k2.6"]
    messages = [{"role": "system", "content": "x" * 300}, {"role": "user", "content": "y" * 30}]
    prompt = prompt_bound(messages, None, 1.0, k26.context_window)
    assert prompt >= (300 + 30) // 3  # three characters a token, and some overhead
    assert estimate_nusd(k26, prompt, 32_768) == k26.cost_nusd(prompt, 0, 32_768)
    # A thread whose prompts measured more than estimated reserves more; less never reserves less.
    assert prompt_bound(messages, None, 2.0, k26.context_window) > prompt
    assert prompt_bound(messages, None, 0.5, k26.context_window) == prompt
    tools = [{"type": "function", "function": {"name": "t", "description": "d" * 900}}]
    assert prompt_bound(messages, tools, 1.0, k26.context_window) >= prompt + 300
    assert prompt_bound([{"role": "user", "content": "z" * 3_000_000}], None, 1.0, 262_144) == 262_144


def test_over_budget_sentences_say_which_budget_its_limit_and_when_it_resets() -> None:
    late = dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.UTC)
    user = over_budget_sentence(Scope.USER, usd_to_nusd(2.5), late)
    assert "your daily Kimi budget ($2.50 a day)" in user and "midnight UTC" in user
    channel = over_budget_sentence(Scope.CHANNEL, usd_to_nusd(50), late)
    assert (
        "This channel" in channel and "$50.00 a month" in channel and "1 January 2027 at 00:00 UTC" in channel
    )
    team = over_budget_sentence(Scope.TEAM, usd_to_nusd(1234), dt.datetime(2026, 2, 3, tzinfo=dt.UTC))
    assert "This workspace" in team and "$1,234.00 a month" in team and "1 March 2026" in team
    assert all(s.count(".") <= 3 for s in (user, channel, team))  # one sentence (the amounts have a dot)


def test_a_refusal_says_reached_only_when_spending_reached_the_limit() -> None:
    now = dt.datetime(2026, 12, 31, 12, tzinfo=dt.UTC)
    waiting = over_budget_sentence(Scope.USER, usd_to_nusd(0.5), now, why=Refusal.WAITING)
    assert "taken by answers in progress" in waiting and "try again in a moment" in waiting
    assert "reached" not in waiting
    small = over_budget_sentence(Scope.TEAM, usd_to_nusd(0.02), now, why=Refusal.SMALL)
    assert small.startswith(
        ":money_with_wings: This workspace's monthly Kimi budget ($0.02 a month) is smaller"
    )
    assert "reached" not in small


def test_start_up_warns_of_budgets_below_one_request() -> None:
    k3 = PROFILES["kimi-k3"]
    assert budget_warnings(None, None, k3, k3.output_budget) == []
    assert budget_warnings(5.0, 100.0, k3, k3.output_budget) == []
    (cut,) = budget_warnings(0.5, None, k3, k3.output_budget)  # a full request reserves $0.98
    assert cut.startswith("BUDGET_USER_DAILY_USD=0.5 is below one full kimi-k3 request ($0.9830 for 65,536")
    assert "fewer output tokens" in cut
    # A thinking model is not cut below 8,000 output tokens (it reasons first): $0.12 on kimi-k3.
    (refused,) = budget_warnings(None, 0.02, k3, k3.output_budget)
    assert refused.startswith("BUDGET_TEAM_MONTHLY_USD=0.02 is below the smallest kimi-k3 request ($0.12")
    assert "8,000 output tokens" in refused
    assert budget_warnings(0.5, None, k3, 20_000) == []  # a smaller KIMI_MAX_COMPLETION_TOKENS fits


def test_money_reads_as_cents_or_fractions_of_a_cent() -> None:
    assert format_usd(0) == "$0.00"
    assert format_usd(usd_to_nusd(0.05)) == "$0.05"
    assert format_usd(usd_to_nusd(0.00123)) == "$0.0012"
    assert format_usd(usd_to_nusd(1234.5)) == "$1,234.50"


def test_periods_are_utc_days_and_months() -> None:
    now = dt.datetime(2026, 1, 2, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=5)))  # 1 Jan 20:00 UTC
    assert days_back(now, 3) == ["2025-12-30", "2025-12-31", "2026-01-01"]
    assert months_back(now, 3) == ["2026-01", "2025-12", "2025-11"]


def test_totals_read_prefixed_fields_and_ranking_orders_by_cost() -> None:
    fields = {
        "turns": "3",
        "prompt_tokens": "100",
        "cached_tokens": "25",
        "cost_nusd": "5",
        "u:U1:cost_nusd": "2",
        "u:U2:cost_nusd": "9",
        "u:U2:turns": "1",
        "c:C1:cost_nusd": "4",
    }
    team = totals_from(fields)
    assert team.turns == 3 and team.cache_share == 0.25 and team.cost_nusd == 5
    assert totals_from(fields, "u:U2:") == Totals(turns=1, cost_nusd=9)
    assert ranked(fields, "u") == [("U2", 9), ("U1", 2)] and ranked(fields, "c") == [("C1", 4)]


def test_bars_scale_to_the_busiest_day_and_show_any_use() -> None:
    lines = bars([("2026-11-01", 0), ("2026-11-02", 100), ("2026-11-03", 1)], width=10).splitlines()
    assert lines[0].startswith("11-01 ··········")
    assert lines[1].startswith("11-02 ██████████")
    assert lines[2].startswith("11-03 █·········")


def snapshot(admin: bool) -> Snapshot:
    now = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)
    t = Totals(
        turns=2, requests=3, prompt_tokens=1000, cached_tokens=500, completion_tokens=200, cost_nusd=10**7
    )
    days = [(d, 10**6 * i) for i, d in enumerate(days_back(now, 14))]
    return Snapshot(
        now=now,
        user="U1",
        mine_today=t,
        mine_month=t,
        mine_days=days,
        admin=admin,
        channel="C1",
        channel_today=t if admin else None,
        channel_month=t if admin else None,
        team_today=t if admin else None,
        team_month=t if admin else None,
        team_days=days if admin else [],
        top_users=[(f"U{i}", 10**6) for i in range(5)] if admin else [],
        top_channels=[("C1", 10**6)] if admin else [],
        budgets=[Budget(Scope.USER, usd_to_nusd(2), 10**7)],
    )


def test_the_report_shows_admins_the_channel_workspace_and_top_lists_only() -> None:
    mine = report_text(snapshot(admin=False))
    assert "*Today:* 2 answers · 1,200 tokens (1,000 in, 200 out) · $0.01 · 50% of input from cache" in mine
    assert "This workspace" not in mine and "<#C1>" not in mine
    assert "Your daily budget: $0.01 of $2.00 used (resets 2026-12-01 00:00 UTC)" in mine
    full = report_text(snapshot(admin=True))
    assert "This channel (<#C1>)" in full and "This workspace" in full and "<@U4> $0.0010" in full


@pytest.mark.parametrize("admin", [False, True])
def test_home_blocks_stay_within_block_kit_limits(admin: bool) -> None:
    blocks = report_blocks(snapshot(admin))
    assert 0 < len(blocks) <= 100
    assert blocks[0]["type"] == "header" and len(blocks[0]["text"]["text"]) <= 150
    for block in blocks[1:]:
        assert block["type"] == "section" and 0 < len(block["text"]["text"]) <= 3000
    bar_block = blocks[-1]["text"]["text"]
    assert bar_block.count("\n") >= 14 and "11-30" in bar_block
