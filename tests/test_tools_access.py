"""Who may read what: the pure rule (reading, audience), and the cached facts from Slack (real Redis)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from slack_sdk.web.async_client import AsyncWebClient

from bot.tools.access import (
    Access,
    AccessError,
    Conversation,
    Person,
    audience_refusal,
    conversation_from_info,
    is_full_member,
    person_from_info,
    read_refusal,
)
from tests.fakes.slack_api import BOT_USER_ID, TEAM_ID, TOKEN, FakeSlack
from tests.slack_requests import ALICE, BOB

CAROL = "U05CAROL001"  # a guest
PUBLIC = Conversation("C0PUBLIC01", "public", "general")
SHARED = Conversation("C0SHARED01", "public", "partners", ext_shared=True)
SECRET = Conversation("G0SECRET01", "private", "secret")
DM_ALICE = Conversation("D0ALICE001", "im", im_user=ALICE)
GROUP = Conversation("G0GROUPDM1", "mpim", "mpdm-alice--bob--kimi-1")

FULL = Person(ALICE)
GUEST = Person(CAROL, guest=True)
EXTERNAL = Person("U0EXTERN01", external=True)


def test_conversations_info_objects_are_read_as_kinds() -> None:
    assert conversation_from_info({"id": "C1", "name": "general", "is_channel": True}).kind == "public"
    assert conversation_from_info({"id": "G1", "is_channel": True, "is_private": True}).kind == "private"
    assert conversation_from_info({"id": "G2", "is_group": True}).kind == "private"
    dm = conversation_from_info({"id": "D1", "is_im": True, "user": ALICE})
    assert dm.kind == "im" and dm.im_user == ALICE
    assert conversation_from_info({"id": "G3", "is_mpim": True, "is_private": True}).kind == "mpim"
    assert conversation_from_info({"id": "C2", "is_ext_shared": True}).ext_shared


def test_guests_strangers_bots_and_deactivated_users_are_not_full_members() -> None:
    assert is_full_member(person_from_info({"id": ALICE, "team_id": TEAM_ID}, TEAM_ID))
    assert not is_full_member(
        person_from_info({"id": CAROL, "team_id": TEAM_ID, "is_restricted": True}, TEAM_ID)
    )
    assert not is_full_member(person_from_info({"id": CAROL, "is_ultra_restricted": True}, TEAM_ID))
    assert not is_full_member(person_from_info({"id": "U9", "team_id": "T0OTHER"}, TEAM_ID))
    assert not is_full_member(person_from_info({"id": "U9", "is_stranger": True}, TEAM_ID))
    assert not is_full_member(person_from_info({"id": "U9", "team_id": TEAM_ID, "deleted": True}, TEAM_ID))
    assert not is_full_member(person_from_info({"id": "U9", "team_id": TEAM_ID, "is_bot": True}, TEAM_ID))
    # Another workspace of the same Enterprise Grid org is not "another organisation".
    grid = {"id": "W1", "team_id": "T0SISTER", "enterprise_user": {"enterprise_id": "E1"}}
    assert is_full_member(person_from_info(grid, TEAM_ID))


def test_reading_public_needs_full_membership_or_being_in_the_channel() -> None:
    assert read_refusal(PUBLIC, FULL, asker_is_member=False) is None
    assert read_refusal(PUBLIC, GUEST, asker_is_member=True) is None
    refused = read_refusal(PUBLIC, GUEST, asker_is_member=False)
    assert refused is not None and refused.startswith("not allowed:") and "#general" in refused
    assert read_refusal(PUBLIC, EXTERNAL, asker_is_member=False) is not None


def test_reading_a_private_channel_dm_or_group_dm_needs_membership() -> None:
    for conversation in (SECRET, DM_ALICE, GROUP):
        assert read_refusal(conversation, FULL, asker_is_member=True) is None
        refused = read_refusal(conversation, FULL, asker_is_member=False)
        assert refused is not None and refused.startswith("not allowed:")
    refused = read_refusal(SECRET, FULL, asker_is_member=False)
    assert refused == "not allowed: #secret is a private channel the asker is not a member of"


def test_private_content_stays_with_people_who_can_read_it() -> None:
    secret_members = frozenset({ALICE, BOB, BOT_USER_ID})
    # The same conversation, a DM with the asker, a group DM of members: fine.
    assert audience_refusal(SECRET, SECRET, None, None) is None
    assert audience_refusal(SECRET, DM_ALICE, secret_members, frozenset({ALICE, BOT_USER_ID})) is None
    assert audience_refusal(SECRET, GROUP, secret_members, frozenset({ALICE, BOB, BOT_USER_ID})) is None
    # A public thread, a group DM with an outsider, or members unknown: refused.
    public_members = frozenset({ALICE, BOB, CAROL, BOT_USER_ID})
    refused = audience_refusal(SECRET, PUBLIC, secret_members, public_members)
    assert refused is not None and refused.startswith("not allowed: #secret is private")
    assert "#general" in refused
    assert audience_refusal(SECRET, GROUP, secret_members, frozenset({ALICE, CAROL, BOT_USER_ID})) is not None
    assert audience_refusal(SECRET, DM_ALICE, secret_members, None) is not None
    # A DM's content never goes into a channel.
    assert audience_refusal(DM_ALICE, PUBLIC, frozenset({ALICE, BOT_USER_ID}), public_members) is not None
    # A public channel's audience is everyone in the workspace, even when its members are all in the source.
    assert audience_refusal(SECRET, PUBLIC, secret_members, frozenset({ALICE, BOT_USER_ID})) is not None


def test_public_content_goes_anywhere_in_the_workspace_but_not_to_another_organisation() -> None:
    assert audience_refusal(PUBLIC, SECRET, None, None, outsiders_in_destination=False) is None
    assert audience_refusal(PUBLIC, DM_ALICE, None, None, outsiders_in_destination=False) is None
    refused = audience_refusal(PUBLIC, SHARED, None, None, outsiders_in_destination=False)
    assert refused is not None and "shared with another organisation" in refused
    assert audience_refusal(SHARED, SHARED, None, None) is None


def test_public_content_never_reaches_a_guest_in_another_conversation() -> None:
    refused = audience_refusal(PUBLIC, SECRET, None, None, outsiders_in_destination=True)
    assert refused is not None and refused.startswith("not allowed:") and "guests" in refused
    unknown = audience_refusal(PUBLIC, GROUP, None, None, outsiders_in_destination=None)
    assert unknown is not None and "too many members" in unknown
    assert audience_refusal(PUBLIC, PUBLIC, None, None, outsiders_in_destination=True) is None


# ---- the cached I/O part -------------------------------------------------------------------------


@pytest.fixture
async def workspace(fake_slack: FakeSlack) -> FakeSlack:
    fake_slack.users[ALICE].update({"team_id": TEAM_ID, "tz": "Europe/Berlin"})
    fake_slack.users[BOB].update({"team_id": TEAM_ID})
    fake_slack.add_user(CAROL, "carol")
    fake_slack.users[CAROL].update({"team_id": TEAM_ID, "is_restricted": True})
    fake_slack.add_conversation(PUBLIC.id, "general", members=[ALICE, BOT_USER_ID])
    fake_slack.add_conversation("C0INCIDENT", "incidents", members=[BOB, BOT_USER_ID])
    fake_slack.add_conversation(SECRET.id, "secret", kind="private", members=[ALICE, BOB, BOT_USER_ID])
    fake_slack.add_conversation("G0HRONLY01", "hr", kind="private", members=[BOB, BOT_USER_ID])
    fake_slack.add_conversation(DM_ALICE.id, kind="im", im_user=ALICE, members=[ALICE, BOT_USER_ID])
    return fake_slack


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def access_for(slack: FakeSlack, redis: Redis, ttl_s: int = 300) -> Access:
    return Access(AsyncWebClient(token=TOKEN, base_url=slack.api_url), redis, team_id=TEAM_ID, ttl_s=ttl_s)


async def test_a_private_channel_the_asker_is_not_in_is_refused(workspace: FakeSlack, redis: Redis) -> None:
    access = access_for(workspace, redis)
    why = await access.refusal(source="G0HRONLY01", asker=ALICE, destination=DM_ALICE.id)
    assert why == "not allowed: #hr is a private channel the asker is not a member of"
    assert await access.refusal(source=SECRET.id, asker=ALICE, destination=DM_ALICE.id) is None


async def test_private_content_is_refused_for_a_public_thread(workspace: FakeSlack, redis: Redis) -> None:
    access = access_for(workspace, redis)
    why = await access.refusal(source=SECRET.id, asker=ALICE, destination=PUBLIC.id)
    assert why is not None and why.startswith("not allowed: #secret is private")
    assert await access.refusal(source=SECRET.id, asker=ALICE, destination=SECRET.id) is None


async def test_guests_read_only_public_channels_they_are_in(workspace: FakeSlack, redis: Redis) -> None:
    access = access_for(workspace, redis)
    workspace.conversation_members[PUBLIC.id].append(CAROL)
    assert await access.refusal(source=PUBLIC.id, asker=CAROL, destination=PUBLIC.id) is None
    why = await access.refusal(source="C0INCIDENT", asker=CAROL, destination=PUBLIC.id)
    assert why is not None and "guest" in why
    # Carol is in #general now: #incidents content read for Alice must not be shown to her there.
    why = await access.refusal(source="C0INCIDENT", asker=ALICE, destination=PUBLIC.id)
    assert why is not None and "guests" in why


async def test_public_content_goes_to_a_conversation_only_if_no_guest_is_in_it(
    workspace: FakeSlack, redis: Redis
) -> None:
    access = access_for(workspace, redis)
    assert await access.refusal(source="C0INCIDENT", asker=ALICE, destination=PUBLIC.id) is None
    workspace.add_conversation(
        "G0CONTRACT", "with-contractor", kind="private", members=[ALICE, CAROL, BOT_USER_ID]
    )
    why = await access.refusal(source="C0INCIDENT", asker=ALICE, destination="G0CONTRACT")
    assert why is not None and why.startswith("not allowed:") and "#with-contractor" in why
    workspace.add_conversation("G0GROUPDM2", kind="mpim", members=[ALICE, CAROL, BOT_USER_ID])
    assert await access.refusal(source="C0INCIDENT", asker=ALICE, destination="G0GROUPDM2") is not None
    assert await access.refusal(source="C0INCIDENT", asker=ALICE, destination=DM_ALICE.id) is None
    assert not workspace.problems


async def test_public_content_is_refused_where_the_members_are_too_many_to_check(
    workspace: FakeSlack, redis: Redis
) -> None:
    many = [f"U{n:09d}" for n in range(5_100)] + [ALICE, BOT_USER_ID]
    workspace.add_conversation("C0HUGE0001", "everyone", members=many)
    why = await access_for(workspace, redis).refusal(
        source="C0INCIDENT", asker=ALICE, destination="C0HUGE0001"
    )
    assert why is not None and "too many members" in why


async def test_facts_are_cached_in_redis_with_a_ttl(workspace: FakeSlack, redis: Redis) -> None:
    access = access_for(workspace, redis, ttl_s=120)
    await access.refusal(source=SECRET.id, asker=ALICE, destination=DM_ALICE.id)
    calls = len(workspace.calls)
    again = access_for(workspace, redis, ttl_s=120)  # another process would see the same cache
    assert await again.refusal(source=SECRET.id, asker=ALICE, destination=DM_ALICE.id) is None
    assert len(workspace.calls) == calls
    keys = sorted(k.decode() for k in await redis.keys("kimibot:access:*"))
    assert f"kimibot:access:conv:{TEAM_ID}:{SECRET.id}" in keys
    assert f"kimibot:access:members:{TEAM_ID}:{SECRET.id}" in keys
    assert f"kimibot:access:user:{TEAM_ID}:{ALICE}" in keys
    assert 0 < await redis.ttl(f"kimibot:access:conv:{TEAM_ID}:{SECRET.id}") <= 120
    assert not workspace.problems


async def test_without_a_cache_every_check_asks_slack(workspace: FakeSlack, redis: Redis) -> None:
    access = access_for(workspace, redis, ttl_s=0)
    await access.refusal(source=SECRET.id, asker=ALICE, destination=SECRET.id)
    first = len(workspace.calls)
    await access.refusal(source=SECRET.id, asker=ALICE, destination=SECRET.id)
    assert len(workspace.calls) == 2 * first
    assert await redis.keys("kimibot:access:*") == []


async def test_a_conversation_the_bot_cannot_see_is_an_access_error(
    workspace: FakeSlack, redis: Redis
) -> None:
    workspace.add_conversation("G0NOBOT001", "no-bot", kind="private", members=[ALICE])
    with pytest.raises(AccessError, match="the bot is not in that conversation"):
        await access_for(workspace, redis).refusal(source="G0NOBOT001", asker=ALICE, destination=DM_ALICE.id)
    workspace.problems.clear()


async def test_members_are_read_across_pages(workspace: FakeSlack, redis: Redis) -> None:
    many = [f"U{n:09d}" for n in range(2_500)] + [ALICE, BOT_USER_ID]
    workspace.add_conversation("G0BIGGROUP", "big", kind="private", members=many)
    access = access_for(workspace, redis)
    members = await access.members("G0BIGGROUP")
    assert members is not None and len(members) == len(many)
    assert len(workspace.calls_of("conversations.members")) == 3
