"""Usage, cost and budgets: the arithmetic and the words. Pure (no I/O): bot/usage.py does the Redis side.

Money is counted in nano-USD (1e-9 USD) integers, so that Redis adds and compares it exactly. Days and months
are UTC.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bot.context import estimate_tokens
from bot.kimi.profiles import ModelProfile

NANO = 1_000_000_000
METRICS = ("turns", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_nusd")


def usd_to_nusd(usd: float) -> int:
    return round(usd * NANO)


def format_usd(nusd: int) -> str:
    """$1,234.56 for sums that matter; four decimals for the small ones (a single answer is cents)."""
    usd = nusd / NANO
    whole_cents = nusd % (NANO // 100) == 0
    return f"${usd:,.2f}" if usd >= 1 or whole_cents else f"${usd:.4f}"


def day_of(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).date().isoformat()


def month_of(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m")


def next_midnight(now: dt.datetime) -> dt.datetime:
    day = now.astimezone(dt.UTC).date() + dt.timedelta(days=1)
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def first_of_next_month(now: dt.datetime) -> dt.datetime:
    utc = now.astimezone(dt.UTC)
    year, month = (utc.year + 1, 1) if utc.month == 12 else (utc.year, utc.month + 1)
    return dt.datetime(year, month, 1, tzinfo=dt.UTC)


def months_back(now: dt.datetime, count: int) -> list[str]:
    """The `count` months up to and including now's, newest first ("YYYY-MM")."""
    utc = now.astimezone(dt.UTC)
    year, month = utc.year, utc.month
    out = []
    for _ in range(count):
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    return out


def days_back(now: dt.datetime, count: int) -> list[str]:
    """The `count` days up to and including today, oldest first ("YYYY-MM-DD")."""
    today = now.astimezone(dt.UTC).date()
    return [(today - dt.timedelta(days=i)).isoformat() for i in range(count - 1, -1, -1)]


class Scope(StrEnum):
    """The three budgets, as the reservation script names them."""

    USER = "user"  # BUDGET_USER_DAILY_USD: per person per UTC day
    CHANNEL = "channel"  # the channel's `budget_usd` setting: per UTC month
    TEAM = "team"  # BUDGET_TEAM_MONTHLY_USD: per workspace per UTC month


class Refusal(StrEnum):
    """Why a request was refused, as the reservation script says it."""

    REACHED = "reached"  # spent (and what is in flight) leave no room for the smallest request
    WAITING = "waiting"  # spending leaves room: answers in progress hold it for now
    SMALL = "small"  # the limit itself is below the smallest request of this model


def resets_at(scope: Scope, now: dt.datetime) -> dt.datetime:
    return next_midnight(now) if scope is Scope.USER else first_of_next_month(now)


def over_budget_sentence(
    scope: Scope, limit_nusd: int, now: dt.datetime, *, why: Refusal = Refusal.REACHED
) -> str:
    """The one sentence an over-budget question gets: which budget, its limit, when it resets; or, when the
    limit is not reached but answers in progress hold the rest of it, that it may be asked again soon; or
    that the limit is too small for any answer of this model."""
    limit = format_usd(limit_nusd)
    reset = resets_at(scope, now)
    whose = {
        Scope.USER: f"your daily Kimi budget ({limit} a day)",
        Scope.CHANNEL: f"this channel's monthly Kimi budget ({limit} a month)",
        Scope.TEAM: f"this workspace's monthly Kimi budget ({limit} a month)",
    }[scope]
    if why is Refusal.WAITING:
        return (
            f":hourglass_flowing_sand: What is left of {whose} is taken by answers in progress, so I can't "
            "answer this now; try again in a moment."
        )
    if why is Refusal.SMALL:
        return (
            f":money_with_wings: {whose[0].upper()}{whose[1:]} is smaller than one answer from this model "
            "costs at most, so I can't answer this; an admin can raise it."
        )
    if scope is Scope.USER:
        return (
            f":money_with_wings: You have reached your daily Kimi budget ({limit} a day), so I can't answer "
            "this now; it resets at midnight UTC (00:00 UTC)."
        )
    when = f"{reset.day} {reset.strftime('%B %Y')} at 00:00 UTC"
    if scope is Scope.CHANNEL:
        return (
            f":money_with_wings: This channel has reached its monthly Kimi budget ({limit} a month), so I "
            f"can't answer this now; it resets on {when}."
        )
    return (
        f":money_with_wings: This workspace has reached its monthly Kimi budget ({limit} a month), so I "
        f"can't answer this now; it resets on {when}."
    )


