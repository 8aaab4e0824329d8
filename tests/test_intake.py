"""The intake path, request -> ack: what it costs in Redis round trips and in Bolt's listener matching,
and that nothing the ack does not need (a notice to the asker) holds it up. Timings are in bench/intake.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from slack_bolt.listener.async_listener import AsyncCustomListener

from bot.admission import NOT_ENABLED
from bot.intake import Intake
from bot.queue import JobQueue
from bot.redis_client import is_cluster
from bot.store import READY_KEY
from bot.turn import ThreadKey
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi
from tests.fakes.slack_api import BOT_USER_ID, FakeSlack
from tests.loop_turns import LoopTurns
from tests.slack_requests import ALICE, envelope, http_request, json_body, mention, message, sign

THREAD = ThreadKey("T1", "C1", "1700000000.000100")


def record_commands(client: Redis) -> list[str]:
    """The name of each command the client sends from now on (a pipeline would not show here)."""
    sent: list[str] = []
    command = client.execute_command

    async def recorded(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return await command(*args, **options)

    client.execute_command = recorded  # type: ignore[method-assign]
    return sent


async def test_queueing_a_message_is_one_evalsha_that_also_lists_its_thread(redis: Redis) -> None:
    """One round trip on a single Redis (two on a cluster, where `ready` is in another slot), sent by SHA:
    no script text, no SCRIPT EXISTS. A redelivery, refused as a duplicate, still lists the thread again."""
    queue = JobQueue(redis, consumer="a", visibility_s=5.0)
    calls = 2 if is_cluster(redis) else 1
    assert await queue.put(THREAD, "turn", {"job_id": "0"}, dedup_ts="1.0")  # the scripts are loaded now
    sent = record_commands(redis)
    assert await queue.put(THREAD, "turn", {"job_id": "1"}, dedup_ts="1.1", engage=True) is True
    assert sent == ["EVALSHA"] * calls
    await redis.zrem(READY_KEY, str(THREAD))  # as if the listing had been lost
    sent.clear()
    assert await queue.put(THREAD, "turn", {"job_id": "1"}, dedup_ts="1.1") is False  # a redelivery
    assert sent == ["EVALSHA"] * calls
    assert [t for t, _ in await queue.due(10)] == [THREAD]
    assert len(await queue.waiting(THREAD)) == 2


async def test_a_server_without_the_scripts_gets_them_once(redis: Redis) -> None:
    """After a restart (or SCRIPT FLUSH) EVALSHA answers NOSCRIPT: the text goes once, then SHA again."""
    queue = JobQueue(redis, consumer="a", visibility_s=5.0)
    assert await queue.put(THREAD, "turn", {"job_id": "0"}, dedup_ts="1.0")
    await redis.script_flush()
    sent = record_commands(redis)
    assert await queue.put(THREAD, "turn", {"job_id": "1"}, dedup_ts="1.1") is True
    assert sent == ["EVALSHA", "EVAL"] * (2 if is_cluster(redis) else 1)
    sent.clear()
    assert await queue.put(THREAD, "turn", {"job_id": "2"}, dedup_ts="1.2") is True
    assert sent == ["EVALSHA"] * (2 if is_cluster(redis) else 1)
    assert [t for t, _ in await queue.due(10)] == [THREAD]
    assert len(await queue.waiting(THREAD)) == 3


async def test_mentions_and_their_message_twins_are_matched_by_the_first_listener_bolt_tries(
    make_bot: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bolt builds every listener matcher's arguments as it tries it, in the order listeners were
    registered: the events that make up the burst are tried first, and their listener runs no middleware."""
    bot: BotHarness = await make_bot(start_worker=False)
    tried: list[AsyncCustomListener] = []
    matches = AsyncCustomListener.async_matches

    async def counted(self: AsyncCustomListener, **kwargs: Any) -> bool:
        tried.append(self)
        return await matches(self, **kwargs)

    monkeypatch.setattr(AsyncCustomListener, "async_matches", counted)
    ts, dm_ts = "1700000950.000100", "1700000950.000200"
    for event in (
        mention("hi", ts),
        message(f"<@{BOT_USER_ID}> hi", ts),  # its twin
        message("hello", dm_ts, channel="D1", channel_type="im"),
    ):
        assert (await bot.send_event(event))[0] == 200
    assert len(tried) == 3 and len(set(tried)) == 1
    assert tried[0].middleware == []
    assert await bot.deps.queue.length() == 2  # the mention and the DM, the twin a duplicate


