"""Every "should I answer?" rule, on plain event dicts (no I/O)."""

from __future__ import annotations

import pytest

from bot.admission import decide, strip_mention
from bot.turn import Source

ME, MY_BOT = "UBOT", "BBOT"


def event(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "type": "message",
        "user": "UALICE",
        "text": "hi",
        "ts": "1.000001",
        "channel": "C1",
        "channel_type": "channel",
    }
    base.update(fields)
    return base


@pytest.mark.parametrize(
    ("fields", "engaged", "source"),
    [
        ({"type": "app_mention", "text": f"<@{ME}> hi"}, False, Source.MENTION),
        ({"text": f"<@{ME}> hi"}, False, Source.MENTION),  # the message twin of a mention
        ({"channel_type": "im", "channel": "D1"}, False, Source.DM),
        ({"thread_ts": "0.5"}, True, Source.THREAD),
        ({"subtype": "file_share"}, False, None),  # a file posted top-level, not addressed to us
        ({"subtype": "thread_broadcast", "thread_ts": "0.5"}, True, Source.THREAD),
    ],
)
def test_messages_addressed_to_the_bot_are_answered(
    fields: dict[str, object], engaged: bool, source: Source | None
) -> None:
    decision = decide(event(**fields), bot_user_id=ME, bot_id=MY_BOT, thread_engaged=engaged)
    assert decision.answer is (source is not None)
    assert decision.source == source


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"subtype": "bot_message", "bot_id": "B2", "user": None}, "subtype bot_message"),
        ({"bot_id": "B2", "text": f"<@{ME}> hi"}, "from a bot"),
        ({"user": ME, "bot_id": MY_BOT}, "from a bot"),
        ({"user": ME}, "from myself"),
        ({"subtype": "message_changed"}, "subtype message_changed"),
        ({"subtype": "message_deleted"}, "subtype message_deleted"),
        ({"subtype": "channel_join"}, "subtype channel_join"),
        ({"user": None}, "no user"),
        ({"ts": 12}, "malformed message"),
        ({"text": ["not", "text"]}, "malformed message"),
        ({"channel": None}, "no channel"),
        ({"thread_ts": "0.5"}, "thread I am not part of"),
        ({}, "not addressed to me"),
        ({"type": "reaction_added"}, "event type reaction_added"),
    ],
)
def test_everything_else_is_ignored_with_a_reason(fields: dict[str, object], why: str) -> None:
    decision = decide(event(**fields), bot_user_id=ME, bot_id=MY_BOT)
    assert not decision.answer
    assert decision.why == why


def test_non_dict_events_are_ignored() -> None:
    assert not decide("nope", bot_user_id=ME, bot_id=MY_BOT).answer  # type: ignore[arg-type]


def test_mention_token_is_stripped_but_other_people_stay() -> None:
    assert strip_mention(f"<@{ME}> ask <@UBOB> about <@{ME}|kimi> it", ME) == "ask <@UBOB> about  it"


def test_a_mentions_only_channel_answers_thread_replies_only_when_mentioned() -> None:
    reply = event(thread_ts="0.5")
    assert decide(reply, bot_user_id=ME, bot_id=MY_BOT, thread_engaged=True, followups="all").answer
    quiet = decide(reply, bot_user_id=ME, bot_id=MY_BOT, thread_engaged=True, followups="mentions")
    assert not quiet.answer and "mention" in quiet.why
    mentioned = event(thread_ts="0.5", text=f"<@{ME}> and this?")
    assert decide(mentioned, bot_user_id=ME, bot_id=MY_BOT, thread_engaged=True, followups="mentions").answer
    dm = event(thread_ts="0.5", channel_type="im", channel="D1")  # a DM is always addressed to the bot
    assert decide(dm, bot_user_id=ME, bot_id=MY_BOT, thread_engaged=True, followups="mentions").answer