def prompt_bound(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    calibration: float,
    context_window: int,
) -> int:
    """The prompt tokens a request is reserved for: context.py's upper-leaning estimate (3 characters a
    token), scaled up (never down) by what this thread's prompts measured, tools included, and never more
    than the model's window (a longer prompt is refused, not billed)."""
    tokens = sum(estimate_tokens(m) for m in messages)
    if tools:
        tokens += len(json.dumps(tools, separators=(",", ":"))) // 3 + 1
    return min(int(tokens * max(calibration, 1.0)) + 1, context_window)


# The fewest output tokens a request is cut to when a budget has no room for its whole output budget: less
# would mostly end inside the model's reasoning, billed and unanswered. A budget without room for this many is
# refused. Thinking models spend thousands of tokens reasoning before the first word of the answer.
FEWEST_OUTPUT_TOKENS = 2_000
FEWEST_THINKING_OUTPUT_TOKENS = 8_000


def fewest_output_tokens(profile: ModelProfile, output_budget: int, *, thinking: bool = True) -> int:
    """The fewest output tokens worth sending a request with (see FEWEST_OUTPUT_TOKENS); `thinking` is the
    request's switch (a kimi-k2.6 channel with thinking off needs no room to reason)."""
    fewest = FEWEST_THINKING_OUTPUT_TOKENS if profile.thinks(thinking) else FEWEST_OUTPUT_TOKENS
    return min(fewest, output_budget)


def smallest_request_nusd(profile: ModelProfile, output_budget: int) -> int:
    """What the smallest request worth sending reserves (an empty prompt, the fewest output tokens)."""
    return profile.cost_nusd(0, 0, fewest_output_tokens(profile, output_budget))


def budget_warnings(
    user_daily_usd: float | None, team_monthly_usd: float | None, profile: ModelProfile, output_budget: int
) -> list[str]:
    """Start-up lines for budgets too small for KIMI_MODEL's requests: below one full request's output,
    answers are cut short; below the smallest request, every question is refused."""
    full = profile.cost_nusd(0, 0, output_budget)
    smallest = smallest_request_nusd(profile, output_budget)
    lines = []
    for name, usd in (
        ("BUDGET_USER_DAILY_USD", user_daily_usd),
        ("BUDGET_TEAM_MONTHLY_USD", team_monthly_usd),
    ):
        if usd is None:
            continue
        limit = usd_to_nusd(usd)
        if limit < smallest:
            lines.append(
                f"{name}={usd} is below the smallest {profile.model_id} request ({format_usd(smallest)} for "
                f"{fewest_output_tokens(profile, output_budget):,} output tokens): every question will be "
                "refused"
            )
        elif limit < full:
            lines.append(
                f"{name}={usd} is below one full {profile.model_id} request ({format_usd(full)} for "
                f"{output_budget:,} output tokens): answers will get fewer output tokens"
            )
    return lines


def estimate_nusd(profile: ModelProfile, prompt_tokens: int, max_completion_tokens: int) -> int:
    """What one request may cost at most: every prompt token at the cache-miss price (a cache hit only
    makes it cheaper) and the whole output budget (max_completion_tokens: reasoning and answer share it)."""
    return profile.cost_nusd(prompt_tokens, 0, max_completion_tokens)


