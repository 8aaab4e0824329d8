"""Nothing lost, nothing twice: dead workers, shutdowns, several replicas, and Redis restarts."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.queue import LeaseLost
from bot.store import READY_KEY
from bot.turn import ThreadKey
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.redis_servers import PrivateRedis
from tests.slack_requests import BOB, CHANNEL, mention, message

LONG = "\n\n".join(f"Paragraph {i}: " + "words of a long answer " * 10 for i in range(30))


def paragraphs(fake_slack: FakeSlack, thread_ts: str) -> list[str]:
    text = "".join(fake_slack.answer_parts(CHANNEL, thread_ts))
    return [line.split(":")[0] for line in text.split("\n") if line.startswith("Paragraph")]


async def test_a_job_whose_worker_died_is_taken_over_after_the_visibility_timeout(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(start_worker=False, job_visibility_timeout=0.3)
    await bot.send_event(mention("are you there?", "1700000007.000100"))
    # A worker takes the thread and dies without a word.
    [(thread, score)] = await bot.deps.queue.due(5)
    dead = await bot.deps.queue.claim(thread, score)
    assert dead is not None
    bot.run_worker()
    await asyncio.sleep(0.5)
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700000007.000100")) == 1
    assert len(fake_kimi.requests) == 1
    assert await bot.deps.queue.waiting(thread) == []
    assert await bot.deps.redis.zcard(READY_KEY) == 0


async def test_shutdown_hands_a_running_answer_to_another_worker_and_the_thread_shows_it_once(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_kimi.script(
        Reply(content=LONG, chunk_chars=60, chunk_delay=0.03), Reply(content=LONG, chunk_chars=400)
    )
    first: BotHarness = await make_bot()
    ts = "1700000007.000200"
    await first.send_event(mention("write a lot", ts))
    async with asyncio.timeout(10):
        while not fake_slack.calls_of("chat.appendStream"):  # noqa: ASYNC110 - waiting on the fake server
            await asyncio.sleep(0.01)
    await first.worker.drain(grace_s=0)  # SIGTERM with no grace left: the job goes back on the queue
    second: BotHarness = await make_bot()
    await second.settle()
    assert paragraphs(fake_slack, ts) == [f"Paragraph {i}" for i in range(30)]  # complete, exactly once
    placeholders = [c for c in fake_slack.calls_of("chat.postMessage") if c.args.get("text") == "Thinking…"]
    assert len(placeholders) == 1  # the re-run reused it
    assert fake_slack.problems == []


async def test_questions_in_one_thread_keep_their_order_across_replicas(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_kimi.script(Reply(content="first answer", first_byte_delay=0.4), Reply(content="second answer"))
    one: BotHarness = await make_bot()
    two: BotHarness = await make_bot()
    root = "1700000007.000300"
    await one.send_event(mention("first", root))
    await asyncio.sleep(0.05)
    await two.send_event(message("second", "1700000007.000301", thread_ts=root, user=BOB))
    await one.settle()
    await two.settle()
    bodies = fake_slack.bodies(CHANNEL, root)
    assert [b.split("\n")[0] for b in bodies] == ["first answer", "second answer"]
    assert [m["content"] for m in fake_kimi.requests[1]["messages"][1:]] == [
        "alice: first",
        "first answer",
        "bob: second",
    ]


async def test_two_replicas_answer_ten_questions_once_each_while_retries_hit_the_other(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    one: BotHarness = await make_bot()
    two: BotHarness = await make_bot()

    async def deliver(bot: BotHarness, event: dict[str, Any], event_id: str, retry_num: int = 0) -> int:
        """As Slack does: a 503 (Redis slow on a loaded machine) is delivered again, up to 3 retries."""
        for attempt in range(retry_num, retry_num + 4):
            status, _ = await bot.send_event(event, event_id=event_id, retry_num=attempt or None)
            if status != 503:
                return status
        return status

    sends = []
    for i in range(10):
        event = mention(f"question {i}", f"1700000007.{400 + i:06d}")
        first, other = (one, two) if i % 2 else (two, one)
        sends.append(deliver(first, event, f"EvR{i}"))
        sends.append(deliver(other, event, f"EvR{i}", retry_num=1))
        sends.append(deliver(other, message(event["text"], event["ts"]), f"EvM{i}"))
    statuses = await asyncio.gather(*sends)
    assert set(statuses) == {200}
    await one.settle()
    await two.settle()
    for i in range(10):
        bodies = fake_slack.bodies(CHANNEL, f"1700000007.{400 + i:06d}")
        # One answer each (on a loaded machine a slow stream may leave the placeholder above it as a
        # one-line "Thought for Ns": that is not a second answer).
        answers = [b for b in bodies if not b.startswith(":thought_balloon: Thought for")]
        assert len(answers) == 1 and f"question {i}" in answers[0], bodies
    assert len(fake_kimi.requests) == 10


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed for this test (scripts/test and .ci/run install it)")
    server = PrivateRedis(tmp_path)
    await server.start()
    yield server
    await server.stop()


async def test_a_redis_restart_keeps_queued_questions_and_the_bot_carries_on(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, private_redis: PrivateRedis
) -> None:
    bot: BotHarness = await make_bot(start_worker=False, redis_url=private_redis.url)
    await bot.send_event(mention("queued before the restart", "1700000007.000500"))
    await private_redis.stop()
    assert bot.session is not None
    async with bot.session.get(bot.url("/healthz")) as response:
        assert response.status == 503
    status, _ = await bot.send_event(mention("during the outage", "1700000007.000501"))
    assert status == 503  # Slack delivers it again later
    await private_redis.start()  # same directory: the AOF brings the queue back
    async with bot.session.get(bot.url("/healthz")) as response:
        assert response.status == 200
    bot.run_worker()
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700000007.000500")) == 1
    status, _ = await bot.send_event(mention("during the outage", "1700000007.000501"), retry_num=1)
    assert status == 200
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700000007.000501")) == 1


async def test_the_worker_survives_a_redis_outage_and_resumes(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, private_redis: PrivateRedis
) -> None:
    bot: BotHarness = await make_bot(redis_url=private_redis.url)
    await private_redis.stop()
    await asyncio.sleep(1.5)  # the worker meets the outage and keeps trying
    assert bot.worker_task is not None and not bot.worker_task.done()
    await private_redis.start()
    await bot.send_event(mention("back again?", "1700000007.000600"))
    await bot.settle()
    assert len(fake_slack.bodies(CHANNEL, "1700000007.000600")) == 1


async def test_a_completed_job_cannot_be_completed_twice_and_a_stale_owner_cannot_write(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """The fencing token: once a newer claim exists, the old holder's writes are refused."""
    thread = ThreadKey("T05KQ2R7JNB", CHANNEL, "1700000007.000700")
    await bot.worker.drain(0)  # no live worker: this test plays both workers by hand
    queue = bot.deps.queue
    assert await queue.put(thread, "turn", {"job_id": "j1", "turn": {}}, dedup_ts="1700000007.000700")
    [(_, score)] = await queue.due(5)
    first = await queue.claim(thread, score)
    assert first is not None
    job = await first.next_job()
    assert job is not None and not isinstance(job, str)
    await bot.deps.redis.delete(f"kimibot:thread:{{{thread}}}:lease")  # as if its lease ran out
    second = await queue.claim(thread, score)
    assert second is not None and second.token > first.token
    with pytest.raises(LeaseLost):
        await first.append({"role": "assistant", "content": "stale"})
    with pytest.raises(LeaseLost):
        await first.complete(job)
    assert first.lost
    assert await second.complete(job) is True
    assert await second.complete(job) is False  # already taken off the inbox
    assert (await bot.deps.threads.load(thread)).entries == []
    assert await second.release() is True
    assert await queue.length() == 0  # nothing left listed


