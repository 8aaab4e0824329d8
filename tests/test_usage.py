"""Usage recording and budgets against real Redis, and end to end through the Bolt app and the fakes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.budgets import Scope, day_of, month_of, usd_to_nusd
from bot.kimi.events import Accumulator, Usage
from bot.kimi.profiles import PROFILES
from bot.store import DEAD_LETTER_KEY
from bot.usage import Limits, OverBudget, UsageKeys, UsageLedger, home_usage_blocks
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, BOB, CHANNEL, mention
from tests.test_cluster import cluster_nodes, cluster_url  # noqa: F401 - fixtures

CENT = usd_to_nusd(0.01)
# Input free, output $10 per 1M: with KIMI_MAX_COMPLETION_TOKENS=1000 every request reserves exactly one cent,
# whatever its prompt, so a test can say how many fit a budget.
ONE_CENT_A_REQUEST = {"kimi_prices": '{"kimi-k2.6": [0, 0, 10]}', "kimi_max_completion_tokens": 1000}


def keys() -> UsageKeys:
    return UsageKeys(TEAM_ID)


async def test_twenty_concurrent_reservations_never_overshoot(bot: BotHarness) -> None:
    ledger = bot.deps.usage
    limits = Limits(user_daily_nusd=None, team_monthly_nusd=7 * CENT + CENT // 2)

    async def one(i: int) -> bool:
        try:
            await ledger.reserve(TEAM_ID, f"job{i}:0", CENT, user=f"U{i:03d}", channel=CHANNEL, limits=limits)
        except OverBudget as exc:
            assert exc.scope is Scope.TEAM and exc.limit_nusd == limits.team_monthly_nusd
            return False
        return True

    granted = await asyncio.gather(*(one(i) for i in range(20)))
    assert sum(granted) == 7
    reserved = await ledger.reserved(TEAM_ID)
    assert len(reserved) == 7 and sum(reserved.values()) <= (limits.team_monthly_nusd or 0)


async def test_settling_releases_the_reservation_and_records_the_actual_cost(bot: BotHarness) -> None:
    ledger, redis = bot.deps.usage, bot.deps.redis
    limits = Limits(user_daily_nusd=2 * CENT)
    await ledger.reserve(TEAM_ID, "j:0", 2 * CENT, user=ALICE, channel=CHANNEL, limits=limits)
    with pytest.raises(OverBudget) as caught:  # the user's day is fully reserved
        await ledger.reserve(TEAM_ID, "k:0", 1, user=ALICE, channel=CHANNEL, limits=limits)
    assert caught.value.scope is Scope.USER
    await ledger.reserve(TEAM_ID, "k:0", 1, user=BOB, channel=CHANNEL, limits=limits)  # Bob's day is his own
    cost = CENT // 10
    assert await ledger.settle(
        TEAM_ID, "j:0", Usage(100, 40, 5), cost, user=ALICE, channel=CHANNEL, model="kimi-k2.6", answer_id="j"
    )
    await ledger.reserve(TEAM_ID, "j:1", CENT, user=ALICE, channel=CHANNEL, limits=limits)  # room again
    assert not await ledger.settle(  # the same turn's next request: not a second answer
        TEAM_ID, "j:1", Usage(10, 1, 0), cost, user=ALICE, channel=CHANNEL, model="kimi-k2.6", answer_id="j"
    )
    assert set(await ledger.reserved(TEAM_ID)) == {"k:0"}
    with pytest.raises(OverBudget):  # 0.2 cents spent: 1.9 cents would pass the 2
        await ledger.reserve(TEAM_ID, "m:0", 19 * CENT // 10, user=ALICE, channel=CHANNEL, limits=limits)
    await ledger.reserve(TEAM_ID, "m:0", 18 * CENT // 10, user=ALICE, channel=CHANNEL, limits=limits)
    now = ledger.now()
    day = await redis.hgetall(keys().user_day(ALICE, day_of(now)))  # type: ignore[misc]
    assert day == {
        "turns": "1",
        "requests": "2",
        "prompt_tokens": "110",
        "cached_tokens": "5",
        "completion_tokens": "41",
        "cost_nusd": str(2 * cost),
    }
    team_day = await redis.hgetall(keys().day(day_of(now)))  # type: ignore[misc]
    assert team_day["cost_nusd"] == team_day[f"c:{CHANNEL}:cost_nusd"] == team_day["m:kimi-k2.6:cost_nusd"]
    assert not [f for f in team_day if f.startswith("u:")]  # no user ids in the team's day
    month = await redis.hgetall(keys().month(month_of(now)))  # type: ignore[misc]
    assert month[f"u:{ALICE}:turns"] == "1" and month[f"c:{CHANNEL}:requests"] == "2"
    assert 0 < await redis.ttl(keys().day(day_of(now))) <= 400 * 86_400
    assert 0 < await redis.ttl(keys().user_day(ALICE, day_of(now))) <= 400 * 86_400


async def test_a_crashed_runs_reservation_is_booked_at_its_amount_by_the_rerun_or_when_it_lapses(
    bot: BotHarness,
) -> None:
    ledger, redis = bot.deps.usage, bot.deps.redis
    limits = Limits(team_monthly_nusd=4 * CENT)
    month = keys().month(month_of(ledger.now()))
    await ledger.reserve(
        TEAM_ID, "crashed:run1:0", CENT, user=ALICE, channel=CHANNEL, limits=limits, answer_prefix="crashed:"
    )
    # The re-run of the same job finds the dead run's reservation: never settled, so it cost at most that.
    await ledger.reserve(
        TEAM_ID, "crashed:run2:0", CENT, user=ALICE, channel=CHANNEL, limits=limits, answer_prefix="crashed:"
    )
    assert set(await ledger.reserved(TEAM_ID)) == {"crashed:run2:0"}
    assert await redis.hget(month, "cost_nusd") == str(CENT)  # type: ignore[misc]
    assert await redis.hget(keys().user_day(ALICE, day_of(ledger.now())), "cost_nusd") == str(CENT)  # type: ignore[misc]
    # The dead run, still alive after all, settles: booked once already, not again.
    assert not await ledger.settle(
        TEAM_ID, "crashed:run1:0", Usage(10, 10), CENT // 2, user=ALICE, channel=CHANNEL, model="kimi-k2.6"
    )
    assert await redis.hget(month, "cost_nusd") == str(CENT)  # type: ignore[misc]
    # A reservation nobody settles lapses (Redis's clock), and is booked at its amount then.
    await ledger.reserve(TEAM_ID, "lost:x:0", CENT, user=BOB, channel=CHANNEL, limits=limits, ttl_s=0.2)
    with pytest.raises(OverBudget):  # 1 spent + 2 reserved + 2 asked > 4
        await ledger.reserve(TEAM_ID, "third:y:0", 2 * CENT, user=BOB, channel=CHANNEL, limits=limits)
    await asyncio.sleep(0.25)
    await ledger.reserve(TEAM_ID, "third:y:0", CENT, user=BOB, channel=CHANNEL, limits=limits)
    assert set(await ledger.reserved(TEAM_ID)) == {"crashed:run2:0", "third:y:0"}
    assert await redis.hget(month, f"u:{BOB}:cost_nusd") == str(CENT)  # type: ignore[misc]
    with pytest.raises(OverBudget):  # 2 spent + 2 reserved: full
        await ledger.reserve(TEAM_ID, "fourth:z:0", 1, user=BOB, channel=CHANNEL, limits=limits)
    assert await redis.pttl(keys().reservations) > 0  # the hash itself expires too


async def test_reservations_expire_by_the_redis_servers_clock_not_a_replicas(bot: BotHarness) -> None:
    import time

    behind = UsageLedger(bot.deps.redis, clock=lambda: time.time() - 7_200)  # a replica two hours slow
    await behind.reserve(TEAM_ID, "slow:a:0", CENT, user=ALICE, channel=CHANNEL, limits=Limits())
    await bot.deps.usage.reserve(TEAM_ID, "other:b:0", CENT, user=BOB, channel=CHANNEL, limits=Limits())
    assert set(await bot.deps.usage.reserved(TEAM_ID)) == {"slow:a:0", "other:b:0"}  # not lapsed on arrival
    month = await bot.deps.redis.hget(keys().month(month_of(bot.deps.usage.now())), "cost_nusd")  # type: ignore[misc]
    assert month is None  # nothing booked


async def test_a_settlement_sent_twice_records_once(bot: BotHarness) -> None:
    ledger = bot.deps.usage
    await ledger.reserve(TEAM_ID, "j:r:0", CENT, user=ALICE, channel=CHANNEL, limits=Limits())
    for _ in range(2):  # the redis client resends a script whose connection dropped after it ran
        await ledger.settle(
            TEAM_ID, "j:r:0", Usage(10, 5), 123, user=ALICE, channel=CHANNEL, model="kimi-k2.6", answer_id="j"
        )
    mine = await bot.deps.redis.hgetall(keys().user_day(ALICE, day_of(ledger.now())))  # type: ignore[misc]
    assert mine["requests"] == "1" and mine["cost_nusd"] == "123"


async def test_two_runs_of_one_job_do_not_release_each_others_reservations(bot: BotHarness) -> None:
    ledger = bot.deps.usage
    old, new = meter_for(ledger, ALICE, "job"), meter_for(ledger, ALICE, "job")
    messages = [{"role": "user", "content": "hi"}]
    await old.before(messages, None)  # the first run, whose lease was lost while it still ran
    await new.before(messages, None)  # the re-run: its first request is number 0 too
    await old.after(Accumulator(usage=Usage(10, 5)), cancelled=True)  # the old run is cancelled at last
    assert [r.startswith(f"job:{new.run}:") for r in await ledger.reserved(TEAM_ID)] == [True]
    await new.after(Accumulator(usage=Usage(10, 5)), cancelled=False)
    assert await ledger.reserved(TEAM_ID) == {}
    day = await bot.deps.redis.hgetall(keys().user_day(ALICE, day_of(ledger.now())))  # type: ignore[misc]
    # The old run's request is booked once, at its reservation (the re-run found it unsettled).
    assert day["requests"] == "1" and int(day["cost_nusd"]) == old.reserved_nusd[0] + PROFILES[
        "kimi-k2.6"
    ].cost_nusd(10, 0, 5)


async def test_a_failed_settlement_is_settled_by_the_next_request_or_it_is_not_sent(bot: BotHarness) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    ledger = bot.deps.usage
    meter = meter_for(ledger, ALICE, "job")
    messages = [{"role": "user", "content": "hi"}]
    settle = ledger.settle
    failures = [2]

    async def flaky_settle(*args: Any, **kwargs: Any) -> bool:
        if failures[0]:
            failures[0] -= 1
            raise RedisConnectionError("blip")
        return await settle(*args, **kwargs)

    ledger.settle = flaky_settle  # type: ignore[method-assign]
    await meter.before(messages, None)
    await meter.after(Accumulator(usage=Usage(100, 50)), cancelled=False)  # the answer stands
    assert meter.unsettled
    with pytest.raises(RedisConnectionError):  # the next step: its predecessor's cost first, or nothing
        await meter.before(messages, None)
    assert len(await ledger.reserved(TEAM_ID)) == 1  # only the first request's
    await meter.before(messages, None)
    assert not meter.unsettled and len(await ledger.reserved(TEAM_ID)) == 1
    day = await bot.deps.redis.hgetall(keys().user_day(ALICE, day_of(ledger.now())))  # type: ignore[misc]
    assert day["requests"] == "1" and day["cost_nusd"] == str(PROFILES["kimi-k2.6"].cost_nusd(100, 0, 50))


async def test_reservations_made_before_midnight_count_against_the_new_day_and_month(bot: BotHarness) -> None:
    # 23:59:59 on the last day of a month; the requests reserved then settle after midnight, into the new
    # day and month, so the new period's checks must count them.
    clock = [dt.datetime(2027, 1, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp()]
    ledger = UsageLedger(bot.deps.redis, clock=lambda: clock[0])
    day_limits = Limits(user_daily_nusd=2 * CENT)
    month_limits = Limits(team_monthly_nusd=2 * CENT)
    await ledger.reserve(TEAM_ID, "late:0", CENT, user=ALICE, channel=CHANNEL, limits=day_limits)
    clock[0] += 2  # 00:00:01, 1 February
    await ledger.reserve(TEAM_ID, "early:0", CENT, user=ALICE, channel=CHANNEL, limits=day_limits)
    with pytest.raises(OverBudget) as caught:
        await ledger.reserve(TEAM_ID, "third:0", CENT, user=ALICE, channel=CHANNEL, limits=day_limits)
    assert caught.value.scope is Scope.USER
    with pytest.raises(OverBudget) as caught:
        await ledger.reserve(TEAM_ID, "third:0", CENT, user=BOB, channel=CHANNEL, limits=month_limits)
    assert caught.value.scope is Scope.TEAM
    for rid in ("late:0", "early:0"):
        await ledger.settle(
            TEAM_ID, rid, Usage(0, 1000), CENT, user=ALICE, channel=CHANNEL, model="kimi-k2.6"
        )
    assert await bot.deps.redis.hget(keys().user_day(ALICE, "2027-02-01"), "cost_nusd") == str(2 * CENT)  # type: ignore[misc]


async def test_every_answer_records_per_team_channel_user_model_and_day(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot()
    fake_kimi.script(Reply(cached_tokens=7, content="Four."))
    await bot.send_event(mention("2+2?", "1700000100.000100"))
    await bot.settle()
    body = fake_kimi.requests[0]
    prompt = fake_kimi.prompt_tokens(body)
    completion = (len("Four.") + len(Reply().reasoning)) // 4 + 1
    expected = PROFILES["kimi-k2.6"].cost_nusd(prompt, 7, completion)
    today = day_of(bot.deps.usage.now())
    redis = bot.deps.redis
    mine = await redis.hgetall(keys().user_day(ALICE, today))  # type: ignore[misc]
    assert mine["cost_nusd"] == str(expected) and mine["turns"] == "1" and mine["cached_tokens"] == "7"
    team = await bot.deps.usage.day(TEAM_ID, dt.date.fromisoformat(today))
    assert team["prompt_tokens"] == str(prompt) and float(team["cost_usd"]) == pytest.approx(expected / 1e9)
    day = await redis.hgetall(keys().day(today))  # type: ignore[misc]
    assert day[f"c:{CHANNEL}:cost_nusd"] == day["m:kimi-k2.6:cost_nusd"] == str(expected)
    assert await bot.deps.usage.reserved(TEAM_ID) == {}
    # /metrics counts the same cost, from the same prices.
    response = await bot.session.get(bot.url("/metrics"))  # type: ignore[union-attr]
    text = await response.text()
    costs = [
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "kimibot_kimi_cost_usd_total" and s.labels.get("model") == "kimi-k2.6"
    ]
    assert costs == [pytest.approx(expected / 1e9)]


async def test_kimi_prices_change_what_is_recorded_and_exported(
    make_bot: Callable[..., Any], fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(kimi_prices='{"kimi-k2.6": [0, 0, 1000]}')
    fake_kimi.script(Reply(reasoning="", content="x" * 39))  # 10 completion tokens in the fake's count
    await bot.send_event(mention("price me", "1700000100.000200"))
    await bot.settle()
    mine = await bot.deps.redis.hgetall(keys().user_day(ALICE, day_of(bot.deps.usage.now())))  # type: ignore[misc]
    assert mine["cost_nusd"] == str(10 * 1000 * 1000)  # 10 tokens x $1000/1M = $0.01
    assert bot.deps.metrics.cost.labels("kimi-k2.6")._value.get() == pytest.approx(0.01)


async def test_twenty_concurrent_questions_against_a_budget_for_five(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(**ONE_CENT_A_REQUEST, budget_team_monthly_usd=0.055, kimi_concurrency=20)
    limit = usd_to_nusd(0.055)
    fake_kimi.responder = lambda request: Reply(content="ok")
    # Requests settle only once every question has been admitted or refused (or after 10 s): otherwise an
    # early settlement (an answer costs a fraction of its reservation) would make room for a sixth.
    gate = asyncio.Event()
    settle = bot.deps.usage.settle

    async def held_settle(*args: Any, **kwargs: Any) -> bool:
        await gate.wait()
        return await settle(*args, **kwargs)

    bot.deps.usage.settle = held_settle  # type: ignore[method-assign]

    async def open_gate() -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while len(await bot.deps.usage.reserved(TEAM_ID)) + over_budget() < 20:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
        gate.set()

    def over_budget() -> int:
        return int(bot.deps.metrics.answers.labels("over_budget")._value.get())

    opener = asyncio.create_task(open_gate())
    roots = [f"1700000200.{i:06d}" for i in range(1, 21)]
    await asyncio.gather(*(bot.send_event(mention(f"question {i}", ts)) for i, ts in enumerate(roots)))
    peak = 0

    async def watch() -> None:
        nonlocal peak
        ledger = bot.deps.usage
        while True:
            month = await bot.deps.redis.hget(keys().month(month_of(ledger.now())), "cost_nusd")  # type: ignore[misc]
            peak = max(peak, int(month or 0) + sum((await ledger.reserved(TEAM_ID)).values()))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    await bot.settle(limit_s=30)
    watcher.cancel()
    await opener
    assert 0 < peak <= limit  # spent + reserved never past the limit
    assert len(fake_kimi.requests) == 5
    told = [ts for ts in roots if any("monthly Kimi budget" in b for b in fake_slack.bodies(CHANNEL, ts))]
    answered = [ts for ts in roots if any(b.startswith("ok") for b in fake_slack.bodies(CHANNEL, ts))]
    assert len(answered) == 5 and len(told) == 15 and not set(told) & set(answered)
    sentence = next(b for b in fake_slack.bodies(CHANNEL, told[0]) if "budget" in b)
    # Nothing was spent yet when they were refused: the answers in progress held the budget, not spending.
    assert sentence == (
        ":hourglass_flowing_sand: What is left of this workspace's monthly Kimi budget ($0.0550 a month) is "
        "taken by answers in progress, so I can't answer this now; try again in a moment."
    )
    assert await bot.deps.redis.xlen(DEAD_LETTER_KEY) == 0 and await bot.deps.queue.length() == 0
    assert bot.deps.metrics.answers.labels("over_budget")._value.get() == 15
    spent = await bot.deps.redis.hget(keys().month(month_of(bot.deps.usage.now())), "cost_nusd")  # type: ignore[misc]
    assert 0 < int(spent) <= limit and await bot.deps.usage.reserved(TEAM_ID) == {}


async def test_a_users_daily_budget_stops_the_call_with_one_sentence(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(**ONE_CENT_A_REQUEST, budget_user_daily_usd=0.0101)
    await bot.send_event(mention("first", "1700000300.000100"))
    await bot.settle()
    await bot.send_event(mention("second", "1700000300.000200", user=BOB))  # Bob has his own day
    await bot.settle()
    assert len(fake_kimi.requests) == 2
    # Alice spent a fraction of a cent: another one-cent reservation would pass 1.01 cents.
    await bot.send_event(mention("third", "1700000300.000300"))
    await bot.settle()
    assert len(fake_kimi.requests) == 2
    bodies = fake_slack.bodies(CHANNEL, "1700000300.000300")
    assert bodies == [
        ":money_with_wings: You have reached your daily Kimi budget ($0.0101 a day), so I can't answer "
        "this now; it resets at midnight UTC (00:00 UTC)."
    ]
    assert await bot.deps.queue.length() == 0 and await bot.deps.redis.xlen(DEAD_LETTER_KEY) == 0


async def test_a_budget_sentence_slack_refuses_still_ends_the_question_as_over_budget(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(**ONE_CENT_A_REQUEST, budget_user_daily_usd=0.005)
    for method in ("chat.postMessage", "chat.update", "chat.startStream"):
        fake_slack.fail(method, "channel_not_found", times=20)
    await bot.send_event(mention("anything", "1700000300.000900"))
    await bot.settle()
    answers = bot.deps.metrics.answers
    assert answers.labels("over_budget")._value.get() == 1 and answers.labels("internal")._value.get() == 0
    assert fake_kimi.requests == [] and await bot.deps.redis.xlen(DEAD_LETTER_KEY) == 0
    assert await bot.deps.queue.length() == 0


async def test_a_channels_budget_from_its_settings_hash(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(**ONE_CENT_A_REQUEST)
    await bot.deps.redis.hset(keys().channel_settings(CHANNEL), "budget_usd", "0.005")  # type: ignore[misc]
    await bot.send_event(mention("anything", "1700000400.000100"))
    await bot.settle()
    assert fake_kimi.requests == []
    (sentence,) = fake_slack.bodies(CHANNEL, "1700000400.000100")
    assert "This channel's monthly Kimi budget ($0.0050 a month) is smaller than one answer" in sentence
    await bot.deps.redis.hset(keys().channel_settings(CHANNEL), "budget_usd", "")  # type: ignore[misc]
    await bot.send_event(mention("again", "1700000400.000200"))
    await bot.settle()
    assert len(fake_kimi.requests) == 1  # empty: no budget


async def test_usage_command_shows_your_own_and_admins_the_channel_and_workspace(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(admin_users=BOB, budget_user_daily_usd=3, budget_team_monthly_usd=100)
    await bot.deps.redis.hset(keys().channel_settings(CHANNEL), "budget_usd", "20")  # type: ignore[misc]
    await bot.send_event(mention("hello", "1700000500.000100"))
    await bot.send_event(mention("hello too", "1700000500.000200", user=BOB))
    await bot.settle()
    status, body = await bot.command("usage")  # Alice, not an admin
    assert status == 200 and body == ""
    await bot.settle()
    mine = fake_slack.responses[-1]
    assert mine["response_type"] == "ephemeral" and "*Your Kimi usage*" in mine["text"]
    assert "*Today:* 1 answer ·" in mine["text"] and "Your daily budget:" in mine["text"]
    assert "This workspace" not in mine["text"] and BOB not in mine["text"]
    assert "monthly budget" not in mine["text"]
    status, _ = await bot.command("usage", user=BOB)
    await bot.settle()
    full = fake_slack.responses[-1]["text"]
    assert f"This channel (<#{CHANNEL}>)" in full and "*This workspace*" in full
    assert "*Today:* 2 answers" in full and f"<@{ALICE}>" in full and f"<@{BOB}>" in full
    assert " of $20.00 used (resets " in full.split("This channel's monthly budget: ")[1]
    assert " of $100.00 used (resets " in full.split("The workspace's monthly budget: ")[1]
    assert fake_kimi.requests and len(fake_kimi.requests) == 2  # /kimi usage asks Kimi nothing


async def test_a_persons_usage_reads_only_their_own_fields_of_the_month(bot: BotHarness) -> None:
    ledger, redis = bot.deps.usage, bot.deps.redis
    for user in (ALICE, BOB):
        await ledger.settle(
            TEAM_ID, f"{user}:r:0", Usage(100, 10), 500, user=user, channel=CHANNEL, model="m"
        )
    await redis.config_resetstat()
    snap = await ledger.snapshot(TEAM_ID, ALICE, channel=CHANNEL)
    assert snap.mine_month.cost_nusd == 500 and snap.mine_month.requests == 1 and snap.top_users == []
    stats = await redis.info("commandstats")
    assert stats["cmdstat_hgetall"]["calls"] == 1  # her day only: not the team's month nor day
    assert stats["cmdstat_hmget"]["calls"] == 1
    admin = await ledger.snapshot(TEAM_ID, BOB, channel=CHANNEL, admin=True)
    assert admin.mine_month.cost_nusd == 500 and {u for u, _ in admin.top_users} == {ALICE, BOB}


async def test_home_usage_blocks_show_the_last_fourteen_days(
    make_bot: Callable[..., Any], fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(admin_users=BOB)
    await bot.send_event(mention("hello", "1700000600.000100"))
    await bot.settle()
    blocks = await home_usage_blocks(bot.deps, TEAM_ID, ALICE)
    assert len(blocks) <= 100 and blocks[0]["type"] == "header"
    bars = blocks[-1]["text"]["text"]
    lines = bars.split("```")[1].splitlines()
    assert len(lines) == 14 and lines[-1].startswith(day_of(bot.deps.usage.now())[5:] + " █")
    text = " ".join(b["text"]["text"] for b in blocks)
    assert "This workspace" not in text
    admin_text = " ".join(b["text"]["text"] for b in await home_usage_blocks(bot.deps, TEAM_ID, BOB))
    assert "This workspace" in admin_text and "workspace's cost, last 14 days" in admin_text


async def test_forget_me_deletes_the_persons_usage_and_keeps_the_totals(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot()
    await bot.send_event(mention("hello", "1700000700.000100"))
    await bot.send_event(mention("hi", "1700000700.000200", user=BOB))
    await bot.settle()
    redis, now = bot.deps.redis, bot.deps.usage.now()
    team_before = await redis.hget(keys().day(day_of(now)), "cost_nusd")  # type: ignore[misc]
    await bot.command("forget-me")
    await bot.settle()
    # Only what her daily budget reads is kept, and only until midnight UTC.
    assert list(await redis.hgetall(keys().user_day(ALICE, day_of(now)))) == ["cost_nusd"]  # type: ignore[misc]
    assert 0 < await redis.ttl(keys().user_day(ALICE, day_of(now))) <= 86_400
    assert len(await redis.hgetall(keys().user_day(BOB, day_of(now)))) == 6  # type: ignore[misc]
    month = await redis.hgetall(keys().month(month_of(now)))  # type: ignore[misc]
    assert not [f for f in month if f.startswith(f"u:{ALICE}:")] and f"u:{BOB}:turns" in month
    assert await redis.hget(keys().day(day_of(now)), "cost_nusd") == team_before  # type: ignore[misc]
    assert "usage records" in fake_slack.responses[-1]["text"]


async def test_forget_me_does_not_reset_the_daily_budget(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(**ONE_CENT_A_REQUEST, budget_user_daily_usd=0.0101)
    await bot.send_event(mention("first", "1700000710.000100"))
    await bot.settle()
    await bot.send_event(mention("second", "1700000710.000200"))
    await bot.settle()
    assert len(fake_kimi.requests) == 1
    await bot.command("forget-me")
    await bot.settle()
    await bot.send_event(mention("third", "1700000710.000300"))
    await bot.settle()
    assert len(fake_kimi.requests) == 1  # forgetting her did not give her a fresh day
    assert "daily Kimi budget" in fake_slack.bodies(CHANNEL, "1700000710.000300")[-1]
    # Her earlier days go entirely.
    yesterday = (bot.deps.usage.now() - dt.timedelta(days=1)).date().isoformat()
    await bot.deps.redis.hset(keys().user_day(ALICE, yesterday), "cost_nusd", "5")  # type: ignore[misc]
    await bot.command("forget-me")
    await bot.settle()
    assert not await bot.deps.redis.exists(keys().user_day(ALICE, yesterday))


async def test_retried_and_failed_attempts_are_recorded_when_kimi_reported_usage(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot()
    # An answer with no text (retried), then a good one: both billed, one answer.
    fake_kimi.script(Reply(content="", reasoning="hmm"), Reply(content="fine"))
    await bot.send_event(mention("retry me", "1700000800.000100"))
    await bot.settle()
    assert len(fake_kimi.requests) == 2
    mine = await bot.deps.redis.hgetall(keys().user_day(ALICE, day_of(bot.deps.usage.now())))  # type: ignore[misc]
    assert mine["requests"] == "2" and mine["turns"] == "1"
    # Output budget used up while thinking: not answered, still billed and recorded.
    fake_kimi.script(Reply(content="", reasoning="long thoughts", finish_reason="length"))
    await bot.send_event(mention("think forever", "1700000800.000200", user=BOB))
    await bot.settle()
    assert "whole output budget thinking" in fake_slack.bodies(CHANNEL, "1700000800.000200")[-1]
    bob = await bot.deps.redis.hgetall(keys().user_day(BOB, day_of(bot.deps.usage.now())))  # type: ignore[misc]
    assert bob["requests"] == "1" and int(bob["completion_tokens"]) > 0
    assert await bot.deps.usage.reserved(TEAM_ID) == {}


async def test_an_attempt_cut_mid_stream_is_recorded_by_an_estimate(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot()
    fake_kimi.script(Reply(content="x" * 400, cut_after_chunks=2), Reply(content="fine", reasoning=""))
    await bot.send_event(mention("cut me", "1700000800.000300"))
    await bot.settle()
    assert len(fake_kimi.requests) == 2
    mine = await bot.deps.redis.hgetall(keys().user_day(ALICE, day_of(bot.deps.usage.now())))  # type: ignore[misc]
    assert mine["requests"] == "2" and mine["turns"] == "1"
    # The cut attempt streamed its reasoning and two 40-character chunks: about a third of a token a char.
    streamed = len(Reply().reasoning) + 80
    assert int(mine["completion_tokens"]) >= streamed // 3 + 1
    assert await bot.deps.usage.reserved(TEAM_ID) == {}


async def test_each_agent_step_is_reserved_before_it_is_asked(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from tests.fakes.kimi_api import Call
    from tests.test_agent_loop import Probe, give

    bot: BotHarness = await make_bot(**ONE_CENT_A_REQUEST, budget_user_daily_usd=0.0101)
    probe = Probe()
    give(bot, probe)
    fake_kimi.script(
        Reply(tool_calls=[Call("lookup", '{"q": "x"}')], content=""), Reply(content="never asked")
    )
    await bot.send_event(mention("look it up", "1700000900.000100"))
    await bot.settle()
    assert len(fake_kimi.requests) == 1 and len(probe.runs) == 1  # the first step ran; the second was refused
    # The sentence takes the placeholder's place; the first step's card stays as it ended.
    bodies = fake_slack.bodies(CHANNEL, "1700000900.000100")
    assert [b for b in bodies if "budget" in b] == [
        ":money_with_wings: You have reached your daily Kimi budget ($0.0101 a day), so I can't answer "
        "this now; it resets at midnight UTC (00:00 UTC)."
    ]
    assert fake_slack.cards_left_open(CHANNEL) == [] and fake_slack.problems == []
    assert await bot.deps.queue.length() == 0 and await bot.deps.redis.xlen(DEAD_LETTER_KEY) == 0


async def test_on_redis_cluster_budgets_usage_and_forget_me_stay_in_the_teams_slot(
    make_bot: Callable[..., Any],
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    cluster_url: str,  # noqa: F811
) -> None:
    bot: BotHarness = await make_bot(
        redis_url=cluster_url, **ONE_CENT_A_REQUEST, budget_user_daily_usd=0.0101
    )
    await bot.deps.redis.hset(keys().channel_settings(CHANNEL), "budget_usd", "1")  # type: ignore[misc]
    await bot.send_event(mention("one", "1700001000.000100"))
    await bot.settle()
    await bot.send_event(mention("two", "1700001000.000200"))
    await bot.settle()
    assert len(fake_kimi.requests) == 1
    assert "daily Kimi budget" in fake_slack.bodies(CHANNEL, "1700001000.000200")[-1]
    await bot.command("usage")
    await bot.settle()
    assert "*Today:* 1 answer ·" in fake_slack.responses[-1]["text"]
    await bot.command("forget-me")
    await bot.settle()
    assert list(await bot.deps.redis.hgetall(keys().user_day(ALICE, day_of(bot.deps.usage.now())))) == [  # type: ignore[misc]
        "cost_nusd"
    ]
    # A dead run's reservation booked by its re-run, a reservation extended: scripts stay in the slot.
    ledger, limits = bot.deps.usage, Limits()
    await ledger.reserve(
        TEAM_ID, "dead:a:0", CENT, user=BOB, channel=CHANNEL, limits=limits, answer_prefix="dead:"
    )
    await ledger.reserve(
        TEAM_ID, "dead:b:0", CENT, user=BOB, channel=CHANNEL, limits=limits, answer_prefix="dead:"
    )
    assert await ledger.extend(TEAM_ID, "dead:b:0")
    bob = await bot.deps.redis.hgetall(keys().user_day(BOB, day_of(ledger.now())))  # type: ignore[misc]
    assert bob == {"cost_nusd": str(CENT)}


def test_the_readme_price_table_is_the_profile_table() -> None:
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Usage, cost and budgets", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`kimi-"):
            rows[cells[0].strip("`")] = tuple(float(c) for c in cells[1:])
    assert rows == {m: (p.price_in, p.price_cached, p.price_out) for m, p in PROFILES.items()}


async def test_reservations_last_an_hour_at_most_and_redis_failures_fail_closed_before_not_after(
    bot: BotHarness,
) -> None:
    from redis.exceptions import RedisError

    from bot.kimi.events import Accumulator
    from bot.metrics import Metrics
    from bot.redis_client import build_redis
    from bot.usage import Meter

    await bot.deps.usage.reserve(TEAM_ID, "r:0", CENT, user=ALICE, channel=CHANNEL, limits=Limits())
    assert 3_500_000 < await bot.deps.redis.pttl(keys().reservations) <= 3_600_000

    unreachable = UsageLedger(build_redis("redis://127.0.0.1:1/0", "false"))
    meter = Meter(
        unreachable,
        Metrics(),
        TEAM_ID,
        CHANNEL,
        ALICE,
        "job",
        "kimi-k2.6",
        PROFILES["kimi-k2.6"],
        100,
        Limits(),
    )
    with pytest.raises(RedisError):  # no reservation, no request: the job is tried again later
        await meter.before([{"role": "user", "content": "hi"}], None)
    await meter.after(Accumulator(usage=Usage(10, 5)), cancelled=False)  # a delivered answer stands
    assert meter.metrics.cost.labels("kimi-k2.6")._value.get() > 0
    await unreachable.redis.aclose()


async def test_a_small_budget_cuts_the_output_instead_of_refusing(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    # Half a dollar a day on kimi-k3: one full request would reserve $0.98 (65,536 output tokens at $15/1M).
    bot: BotHarness = await make_bot(kimi_model="kimi-k3", budget_user_daily_usd=0.5)
    fake_kimi.script(Reply(content="Four."))
    await bot.send_event(mention("2+2?", "1700001100.000100"))
    await bot.settle()
    (body,) = fake_kimi.requests
    # $0.50 less the short prompt at $3/1M, at $15/1M: just under 33,334 output tokens.
    assert 32_000 < body["max_completion_tokens"] <= usd_to_nusd(0.5) // 15_000
    assert fake_slack.bodies(CHANNEL, "1700001100.000100")[-1].startswith("Four.")


async def test_a_budget_below_the_smallest_request_says_so_and_is_warned_at_start(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, caplog: pytest.LogCaptureFixture
) -> None:
    # 8,000 output tokens (a thinking model's fewest) on kimi-k3 cost $0.12: two cents a day answers nothing.
    with caplog.at_level("WARNING"):
        bot: BotHarness = await make_bot(kimi_model="kimi-k3", budget_user_daily_usd=0.02)
    assert any(
        "BUDGET_USER_DAILY_USD=0.02 is below the smallest kimi-k3 request" in r.getMessage()
        for r in caplog.records
    )
    await bot.send_event(mention("2+2?", "1700001100.000200"))
    await bot.settle()
    assert fake_kimi.requests == []
    assert fake_slack.bodies(CHANNEL, "1700001100.000200") == [
        ":money_with_wings: Your daily Kimi budget ($0.02 a day) is smaller than one answer from this "
        "model costs at most, so I can't answer this; an admin can raise it."
    ]


def meter_for(
    ledger: UsageLedger,
    user: str,
    answer_id: str,
    output_budget: int = 1000,
    limits: Limits | None = None,
    **kwargs: Any,
) -> Any:
    from bot.metrics import Metrics
    from bot.usage import Meter

    return Meter(
        ledger,
        Metrics(),
        TEAM_ID,
        CHANNEL,
        user,
        answer_id,
        "kimi-k2.6",
        PROFILES["kimi-k2.6"],
        output_budget,
        limits or Limits(),
        **kwargs,
    )


async def test_a_request_waiting_for_a_kimi_slot_holds_no_reservation_and_stopped_costs_nothing(
    make_bot: Callable[..., Any], fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(kimi_concurrency=1)
    kimi, ledger = bot.deps.kimi, bot.deps.usage
    fake_kimi.script(Reply(content="slow", first_byte_delay=1.0))
    messages = [{"role": "user", "content": "hi"}]
    first = asyncio.create_task(kimi.complete(messages, meter=meter_for(ledger, ALICE, "first")))
    while not fake_kimi.requests:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    waiting = asyncio.create_task(kimi.complete(messages, meter=meter_for(ledger, BOB, "waiting")))
    await asyncio.sleep(0.2)
    assert [r.split(":")[0] for r in await ledger.reserved(TEAM_ID)] == ["first"]  # the wait reserves nothing
    waiting.cancel()  # Stop while it waits for the slot
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await first
    assert len(fake_kimi.requests) == 1
    assert not await bot.deps.redis.exists(keys().user_day(BOB, day_of(ledger.now())))  # nothing guessed
    assert await bot.deps.redis.exists(keys().user_day(ALICE, day_of(ledger.now())))
    assert await ledger.reserved(TEAM_ID) == {}


async def test_a_reservation_is_extended_while_its_request_runs(
    make_bot: Callable[..., Any], fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot()
    ledger = bot.deps.usage
    meter = meter_for(ledger, ALICE, "long", reservation_ttl_s=0.3)
    fake_kimi.script(Reply(content="slow", first_byte_delay=1.0))
    task = asyncio.create_task(bot.deps.kimi.complete([{"role": "user", "content": "hi"}], meter=meter))
    await asyncio.sleep(0.8)  # well past the reservation's 0.3 s
    assert len(await ledger.reserved(TEAM_ID)) == 1
    # Another request reserving now finds it live, not lapsed (which would book it at its whole amount).
    await ledger.reserve(TEAM_ID, "other:r:0", 1, user=BOB, channel=CHANNEL, limits=Limits())
    acc = await task
    assert acc.usage is not None
    mine = await bot.deps.redis.hgetall(keys().user_day(ALICE, day_of(ledger.now())))  # type: ignore[misc]
    assert mine["requests"] == "1" and mine["cost_nusd"] == str(
        PROFILES["kimi-k2.6"].cost_nusd(acc.usage.prompt_tokens, 0, acc.usage.completion_tokens)
    )
    assert set(await ledger.reserved(TEAM_ID)) == {"other:r:0"}


async def test_a_channels_own_model_is_priced_and_recorded_as_that_model(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """/kimi settings gave the channel kimi-k3: its answers are recorded under kimi-k3 at K3's prices."""
    bot: BotHarness = await make_bot()
    await bot.deps.channel_settings.save(TEAM_ID, CHANNEL, {"model": "kimi-k3", "effort": "high"}, ALICE)
    fake_kimi.script(Reply(content="Four."))
    await bot.send_event(mention("2+2?", "1700000100.000900"))
    await bot.settle()
    body = fake_kimi.requests[0]
    assert body["model"] == "kimi-k3"
    prompt = fake_kimi.prompt_tokens(body)
    completion = (len("Four.") + len(Reply().reasoning)) // 4 + 1
    expected = PROFILES["kimi-k3"].cost_nusd(prompt, 0, completion)
    today = day_of(bot.deps.usage.now())
    day = await bot.deps.redis.hgetall(keys().day(today))  # type: ignore[misc]
    assert day["m:kimi-k3:cost_nusd"] == str(expected) and "m:kimi-k2.6:cost_nusd" not in day


