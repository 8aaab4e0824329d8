"""How long each kind of data is kept, as the README's retention table says: read off Redis after real
answers through the Bolt app (the TTL of each key), not off the constants."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bot.store import AccessFacts, Stops, ThreadKeys, ThreadStore, UserNames
from bot.turn import ThreadKey
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, CHANNEL, mention

HOUR, DAY = 3_600, 86_400


def about(ttl_s: int, expected_s: int) -> bool:
    """A TTL set a moment ago for `expected_s` (a minute of slack for a slow machine)."""
    return expected_s - 60 < ttl_s <= expected_s


async def test_each_kind_of_data_expires_as_the_readme_says(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(allow_guests=False)  # the guest check stores an access fact
    redis = bot.deps.redis
    root = "1700000950.000100"
    fake_kimi.script(Reply(content="Hello."))
    await bot.send_event(mention("hi", root))
    await bot.settle()
    assert fake_slack.bodies(CHANNEL, root)
    thread = ThreadKey(TEAM_ID, CHANNEL, root)

    kept = bot.deps.settings.thread_ttl_seconds
    assert about(await redis.ttl(ThreadStore.history_key(thread)), kept)  # THREAD_TTL_DAYS
    assert about(await redis.ttl(ThreadStore.meta_key(thread)), kept)
    claims = [k async for k in redis.scan_iter(match=ThreadKeys(thread).seen("*"))]
    assert claims
    for claim in claims:  # DEDUP_TTL_SECONDS
        assert about(await redis.ttl(claim), bot.deps.settings.dedup_ttl_seconds), claim
    assert about(await redis.ttl(UserNames.key(TEAM_ID, ALICE)), DAY)  # display names: a day
    assert about(await redis.ttl(AccessFacts.guest_key(TEAM_ID, ALICE)), HOUR)  # access facts: an hour

    await Stops(redis).request(CHANNEL, root, ALICE)
    assert about(await redis.ttl(Stops.key(CHANNEL, root)), DAY)  # Stop requests: a day