async def test_questions_queued_by_the_previous_version_are_answered_after_an_upgrade(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str
) -> None:
    import json

    from bot.redis_client import build_redis
    from bot.work import LEGACY_STREAM

    root = "1700000007.000800"
    fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="queued before the upgrade", ts=root)
    turn = {
        "source": "mention",
        "team_id": "T05KQ2R7JNB",
        "channel": CHANNEL,
        "user": "U04RZ8N2PQM",
        "text": "queued before the upgrade",
        "ts": root,
        "thread_ts": root,
        "seq": 1,  # the old format carried a sequence number
    }
    old = build_redis(redis_url)
    await old.xadd(
        LEGACY_STREAM,
        {"kind": "turn", "data": json.dumps({"job_id": f"{CHANNEL}:{root}", "thread": "x", "turn": turn})},
    )
    await old.xadd(LEGACY_STREAM, {"kind": "turn", "data": "{not json"})
    await old.aclose()
    bot: BotHarness = await make_bot(start_worker=False)
    from bot.work import adopt_legacy_jobs

    # Two workers adopting at once (or one adopting again after a crash) queue each old job once.
    await asyncio.gather(adopt_legacy_jobs(bot.deps), adopt_legacy_jobs(bot.deps))
    assert len(await bot.deps.queue.waiting(bot.thread(root))) == 1
    bot.run_worker()
    await bot.settle()
    [body] = fake_slack.bodies(CHANNEL, root)
    assert "queued before the upgrade" in body
    assert await bot.deps.redis.xlen(LEGACY_STREAM) == 0