async def test_a_reserve_whose_reply_is_lost_leaves_nothing_to_book(bot: BotHarness) -> None:
    """Redis ran the reserve script but its reply never came (a timeout): the request is not sent, so
    its reservation is dropped, not booked at its bound by the job's re-run."""
    from redis.exceptions import TimeoutError as RedisTimeoutError

    ledger = bot.deps.usage
    reserve = ledger.reserve

    async def reply_lost(*args: Any, **kwargs: Any) -> int:
        await reserve(*args, **kwargs)
        raise RedisTimeoutError("Timeout reading from socket")

    ledger.reserve = reply_lost  # type: ignore[method-assign]
    meter = meter_for(ledger, ALICE, "job")
    with pytest.raises(RedisTimeoutError):
        await meter.before([{"role": "user", "content": "hi"}], None)
    ledger.reserve = reserve  # type: ignore[method-assign]
    assert await ledger.reserved(TEAM_ID) == {}
    rerun = meter_for(ledger, ALICE, "job")
    await rerun.before([{"role": "user", "content": "hi"}], None)
    await rerun.after(Accumulator(usage=Usage(10, 5)), cancelled=False)
    day = await bot.deps.redis.hgetall(keys().user_day(ALICE, day_of(ledger.now())))  # type: ignore[misc]
    assert int(day["cost_nusd"]) == PROFILES["kimi-k2.6"].cost_nusd(10, 0, 5)  # nothing booked at a bound


async def test_a_channel_with_thinking_off_is_cut_to_the_plain_floor_not_refused(
    make_bot: Callable[..., Any],
) -> None:
    """kimi-k2.6 with thinking off needs no room to reason: a budget with room for 3,000 output tokens
    answers (cut to them) where, thinking, it is refused for want of 8,000."""
    bot: BotHarness = await make_bot()
    k26 = PROFILES["kimi-k2.6"]
    messages = [{"role": "user", "content": "hi"}]
    room = k26.cost_nusd(0, 0, 3_000) + k26.cost_nusd(100, 0, 0)  # 3,000 output tokens and a short prompt
    limits = Limits(user_daily_nusd=room)
    thinking = meter_for(bot.deps.usage, ALICE, "thinking", output_budget=k26.output_budget, limits=limits)
    with pytest.raises(OverBudget):
        await thinking.before(messages, None)
    plain = meter_for(
        bot.deps.usage, BOB, "plain", output_budget=k26.output_budget, limits=limits, thinking=False
    )
    tokens = await plain.before(messages, None)
    assert tokens is not None and 2_000 <= tokens < 8_000
