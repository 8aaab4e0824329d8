"""Issue 10: from a queued job to its request reaching Kimi, in few Redis round trips and with Kimi's request
ahead of the answer's other work, without giving up what the queue guarantees."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

import bot.queue
import bot.usage
from bot.queue import CLAIM_SCRIPT, READY_SCRIPT, Job, JobQueue
from bot.redis_client import is_cluster
from bot.slack.reply import ReplyWriter
from bot.store import READY_KEY, ThreadKeys
from bot.turn import Source, ThreadKey, Turn
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import TEAM_ID, FakeSlack
from tests.slack_requests import ALICE, CHANNEL, mention
from tests.test_usage import ONE_CENT_A_REQUEST

THREAD = ThreadKey("T1", "C1", "1700000000.000100")


def counting(redis: Redis) -> list[str]:
    """The commands the client sends from now on (a pipeline's execute counts once)."""
    sent: list[str] = []
    command = redis.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await command(*args, **options)

    redis.execute_command = counted  # type: ignore[method-assign]
    return sent


async def test_a_claim_takes_the_lease_begins_the_head_job_and_lists_the_thread_in_one_call(
    redis: Redis,
) -> None:
    queue = JobQueue(redis, consumer="a", visibility_s=5.0)
    await queue.put(THREAD, "turn", {"job_id": "1"})
    await queue.put(THREAD, "turn", {"job_id": "2"})
    [(thread, score)] = await queue.due(5)
    for script in (CLAIM_SCRIPT, READY_SCRIPT):  # loaded already, as after a process's first claim
        await redis.script_load(script.text)  # type: ignore[no-untyped-call]
    sent = counting(redis)
    lease = await queue.claim(thread, score)
    assert lease is not None
    # The listing is in another slot on a cluster: its own call there.
    assert len(sent) == (2 if is_cluster(redis) else 1)
    job = await lease.next_job()  # the job the claim began: no call of its own
    assert len(sent) == (2 if is_cluster(redis) else 1)
    assert isinstance(job, Job) and job.job_id == "1" and job.attempt == 1
    attempts = await redis.hget(ThreadKeys(THREAD).attempts, job.raw)  # type: ignore[misc]
    assert attempts == "1"
    assert await queue.due(5) == []  # pushed to when the lease runs out
    await lease.complete(job)
    second = await lease.next_job()  # the next ones are begun as before
    assert isinstance(second, Job) and second.job_id == "2" and second.attempt == 1


async def test_a_job_the_claim_began_and_nobody_ran_is_handed_back_without_an_attempt(redis: Redis) -> None:
    """Shutdown between the claim and the run: the next worker's run is still the first attempt."""
    queue = JobQueue(redis, consumer="a", visibility_s=5.0)
    await queue.put(THREAD, "turn", {"job_id": "1"})
    [(thread, score)] = await queue.due(5)
    lease = await queue.claim(thread, score)
    assert lease is not None
    await lease.hand_back(None)
    [(thread, score)] = await queue.due(5)  # listed for now again
    again = await queue.claim(thread, score)
    assert again is not None
    job = await again.next_job()
    assert isinstance(job, Job) and job.attempt == 1


async def test_a_claim_of_a_thread_without_jobs_unlists_it_unless_listed_anew(redis: Redis) -> None:
    queue = JobQueue(redis, consumer="a", visibility_s=5.0)
    await queue.put(THREAD, "turn", {"job_id": "1"})
    [(thread, score)] = await queue.due(5)
    await redis.delete(ThreadKeys(THREAD).inbox)  # its job went meanwhile
    assert await queue.claim(thread, score) is None
    assert await redis.zscore(READY_KEY, str(THREAD)) is None
    await queue.put(THREAD, "turn", {"job_id": "2"})
    await redis.delete(ThreadKeys(THREAD).inbox)
    await redis.zadd(READY_KEY, {str(THREAD): score + 1})  # listed anew since it was seen at `score`
    assert await queue.claim(thread, score) is None
    assert await redis.zscore(READY_KEY, str(THREAD)) == score + 1


async def test_a_thread_another_worker_holds_is_looked_at_again_when_its_lease_runs_out(redis: Redis) -> None:
    one, two = (JobQueue(redis, consumer=n, visibility_s=5.0) for n in ("one", "two"))
    await one.put(THREAD, "turn", {"job_id": "1"})
    [(thread, score)] = await one.due(5)
    assert await one.claim(thread, score) is not None
    listed = await redis.zscore(READY_KEY, str(THREAD))
    await redis.zadd(READY_KEY, {str(THREAD): 0})  # due now, as if the holder's listing were lost
    assert await two.claim(thread, 0.0) is None
    pushed = await redis.zscore(READY_KEY, str(THREAD))
    assert pushed is not None and listed is not None and pushed >= listed - 100  # ~ its lease's end


async def test_kimi_has_the_request_before_the_placeholder_is_posted(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """The sign of life goes right behind the request: its Slack call's work does not delay Kimi's (once
    the connection to Kimi is open: the first request's connect lets the placeholder go meanwhile)."""
    fake_kimi.script(Reply(content="First."), Reply(content="Short and sweet."))
    await bot.send_event(mention("hello", "1700000010.000050"))
    await bot.settle()
    calls = len(fake_slack.calls)
    await bot.send_event(mention("hi", "1700000010.000100"))
    await bot.settle()
    [placeholder] = [c for c in fake_slack.calls[calls:] if c.method == "chat.postMessage"]
    assert fake_kimi.request_times[1] <= placeholder.at
    assert fake_slack.bodies(CHANNEL, "1700000010.000100")[0].startswith("Short and sweet.")


async def test_a_rerun_refused_by_the_budget_says_so_in_the_earlier_runs_placeholder(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """Refused before its request is sent: the sentence still takes the place of the sign of life, and of
    the placeholder an earlier run of the job left (not a second message below a "Thinking…")."""
    bot: BotHarness = await make_bot(start_worker=False, **ONE_CENT_A_REQUEST, budget_user_daily_usd=0.005)
    await bot.send_event(mention("question", "1700000010.000200"))
    _, lease, job = await bot.claim_queued()
    earlier = await bot.deps.slack.chat_postMessage(
        channel=CHANNEL, thread_ts="1700000010.000200", text="Thinking…"
    )
    await lease.save_progress(job, started="1", placeholder_ts=str(earlier["ts"]))
    await lease.hand_back(job)  # a shutdown: the next run takes over
    bot.run_worker()
    await bot.settle()
    assert fake_kimi.requests == []
    [sentence] = fake_slack.bodies(CHANNEL, "1700000010.000200")
    assert "budget" in sentence


async def test_an_approval_prompt_goes_below_the_sign_of_life_still_on_its_way(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    """The placeholder now follows Kimi's first request: a tool call that needs approval, answered at once,
    must not post its Approve/Deny above it."""
    ts = fake_slack.seed(CHANNEL, user=ALICE, text="file it")
    turn = Turn(Source.MENTION, TEAM_ID, CHANNEL, ALICE, "file it", ts=ts, thread_ts=ts)
    writer = ReplyWriter(bot.deps.slack, turn, pacer=bot.deps.pacer, pace=bot.deps.pace, stop_value="x")
    writer.start()
    await writer.post_prompt("Approve?", [])
    posts = [c.args.get("text") for c in fake_slack.calls if c.method == "chat.postMessage"]
    assert len(posts) == 2 and posts[1] == "Approve?"
    await writer.close()


async def test_a_cluster_claim_whose_listing_call_fails_still_runs_its_job(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster the claim's second call (the `ready` listing, another slot) can fail after the first
    took the lease and counted the attempt: the claim still returns the lease and the job runs (it used
    to raise: the job unrun until the lease ran out, its attempt spent; JOB_MAX_ATTEMPTS=1 dead-lettered
    it without a run)."""
    monkeypatch.setattr(bot.queue, "is_cluster", lambda _: True)  # the cluster's two-call claim
    original = bot.queue.JobQueue.listing
    failed: list[str] = []

    async def listing(self: JobQueue, op: str, thread: Any, *args: Any, **kwargs: Any) -> Any:
        if op == "later" and not failed:
            failed.append(op)
            raise RedisConnectionError("the ready key's node is failing over")
        return await original(self, op, thread, *args, **kwargs)

    monkeypatch.setattr(bot.queue.JobQueue, "listing", listing)
    fake_kimi.script(Reply(content="Answered."))
    bot_harness: BotHarness = await make_bot(job_visibility_timeout=30.0, job_max_attempts=1)
    await bot_harness.send_event(mention("question", "1700000010.000500"))
    await bot_harness.settle()
    assert failed == ["later"]
    assert len(fake_kimi.requests) == 1
    assert fake_slack.bodies(CHANNEL, "1700000010.000500")[0].startswith("Answered.")


async def test_a_redis_error_before_kimi_is_asked_lets_the_lease_lapse_with_an_attempt_counted(
    make_bot: Callable[..., Any], fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget reservation (the usage keys, maybe on a failing cluster shard) raising RedisError: the
    job is left to run again after its lease, an attempt counted, as for any Redis failure mid-job. The
    unstarted sign of life that ReplyWriter.close cancels made it look like a shutdown: handed back at once
    without an attempt, run again and again (29 runs in 1.5 s)."""
    runs: list[int] = []

    async def before(self: Any, messages: Any, tools: Any) -> Any:
        runs.append(1)
        raise RedisConnectionError("the usage keys' shard is failing over")

    monkeypatch.setattr(bot.usage.Meter, "before", before)
    fake_kimi.script(*[Reply(content="never") for _ in range(50)])
    harness: BotHarness = await make_bot(job_visibility_timeout=3.0)
    await harness.send_event(mention("question", "1700000010.000300"))
    await asyncio.sleep(1.5)  # less than the lease: one run, then none until it lapses
    assert len(runs) == 1
    attempts = await harness.deps.redis.hgetall(ThreadKeys(harness.thread("1700000010.000300")).attempts)
    assert list(attempts.values()) == ["1"]
    assert fake_kimi.requests == []


async def test_stop_while_the_kimi_task_waits_for_the_placeholder_leaves_no_thinking_placeholder(
    bot: BotHarness, fake_slack: FakeSlack
) -> None:
    """Stop cancels the Kimi task, which may be waiting for the sign of life (a restarted stream, an
    approval prompt): the placeholder being posted is not cancelled with it, so the stopped answer replaces
    it instead of leaving a "Thinking…" with a Stop button in the thread for good."""
    ts = fake_slack.seed(CHANNEL, user=ALICE, text="q")
    turn = Turn(Source.MENTION, TEAM_ID, CHANNEL, ALICE, "q", ts=ts, thread_ts=ts)
    writer = ReplyWriter(bot.deps.slack, turn, pacer=bot.deps.pacer, pace=bot.deps.pace, stop_value="x")
    hold = fake_slack.hold("chat.postMessage")
    writer.start()
    waiting = asyncio.create_task(writer.restarted())  # as the Kimi task does (on_restart)
    await hold.reached.wait()  # the placeholder is posted in Slack, its answer not back yet
    writer.request_stop()
    waiting.cancel()  # what Stop does to the Kimi task
    await asyncio.gather(waiting, return_exceptions=True)
    hold.release()
    writer.text("partial answer")
    await writer.finish([])
    await writer.close()
    bodies = fake_slack.bodies(CHANNEL, ts)
    assert len(bodies) == 1 and "Thinking" not in bodies[0], bodies