async def test_a_question_waiting_behind_another_shows_a_placeholder_and_stop_works_while_it_waits(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from bot.slack.blocks import ACTION_STOP

    fake_kimi.script(Reply(content="first answer", first_byte_delay=2.5), Reply(content="never asked"))
    root, follow = "1700000007.000900", "1700000007.000901"
    await bot.send_event(mention("a slow one", root))
    await bot.send_event(message("and then this", follow, thread_ts=root, user=BOB))

    def waiting() -> list[dict[str, Any]]:
        return [m for m in fake_slack.replies(CHANNEL, root) if "Waiting for the answer above" in str(m)]

    async with asyncio.timeout(2.0):  # well before the first answer is done
        while not waiting():  # noqa: ASYNC110 - effects on the fake server
            await asyncio.sleep(0.02)
    assert (await bot.click(waiting()[0], ACTION_STOP, user=BOB))[0] == 200
    await bot.settle()
    bodies = fake_slack.bodies(CHANNEL, root)
    assert bodies[0].startswith("first answer")
    assert len(bodies) == 2 and "Stopped by <@" in bodies[1] and "before I began" in bodies[1]
    assert len(fake_kimi.requests) == 1  # the stopped question never reached Kimi


async def test_a_greeting_does_not_wait_for_a_long_answer_holding_the_only_kimi_slot(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from tests.slack_requests import DM

    bot: BotHarness = await make_bot(kimi_concurrency=1)
    fake_kimi.script(Reply(content="a long answer", first_byte_delay=3.0), Reply(content="second"))
    await bot.send_event(mention("a long one", "1700000007.001000"))
    await bot.send_event(mention("another long one", "1700000007.001100"))  # waits for the Kimi slot
    thread_ts = fake_slack.seed(DM, user="U07F3N1BOTX", text="(assistant thread)")
    started = {
        "type": "assistant_thread_started",
        "event_ts": "1700000007.001200",
        "assistant_thread": {
            "user_id": "U04RZ8N2PQM",
            "channel_id": DM,
            "thread_ts": thread_ts,
            "context": {},
        },
    }
    await bot.send_event(started, seed=False)
    roots = ("1700000007.001000", "1700000007.001100")

    def greeted_and_both_shown() -> bool:
        # Both questions show their sign of life, though only one is with Kimi.
        shown = all(any("Thinking" in b for b in fake_slack.bodies(CHANNEL, root)) for root in roots)
        return shown and bool(fake_slack.bodies(DM, thread_ts))

    async with asyncio.timeout(2.0):  # long before the first answer frees the slot
        while not greeted_and_both_shown():  # noqa: ASYNC110 - effects on the fake server
            await asyncio.sleep(0.02)
    assert len(fake_kimi.requests) <= 1
    await bot.settle()
    answers = sorted(
        fake_slack.bodies(CHANNEL, root)[0] for root in ("1700000007.001000", "1700000007.001100")
    )
    assert answers[0].startswith("a long answer") and answers[1].startswith("second")


async def test_a_waiting_question_leaves_the_failure_sentence_of_the_one_before_it_in_place(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    # Q1's placeholder cannot be posted, and Kimi refuses Q1: its sentence is a message of its own, posted
    # after Q2's waiting placeholder. Q2's run must not take it for a partial answer of its own.
    fake_kimi.script(
        Reply(
            first_byte_delay=2.0,
            error_in_stream={"type": "exceeded_current_quota_error", "message": "Your account is suspended"},
        ),
        Reply(content="second answer"),
    )
    fake_slack.fail("chat.postMessage", "internal_error")
    root, follow = "1700000007.001300", "1700000007.001301"
    await bot.send_event(mention("first", root))
    await bot.send_event(message("second", follow, thread_ts=root, user=BOB))
    await bot.settle()
    bodies = fake_slack.bodies(CHANNEL, root)
    assert any("Waiting for the answer above" in str(p) for p in fake_slack.posts(CHANNEL, root))
    assert any("run out of credit" in body and "ref `" in body for body in bodies), bodies
    assert bodies[-1].startswith("second answer")
    assert not fake_slack.calls_of("chat.delete") or all(
        "credit" not in str(call.args) for call in fake_slack.calls_of("chat.delete")
    )