@dataclass(frozen=True)
class Totals:
    turns: int = 0  # answers (a turn counted once, however many requests it made)
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost_nusd: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cache_share(self) -> float:
        """The part of input served from Kimi's prompt cache (0..1)."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def totals_from(fields: dict[str, str], prefix: str = "") -> Totals:
    """The metrics under `prefix` ("" team totals, "c:<channel>:", "u:<user>:", "m:<model>:")."""
    values = {}
    for name in METRICS:
        try:
            values[name] = int(float(fields.get(prefix + name, 0) or 0))
        except ValueError:
            values[name] = 0
    return Totals(**values)


def ranked(fields: dict[str, str], kind: str, top: int = 5) -> list[tuple[str, int]]:
    """The `top` users (kind "u") or channels ("c") of a month hash by cost, highest first."""
    costs: list[tuple[str, int]] = []
    for name, value in fields.items():
        parts = name.split(":")
        if len(parts) == 3 and parts[0] == kind and parts[2] == "cost_nusd":
            costs.append((parts[1], int(float(value or 0))))
    return sorted(costs, key=lambda item: (-item[1], item[0]))[:top]


def totals_line(label: str, t: Totals) -> str:
    answers = f"{t.turns} answer{'s' if t.turns != 1 else ''}"
    return (
        f"*{label}:* {answers} · {t.tokens:,} tokens ({t.prompt_tokens:,} in, {t.completion_tokens:,} out) "
        f"· {format_usd(t.cost_nusd)} · {t.cache_share:.0%} of input from cache"
    )


BAR_WIDTH = 20


def bars(days: list[tuple[str, int]], width: int = BAR_WIDTH) -> str:
    """Per-day cost as text bars (one line a day, "MM-DD ███░ $0.12"), scaled to the highest day."""
    top = max((cost for _, cost in days), default=0)
    lines = []
    for day, cost in days:
        filled = round(cost / top * width) if top else 0
        if cost and not filled:
            filled = 1  # a day with any use shows
        lines.append(f"{day[5:]} {'█' * filled}{'·' * (width - filled)} {format_usd(cost)}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Budget:
    scope: Scope
    limit_nusd: int
    spent_nusd: int


@dataclass(frozen=True)
class Snapshot:
    """What /kimi usage and the Home tab show, read from Redis at `now`."""

    now: dt.datetime
    user: str
    mine_today: Totals
    mine_month: Totals
    mine_days: list[tuple[str, int]]  # the last 14 days, oldest first: (day, cost)
    admin: bool = False
    channel: str = ""
    channel_today: Totals | None = None
    channel_month: Totals | None = None
    team_today: Totals | None = None
    team_month: Totals | None = None
    team_days: list[tuple[str, int]] = field(default_factory=list)
    top_users: list[tuple[str, int]] = field(default_factory=list)
    top_channels: list[tuple[str, int]] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)


def budget_line(budget: Budget, now: dt.datetime) -> str:
    what = {
        Scope.USER: "Your daily budget",
        Scope.CHANNEL: "This channel's monthly budget",
        Scope.TEAM: "The workspace's monthly budget",
    }[budget.scope]
    reset = resets_at(budget.scope, now).strftime("%Y-%m-%d 00:00 UTC")
    return f"{what}: {format_usd(budget.spent_nusd)} of {format_usd(budget.limit_nusd)} used (resets {reset})"


def report_sections(snap: Snapshot) -> list[str]:
    """The report as mrkdwn sections (each well under Block Kit's 3,000 characters)."""
    sections = [
        "*Your Kimi usage*\n"
        + totals_line("Today", snap.mine_today)
        + "\n"
        + totals_line("This month", snap.mine_month)
    ]
    if snap.admin and snap.channel_today is not None and snap.channel_month is not None:
        sections.append(
            f"*This channel (<#{snap.channel}>)*\n"
            + totals_line("Today", snap.channel_today)
            + "\n"
            + totals_line("This month", snap.channel_month)
        )
    if snap.admin and snap.team_today is not None and snap.team_month is not None:
        sections.append(
            "*This workspace*\n"
            + totals_line("Today", snap.team_today)
            + "\n"
            + totals_line("This month", snap.team_month)
        )
        users = ", ".join(f"<@{u}> {format_usd(c)}" for u, c in snap.top_users) or "nobody yet"
        channels = ", ".join(f"<#{c}> {format_usd(n)}" for c, n in snap.top_channels) or "none yet"
        sections.append(f"*Top this month*\nPeople: {users}\nChannels: {channels}")
    if snap.budgets:
        sections.append("\n".join(budget_line(b, snap.now) for b in snap.budgets))
    return sections


def report_text(snap: Snapshot) -> str:
    return "\n\n".join(report_sections(snap))


def report_blocks(snap: Snapshot) -> list[dict[str, Any]]:
    """The same at a glance for the Home tab, with per-day bars for the last 14 days."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": "Usage and cost"}},
    ]
    for text in report_sections(snap):
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    days = snap.team_days if snap.admin and snap.team_days else snap.mine_days
    whose = "The workspace's" if snap.admin and snap.team_days else "Your"
    blocks.append(
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"*{whose} cost, last 14 days (UTC)*\n```{bars(days)}```"},
        }
    )
    return blocks
