"""Usage, cost and budgets in Redis: reserve before each Kimi request, settle (record) after it.

Every key of a team sits under `kimibot:usage:{<team_id>}:...` (one hash slot on Redis Cluster), so one Lua
script reads the user's day, the channel's and the team's month and the live reservations, and reserves
atomically; the channel's budget comes from the settings part's hash
`kimibot:settings:{<team_id>}:channel:<id>` (field `budget_usd`), in the same slot. Layout:

- `...:day:<YYYY-MM-DD>` hash: the team's totals that day (fields `turns`, `requests`, `prompt_tokens`,
  `cached_tokens`, `completion_tokens`, `cost_nusd`), and the same per channel (`c:<channel>:<metric>`) and
  per model (`m:<model>:<metric>`). No user ids.
- `...:user:<user>:day:<YYYY-MM-DD>` hash: one person's totals that day (their daily budget, their bars).
- `...:month:<YYYY-MM>` hash: the team's month, per channel (`c:`), per person (`u:`) and per model (`m:`).
- `...:reservations` hash: reservation id -> "expires_ms|nusd|user|channel|day|month" (requests in flight).
- `...:answer:<job id>` string: the turn has been counted as an answer (re-runs do not count it again).

Recorded hashes keep USAGE_TTL_S (400 days: a year back, plus the month being compared), per day rather than
rolled up: a team's day hash is a few hundred fields at most, and days make the 14-day bars and "today" reads
direct.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.budgets import (
    METRICS,
    Budget,
    Scope,
    Snapshot,
    day_of,
    days_back,
    estimate_nusd,
    month_of,
    months_back,
    over_budget_sentence,
    prompt_bound,
    ranked,
    report_blocks,
    totals_from,
    usd_to_nusd,
)
from bot.kimi.events import Accumulator, Usage
from bot.kimi.profiles import ModelProfile

if TYPE_CHECKING:
    from bot.deps import Deps
    from bot.metrics import Metrics
    from bot.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "kimibot"
USAGE_TTL_S = 400 * 86_400
RESERVATION_TTL_S = 3_600  # longer than any one streamed request (a 64k-token answer at 30 tokens/s: 36 min)
ANSWER_MARK_TTL_S = 2 * 86_400  # a turn's re-runs happen within minutes; a day's margin either side
HISTORY_DAYS = 14


@dataclass(frozen=True)
class UsageKeys:
    team_id: str

    @property
    def tag(self) -> str:
        return f"{PREFIX}:usage:{{{self.team_id or '-'}}}"

    @property
    def reservations(self) -> str:
        return f"{self.tag}:reservations"

    def day(self, day: str) -> str:
        return f"{self.tag}:day:{day}"

    def month(self, month: str) -> str:
        return f"{self.tag}:month:{month}"

    def user_day(self, user: str, day: str) -> str:
        return f"{self.tag}:user:{user}:day:{day}"

    def answer(self, answer_id: str) -> str:
        return f"{self.tag}:answer:{answer_id}"

    @property
    def gone(self) -> str:
        """Set by forget_team (bot/store.py) for an hour: the team uninstalled, record nothing more."""
        return f"{self.tag}:gone"

    def channel_settings(self, channel: str) -> str:
        """The settings part's channel hash (keys.md); its `budget_usd` is the channel's monthly budget."""
        return f"{PREFIX}:settings:{{{self.team_id or '-'}}}:channel:{channel}"


# KEYS: reservations, user-day, month, channel settings.
# ARGV: now_ms, id, amount, user, channel, day, month, user limit, team limit, expires_ms (limits -1: none),
# the answer's prefix ("<job id>:"). Expired reservations are dropped, and so are the answer's others: its
# requests go one at a time, so another of its reservations is left by a run that died (this is the re-run).
# Spent + reserved + amount must stay within each budget. -> {'ok'} | {scope, limit, used}
_RESERVE = """
local now = tonumber(ARGV[1])
local amount = tonumber(ARGV[3])
local user, channel, day, month = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local prefix = ARGV[11]
local r_user, r_channel, r_team = 0, 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local exp, amt, u, c, d, m = string.match(all[i + 1], '^(%d+)|(%d+)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  if (not exp) or tonumber(exp) <= now or all[i] == ARGV[2] or string.sub(all[i], 1, #prefix) == prefix then
    redis.call('HDEL', KEYS[1], all[i])
  else
    amt = tonumber(amt)
    if m == month then
      r_team = r_team + amt
      if c == channel then r_channel = r_channel + amt end
    end
    if u == user and d == day then r_user = r_user + amt end
  end
end
local channel_limit = -1
local raw = redis.call('HGET', KEYS[4], 'budget_usd')
if raw and tonumber(raw) and tonumber(raw) >= 0 then channel_limit = math.floor(tonumber(raw) * 1e9 + 0.5) end
local spent_user = tonumber(redis.call('HGET', KEYS[2], 'cost_nusd') or '0') or 0
local spent_team = tonumber(redis.call('HGET', KEYS[3], 'cost_nusd') or '0') or 0
local spent_channel = tonumber(redis.call('HGET', KEYS[3], 'c:' .. channel .. ':cost_nusd') or '0') or 0
local checks = {
  {'user', tonumber(ARGV[8]), spent_user + r_user},
  {'channel', channel_limit, spent_channel + r_channel},
  {'team', tonumber(ARGV[9]), spent_team + r_team},
}
for _, check in ipairs(checks) do
  if check[2] >= 0 and check[3] + amount > check[2] then
    return {check[1], string.format('%.0f', check[2]), string.format('%.0f', check[3])}
  end
end
local entry = table.concat({ARGV[10], ARGV[3], user, channel, day, month}, '|')
redis.call('HSET', KEYS[1], ARGV[2], entry)
redis.call('PEXPIREAT', KEYS[1], ARGV[10])
return {'ok'}
"""

# KEYS: reservations, team day, user day, month, answer mark, gone mark.
# ARGV: id, prompt, cached, completion, cost, channel, model, user, ttl_s, mark_ttl_s, record (1/0),
# count the answer (1/0). Releases the reservation and records the actual usage in one step, so spent +
# reserved never counts a request twice nor drops it in between. Nothing once the team is gone (its data
# deleted: a request cancelled by the uninstall must not recreate it). -> turns counted (0/1)
_SETTLE = """
if redis.call('EXISTS', KEYS[6]) == 1 then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[11] ~= '1' then return 0 end
local turns = 0
if ARGV[12] == '1' and redis.call('SET', KEYS[5], '1', 'NX', 'EX', ARGV[10]) then turns = 1 end
local values = {turns = turns, requests = 1, prompt_tokens = ARGV[2], cached_tokens = ARGV[3],
  completion_tokens = ARGV[4], cost_nusd = ARGV[5]}
local names = {'turns', 'requests', 'prompt_tokens', 'cached_tokens', 'completion_tokens', 'cost_nusd'}
local function add(key, prefixes)
  for _, prefix in ipairs(prefixes) do
    for _, name in ipairs(names) do redis.call('HINCRBY', key, prefix .. name, values[name]) end
  end
  redis.call('EXPIRE', key, ARGV[9])
end
local c, m, u = 'c:' .. ARGV[6] .. ':', 'm:' .. ARGV[7] .. ':', 'u:' .. ARGV[8] .. ':'
add(KEYS[2], {'', c, m})
add(KEYS[3], {''})
add(KEYS[4], {'', c, u, m})
return turns
"""


class OverBudget(Exception):
    """A request that would take a budget past its limit: not sent; the asker is told which, and when it
    resets."""

    def __init__(self, scope: Scope, limit_nusd: int, used_nusd: int, now: dt.datetime) -> None:
        self.scope = scope
        self.limit_nusd = limit_nusd
        self.used_nusd = used_nusd
        self.sentence = over_budget_sentence(scope, limit_nusd, now)
        super().__init__(f"{scope} budget: {used_nusd} of {limit_nusd} nano-USD used or reserved")


@dataclass(frozen=True)
class Limits:
    """The budgets from settings, in nano-USD (None: no cap). The channel's is read by the script."""

    user_daily_nusd: int | None = None
    team_monthly_nusd: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        user, team = settings.budget_user_daily_usd, settings.budget_team_monthly_usd
        return cls(None if user is None else usd_to_nusd(user), None if team is None else usd_to_nusd(team))


class UsageLedger:
    """Reservations, recorded usage and the reads behind /kimi usage and the Home tab."""

    def __init__(self, redis: Redis, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.clock = clock

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    async def reserve(
        self,
        team_id: str,
        reservation_id: str,
        amount_nusd: int,
        *,
        user: str,
        channel: str,
        limits: Limits,
        ttl_s: float = RESERVATION_TTL_S,
    ) -> None:
        """Hold `amount_nusd` against the user's day, the channel's and the team's month, or raise
        OverBudget. Redis errors are raised (fail closed: a budget is never skipped for a blip)."""
        now_s = self.clock()
        now = dt.datetime.fromtimestamp(now_s, dt.UTC)
        keys = UsageKeys(team_id)
        day, month = day_of(now), month_of(now)
        result = await self.redis.eval(  # type: ignore[misc]
            _RESERVE,
            4,
            keys.reservations,
            keys.user_day(user, day),
            keys.month(month),
            keys.channel_settings(channel),
            int(now_s * 1000),
            reservation_id,
            max(int(amount_nusd), 0),
            user,
            channel,
            day,
            month,
            -1 if limits.user_daily_nusd is None else limits.user_daily_nusd,
            -1 if limits.team_monthly_nusd is None else limits.team_monthly_nusd,
            int((now_s + ttl_s) * 1000),
            reservation_id.rpartition(":")[0] + ":" if ":" in reservation_id else reservation_id,
        )
        if str(result[0]) != "ok":
            raise OverBudget(Scope(str(result[0])), int(result[1]), int(result[2]), now)

    async def settle(
        self,
        team_id: str,
        reservation_id: str,
        usage: Usage | None,
        cost_nusd: int,
        *,
        user: str,
        channel: str,
        model: str,
        answer_id: str = "",
    ) -> bool:
        """Release the reservation and record what the request used (None: nothing known, so nothing
        recorded). The turn is counted as an answer the first time one of its requests is recorded (across
        re-runs too). Returns whether this request counted the answer."""
        now = self.now()
        keys = UsageKeys(team_id)
        day = day_of(now)
        result = await self.redis.eval(  # type: ignore[misc]
            _SETTLE,
            6,
            keys.reservations,
            keys.day(day),
            keys.user_day(user, day),
            keys.month(month_of(now)),
            keys.answer(answer_id or reservation_id),
            keys.gone,
            reservation_id,
            usage.prompt_tokens if usage else 0,
            usage.cached_tokens if usage else 0,
            usage.completion_tokens if usage else 0,
            max(int(cost_nusd), 0),
            channel,
            model,
            user,
            USAGE_TTL_S,
            ANSWER_MARK_TTL_S,
            "1" if usage is not None else "0",
            "1" if answer_id else "0",
        )
        return bool(int(result))

    async def release(self, team_id: str, reservation_id: str) -> None:
        """Drop a reservation without recording anything (its request was never sent)."""
        await self.redis.hdel(UsageKeys(team_id).reservations, reservation_id)  # type: ignore[misc]

    async def reserved(self, team_id: str) -> dict[str, int]:
        """Live reservations: id -> nano-USD (expired ones are dropped by the next reserve)."""
        raw = await self.redis.hgetall(UsageKeys(team_id).reservations)  # type: ignore[misc]
        now_ms = int(self.clock() * 1000)
        live = {}
        for rid, value in raw.items():
            parts = str(value).split("|")
            if len(parts) == 6 and int(parts[0]) > now_ms:
                live[str(rid)] = int(parts[1])
        return live

    async def day(self, team_id: str, day: dt.date) -> dict[str, str]:
        """The team's totals of one day (as stored, plus `cost_usd`)."""
        raw = await self.redis.hgetall(UsageKeys(team_id).day(day.isoformat()))  # type: ignore[misc]
        fields = {str(k): str(v) for k, v in raw.items() if ":" not in str(k)}
        if "cost_nusd" in fields:
            fields["cost_usd"] = repr(int(fields["cost_nusd"]) / 1e9)
        return fields

    async def _hash(self, key: str) -> dict[str, str]:
        raw = await self.redis.hgetall(key)  # type: ignore[misc]
        return {str(k): str(v) for k, v in raw.items()}

    async def snapshot(
        self, team_id: str, user: str, *, channel: str = "", admin: bool = False, limits: Limits = Limits()
    ) -> Snapshot:
        """What /kimi usage and the Home tab show: the asker's own today, month and last 14 days; for an
        admin also the channel's and the workspace's, and the month's top people and channels."""
        now = self.now()
        keys = UsageKeys(team_id)
        today, month = day_of(now), month_of(now)
        days = days_back(now, HISTORY_DAYS)
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hget(keys.user_day(user, day), "cost_nusd")
            pipe.hgetall(keys.user_day(user, today))
            pipe.hgetall(keys.month(month))
            pipe.hgetall(keys.day(today))
            for day in days:
                pipe.hget(keys.day(day), "cost_nusd")
            pipe.hget(keys.channel_settings(channel), "budget_usd")
            results: list[Any] = await pipe.execute()
        n = len(days)
        mine_days = [(day, int(results[i] or 0)) for i, day in enumerate(days)]
        mine_today = totals_from({str(k): str(v) for k, v in results[n].items()})
        month_fields = {str(k): str(v) for k, v in results[n + 1].items()}
        day_fields = {str(k): str(v) for k, v in results[n + 2].items()}
        team_days = [(day, int(results[n + 3 + i] or 0)) for i, day in enumerate(days)]
        channel_budget = results[-1]
        team_month = totals_from(month_fields)
        budgets = []
        if limits.user_daily_nusd is not None:
            budgets.append(Budget(Scope.USER, limits.user_daily_nusd, mine_today.cost_nusd))
        snap = Snapshot(
            now=now,
            user=user,
            mine_today=mine_today,
            mine_month=totals_from(month_fields, f"u:{user}:"),
            mine_days=mine_days,
            admin=admin,
            channel=channel,
            budgets=budgets,
        )
        if not admin:
            return snap
        if channel:
            snap.budgets.extend(_channel_budget(channel_budget, month_fields, channel))
        if limits.team_monthly_nusd is not None:
            snap.budgets.append(Budget(Scope.TEAM, limits.team_monthly_nusd, team_month.cost_nusd))
        return Snapshot(
            **{
                **snap.__dict__,
                "channel_today": totals_from(day_fields, f"c:{channel}:") if channel else None,
                "channel_month": totals_from(month_fields, f"c:{channel}:") if channel else None,
                "team_today": totals_from(day_fields),
                "team_month": team_month,
                "team_days": team_days,
                "top_users": ranked(month_fields, "u"),
                "top_channels": ranked(month_fields, "c"),
            }
        )


def _channel_budget(raw: Any, month_fields: dict[str, str], channel: str) -> list[Budget]:
    try:
        limit = float(str(raw)) if raw not in (None, "") else None
    except ValueError:
        limit = None
    if limit is None or limit < 0:
        return []
    spent = totals_from(month_fields, f"c:{channel}:").cost_nusd
    return [Budget(Scope.CHANNEL, usd_to_nusd(limit), spent)]


async def forget_user_usage(redis: Redis, team_id: str, user: str, now: dt.datetime | None = None) -> int:
    """`/kimi forget-me`: delete the person's usage records (their day hashes, their `u:` fields in the
    month hashes, their reservations). The team's and channels' totals keep the aggregate numbers, which
    carry no user id. Keys are computed, not scanned (USAGE_TTL_S of days, 14 months), all in the team's slot.
    Returns how many records were deleted."""
    now = now or dt.datetime.now(dt.UTC)
    keys = UsageKeys(team_id)
    deleted = 0
    day_keys = [keys.user_day(user, d) for d in days_back(now, USAGE_TTL_S // 86_400 + 2)]
    for start in range(0, len(day_keys), 100):
        deleted += int(await redis.delete(*day_keys[start : start + 100]))
    fields = [f"u:{user}:{name}" for name in METRICS]
    for month in months_back(now, 15):
        deleted += int(await redis.hdel(keys.month(month), *fields) > 0)  # type: ignore[misc]
    reservations = await redis.hgetall(keys.reservations)  # type: ignore[misc]
    mine = [str(k) for k, v in reservations.items() if str(v).split("|")[2:3] == [user]]
    if mine:
        await redis.hdel(keys.reservations, *mine)  # type: ignore[misc]
    return deleted


@dataclass
class Meter:
    """Budgets and usage around each Kimi request of one turn (the client calls it per attempt, the agent
    loop's steps included): `before` reserves the request's bound or raises OverBudget, `after` settles to
    what Kimi reported (for a request Stop cut off, an estimate of what it had streamed)."""

    ledger: UsageLedger
    metrics: Metrics
    team_id: str
    channel: str
    user: str
    answer_id: str  # the turn's job id: the answer is counted once, whatever its requests and re-runs
    model: str
    profile: ModelProfile
    output_budget: int
    limits: Limits
    calibration: float = 1.0
    _n: int = 0
    _current: str = ""
    _prompt: int = 0
    reserved_nusd: list[int] = field(default_factory=list)

    async def before(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
        self._prompt = prompt_bound(messages, tools, self.calibration, self.profile.context_window)
        amount = estimate_nusd(self.profile, self._prompt, self.output_budget)
        # "<job id>:<n>": a request reserves for its answer alone, so a re-run replaces (does not add to)
        # what a crashed run of the job left reserved.
        reservation = f"{self.answer_id}:{self._n}"
        self._n += 1
        try:
            await self.ledger.reserve(
                self.team_id, reservation, amount, user=self.user, channel=self.channel, limits=self.limits
            )
        except asyncio.CancelledError:  # Stop while reserving: the request will not be sent
            with contextlib.suppress(RedisError):
                await self.ledger.release(self.team_id, reservation)
            raise
        self._current = reservation
        self.reserved_nusd.append(amount)

    async def after(self, acc: Accumulator, *, cancelled: bool) -> None:
        usage = acc.usage
        if usage is None and cancelled:
            # Stop cut the stream: Kimi bills what it generated; the streamed characters estimate it.
            streamed = len(acc.reasoning_text) + len(acc.text)
            streamed += sum(len(str(c["function"]["arguments"])) for c in acc.tool_calls.values())
            usage = Usage(self._prompt, streamed // 3 + 1)
        cost = (
            self.profile.cost_nusd(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
            if usage
            else 0
        )
        if usage is not None:
            self.metrics.used(self.model, usage, cost / 1e9)
        reservation, self._current = self._current, ""
        try:
            await self.ledger.settle(
                self.team_id,
                reservation,
                usage,
                cost,
                user=self.user,
                channel=self.channel,
                model=self.model,
                answer_id=self.answer_id,
            )
        except RedisError as exc:
            # Best effort: the answer stands. The reservation (an upper bound) holds the budget until it
            # expires (RESERVATION_TTL_S); only this request's record is lost.
            log.warning(
                "usage not recorded",
                extra={"team": self.team_id, "model": self.model, "cost_nusd": cost, "error": str(exc)},
            )


async def usage_report(deps: Deps, team_id: str, user: str, channel: str) -> Snapshot:
    """/kimi usage's snapshot: admins (deps.admins) see the channel and the workspace too."""
    admin = await deps.admins.is_admin(team_id, user)
    return await deps.usage.snapshot(
        team_id, user, channel=channel, admin=admin, limits=Limits.from_settings(deps.settings)
    )


async def home_usage_blocks(deps: Deps, team_id: str, user: str) -> list[dict[str, Any]]:
    """Block Kit for the App Home tab (the settings part builds the tab and calls this): the same as
    /kimi usage at a glance (no channel there), with per-day text bars for the last 14 days."""
    admin = await deps.admins.is_admin(team_id, user)
    snap = await deps.usage.snapshot(team_id, user, admin=admin, limits=Limits.from_settings(deps.settings))
    return report_blocks(snap)
