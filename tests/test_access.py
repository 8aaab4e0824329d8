"""Access control (ALLOWED_USERS, ALLOWED_CHANNELS, ALLOW_GUESTS) and forgetting (`@kimibot forget`, the
Forget shortcut, `/kimi forget-me`): the rule on plain inputs, then end to end through the real Bolt app."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest

from bot.admission import NOT_ENABLED, AccessPolicy, PersonFacts, decide
from bot.settings import Settings, SettingsError
from bot.slack.blocks import ACTION_REGENERATE
from bot.store import AccessFacts, Feedback, Stops, ThreadKeys, UserNames
from bot.turn import Source
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import APP_ID, BOT_USER_ID, TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, BOB, CHANNEL, DM, mention, message

ME, MY_BOT = "UBOT", "BBOT"
OTHER = "C0OTHERCH1"
GROUP = "S0ENGINEER"


def event(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "type": "app_mention",
        "user": "UALICE",
        "text": f"<@{ME}> hi",
        "ts": "1.000001",
        "channel": "C1",
    }
    base.update(fields)
    return base


def policy(**fields: Any) -> AccessPolicy:
    return AccessPolicy(**{key: frozenset(v) if isinstance(v, set) else v for key, v in fields.items()})


# ---- the rule, on plain inputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("access", "fields", "facts", "why"),
    [
        (policy(), {}, PersonFacts(), None),  # the default: everyone, everywhere
        (policy(users={"UALICE"}), {}, PersonFacts(), None),
        (policy(users={"UBOB"}), {}, PersonFacts(), "user not allowed"),
        (policy(groups={GROUP}), {}, PersonFacts(groups=frozenset({GROUP})), None),
        (policy(groups={GROUP}), {}, PersonFacts(), "user not allowed"),
        (policy(channels={"C1"}), {}, PersonFacts(), None),
        (policy(channels={"C2"}), {}, PersonFacts(), "channel not allowed"),
        (
            policy(channels={"C2"}),
            {"channel": "D1", "type": "message", "channel_type": "im"},
            None,
            "channel",
        ),
        (
            policy(channels={"C2", "dm"}),
            {"channel": "D1", "type": "message", "channel_type": "im"},
            None,
            None,
        ),
        (policy(allow_guests=False), {}, PersonFacts(guest=True), "guest"),
        (policy(allow_guests=False), {}, PersonFacts(guest=False), None),
        (policy(allow_guests=False), {}, PersonFacts(guest=None), None),  # Slack could not say: let in
        (policy(allow_guests=True), {}, PersonFacts(guest=True), None),
        (policy(users={"UALICE"}, allow_guests=False), {}, PersonFacts(guest=True), "guest"),
    ],
)
def test_access_rule_on_plain_inputs(
    access: AccessPolicy, fields: dict[str, object], facts: PersonFacts | None, why: str | None
) -> None:
    decision = decide(event(**fields), bot_user_id=ME, bot_id=MY_BOT, access=access, facts=facts)
    if why is None:
        assert decision.answer and not decision.refused
    else:
        assert not decision.answer and decision.refused
        assert decision.why.startswith(f"not allowed: {why}")
        assert decision.source in (Source.MENTION, Source.DM)


def test_a_message_not_addressed_to_the_bot_is_ignored_not_refused() -> None:
    decision = decide(
        event(type="message", text="just chatting", channel_type="channel"),
        bot_user_id=ME,
        bot_id=MY_BOT,
        access=policy(users={"UBOB"}),
    )
    assert not decision.answer and not decision.refused and decision.why == "not addressed to me"


def test_without_a_policy_decide_is_unchanged() -> None:
    assert decide(event(), bot_user_id=ME, bot_id=MY_BOT).answer


def test_the_settings_are_parsed_and_checked() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        allowed_users=f"UALICE, {GROUP},WBOB",
        allowed_channels="C1, dm",
    )
    parsed = AccessPolicy.from_settings(settings)
    assert parsed == AccessPolicy(
        users=frozenset({"UALICE", "WBOB"}),
        groups=frozenset({GROUP}),
        channels=frozenset({"C1", "dm"}),
        allow_guests=False,
    )
    assert not parsed.open and AccessPolicy().open
    assert Settings(_env_file=None).allow_guests is False  # type: ignore[call-arg]


def test_malformed_ids_are_one_line_each(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(SettingsError) as caught:
        make_settings(allowed_users="alice", allowed_channels="#general")
    text = str(caught.value)
    assert "ALLOWED_USERS holds 'alice', not ids" in text
    assert "ALLOWED_CHANNELS holds '#general', not ids" in text


# ---- end to end -------------------------------------------------------------------------------


def refusals(fake_slack: FakeSlack, user: str = ALICE) -> list[dict[str, Any]]:
    return [e for e in fake_slack.ephemerals if e.get("user") == user and e.get("text") == NOT_ENABLED]


async def test_a_disallowed_user_gets_no_kimi_call_and_one_notice_an_hour(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(allowed_users=BOB)
    for ts in ("1700000900.000100", "1700000900.000200"):
        await bot.send_event(mention("hello?", ts))  # a mention
        await bot.send_event(message(f"<@{BOT_USER_ID}> hello?", ts))  # and its message twin
    await bot.settle()
    assert fake_kimi.requests == []
    assert len(refusals(fake_slack)) == 1  # four events, one notice
    assert fake_slack.posts(CHANNEL) == []
    assert await bot.deps.queue.length() == 0
    await bot.send_event(mention("and me?", "1700000900.000300", user=BOB))
    await bot.settle()
    assert len(fake_kimi.requests) == 1 and fake_slack.bodies(CHANNEL, "1700000900.000300")
    assert fake_slack.problems == []


async def test_a_disallowed_channel_gets_no_kimi_call_and_one_notice(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(allowed_channels=f"{OTHER},dm")
    await bot.send_event(mention("here?", "1700000901.000100"))
    await bot.settle()
    assert fake_kimi.requests == []
    assert len(refusals(fake_slack)) == 1 and refusals(fake_slack)[0]["channel"] == CHANNEL
    await bot.send_event(mention("there?", "1700000901.000200", channel=OTHER))
    await bot.send_event(message("and in a DM?", "1700000901.000300", channel=DM, channel_type="im"))
    await bot.settle()
    assert len(fake_kimi.requests) == 2
    assert fake_slack.bodies(OTHER, "1700000901.000200") and fake_slack.bodies(DM, "1700000901.000300")
    assert fake_slack.problems == []


@pytest.mark.parametrize(
    ("user", "channel", "why"),
    [("UALICE", "C2", None), ("UALICE", "C1", "channel"), ("UBOB", "C2", "user"), ("UBOB", "C1", "channel")],
)
def test_with_both_lists_the_person_and_the_channel_must_each_be_allowed(
    user: str, channel: str, why: str | None
) -> None:
    access = policy(users={"UALICE"}, channels={"C2"})
    decision = decide(event(user=user, channel=channel), bot_user_id=ME, bot_id=MY_BOT, access=access)
    assert decision.answer is (why is None)
    if why is not None:
        assert decision.refused and decision.why.startswith(f"not allowed: {why}")


async def test_a_user_group_slack_cannot_read_lets_no_one_in_through_it(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_slack.usergroups[GROUP] = [ALICE]
    fake_slack.fail("usergroups.users.list", "missing_scope", times=10)
    bot: BotHarness = await make_bot(allowed_users=GROUP)
    await bot.send_event(mention("am I in?", "1700000907.000100"))
    await bot.settle()
    assert fake_kimi.requests == [] and len(refusals(fake_slack, ALICE)) == 1


async def test_a_guest_check_slack_cannot_answer_lets_the_person_in_with_a_warning(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, caplog: pytest.LogCaptureFixture
) -> None:
    bot: BotHarness = await make_bot(allow_guests=False)
    fake_slack.fail("users.info", "internal_error", status=500, times=20)
    with caplog.at_level("WARNING"):
        await bot.send_event(mention("am I in?", "1700000908.000100"))
        await bot.settle()
    assert len(fake_kimi.requests) == 1 and not refusals(fake_slack)
    assert any("guest" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


async def test_kimi_command_refuses_every_time_not_once_an_hour(
    make_bot: Callable[..., Any], fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(allowed_users=BOB)
    for question in ("first?", "second?"):
        status, body = await bot.command(question)
        assert status == 200 and json.loads(body) == {"response_type": "ephemeral", "text": NOT_ENABLED}
    await bot.settle()
    assert fake_kimi.requests == []


async def test_a_follow_up_from_a_disallowed_user_in_an_answered_thread_is_refused(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(allowed_users=ALICE)
    root = "1700000902.000100"
    await bot.send_event(mention("start", root))
    await bot.settle()
    await bot.send_event(message("may I join?", "1700000902.000200", user=BOB, thread_ts=root))
    await bot.settle()
    assert len(fake_kimi.requests) == 1
    notices = refusals(fake_slack, BOB)
    assert len(notices) == 1 and notices[0]["thread_ts"] == root


async def test_a_guest_is_refused_by_default_and_members_answered(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    default = Settings.model_fields["allow_guests"].default
    assert default is False
    bot: BotHarness = await make_bot(allow_guests=default)
    fake_slack.users[ALICE]["is_restricted"] = True
    await bot.send_event(mention("am I in?", "1700000903.000100"))
    await bot.send_event(mention("and me?", "1700000903.000200", user=BOB))
    await bot.settle()
    assert len(refusals(fake_slack)) == 1
    assert len(fake_kimi.requests) == 1 and fake_slack.bodies(CHANNEL, "1700000903.000200")
    assert fake_slack.bodies(CHANNEL, "1700000903.000100") == []
    # The facts are cached: BOB's second question asks Slack nothing more about him.
    asked = len(fake_slack.calls_of("users.info"))
    await bot.send_event(mention("again", "1700000903.000300", user=BOB))
    await bot.settle()
    assert len(fake_slack.calls_of("users.info")) == asked
    assert await bot.deps.redis.get(AccessFacts.guest_key(TEAM_ID, ALICE)) == "1"


async def test_an_ultra_restricted_guest_is_let_in_with_allow_guests(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(allow_guests=True)
    fake_slack.users[ALICE]["is_ultra_restricted"] = True
    await bot.send_event(mention("am I in?", "1700000904.000100"))
    await bot.settle()
    assert len(fake_kimi.requests) == 1 and not refusals(fake_slack)


async def test_user_group_members_are_allowed_and_the_group_is_read_once(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_slack.usergroups[GROUP] = [ALICE, "U0SOMEONE1"]
    bot: BotHarness = await make_bot(allowed_users=GROUP)
    await bot.send_event(mention("one", "1700000905.000100"))
    await bot.send_event(mention("two", "1700000905.000200"))
    await bot.send_event(mention("me too?", "1700000905.000300", user=BOB))
    await bot.settle()
    assert len(fake_kimi.requests) == 2
    assert len(refusals(fake_slack, BOB)) == 1 and not refusals(fake_slack, ALICE)
    assert len(fake_slack.calls_of("usergroups.users.list")) == 1  # cached (Redis and the process)
    assert fake_slack.problems == []


async def test_the_default_policy_asks_slack_and_redis_nothing_more(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(allow_guests=True)  # no lists, guests allowed: nothing to check
    await bot.send_event(mention("hi", "1700000906.000100"))
    await bot.settle()
    assert len(fake_kimi.requests) == 1
    assert fake_slack.calls_of("usergroups.users.list") == []
    assert [k async for k in bot.deps.redis.scan_iter(match="kimibot:guest:*")] == []
    assert [k async for k in bot.deps.redis.scan_iter(match="kimibot:refused:*")] == []


async def test_kimi_command_from_a_disallowed_user_is_refused_in_the_ack(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(allowed_users=BOB)
    status, body = await bot.command("what is Redis?")
    assert status == 200
    assert json.loads(body) == {"response_type": "ephemeral", "text": NOT_ENABLED}
    await bot.settle()
    assert fake_kimi.requests == [] and fake_slack.posts() == []
    status, body = await bot.command("and now?", user=BOB)
    assert status == 200 and NOT_ENABLED not in body
    await bot.settle()
    assert len(fake_kimi.requests) == 1


async def test_regenerate_by_a_disallowed_user_asks_kimi_nothing(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(allowed_users=BOB)
    ts = "1700000907.000100"
    await bot.send_event(mention("a colour?", ts, user=BOB))
    await bot.settle()
    answer = fake_slack.replies(CHANNEL, ts)[0]
    status, _ = await bot.click(answer, ACTION_REGENERATE, user=ALICE)
    assert status == 200
    await bot.settle()
    assert len(fake_kimi.requests) == 1
    assert len(refusals(fake_slack)) == 1
    status, _ = await bot.click(answer, ACTION_REGENERATE, user=BOB)
    await bot.settle()
    assert len(fake_kimi.requests) == 2


# ---- forgetting -------------------------------------------------------------------------------


async def thread_keys(bot: BotHarness, root: str) -> dict[str, Any]:
    keys = ThreadKeys(bot.thread(root))
    redis = bot.deps.redis
    return {
        "history": await redis.lrange(keys.history, 0, -1),  # type: ignore[misc]
        "turns": await redis.hgetall(keys.turns),  # type: ignore[misc]
        "meta": await redis.hgetall(keys.meta),  # type: ignore[misc]
    }


async def test_forget_in_a_thread_deletes_its_context_and_the_next_question_starts_afresh(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000910.000100"
    fake_slack.seed(CHANNEL, user=BOB, text="an earlier message the bot never saw", ts="1700000910.000050")
    await bot.send_event(mention("remember 42", root, thread_ts="1700000910.000050"))
    await bot.settle()
    thread = "1700000910.000050"
    before = await thread_keys(bot, thread)
    assert before["history"] and before["turns"]
    forget_ts = "1700000910.000200"
    await bot.send_event(mention("Forget", forget_ts, thread_ts=thread))
    await bot.send_event(message(f"<@{BOT_USER_ID}> Forget", forget_ts, thread_ts=thread))  # its twin
    await bot.settle()
    after = await thread_keys(bot, thread)
    assert after["history"] == [] and after["turns"] == {}
    assert after["meta"] == {"answered": "1", "forgotten": forget_ts} | (
        {"posted_ts": before["meta"]["posted_ts"]} if "posted_ts" in before["meta"] else {}
    )
    confirmations = [b for b in fake_slack.bodies(CHANNEL, thread) if b.startswith("Done: I have forgotten")]
    assert len(confirmations) == 1
    assert len(fake_kimi.requests) == 1  # forgetting asks Kimi nothing
    replies_read = len(fake_slack.calls_of("conversations.replies"))
    await bot.send_event(message("what number?", "1700000910.000300", thread_ts=thread))  # a follow-up
    await bot.settle()
    sent = [m["content"] for m in fake_kimi.requests[1]["messages"]]
    assert sent[1:] == ["alice: what number?"]  # no 42, no earlier messages read back from Slack
    assert len(fake_slack.calls_of("conversations.replies")) == replies_read
    assert fake_slack.problems == []


async def test_forget_waits_for_the_answer_in_progress_and_deletes_it_too(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000911.000100"
    fake_kimi.script(Reply(content="A slow answer about 42.", first_byte_delay=0.6))
    await bot.send_event(mention("remember 42", root))
    async with asyncio.timeout(5):
        while not fake_kimi.requests:  # noqa: ASYNC110 - the state changes in the fake
            await asyncio.sleep(0.01)
    await bot.send_event(mention("forget", "1700000911.000200", thread_ts=root))
    await bot.settle()
    bodies = fake_slack.bodies(CHANNEL, root)
    assert bodies[0].startswith("A slow answer about 42.")  # the running answer was not cut
    assert bodies[-1].startswith("Done: I have forgotten")
    after = await thread_keys(bot, root)
    assert after["history"] == [] and after["turns"] == {}


async def test_forget_in_a_top_level_mention_only_says_where_it_works(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    await bot.send_event(mention("forget", "1700000912.000100"))
    await bot.settle()
    assert fake_kimi.requests == [] and fake_slack.posts() == []
    assert [e["text"] for e in fake_slack.ephemerals] == [
        "Say `forget` to me inside a thread to make me forget that thread."
    ]


async def test_the_forget_shortcut_forgets_the_messages_thread_and_confirms_privately(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000913.000100"
    await bot.send_event(mention("remember 42", root))
    await bot.settle()
    answer = fake_slack.replies(CHANNEL, root)[0]
    payload = {
        "type": "message_action",
        "callback_id": "kimi_forget_thread",
        "trigger_id": "13345224609.738474920.8088930838d88f008e0",
        "action_ts": f"{time.time():.6f}",
        "team": {"id": TEAM_ID, "domain": "fake"},
        "user": {"id": BOB, "username": "bob", "team_id": TEAM_ID},
        "channel": {"id": CHANNEL, "name": "general"},
        "api_app_id": APP_ID,
        "token": "legacy",
        "message_ts": answer["ts"],
        "message": {k: v for k, v in answer.items() if k in ("type", "user", "ts", "thread_ts", "text")},
        "response_url": fake_slack.response_url("shortcut"),
    }
    started = time.monotonic()
    status, _ = await bot.post(
        b"payload=" + quote(json.dumps(payload)).encode(), "application/x-www-form-urlencoded"
    )
    assert status == 200 and time.monotonic() - started < 1.0
    await bot.settle()
    after = await thread_keys(bot, root)
    assert after["history"] == [] and after["turns"] == {}
    confirmation = [e for e in fake_slack.ephemerals if e["user"] == BOB]
    assert len(confirmation) == 1 and confirmation[0]["thread_ts"] == root
    assert confirmation[0]["text"].startswith("Done: I have forgotten")
    assert fake_slack.bodies(CHANNEL, root) == [fake_slack.bodies(CHANNEL, root)[0]]  # nothing posted
    assert fake_slack.problems == []


async def test_forget_me_deletes_the_askers_data_and_no_one_elses(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    redis = bot.deps.redis
    await bot.send_event(mention("hello", "1700000914.000100"))
    await bot.settle()
    assert await redis.get(UserNames.key(TEAM_ID, ALICE)) == "alice"
    for user in (ALICE, BOB):
        await bot.deps.feedback.record(TEAM_ID, CHANNEL, "1700000914.000500", user, "up", {"model": "m"})
    await bot.deps.feedback.record(TEAM_ID, CHANNEL, "1700000914.000600", ALICE, "down", {"model": "m"})
    await Stops(redis).request(CHANNEL, "1700000914.000700", ALICE)
    await Stops(redis).request(CHANNEL, "1700000914.000800", BOB)
    await AccessFacts(redis).put_guest(TEAM_ID, ALICE, False)
    history_before = await redis.lrange(ThreadKeys(bot.thread("1700000914.000100")).history, 0, -1)  # type: ignore[misc]

    status, body = await bot.command("forget-me")
    assert status == 200 and "Deleting what I keep about you" in body
    await bot.settle()

    assert await redis.get(UserNames.key(TEAM_ID, ALICE)) is None
    assert await redis.get(AccessFacts.guest_key(TEAM_ID, ALICE)) is None
    assert set(await bot.deps.feedback.ratings(TEAM_ID, CHANNEL, "1700000914.000500")) == {BOB}
    assert await bot.deps.feedback.ratings(TEAM_ID, CHANNEL, "1700000914.000600") == {}
    log = [json.loads(x) for x in await redis.lrange(Feedback.log_key(TEAM_ID), 0, -1)]  # type: ignore[misc]
    assert [e["user"] for e in log] == [BOB]
    assert await Stops(redis).requested_by(CHANNEL, "1700000914.000700") is None
    assert await Stops(redis).requested_by(CHANNEL, "1700000914.000800") == BOB
    # The user's turns inside threads stay (and the reply says so).
    assert await redis.lrange(ThreadKeys(bot.thread("1700000914.000100")).history, 0, -1) == history_before  # type: ignore[misc]
    assert len(fake_slack.responses) == 1
    reply = fake_slack.responses[0]
    assert reply["response_type"] == "ephemeral"
    assert (
        "2 👍/👎 vote(s), 1 Stop request(s) and your usage records" in reply["text"]
        and "inside threads stay" in reply["text"]
    )
    assert len(fake_kimi.requests) == 1


async def test_forget_me_works_for_someone_not_allowed(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    bot: BotHarness = await make_bot(allowed_users=BOB)
    status, body = await bot.command("forget-me")
    assert status == 200 and NOT_ENABLED not in body
    await bot.settle()
    assert len(fake_slack.responses) == 1 and fake_slack.responses[0]["text"].startswith("Done.")
