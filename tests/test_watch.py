"""The worker's watcher: all running answers' lease renewals, Stop reads and looks for waiting questions in
one pipeline per tick, against a real Redis (a cluster too, when the suite runs on one)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bot.queue import Job, JobQueue, Lease
from bot.redis_client import is_cluster
from bot.slack.blocks import ACTION_STOP
from bot.store import READY_KEY, Stops, ThreadKeys
from bot.turn import ThreadKey
from bot.watch import Watcher, _Held
from bot.worker import Worker
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import CHANNEL as SLACK_CHANNEL
from tests.slack_requests import mention

CHANNEL = "C1"


def thread(n: int) -> ThreadKey:
    return ThreadKey("T1", CHANNEL, f"1700000000.{n:06d}")


class Counted:
    """Counts what a Redis client sends: single commands, and pipelines with the commands queued in each."""

    def __init__(self, client: Redis) -> None:
        self.single: Counter[str] = Counter()
        self.single_keys: Counter[str] = Counter()  # "COMMAND first-argument" of each single command
        self.pipelines: list[Counter[str]] = []
        self.fail_next = 0  # pipelines to fail (as a dropped connection would) before they reach Redis
        command, pipeline = client.execute_command, client.pipeline

        async def execute_command(*args: Any, **options: Any) -> Any:
            self.single[str(args[0]).upper()] += 1
            self.single_keys[" ".join(str(a) for a in args[:2]).upper()] += 1
            return await command(*args, **options)

        def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = pipeline(*args, **kwargs)
            queue, execute = pipe.execute_command, pipe.execute
            sent: Counter[str] = Counter()

            def queued(*a: Any, **kw: Any) -> Any:
                sent[str(a[0]).upper()] += 1  # the command
                sent.update(f"key {x}" for x in a[1:] if isinstance(x, str) and ":" in x)  # and its keys
                return queue(*a, **kw)

            async def counted_execute(*a: Any, **kw: Any) -> Any:
                self.pipelines.append(sent)
                if self.fail_next > 0:
                    self.fail_next -= 1
                    await pipe.reset()
                    raise RedisConnectionError("injected: connection dropped")
                return await execute(*a, **kw)

            pipe.execute_command = queued
            pipe.execute = counted_execute
            return pipe

        client.execute_command = execute_command  # type: ignore[method-assign]
        client.pipeline = counted_pipeline  # type: ignore[method-assign]

    def reset(self) -> None:
        self.single.clear()
        self.single_keys.clear()
        self.pipelines.clear()


async def until(predicate: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():  # noqa: ASYNC110 - the state changes in other tasks
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {limit_s} s: {what}") from None


class Answers:
    """A runner standing in for the pipeline's answer: it reads its Stop through the watcher, as `answer`
    does, and runs until stopped (or cancelled)."""

    def __init__(self, stops: Stops) -> None:
        self.stops = stops
        self.running: dict[str, Lease] = {}
        self.stopped: set[str] = set()
        self.cancelled: set[str] = set()

    async def __call__(self, job: Job, lease: Lease) -> None:
        assert lease.watcher is not None
        ts = job.data["ts"]
        watch = lease.watcher.watch(self.stops.key(CHANNEL, ts))
        self.running[ts] = lease
        try:
            while watch.value is None:  # noqa: ASYNC110 - what a ReplyWriter's should_stop reads
                await asyncio.sleep(0.01)
            self.stopped.add(ts)
            await lease.complete(job)
        except asyncio.CancelledError:
            self.cancelled.add(ts)
            raise
        finally:
            watch.close()
            self.running.pop(ts, None)


async def test_n_running_answers_cost_one_pipeline_per_tick_and_a_stop_is_seen_through_it(
    redis: Redis,
) -> None:
    n = 12
    counted = Counted(redis)
    queue = JobQueue(redis, consumer="w", visibility_s=0.4)  # renewed every 0.1 s: a tick of 0.1 s
    answers = Answers(Stops(redis))
    shown: list[str] = []

    async def show_waiting(lease: Lease) -> None:
        shown.append(str(lease.thread))

    worker = Worker(queue, answers, concurrency=n, visibility_s=0.4, block_ms=50, show_waiting=show_waiting)
    for i in range(n):
        await queue.put(thread(i), "turn", {"job_id": str(i), "ts": thread(i).thread_ts})
    loop = asyncio.create_task(worker.run())
    try:
        await until(lambda: len(answers.running) == n, "all answers running")
        counted.reset()
        ticks = worker.watcher.ticks
        await until(lambda: worker.watcher.ticks >= ticks + 8, "eight ticks")
        pipelines = worker.watcher.ticks - ticks
        # Nothing but the watcher's pipelines while the answers run: no command of an answer's own.
        assert sum(counted.single.values()) == 0, counted.single
        stop_keys = [f"key {Stops.key(CHANNEL, thread(i).thread_ts)}" for i in range(n)]
        leases = [f"key {ThreadKeys(thread(i)).lease}" for i in range(n)]
        inboxes = [f"key {ThreadKeys(thread(i)).inbox}" for i in range(n)]
        if is_cluster(redis):  # one command per key, in one pipeline per node (3 masters)
            assert pipelines - 1 <= len(counted.pipelines) <= 3 * (pipelines + 1)
            for key in stop_keys:  # every answer's Stop read once a tick
                assert pipelines - 1 <= sum(sent[key] for sent in counted.pipelines) <= pipelines + 1
            total: Counter[str] = sum(counted.pipelines, Counter())
            assert total["GET"] <= n * (pipelines + 1) and total["LLEN"] <= n * (pipelines + 1)
        else:  # one pipeline a tick, one command per kind: Stop keys, renewals, listings pushed, inboxes
            assert pipelines - 1 <= len(counted.pipelines) <= pipelines + 1  # one in flight either side
            for sent in counted.pipelines:
                assert all(sent[key] == 1 for key in stop_keys)  # every answer's Stop read, each tick
                commands = sum(count for name, count in sent.items() if not name.startswith("key "))
                assert sent["EVAL"] == commands <= 4
        assert all(sum(sent[key] for sent in counted.pipelines) for key in leases)  # all renewed
        assert all(sum(sent[key] for sent in counted.pipelines) for key in inboxes)  # all looked at
        assert shown == []  # one job per thread: nothing waits

        await Stops(redis).request(CHANNEL, thread(3).thread_ts, "U1")
        await until(lambda: thread(3).thread_ts in answers.stopped, "the Stop seen by its answer")
        assert answers.stopped == {thread(3).thread_ts} and not answers.cancelled
    finally:
        await worker.drain(0.0)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert answers.cancelled == {thread(i).thread_ts for i in range(n) if i != 3}
    await until(lambda: worker.watcher.holding == 0 and worker.watcher._task is None, "the watcher ended")


async def test_a_lost_lease_cancels_its_job_and_is_no_longer_renewed(redis: Redis) -> None:
    queue = JobQueue(redis, consumer="w", visibility_s=0.4)
    answers = Answers(Stops(redis))
    worker = Worker(queue, answers, concurrency=2, visibility_s=0.4, block_ms=50)
    for i in (1, 2):
        await queue.put(thread(i), "turn", {"job_id": str(i), "ts": thread(i).thread_ts})
    loop = asyncio.create_task(worker.run())
    try:
        await until(lambda: len(answers.running) == 2, "both answers running")
        lost = answers.running[thread(1).thread_ts]
        await redis.set(ThreadKeys(thread(1)).lease, "another-worker|99", px=5_000)  # taken over
        await until(lambda: thread(1).thread_ts in answers.cancelled, "the job cancelled")
        assert lost.lost
        await until(lambda: worker.watcher.holding == 1, "the lost lease dropped")
        assert await redis.get(ThreadKeys(thread(1)).lease) == "another-worker|99"  # not renewed over
        assert not answers.cancelled - {thread(1).thread_ts}  # the other answer runs on
    finally:
        await worker.drain(0.0)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_a_failed_tick_confirms_nothing_and_the_next_one_renews_the_lease(redis: Redis) -> None:
    counted = Counted(redis)
    queue = JobQueue(redis, consumer="w", visibility_s=0.4)
    await queue.put(thread(1), "turn", {"job_id": "1"})
    [(found, score)] = await queue.due(1)
    lease = await queue.claim(found, score)
    assert lease is not None
    job = asyncio.create_task(asyncio.sleep(60))
    watcher = Watcher(queue, renew_s=0.1)
    held = watcher._held[id(lease)] = _Held(lease, job)  # held, with the ticks sent by hand (no loop)
    lease.renewed_at -= 1.0  # due now
    renewed_at, valid_until = lease.renewed_at, lease.valid_until
    try:
        counted.fail_next = 1
        await watcher.tick()  # Redis cannot be reached
        assert (lease.renewed_at, lease.valid_until) == (renewed_at, valid_until)  # writes wait
        assert not lease.lost and not job.done()
        await watcher.tick()
        assert lease.renewed_at > renewed_at and lease.valid_until > valid_until
        assert not lease.lost and not job.done()
        assert held.unlisted_since == lease.renewed_at  # its listing is pushed in the next tick
        await lease.guard()  # writes go ahead
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)


async def test_a_tick_that_fails_in_the_running_watcher_does_not_lose_the_lease(redis: Redis) -> None:
    counted = Counted(redis)
    queue = JobQueue(redis, consumer="w", visibility_s=0.4)
    answers = Answers(Stops(redis))
    worker = Worker(queue, answers, concurrency=1, visibility_s=0.4, block_ms=50)
    await queue.put(thread(1), "turn", {"job_id": "1", "ts": thread(1).thread_ts})
    loop = asyncio.create_task(worker.run())
    try:
        await until(lambda: len(answers.running) == 1, "the answer running")
        lease = answers.running[thread(1).thread_ts]
        counted.fail_next = 2  # two ticks in a row (0.2 s of a 0.4 s lease)
        await until(lambda: counted.fail_next == 0, "two failed ticks")
        before = lease.renewed_at
        await until(lambda: lease.renewed_at > before, "renewed again")
        assert not lease.lost and not answers.cancelled
        await Stops(redis).request(CHANNEL, thread(1).thread_ts, "U1")
        await until(lambda: answers.stopped == {thread(1).thread_ts}, "the answer stopped")
    finally:
        await worker.drain(1.0)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert not answers.cancelled


async def test_questions_waiting_behind_a_running_one_are_shown_once_a_second_at_most(redis: Redis) -> None:
    queue = JobQueue(redis, consumer="w", visibility_s=10.0)
    answers = Answers(Stops(redis))
    shown: list[str] = []
    release = asyncio.Event()

    async def show_waiting(lease: Lease) -> None:
        shown.append(str(lease.thread))
        await release.wait()  # a slow Slack: never two at once for a thread, renewals go on

    worker = Worker(queue, answers, concurrency=2, visibility_s=10.0, block_ms=50, show_waiting=show_waiting)
    await queue.put(thread(1), "turn", {"job_id": "1", "ts": thread(1).thread_ts})
    await queue.put(thread(1), "turn", {"job_id": "2", "ts": "1700000000.900000"})  # waits behind it
    await queue.put(thread(2), "turn", {"job_id": "3", "ts": thread(2).thread_ts})  # nothing behind it
    loop = asyncio.create_task(worker.run())
    try:
        await until(lambda: shown == [str(thread(1))], "the waiting question shown")
        await asyncio.sleep(1.2)
        assert shown == [str(thread(1))]  # the first show still in Slack's hands
        release.set()
        await until(lambda: len(shown) >= 2, "shown again, a second later")
        assert set(shown) == {str(thread(1))}
    finally:
        await worker.drain(0.0)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_a_stop_pressed_while_an_answer_streams_reaches_it_through_the_watcher(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    counted = Counted(bot.deps.redis)
    paragraphs = "\n\n".join(f"Paragraph {i}: " + "lorem ipsum dolor sit amet " * 12 for i in range(120))
    fake_kimi.script(Reply(content=paragraphs, chunk_chars=50, chunk_delay=0.05))
    ts = "1700000005.000900"
    await bot.send_event(mention("question", ts))
    await until(lambda: bool(fake_slack.calls_of("chat.appendStream")), "the answer streaming")
    await asyncio.sleep(1.5)  # the answer runs on: it used to ask Redis for its Stop every half second
    placeholder = fake_slack.replies(SLACK_CHANNEL, ts)[0]
    status, _ = await bot.click(placeholder, ACTION_STOP)
    assert status == 200
    await bot.settle(limit_s=5)
    assert "Stopped by <@U04RZ8N2PQM>" in fake_slack.bodies(SLACK_CHANNEL, ts)[-1]
    key = Stops.key(SLACK_CHANNEL, ts)
    # Read directly before it began, and for who pressed it once it stopped; meanwhile with the ticks.
    assert counted.single_keys[f"GET {key}".upper()] <= 2
    assert sum(sent[f"key {key}"] for sent in counted.pipelines) >= 3


async def _held_lease(redis: Redis, n: int = 1) -> tuple[JobQueue, Lease, Watcher, _Held, asyncio.Task[None]]:
    """A claimed lease held by a watcher whose last tick renewed it (so the next tick pushes its listing)."""
    queue = JobQueue(redis, consumer="w", visibility_s=10.0)
    await queue.put(thread(n), "turn", {"job_id": str(n)})
    [(found, score)] = [due for due in await queue.due(10) if due[0] == thread(n)]
    lease = await queue.claim(found, score)
    assert lease is not None
    job = asyncio.create_task(asyncio.sleep(60))
    watcher = Watcher(queue, renew_s=2.5)
    held = watcher._held[id(lease)] = _Held(lease, job)
    lease.watcher = watcher
    lease.renewed_at -= 3.0  # a renewal is due: this tick renews, the next one pushes the listing
    await watcher.tick()
    assert held.unlisted_since is not None
    return queue, lease, watcher, held, job


async def _listed_in_ms(redis: Redis, key: ThreadKey) -> float:
    score = await redis.zscore(READY_KEY, str(key))
    seconds, micros = await redis.time()
    assert score is not None
    return float(score) - (int(seconds) * 1000 + int(micros) / 1000)


async def test_a_tick_during_a_hand_back_does_not_push_the_thread_s_listing_back(redis: Redis) -> None:
    """hand_back lists the thread for now; a tick built meanwhile (the lease still held by the watcher
    until the worker drops it) must not push that listing back a lease's time: the thread's jobs would
    wait ~10 s for nobody."""
    queue, lease, watcher, _, job = await _held_lease(redis)
    real_listing = queue.listing

    async def listing(op: str, *args: Any, **kwargs: Any) -> Any:
        result = await real_listing(op, *args, **kwargs)
        if op == "set":  # a tick built while the hand-back was on its way reaches Redis after it
            await watcher.tick()
        return result

    queue.listing = listing  # type: ignore[method-assign]
    lease.renewed_at -= 3.0  # that tick has a renewal due too: it would find the lease gone
    try:
        await lease.hand_back(None)
        assert not job.cancelled() and not lease.lost  # handed back, not lost to another worker
        watcher.drop(lease)
        assert await redis.get(lease.keys.lease) is None  # nobody holds the thread
        assert await _listed_in_ms(redis, thread(1)) <= 100  # due now, not in ~10 s
    finally:
        job.cancel()


async def test_a_late_listing_push_skips_a_thread_whose_lease_is_gone(redis: Redis) -> None:
    """The same race where the push was already built when the lease went: on a single Redis the push
    itself checks the lease (a cluster keeps the thread's keys and the listing in different slots)."""
    if is_cluster(redis):
        pytest.skip("the one-script push is for a single Redis")
    _, lease, _, held, job = await _held_lease(redis, 2)
    try:
        pipe = redis.pipeline(transaction=False)
        assert held.unlisted_since is not None
        Lease.queue_listings(pipe, [(lease, held.unlisted_since)], time.monotonic())  # built while held
        await lease.hand_back(None)  # ... then the lease is handed back, listed for now
        [pushed] = await pipe.execute()
        assert int(pushed) == 0
        assert await _listed_in_ms(redis, thread(2)) <= 100
    finally:
        job.cancel()


async def test_on_a_cluster_a_silent_node_holds_up_only_its_own_leases_renewals(redis: Redis) -> None:
    """One pipeline per node: while one master does not answer (CLIENT PAUSE, as in a failover), the
    leases on the others are renewed and confirmed; before, one pipeline for all failed or waited whole,
    and every lease of the process lapsed with it."""
    if not is_cluster(redis):
        pytest.skip("needs a Redis Cluster (the suite's cluster run)")
    queue = JobQueue(redis, consumer="w", visibility_s=10.0)
    watcher = Watcher(queue, renew_s=2.5)
    leases: list[Lease] = []
    job = asyncio.create_task(asyncio.sleep(60))
    for i in range(12):
        await queue.put(thread(100 + i), "turn", {"job_id": str(i)})
    for key, score in await queue.due(50):
        lease = await queue.claim(key, score)
        if lease is not None:
            leases.append(lease)
            watcher._held[id(lease)] = _Held(lease, job)
            lease.watcher = watcher
    cluster: Any = redis
    nodes = {str(cluster.get_node_from_key(lease.keys.lease).name) for lease in leases}
    assert len(nodes) > 1, nodes  # 12 threads over 3 masters
    silent = cluster.get_node_from_key(leases[0].keys.lease)
    others = [lease for lease in leases if cluster.get_node_from_key(lease.keys.lease).name != silent.name]
    for lease in leases:
        lease.renewed_at -= 3.0  # all due
    pauser = Redis(host=silent.host, port=silent.port)
    try:
        await pauser.execute_command("CLIENT", "PAUSE", 6000, "ALL")
        before = {id(lease): lease.renewed_at for lease in others}
        tick = asyncio.create_task(watcher.tick())
        await until(
            lambda: all(lease.renewed_at > before[id(lease)] for lease in others) or tick.done(),
            "the healthy nodes' renewals",
        )
        assert not tick.done()  # the paused node has not answered yet ...
        assert all(lease.renewed_at > before[id(lease)] for lease in others)  # ... the others are confirmed
        # The next tick does not wait for the silent node either: its pipeline is still out, so it is
        # skipped, and the others' leases are renewed again.
        for lease in leases:
            lease.renewed_at -= 3.0
        before = {id(lease): lease.renewed_at for lease in others}
        async with asyncio.timeout(3):
            await watcher.tick()
        assert not tick.done()
        assert all(lease.renewed_at > before[id(lease)] for lease in others)
        await tick
    finally:
        await pauser.execute_command("CLIENT", "UNPAUSE")
        await pauser.aclose()
        job.cancel()
