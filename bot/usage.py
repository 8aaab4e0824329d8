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
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bot.budgets import (
    METRICS,
    Budget,
    Refusal,
    Scope,
    Snapshot,
    day_of,
    days_back,
    estimate_nusd,
    fewest_output_tokens,
    month_of,
    months_back,
    next_midnight,
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


# Reservation entries: live "expires_ms|nusd|user|channel|day|month", or settled "done|expires_ms" (a
# settled-once mark: a settlement sent twice, by the client's retry or by two runs of one job, counts once).
# An unsettled reservation that is found lapsed, or left by another request of the same answer (its requests
# go one at a time, so that one ended without settling: its run died, or its settlement failed), is booked as
# spent at its reserved amount (an upper bound of what it cost) and marked settled: a cost never escapes the
# budgets. Times come from the Redis server's clock (TIME), the same for every replica.
_CONVERT = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function keep_until(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
-- Book `amt` as spent (cost only: what it used is unknown) and mark the reservation settled.
local function book(rid, amt, u, c, user_day_prefix, day_key, month_key, today, now, ttl_ms, usage_ttl)
  local user_day = user_day_prefix .. u .. ':day:' .. today
  redis.call('HINCRBY', user_day, 'cost_nusd', amt)
  redis.call('EXPIRE', user_day, usage_ttl)
  for _, f in ipairs({'cost_nusd', 'c:' .. c .. ':cost_nusd'}) do redis.call('HINCRBY', day_key, f, amt) end
  redis.call('EXPIRE', day_key, usage_ttl)
  for _, f in ipairs({'cost_nusd', 'c:' .. c .. ':cost_nusd', 'u:' .. u .. ':cost_nusd'}) do
    redis.call('HINCRBY', month_key, f, amt)
  end
  redis.call('EXPIRE', month_key, usage_ttl)
  redis.call('HSET', KEYS[1], rid, 'done|' .. (now + ttl_ms))
end
"""

# KEYS: reservations, user-day, month, channel settings, team day.
# ARGV: (unused), id, amount, user, channel, day, month, user limit, team limit, ttl_ms (limits -1: none),
# the answer's prefix ("<job id>:"), the user-day key's prefix ("...:user:"), usage ttl s, output price in
# nano-USD per token, the full output tokens, the fewest output tokens worth asking for, prompt nano-USD.
# Spent + reserved + amount must stay within each budget; when the full output does not fit, the request is
# cut to the output tokens that do (at least the fewest).
# -> {'ok', output tokens} | {scope, limit, used, spent, why: reached / waiting / small}
_RESERVE = (
    _CONVERT
    + """
local now = now_ms()
local ttl_ms = tonumber(ARGV[10])
local user, channel, day, month = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local prefix = ARGV[11]
local r_user, r_channel, r_team = 0, 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local rid, value = all[i], all[i + 1]
  local done_until = string.match(value, '^done|(%d+)$')
  if done_until then
    if tonumber(done_until) <= now then redis.call('HDEL', KEYS[1], rid) end
  else
    local exp, amt, u, c = string.match(value, '^(%d+)|(%d+)|([^|]*)|([^|]*)|[^|]*|[^|]*$')
    if not exp or rid == ARGV[2] then
      redis.call('HDEL', KEYS[1], rid)
    elseif tonumber(exp) <= now or string.sub(rid, 1, #prefix) == prefix then
      book(rid, tonumber(amt), u, c, ARGV[12], KEYS[5], KEYS[3], day, now, ttl_ms, ARGV[13])
    else
      -- Every live reservation counts against the current period, whichever it was made in: it is booked
      -- into the period it settles in (a request reserved at 23:59 and settled at 00:01 costs today).
      amt = tonumber(amt)
      r_team = r_team + amt
      if c == channel then r_channel = r_channel + amt end
      if u == user then r_user = r_user + amt end
    end
  end
end
local channel_limit = -1
local raw = redis.call('HGET', KEYS[4], 'budget_usd')
if raw and tonumber(raw) and tonumber(raw) >= 0 then channel_limit = math.floor(tonumber(raw) * 1e9 + 0.5) end
local spent_user = tonumber(redis.call('HGET', KEYS[2], 'cost_nusd') or '0') or 0
local spent_team = tonumber(redis.call('HGET', KEYS[3], 'cost_nusd') or '0') or 0
local spent_channel = tonumber(redis.call('HGET', KEYS[3], 'c:' .. channel .. ':cost_nusd') or '0') or 0
local checks = {
  {'user', tonumber(ARGV[8]), spent_user + r_user, spent_user},
  {'channel', channel_limit, spent_channel + r_channel, spent_channel},
  {'team', tonumber(ARGV[9]), spent_team + r_team, spent_team},
}
local price, full = tonumber(ARGV[14]), tonumber(ARGV[15])
local fewest, prompt = tonumber(ARGV[16]), tonumber(ARGV[17])
local tokens = full
local amount = tonumber(ARGV[3])
for _, check in ipairs(checks) do
  if check[2] >= 0 and check[3] + amount > check[2] then
    local fits = price > 0 and math.floor((check[2] - check[3] - prompt) / price) or -1
    if fits < fewest then
      -- Refused, and why: 'small' when the limit itself has no room for the smallest request, 'waiting'
      -- when what is spent leaves room for it and answers in progress took it, else 'reached'.
      local smallest = prompt + math.ceil(fewest * price)
      local why = 'reached'
      if check[2] < smallest then why = 'small'
      elseif check[3] > check[4] and check[4] + smallest <= check[2] then why = 'waiting' end
      return {check[1], string.format('%.0f', check[2]), string.format('%.0f', check[3]),
        string.format('%.0f', check[4]), why}
    end
    tokens = math.min(tokens, fits)
    amount = prompt + math.ceil(tokens * price)
  end
end
local entry = table.concat({now + ttl_ms, string.format('%.0f', amount), user, channel, day, month}, '|')
redis.call('HSET', KEYS[1], ARGV[2], entry)
keep_until(KEYS[1], ttl_ms)
return {'ok', tokens}
"""
)

# KEYS: reservations, team day, user day, month, answer mark, gone mark.
# ARGV: id, prompt, cached, completion, cost, channel, model, user, ttl_s, mark_ttl_s, record (1/0),
# count the answer (1/0), reservation ttl ms. Marks the reservation settled and records the actual usage in
# one step, so spent + reserved never counts a request twice nor drops it in between; a reservation already
# settled (or booked at its bound) records nothing again. Nothing once the team is gone (its data deleted: a
# request cancelled by the uninstall must not recreate it; its reservation goes).
# -> turns counted (0/1), -1 already settled
_SETTLE = (
    _CONVERT
    + """
if redis.call('EXISTS', KEYS[6]) == 1 then redis.call('HDEL', KEYS[1], ARGV[1]) return 0 end
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if entry and string.match(entry, '^done|') then return -1 end
local now = now_ms()
redis.call('HSET', KEYS[1], ARGV[1], 'done|' .. (now + tonumber(ARGV[13])))
keep_until(KEYS[1], tonumber(ARGV[13]))
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
)

# KEYS: reservations. ARGV: id, ttl ms. A live reservation's expiry moves to now + ttl (a long answer still
# streaming keeps what it holds); a settled or lapsed one is left as it is. -> 1 extended, 0 not
_EXTEND = (
    _CONVERT
    + """
local now = now_ms()
local entry = redis.call('HGET', KEYS[1], ARGV[1])
if not entry then return 0 end
local exp, rest = string.match(entry, '^(%d+)(|.*)$')
if not exp or tonumber(exp) <= now then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], (now + tonumber(ARGV[2])) .. rest)
keep_until(KEYS[1], tonumber(ARGV[2]))
return 1
"""
)


class OverBudget(Exception):
    """A request that would take a budget past its limit: not sent; the asker is told which, and when it
    resets."""

    def __init__(
        self,
        scope: Scope,
        limit_nusd: int,
        used_nusd: int,
        now: dt.datetime,
        *,
        spent_nusd: int | None = None,
        why: Refusal = Refusal.REACHED,
    ) -> None:
        self.scope = scope
        self.limit_nusd = limit_nusd
        self.used_nusd = used_nusd
        self.spent_nusd = used_nusd if spent_nusd is None else spent_nusd
        self.why = why
        self.sentence = over_budget_sentence(scope, limit_nusd, now, why=why)
        super().__init__(f"{scope} budget: {used_nusd} of {limit_nusd} nano-USD used or reserved")


@dataclass(frozen=True)
class OutputBound:
    """How a request's reservation is made of its prompt and its output, so that a budget with too little
    room for the full output can cut the request's output instead of refusing it."""

    prompt_nusd: int  # the prompt at the miss price
    tokens: int  # the full output budget
    fewest: int  # below this many output tokens the request is not worth sending: refused
    price_nusd_per_token: float  # the output price


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
        answer_prefix: str | None = None,
        output: OutputBound | None = None,
    ) -> int:
        """Hold `amount_nusd` against the user's day, the channel's and the team's month, or raise
        OverBudget. With `output`, a request whose full output does not fit is cut to the output tokens that
        do (at least `output.fewest`), and holds that much less. Returns the output tokens granted (0 without
        `output`). `answer_prefix` ("<job id>:", default: the id up to its last colon) names the answer's
        other reservations: any found is booked as spent at its amount (see _CONVERT). Redis errors are
        raised (fail closed: a budget is never skipped for a blip)."""
        now = self.now()
        keys = UsageKeys(team_id)
        day, month = day_of(now), month_of(now)
        amount = max(int(amount_nusd), 0)
        if answer_prefix is None:
            answer_prefix = (
                reservation_id.rpartition(":")[0] + ":" if ":" in reservation_id else reservation_id
            )
        bound = output or OutputBound(amount, 0, 0, 0.0)
        result = await self.redis.eval(  # type: ignore[misc]
            _RESERVE,
            5,
            keys.reservations,
            keys.user_day(user, day),
            keys.month(month),
            keys.channel_settings(channel),
            keys.day(day),
            0,
            reservation_id,
            amount,
            user,
            channel,
            day,
            month,
            -1 if limits.user_daily_nusd is None else limits.user_daily_nusd,
            -1 if limits.team_monthly_nusd is None else limits.team_monthly_nusd,
            max(int(ttl_s * 1000), 1),
            answer_prefix,
            f"{keys.tag}:user:",
            USAGE_TTL_S,
            bound.price_nusd_per_token,
            bound.tokens,
            bound.fewest,
            bound.prompt_nusd,
        )
        if str(result[0]) != "ok":
            raise OverBudget(
                Scope(str(result[0])),
                int(result[1]),
                int(result[2]),
                now,
                spent_nusd=int(result[3]),
                why=Refusal(str(result[4])),
            )
        return int(result[1])

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
            RESERVATION_TTL_S * 1000,
        )
        return int(result) == 1

    async def extend(self, team_id: str, reservation_id: str, ttl_s: float = RESERVATION_TTL_S) -> bool:
        """Keep a request's reservation live for another `ttl_s` (its request is still streaming)."""
        keys = UsageKeys(team_id)
        result = await self.redis.eval(  # type: ignore[misc]
            _EXTEND, 1, keys.reservations, reservation_id, max(int(ttl_s * 1000), 1)
        )
        return int(result) == 1

    async def release(self, team_id: str, reservation_id: str) -> None:
        """Drop a reservation without recording anything (its request was never sent)."""
        await self.redis.hdel(UsageKeys(team_id).reservations, reservation_id)  # type: ignore[misc]

    async def reserved(self, team_id: str) -> dict[str, int]:
        """Live reservations: id -> nano-USD (expired ones are dropped by the next reserve)."""
        raw = await self.redis.hgetall(UsageKeys(team_id).reservations)  # type: ignore[misc]
        seconds, micros = await self.redis.time()  # the clock reservations expire by
        now_ms = seconds * 1000 + micros // 1000
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
        own = [f"u:{user}:{name}" for name in METRICS]
        async with self.redis.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hget(keys.user_day(user, day), "cost_nusd")
            pipe.hgetall(keys.user_day(user, today))
            if admin:  # the whole month (every person's and channel's) only for those who see it
                pipe.hgetall(keys.month(month))
                pipe.hgetall(keys.day(today))
                for day in days:
                    pipe.hget(keys.day(day), "cost_nusd")
                pipe.hget(keys.channel_settings(channel), "budget_usd")
            else:
                pipe.hmget(keys.month(month), own)
            results: list[Any] = await pipe.execute()
        n = len(days)
        mine_days = [(day, int(results[i] or 0)) for i, day in enumerate(days)]
        mine_today = totals_from({str(k): str(v) for k, v in results[n].items()})
        day_fields: dict[str, str] = {}
        team_days: list[tuple[str, int]] = []
        channel_budget = None
        if admin:
            month_fields = {str(k): str(v) for k, v in results[n + 1].items()}
            day_fields = {str(k): str(v) for k, v in results[n + 2].items()}
            team_days = [(day, int(results[n + 3 + i] or 0)) for i, day in enumerate(days)]
            channel_budget = results[-1]
        else:
            month_fields = {f: str(v) for f, v in zip(own, results[n + 1], strict=True) if v is not None}
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
    month hashes). Kept, because the daily budget reads it: today's `cost_nusd` of their day hash, alone,
    until midnight UTC (forgetting must not hand out a fresh daily budget); their live reservations too (the
    requests are in flight; they expire within RESERVATION_TTL_S). The team's and channels' totals keep the
    aggregate numbers, which carry no user id. Keys are computed, not scanned (USAGE_TTL_S of days, 14
    months), all in the team's slot. Returns how many records were deleted."""
    now = now or dt.datetime.now(dt.UTC)
    keys = UsageKeys(team_id)
    deleted = 0
    today = day_of(now)
    day_keys = [keys.user_day(user, d) for d in days_back(now, USAGE_TTL_S // 86_400 + 2) if d != today]
    for start in range(0, len(day_keys), 100):
        deleted += int(await redis.delete(*day_keys[start : start + 100]))
    today_key = keys.user_day(user, today)
    others = [name for name in METRICS if name != "cost_nusd"]
    deleted += int(await redis.hdel(today_key, *others) > 0)  # type: ignore[misc]
    await redis.expireat(today_key, next_midnight(now))  # a no-op when there is no such hash
    fields = [f"u:{user}:{name}" for name in METRICS]
    for month in months_back(now, 15):
        deleted += int(await redis.hdel(keys.month(month), *fields) > 0)  # type: ignore[misc]
    return deleted


@dataclass
class Meter:
    """Budgets and usage around each Kimi request of one turn (the client calls it per attempt, the agent
    loop's steps included): `before` reserves the request's bound (cutting its output to what a budget has
    room for) or raises OverBudget, `after` settles to what Kimi reported (for a request Stop cut off, an
    estimate of what it had streamed). A settlement Redis refused is kept and tried again by the next
    `before`, which fails closed (raises) if it fails again: a request's cost does not escape the budget."""

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
    thinking: bool = True  # the requests' thinking switch (the channel's): a non-thinking one is cut further
    # This run of the job: two runs of one job (a lease lost while the first still ran) never share an id.
    run: str = field(default_factory=lambda: secrets.token_hex(4))
    # How long a reservation lasts unless extended; while its request runs it is extended every third of it.
    reservation_ttl_s: float = RESERVATION_TTL_S
    _keeper: asyncio.Task[None] | None = None
    _n: int = 0
    _current: str = ""
    _prompt: int = 0
    reserved_nusd: list[int] = field(default_factory=list)
    unsettled: list[dict[str, Any]] = field(default_factory=list)

    async def before(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int | None:
        while self.unsettled:  # RedisError propagates: no new request while an old one's cost is unbooked
            await self.ledger.settle(**self.unsettled[0])
            self.unsettled.pop(0)
        self._prompt = prompt_bound(messages, tools, self.calibration, self.profile.context_window)
        amount = estimate_nusd(self.profile, self._prompt, self.output_budget)
        bound = OutputBound(
            prompt_nusd=self.profile.cost_nusd(self._prompt, 0, 0),
            tokens=self.output_budget,
            fewest=fewest_output_tokens(self.profile, self.output_budget, thinking=self.thinking),
            price_nusd_per_token=self.profile.price_out * 1000,  # USD per 1M tokens -> nano-USD per token
        )
        # "<job id>:<run>:<n>": the answer's other reservations (a run that died, a settlement that failed)
        # are found by "<job id>:" and booked at their amount, never dropped.
        reservation = f"{self.answer_id}:{self.run}:{self._n}"
        self._n += 1
        try:
            tokens = await self.ledger.reserve(
                self.team_id,
                reservation,
                amount,
                user=self.user,
                channel=self.channel,
                limits=self.limits,
                ttl_s=self.reservation_ttl_s,
                answer_prefix=f"{self.answer_id}:",
                output=bound,
            )
        except OverBudget:
            raise  # refused: nothing was reserved
        except BaseException:
            # Stop while reserving, or Redis's reply lost (a timeout: the script may have run): the request
            # will not be sent, so its reservation must not stay to be booked at its bound by the re-run.
            with contextlib.suppress(RedisError, OSError, asyncio.CancelledError, TimeoutError):
                await asyncio.shield(self.ledger.release(self.team_id, reservation))
            raise
        self._current = reservation
        self._keeper = asyncio.create_task(self._keep(reservation))
        granted = bound.prompt_nusd + math.ceil(tokens * bound.price_nusd_per_token)
        self.reserved_nusd.append(min(amount, granted))
        return tokens if tokens < self.output_budget else None

    async def _keep(self, reservation: str) -> None:
        """Extend the reservation while its request runs (a long answer, a long wait for the first token):
        otherwise it would lapse and be booked at its whole amount. A failed extension is retried next time;
        if the reservation lapses meanwhile, it is booked at its amount, which only errs on the safe side."""
        while True:
            await asyncio.sleep(self.reservation_ttl_s / 3)
            try:
                if not await self.ledger.extend(self.team_id, reservation, self.reservation_ttl_s):
                    return
            except RedisError as exc:
                log.warning("reservation not extended", extra={"team": self.team_id, "error": str(exc)})

    async def after(self, acc: Accumulator, *, cancelled: bool) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        usage = acc.usage
        streamed = len(acc.reasoning_text) + len(acc.text)
        streamed += sum(len(str(c["function"]["arguments"])) for c in acc.tool_calls.values())
        if usage is None and (cancelled or streamed):
            # Stop, or a lost connection, cut the stream before its usage chunk: Kimi bills what it read and
            # generated; the prompt's bound and the streamed characters estimate it.
            usage = Usage(self._prompt, streamed // 3 + 1)
        cost = (
            self.profile.cost_nusd(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
            if usage
            else 0
        )
        if usage is not None:
            self.metrics.used(self.model, usage, cost / 1e9)
        reservation, self._current = self._current, ""
        settlement: dict[str, Any] = {
            "team_id": self.team_id,
            "reservation_id": reservation,
            "usage": usage,
            "cost_nusd": cost,
            "user": self.user,
            "channel": self.channel,
            "model": self.model,
            "answer_id": self.answer_id,
        }
        try:
            await self.ledger.settle(**settlement)
        except RedisError as exc:
            # The answer stands. The reservation (an upper bound) holds the budget meanwhile; the next request
            # settles this first, and if there is none, a later reservation books it at its amount.
            self.unsettled.append(settlement)
            log.warning(
                "usage not recorded yet",
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