async def test_a_refusal_notice_does_not_hold_up_the_ack(
    make_bot: Callable[..., Any], fake_slack: FakeSlack
) -> None:
    """The ephemeral "not enabled" is sent after the ack: Slack answering slowly (or rate limiting it)
    cannot make the event late and redelivered."""
    bot: BotHarness = await make_bot(allowed_users="U0SOMEONE")
    hold = fake_slack.hold("chat.postEphemeral")
    try:
        async with asyncio.timeout(10):  # no answer from Slack until released: an ack waiting for it hangs
            status, _ = await bot.send_event(mention("hello?", "1700000951.000100"))
        assert status == 200
        call = await hold.wait()
        assert call.args.get("user") == ALICE and call.args.get("text") == NOT_ENABLED
    finally:
        hold.release()
    await bot.settle()
    assert [e["text"] for e in fake_slack.ephemerals if e.get("user") == ALICE] == [NOT_ENABLED]


async def test_job_starts_wait_while_requests_are_in_hand_and_not_longer() -> None:
    """`quiet()` (the worker's hold on claiming new threads, bot/intake.py): at once when no request is in
    hand; while one is, until it is answered; under requests that keep coming, `max_hold_s` at most."""
    intake = Intake(max_hold_s=30.0)
    async with asyncio.timeout(0.05):
        await intake.quiet()
    answered = asyncio.Event()

    async def request() -> None:
        with intake.request():
            await answered.wait()

    task = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(intake.quiet())
    await asyncio.sleep(0.3)
    assert not waiter.done()
    answered.set()
    await task
    async with asyncio.timeout(1):
        await waiter
    assert intake.in_hand == 0

    stop = asyncio.Event()

    async def held_until(ending: asyncio.Event) -> None:
        with intake.request():
            await ending.wait()

    async def stream() -> None:  # overlapping requests: the next is in hand before the last is answered
        ending = asyncio.Event()
        current = asyncio.create_task(held_until(ending))
        while not stop.is_set():
            await asyncio.sleep(0.02)
            next_ending = asyncio.Event()
            following = asyncio.create_task(held_until(next_ending))
            await asyncio.sleep(0)
            ending.set()
            await current
            ending, current = next_ending, following
        ending.set()
        await current

    intake.max_hold_s = 0.2
    streaming = asyncio.create_task(stream())
    await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    await intake.quiet()
    held = asyncio.get_running_loop().time() - started
    stop.set()
    await streaming
    assert 0.1 < held < 1.0, held  # gave up after ~max_hold_s, neither at once nor never
    assert intake.in_hand == 0


