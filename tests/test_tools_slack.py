"""The Slack tools against the fake Slack (and real Redis): what each returns, and every refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import yaml
from redis.asyncio import Redis
from slack_sdk.web.async_client import AsyncWebClient

from bot.tools.base import ToolContext
from bot.tools.registry import build_registry, offered
from bot.tools.slack import (
    CurrentTime,
    SlackChannelHistory,
    SlackReadThread,
    SlackSearch,
    SlackUserInfo,
    format_time,
    parse_channel,
    parse_permalink,
    parse_user,
    parse_when,
    plain_text,
)
from tests.fakes.slack_api import BOT_USER_ID, TEAM_ID, TOKEN, FakeSlack
from tests.slack_requests import ALICE, BOB
from tests.test_manifests import ROOT, bot_scopes_for

GENERAL, INCIDENTS, SECRET, HR, DM_ALICE, SHARED = (
    "C0GENERAL1",
    "C0INCIDENT",
    "G0SECRET01",
    "G0HRONLY01",
    "D0ALICE001",
    "C0SHARED01",
)
CAROL = "U05CAROL001"
BERLIN = ZoneInfo("Europe/Berlin")


# ---- pure helpers --------------------------------------------------------------------------------


def test_permalinks_give_channel_message_and_thread() -> None:
    root = "https://acme.slack.com/archives/C0INCIDENT/p1764400000123456"
    assert parse_permalink(root) == ("C0INCIDENT", "1764400000.123456", "1764400000.123456")
    reply = "https://acme.slack.com/archives/C0INCIDENT/p1764400100000200?thread_ts=1764400000.123456&cid=C0INCIDENT"
    assert parse_permalink(reply) == ("C0INCIDENT", "1764400100.000200", "1764400000.123456")
    assert parse_permalink("<https://acme.slack.com/archives/G0SECRET01/p1764400000000100|link>") == (
        "G0SECRET01",
        "1764400000.000100",
        "1764400000.000100",
    )
    assert parse_permalink("https://example.com/archives/nothing") is None


def test_channel_and_user_references_are_read_in_their_slack_forms() -> None:
    assert parse_channel("C0INCIDENT") == "C0INCIDENT"
    assert parse_channel("<#C0INCIDENT|incidents>") == "C0INCIDENT"
    assert parse_channel("#C0INCIDENT") == "C0INCIDENT"
    assert parse_channel("https://acme.slack.com/archives/C0INCIDENT/p1764400000123456") == "C0INCIDENT"
    assert parse_channel("#incidents") is None  # names need conversations.list: ids only
    assert parse_user("<@U04RZ8N2PQM>") == "U04RZ8N2PQM"
    assert parse_user("@U04RZ8N2PQM") == "U04RZ8N2PQM"
    assert parse_user("alice") is None


def test_times_are_read_as_slack_ts_unix_or_iso_in_the_askers_zone() -> None:
    assert parse_when("1764400000.000100", BERLIN) == "1764400000.000100"
    assert parse_when("1764400000", BERLIN) == "1764400000.000000"
    assert parse_when("2026-11-29", BERLIN) == f"{datetime(2026, 11, 29, tzinfo=BERLIN).timestamp():.6f}"
    assert (
        parse_when("2026-11-29T10:00:00Z", BERLIN)
        == f"{datetime(2026, 11, 29, 10, tzinfo=UTC).timestamp():.6f}"
    )
    assert parse_when("yesterday", BERLIN) is None
    assert format_time("1764410400.000000", BERLIN) == "2025-11-29 11:00 CET"


def test_slack_markup_becomes_what_a_reader_sees() -> None:
    text = (
        "<@U04RZ8N2PQM> see <#C0INCIDENT|incidents> and <https://status.example.com|the status page> "
        "&amp; <!here>"
    )
    assert plain_text(text, {"U04RZ8N2PQM": "alice"}) == (
        "@alice see #incidents and the status page (https://status.example.com) & @here"
    )


# ---- the tools against the fake ------------------------------------------------------------------


@pytest.fixture
async def workspace(fake_slack: FakeSlack) -> FakeSlack:
    slack = fake_slack
    slack.users[ALICE].update(
        {
            "team_id": TEAM_ID,
            "tz": "Europe/Berlin",
            "tz_label": "Central European Time",
            "profile": {
                "display_name": "alice",
                "real_name": "Alice Liddell",
                "title": "SRE lead",
                "status_text": "On call",
                "status_emoji": ":pager:",
            },
        }
    )
    slack.users[BOB].update({"team_id": TEAM_ID, "tz": "America/New_York"})
    slack.add_user(CAROL, "carol")
    slack.users[CAROL].update({"team_id": TEAM_ID, "is_restricted": True})
    slack.add_conversation(GENERAL, "general", members=[ALICE, BOB, CAROL, BOT_USER_ID])
    slack.add_conversation(INCIDENTS, "incidents", members=[BOB, BOT_USER_ID])
    slack.add_conversation(SECRET, "secret", kind="private", members=[ALICE, BOB, BOT_USER_ID])
    slack.add_conversation(HR, "hr", kind="private", members=[BOB, BOT_USER_ID])
    slack.add_conversation(DM_ALICE, kind="im", im_user=ALICE, members=[ALICE, BOT_USER_ID])
    slack.add_conversation(SHARED, "partners", members=[ALICE, BOT_USER_ID], ext_shared=True)
    return slack


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def ctx_for(workspace: FakeSlack, redis: Redis) -> Callable[..., ToolContext]:
    client = AsyncWebClient(token=TOKEN, base_url=workspace.api_url)

    def make(user: str = ALICE, channel: str = DM_ALICE, action_token: str = "") -> ToolContext:
        return ToolContext(
            team_id=TEAM_ID,
            user=user,
            channel=channel,
            thread_ts="1764000000.000100",
            slack=client,
            redis=redis,
            action_token=action_token,
        )

    return make


def seed_incident(slack: FakeSlack) -> str:
    root = slack.seed(
        INCIDENTS, user=BOB, text="Rollback of 4.2? <@U04RZ8N2PQM> thoughts", ts="1764410400.000100"
    )
    slack.seed(INCIDENTS, user=ALICE, text="Yes, roll back now", ts="1764410460.000200", thread_ts=root)
    slack.seed(
        INCIDENTS, user=BOB, text="Decided: rollback done at 11:05", ts="1764410700.000300", thread_ts=root
    )
    return root


async def test_current_time_is_in_the_askers_zone(ctx_for: Callable[..., ToolContext]) -> None:
    now = datetime(2026, 11, 30, 4, 30, tzinfo=UTC)
    result = await CurrentTime().run({}, ctx_for(), now=now)
    assert result.ok
    assert "Europe/Berlin" in result.text
    assert "Monday 30 November 2026, 05:30:00 CET" in result.text
    assert "ISO 2026-11-30T05:30:00+01:00" in result.text
    other = await CurrentTime().run({"timezone": "Asia/Tokyo"}, ctx_for(), now=now)
    assert "In Asia/Tokyo: Monday 30 November 2026, 13:30 JST" in other.text
    nobody = await CurrentTime().run({}, ctx_for(user="U0NOBODY01"), now=now)
    assert nobody.ok and "(UTC)" in nobody.text and "04:30:00" in nobody.text


async def test_user_info_gives_name_title_zone_and_status(ctx_for: Callable[..., ToolContext]) -> None:
    result = await SlackUserInfo().run({"user": f"<@{ALICE}>"}, ctx_for(channel=GENERAL))
    assert result.ok
    for fact in (
        "display name: alice",
        "real name: Alice Liddell",
        "title: SRE lead",
        "Europe/Berlin",
        ":pager: On call",
    ):
        assert fact in result.text
    me = await SlackUserInfo().run({"user": "me"}, ctx_for(user=BOB))
    assert f"User {BOB}" in me.text
    guest = await SlackUserInfo().run({"user": CAROL}, ctx_for())
    assert "a guest of this workspace" in guest.text
    missing = await SlackUserInfo().run({"user": "U0NOBODY01"}, ctx_for())
    assert not missing.ok and "no such user" in missing.text
    bad = await SlackUserInfo().run({"user": "alice"}, ctx_for())
    assert not bad.ok


async def test_reading_a_public_thread_by_link_or_by_channel_and_ts(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    root = seed_incident(workspace)
    link = f"https://fake.slack.com/archives/{INCIDENTS}/p1764410460000200?thread_ts={root}&cid={INCIDENTS}"
    by_link = await SlackReadThread().run({"permalink": link}, ctx_for())
    assert by_link.ok, by_link.text
    assert by_link.title == "Read a thread in #incidents"
    lines = by_link.text.splitlines()
    assert lines[0] == "Thread in #incidents (3 messages, times in Europe/Berlin):"
    assert lines[1] == f"[2025-11-29 11:00 CET, ts={root}] bob: Rollback of 4.2? @alice thoughts"
    assert lines[3].endswith("bob: Decided: rollback done at 11:05")
    assert by_link.sources == (f"https://fake.slack.com/archives/{INCIDENTS}/p1764410400000100",)
    by_ts = await SlackReadThread().run({"channel": INCIDENTS, "ts": "1764410460.000200"}, ctx_for())
    assert by_ts.text == by_link.text  # a reply's ts reads its whole thread
    assert not workspace.problems


async def test_a_private_channel_the_asker_is_not_in_is_refused(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    root = workspace.seed(HR, user=BOB, text="salary review", ts="1764410400.000100")
    result = await SlackReadThread().run({"channel": HR, "ts": root}, ctx_for())
    assert not result.ok
    assert result.text == "not allowed: #hr is a private channel the asker is not a member of"
    history = await SlackChannelHistory().run({"channel": HR}, ctx_for())
    assert not history.ok and history.text.startswith("not allowed:")
    assert workspace.calls_of("conversations.replies") == []
    assert workspace.calls_of("conversations.history") == []
    allowed = await SlackReadThread().run({"channel": HR, "ts": root}, ctx_for(user=BOB, channel=HR))
    assert allowed.ok and "salary review" in allowed.text


async def test_private_content_is_refused_for_a_public_thread(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    root = workspace.seed(SECRET, user=BOB, text="the acquisition closes Friday", ts="1764410400.000100")
    into_public = await SlackReadThread().run({"channel": SECRET, "ts": root}, ctx_for(channel=GENERAL))
    assert not into_public.ok
    assert into_public.text.startswith("not allowed: #secret is private, and this answer goes to #general")
    assert "acquisition" not in into_public.text
    history = await SlackChannelHistory().run({"channel": SECRET}, ctx_for(channel=GENERAL))
    assert not history.ok and "acquisition" not in history.text
    assert workspace.calls_of("conversations.replies") == []
    in_dm = await SlackReadThread().run({"channel": SECRET, "ts": root}, ctx_for(channel=DM_ALICE))
    assert in_dm.ok and "acquisition" in in_dm.text
    in_place = await SlackReadThread().run({"channel": SECRET, "ts": root}, ctx_for(channel=SECRET))
    assert in_place.ok


async def test_public_content_is_not_carried_to_another_organisation(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    seed_incident(workspace)
    result = await SlackChannelHistory().run({"channel": INCIDENTS}, ctx_for(channel=SHARED))
    assert not result.ok and "shared with another organisation" in result.text
    assert (await SlackChannelHistory().run({"channel": INCIDENTS}, ctx_for(channel=DM_ALICE))).ok
    # #general has a guest (Carol) among its members: #incidents content read for Alice stays out of it.
    guest_there = await SlackChannelHistory().run({"channel": INCIDENTS}, ctx_for(channel=GENERAL))
    assert not guest_there.ok and guest_there.text.startswith("not allowed:") and "guests" in guest_there.text


async def test_a_guest_reads_only_public_channels_they_are_in(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    seed_incident(workspace)
    workspace.seed(GENERAL, user=ALICE, text="hello all")
    refused = await SlackChannelHistory().run({"channel": INCIDENTS}, ctx_for(user=CAROL, channel=GENERAL))
    assert not refused.ok and "guest" in refused.text
    own = await SlackChannelHistory().run({"channel": GENERAL}, ctx_for(user=CAROL, channel=GENERAL))
    assert own.ok and "hello all" in own.text


async def test_channel_history_oldest_first_with_since_until_and_threads(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    workspace.seed(INCIDENTS, user=BOB, text="old news", ts="1764300000.000100")
    root = seed_incident(workspace)
    workspace.seed(INCIDENTS, user=ALICE, text="later note", ts="1764420000.000100")
    assert SlackChannelHistory().title({"channel": f"<#{INCIDENTS}|incidents>"}) == "Reading #incidents"
    assert SlackChannelHistory().title({"channel": INCIDENTS}) == "Reading a channel"
    assert (
        SlackReadThread().title({"channel": f"<#{INCIDENTS}|incidents>"}) == "Reading a thread in #incidents"
    )
    everything = await SlackChannelHistory().run({"channel": f"<#{INCIDENTS}|incidents>"}, ctx_for())
    assert everything.ok and everything.title == "Read #incidents"
    lines = everything.text.splitlines()
    assert lines[0] == "#incidents: 3 messages, times in Europe/Berlin:"
    assert [line.split("] ", 1)[1] for line in lines[1:]] == [
        "bob: old news",
        "bob: Rollback of 4.2? @alice thoughts [thread: 2 replies; slack_read_thread with this ts reads it]",
        "alice: later note",
    ]
    assert root in lines[2]
    window = await SlackChannelHistory().run(
        {"channel": INCIDENTS, "since": "2025-11-29", "until": "2025-11-29T12:00"}, ctx_for()
    )
    assert window.ok
    assert "old news" not in window.text and "later note" not in window.text and "Rollback" in window.text
    newest = await SlackChannelHistory().run({"channel": INCIDENTS, "limit": 1}, ctx_for())
    assert "later note" in newest.text and "older messages exist" in newest.text
    bad = await SlackChannelHistory().run({"channel": INCIDENTS, "since": "last tuesday"}, ctx_for())
    assert not bad.ok and "since" in bad.text
    assert everything.sources == (f"https://fake.slack.com/archives/{INCIDENTS}/p1764420000000100",)
    assert not workspace.problems


async def test_long_history_is_paged_with_start_index(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    for n in range(60):
        workspace.seed(
            INCIDENTS, user=BOB, text=f"update {n:02d} " + "x" * 80, ts=f"{1764400000 + n * 60}.000100"
        )
    tool = SlackChannelHistory(max_chars=2_000)
    first = await tool.run({"channel": INCIDENTS, "limit": 60}, ctx_for())
    assert "Call the slack_channel_history tool with a start_index of 2000" in first.text
    second = await tool.run({"channel": INCIDENTS, "limit": 60, "start_index": 2000}, ctx_for())
    assert second.ok and "start_index of 4000" in second.text


async def test_slack_errors_are_plain_refusals(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    missing = await SlackChannelHistory().run({"channel": "C0MISSING1"}, ctx_for())
    assert not missing.ok and "the bot is not in that conversation" in missing.text
    no_thread = await SlackReadThread().run({"channel": INCIDENTS, "ts": "1764000000.000001"}, ctx_for())
    assert not no_thread.ok and "no such message or thread" in no_thread.text
    assert not (await SlackReadThread().run({"permalink": "https://example.com/x"}, ctx_for())).ok
    assert not (await SlackReadThread().run({}, ctx_for())).ok
    workspace.problems.clear()


async def test_slack_search_is_offered_only_with_an_action_token(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    tools = [CurrentTime(), SlackSearch()]
    assert [t.name for t in offered(tools, ctx_for())] == ["current_time"]
    assert [t.name for t in offered(tools, ctx_for(action_token="act.1"))] == ["current_time", "slack_search"]
    refused = await SlackSearch().run({"query": "rollback"}, ctx_for())
    assert not refused.ok


async def test_slack_search_returns_public_messages_with_links(
    workspace: FakeSlack, ctx_for: Callable[..., ToolContext]
) -> None:
    workspace.action_tokens.add("act.1")
    workspace.search_results.append(
        {
            "author_name": "Bob Builder",
            "author_user_id": BOB,
            "team_id": TEAM_ID,
            "channel_id": INCIDENTS,
            "channel_name": "incidents",
            "message_ts": "1764410700.000300",
            "content": "Decided: rollback done at 11:05",
            "is_author_bot": False,
            "permalink": f"https://fake.slack.com/archives/{INCIDENTS}/p1764410700000300",
        }
    )
    result = await SlackSearch().run(
        {"query": "rollback decision", "after": "2025-11-28"}, ctx_for(action_token="act.1")
    )
    assert result.ok, result.text
    assert "#incidents (C0INCIDENT), 2025-11-29 11:05 CET" in result.text
    assert "Bob Builder: Decided: rollback done at 11:05" in result.text
    assert result.sources == (f"https://fake.slack.com/archives/{INCIDENTS}/p1764410700000300",)
    call = workspace.calls_of("assistant.search.context")[0].args
    assert call["action_token"] == "act.1" and call["channel_types"] == "public_channel"
    assert int(call["after"]) == int(datetime(2025, 11, 28, tzinfo=BERLIN).timestamp())
    expired = await SlackSearch().run({"query": "x"}, ctx_for(action_token="stale"))
    assert not expired.ok and "invalid_action_token" in expired.text
    guest = await SlackSearch().run(
        {"query": "x"}, ctx_for(user=CAROL, channel=GENERAL, action_token="act.1")
    )
    assert not guest.ok and guest.text.startswith("not allowed:")
    shared = await SlackSearch().run({"query": "x"}, ctx_for(channel=SHARED, action_token="act.1"))
    assert not shared.ok and "another organisation" in shared.text
    assert not workspace.problems


def test_the_slack_tools_pass_the_registry_unchanged() -> None:
    tools = [CurrentTime(), SlackUserInfo(), SlackReadThread(), SlackChannelHistory(), SlackSearch()]
    registry = build_registry(tools)
    assert registry.names == (
        "current_time",
        "slack_channel_history",
        "slack_read_thread",
        "slack_search",
        "slack_user_info",
    )
    for tool, definition in zip(registry.tools, registry.definitions, strict=True):
        assert definition["function"]["parameters"] == tool.parameters


TOOLS_CALL = [
    "users.info",
    "conversations.info",
    "conversations.members",
    "conversations.replies",
    "conversations.history",
    "chat.getPermalink",
    "assistant.search.context",
]


@pytest.mark.parametrize("name", ["manifest-http.yml", "manifest-socket-mode.yml"])
def test_both_manifests_grant_what_the_slack_tools_call(name: str) -> None:
    """Like test_manifests, for the tools' methods: each needs one of its bot scopes, and for the access
    rule every conversation kind must be readable (public, private, DM, group DM)."""
    manifest = yaml.safe_load((ROOT / "manifests" / name).read_text())
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    for method in TOOLS_CALL:
        needed = bot_scopes_for(method)
        assert not needed or needed & scopes, f"{name}: {method} needs one of {sorted(needed)}"
    assert {"channels:read", "groups:read", "im:read", "mpim:read"} <= scopes
    assert {"channels:history", "groups:history", "im:history", "mpim:history"} <= scopes
    assert "search:read.public" in scopes