async def test_a_request_counts_from_bolt_taking_it_until_its_ack(
    make_bot: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/slack/events: a request is in hand while Bolt handles it (the job is queued inside), and not while
    its body is still arriving: a client trickling a body in holds no job start back."""
    bot: BotHarness = await make_bot(start_worker=False)
    intake = bot.deps.intake
    seen: list[int] = []
    put = bot.deps.queue.put

    async def recorded(*args: Any, **kwargs: Any) -> bool:
        seen.append(intake.in_hand)
        return await put(*args, **kwargs)

    monkeypatch.setattr(bot.deps.queue, "put", recorded)
    status, _ = await bot.send_event(mention("hello", "1700000961.000100"))
    assert status == 200 and seen == [1] and intake.in_hand == 0

    url = bot.server.make_url("/slack/events")
    _, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /slack/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"type":'
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    assert intake.in_hand == 0
    writer.close()
    await writer.wait_closed()


async def test_the_worker_holds_job_starts_while_a_request_is_in_hand(
    make_bot: Callable[..., Any], fake_kimi: FakeKimi
) -> None:
    """A job queued while a Slack request is still in hand starts once that request is answered."""
    bot: BotHarness = await make_bot()
    intake = bot.deps.intake
    intake.max_hold_s = 30.0
    with intake.request():  # another request, still being handled
        status, _ = await bot.send_event(mention("hello", "1700000962.000100"))
        assert status == 200
        await asyncio.sleep(0.3)
        assert fake_kimi.requests == [] and not bot.worker.running
    await bot.settle()
    assert len(fake_kimi.requests) == 1


async def test_a_burst_of_requests_starts_one_per_turn_of_the_loop_in_order() -> None:
    """`turn()` (bot/intake.py): requests that arrive together start in the order they came, each in a turn
    of the loop of its own, so the Redis replies of the first are read before the last ones start."""
    intake, turns = Intake(turn_cost_s=1.0, turn_grace_s=1.0), LoopTurns()  # none overdue here
    started: list[tuple[int, int]] = []

    async def request(number: int) -> None:
        await intake.turn()
        started.append((number, turns.count))

    async with asyncio.timeout(2):
        await asyncio.gather(*(request(number) for number in range(10)))
    turns.stop()
    assert [number for number, _ in started] == list(range(10))
    at = [turn for _, turn in started]
    assert all(later > earlier for earlier, later in itertools.pairwise(at)), at


async def test_on_a_busy_loop_overdue_requests_start_together() -> None:
    """When each turn of the loop is long (other work), a request does not wait one turn per request ahead
    of it: once it has waited `turn_cost_s` per request ahead plus `turn_grace_s`, it starts with the next
    turn, together with the other overdue ones, still in order."""
    intake = Intake(turn_cost_s=0.001, turn_grace_s=0.002)
    loop = asyncio.get_running_loop()
    busy = True

    def other_work() -> None:  # 5 ms of CPU in every turn of the loop
        if busy:
            time.sleep(0.005)
            loop.call_soon(other_work)

    loop.call_soon(other_work)
    turns = LoopTurns()
    started: list[tuple[int, int]] = []

    async def request(number: int) -> None:
        await intake.turn()
        started.append((number, turns.count))

    try:
        async with asyncio.timeout(5):
            await asyncio.gather(*(request(number) for number in range(20)))
    finally:
        busy = False
        turns.stop()
    assert [number for number, _ in started] == list(range(20))
    at = [turn for _, turn in started]
    assert at[-1] - at[0] < 10, at  # one per turn would take 19 turns


async def test_requests_let_through_overdue_do_not_pass_the_turn_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Overdue requests let through with the one handed the turn do not carry it on themselves (one chain:
    pacing resumes after them), even when one of them is cancelled before it runs."""
    intake = Intake(turn_cost_s=1.0, turn_grace_s=1.0)  # overdue only when the clock below jumps
    loop = asyncio.get_running_loop()
    real_time, offset = loop.time, [0.0]
    monkeypatch.setattr(loop, "time", lambda: real_time() + offset[0])
    turns = LoopTurns()
    started: list[tuple[int, int]] = []
    tasks: list[asyncio.Task[None]] = []

    async def request(number: int) -> None:
        await intake.turn()
        started.append((number, turns.count))

    def jump() -> None:  # after the burst is in line: 2 and 3 are overdue (deadlines T+3, T+4), 4.. are not
        offset[0] = 4.5
        loop.call_soon(tasks[2].cancel)  # runs right after 1, 2, 3 are let through, before they run

    tasks.extend(asyncio.create_task(request(number)) for number in range(10))
    loop.call_soon(jump)
    async with asyncio.timeout(30):
        await asyncio.gather(*tasks, return_exceptions=True)
    turns.stop()
    assert tasks[2].cancelled()
    assert [number for number, _ in started] == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    at = dict(started)
    assert at[1] == at[3], started  # let through together
    later = [at[number] for number in range(3, 10)]
    assert all(b > a for a, b in itertools.pairwise(later)), started  # then one per turn again: one chain
    with contextlib.suppress(asyncio.CancelledError):
        await tasks[2]


async def test_the_next_request_starts_whatever_the_one_before_it_waits_for() -> None:
    """Nothing is held through a round trip: a request stuck on its I/O does not hold the next one back,
    and once the burst has started, a new request starts in the turn it arrives."""
    intake = Intake()
    never = asyncio.Event()

    async def stuck() -> None:
        await intake.turn()
        await never.wait()

    first = asyncio.create_task(stuck())
    second = asyncio.create_task(intake.turn())
    async with asyncio.timeout(1):
        await second
    for _ in range(3):
        await asyncio.sleep(0)
    turns = LoopTurns()
    async with asyncio.timeout(1):
        await intake.turn()
    assert turns.count == 0  # did not wait for a turn
    turns.stop()
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first


async def test_a_cancelled_request_passes_its_turn_on() -> None:
    """A request cancelled while it waits for its turn, or after it was handed the turn but before it ran,
    does not stall the ones behind it."""
    intake = Intake(turn_cost_s=1.0, turn_grace_s=1.0)
    started: list[str] = []
    tasks: dict[str, asyncio.Task[None]] = {}

    async def request(name: str, cancel: str = "") -> None:
        await intake.turn()
        if cancel:  # runs right after the wake-up `turn()` scheduled for the next request in line
            asyncio.get_running_loop().call_soon(tasks[cancel].cancel)
        started.append(name)

    for name, cancel in [("a", "b"), ("b", ""), ("c", ""), ("d", "")]:
        tasks[name] = asyncio.create_task(request(name, cancel))
    await asyncio.sleep(0)  # a started; b, c and d wait; b is handed the turn and cancelled before it runs
    tasks["c"].cancel()  # c is cancelled while it still waits
    async with asyncio.timeout(1):
        await tasks["d"]
    assert started == ["a", "d"]
    assert tasks["b"].cancelled() and tasks["c"].cancelled()


async def test_a_request_closed_while_in_line_is_skipped() -> None:
    """A waiting request whose coroutine is closed (GeneratorExit, not a cancellation) leaves the line: the
    turn is not handed to it, so the ones behind it still start."""
    intake = Intake(turn_cost_s=1.0, turn_grace_s=1.0)
    await intake.turn()  # holds this turn: the next ones wait in line
    closed = intake.turn()
    closed.send(None)  # now waiting in line
    closed.close()
    async with asyncio.timeout(1):
        await intake.turn()


async def test_over_http_the_first_requests_of_a_burst_are_answered_before_the_last_start(
    make_bot: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/slack/events: 20 signed mentions written at once on 20 open connections. The first one's job is
    queued (its Redis reply read) before the last one's is sent: acks go out as each is done, not all
    together after the whole burst's CPU-bound part (bench.load shows the figures). A first burst opens the
    Redis connections (`serve` opens them as it starts; on a cluster they open per node, on first use)."""
    bot: BotHarness = await make_bot(start_worker=False)
    steps: list[tuple[str, str]] = []
    put = bot.deps.queue.put

    async def recorded(*args: Any, **kwargs: Any) -> bool:
        ts = str(kwargs.get("dedup_ts"))
        steps.append(("sent", ts))
        try:
            return await put(*args, **kwargs)
        finally:
            steps.append(("replied", ts))

    monkeypatch.setattr(bot.deps.queue, "put", recorded)
    url = bot.server.make_url("/slack/events")

    async def burst(first_ts: int) -> None:
        connections = [await asyncio.open_connection(url.host, url.port) for _ in range(20)]
        requests = []
        for number in range(20):
            ts = f"1700000970.{first_ts + number:06d}"
            body = json_body(envelope(mention(f"question {number}", ts, channel=f"C0BURST{number:02d}")))
            requests.append(http_request(str(url), body, {"Content-Type": "application/json", **sign(body)}))
        for (_, writer), request in zip(connections, requests, strict=True):
            writer.write(request)  # all written before the bot's loop runs again
        async with asyncio.timeout(5):
            for reader, writer in connections:
                status = await reader.readline()
                assert status.startswith(b"HTTP/1.1 200"), status
                writer.close()

    await burst(0)
    steps.clear()
    await burst(100)
    sent = [ts for step, ts in steps if step == "sent"]
    assert len(sent) == 20
    first_reply = steps.index(("replied", sent[0]))
    assert first_reply < steps.index(("sent", sent[-1])), steps
