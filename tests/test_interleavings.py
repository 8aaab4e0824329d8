"""Faults interleaved with real `kimibot serve` processes (issue 7): kill -9 at each step of a job, two
processes racing for one thread, a worker cut off and resumed (fencing), Redis silent while Slack
delivers, poison jobs and malformed entries, and failures outside the answer's own error handling.

Every process here is a real `kimibot serve` on a Redis of the test's own (so it can be paused, stopped
and inspected), talking to the fake Slack and Kimi over loopback. Each test kills what it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from bot.store import DEAD_LETTER_KEY, READY_KEY, ThreadKeys
from tests.fakes.kimi_api import API_KEY, FakeKimi, Reply
from tests.fakes.slack_api import TOKEN, FakeSlack
from tests.redis_servers import PrivateRedis
from tests.slack_requests import (
    ALICE,
    BOB,
    CHANNEL,
    SIGNING_SECRET,
    command_body,
    envelope,
    json_body,
    mention,
    message,
    sign,
    thread_key,
)
from tests.test_serve_process import free_port
from tests.test_settings_cli import kimibot_command

FAST_LEASE = {
    "JOB_VISIBILITY_TIMEOUT": "2"
}  # a dead worker's thread is taken over 2 s after its last renewal
RETRY = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
THINKING = "Thinking…"


# ---- Kimi's answers: deterministic per question, so a test can tell whole, partial and repeated apart ----
def tag_of(request: dict[str, Any]) -> str:
    """The question's tag ("question Q1 ..." -> "Q1") of the last user message Kimi was sent."""
    users = [m for m in request["messages"] if m["role"] == "user"]
    found = re.search(r"question (\S+)", str(users[-1]["content"]) if users else "")
    return found.group(1) if found else "?"


def full_answer(tag: str, paragraphs: int = 12) -> str:
    body = "\n\n".join(f"{tag} paragraph {i}: " + "words of a long answer " * 9 for i in range(paragraphs))
    return f"BEGIN-{tag}\n\n{body}\n\nEND-{tag}"


def answer_to(request: dict[str, Any]) -> str:
    return full_answer(tag_of(request))


def slow(**extra: Any) -> Reply:
    """Streams for about 3 s (long enough for a start, appends and a kill in between)."""
    return Reply(content=answer_to, chunk_chars=100, chunk_delay=0.1, **extra)


def fast() -> Reply:
    return Reply(content=answer_to, chunk_chars=5000)


# ---- processes ----------------------------------------------------------------------------------
class Serve:
    """`kimibot serve` as a process of its own; its log goes to a file (a pipe nobody reads would fill)."""

    def __init__(
        self, env: dict[str, str], directory: Path, name: str, command: list[str] | None = None
    ) -> None:
        self.port = int(env["PORT"])
        self.log_path = directory / f"{name}.log"
        self._log = self.log_path.open("w")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            command or [*kimibot_command(), "serve"],
            env=env,
            cwd=directory,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text()

    async def wait_healthy(self, session: aiohttp.ClientSession, limit_s: float = 20.0) -> None:
        async with asyncio.timeout(limit_s):
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"kimibot exited: {self.output()[-3000:]}")
                try:
                    async with session.get(f"{self.base}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    async def healthz(self, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
        async with session.get(f"{self.base}/healthz") as response:
            return response.status, await response.json()

    async def post(
        self, session: aiohttp.ClientSession, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> int:
        body = json_body(payload)
        all_headers = {"Content-Type": "application/json", **sign(body), **(headers or {})}
        async with session.post(f"{self.base}/slack/events", data=body, headers=all_headers) as response:
            await response.read()
            return response.status

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL: no goodbye; whatever it held stays held until its lease runs out."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        await asyncio.to_thread(self.process.wait)
        self._log.close()


@dataclass
class Stack:
    """A private Redis, the fakes, and the `kimibot serve` processes a test starts (all cleaned up)."""

    slack: FakeSlack
    kimi: FakeKimi
    redis_server: PrivateRedis
    redis: Redis
    session: aiohttp.ClientSession
    directory: Path
    processes: list[Serve] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(self.directory),
            "SLACK_BOT_TOKEN": TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SLACK_API_URL": self.slack.api_url,
            "MOONSHOT_API_KEY": API_KEY,
            "KIMI_BASE_URL": self.kimi.base_url,
            "KIMI_MODEL": "kimi-k2.6",
            "KIMI_RETRY_BASE_DELAY": "0.01",
            "ALLOW_GUESTS": "true",  # no guest check (users.info) at admission: these tests count Slack calls
            "REDIS_URL": self.redis_server.url,
            "PORT": str(free_port()),
            **extra,
        }

    def spawn(self, **extra: str) -> Serve:
        process = Serve(self.env(**extra), self.directory, f"serve{len(self.processes)}")
        self.processes.append(process)
        return process

    async def start(self, **extra: str) -> Serve:
        process = self.spawn(**extra)
        await process.wait_healthy(self.session)
        return process

    async def history(self, thread_ts: str) -> list[dict[str, Any]]:
        raw = await self.redis.lrange(ThreadKeys(thread_key(thread_ts)).history, 0, -1)  # type: ignore[misc]
        return [json.loads(item) for item in raw]

    async def dead_letters(self) -> list[dict[str, str]]:
        entries = await self.redis.xrange(DEAD_LETTER_KEY)
        return [dict(fields) for _, fields in entries]

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.output()[-4000:]}" for p in self.processes)


@pytest.fixture
async def stack(fake_slack: FakeSlack, fake_kimi: FakeKimi, tmp_path: Path) -> AsyncIterator[Stack]:
    server = PrivateRedis(tmp_path / "redis", appendonly=False)
    await server.start()
    client = Redis(host="127.0.0.1", port=server.port, decode_responses=True)
    session = aiohttp.ClientSession()
    stack = Stack(fake_slack, fake_kimi, server, client, session, tmp_path)
    try:
        yield stack
    finally:
        fake_slack.release_holds()
        for process in stack.processes:
            await process.kill()
        await session.close()
        await client.aclose()
        await server.stop()


# ---- what the thread shows ----------------------------------------------------------------------
def answer_text(slack: FakeSlack, thread_ts: str) -> str:
    """The answers' Markdown as the thread shows it now (deleted messages don't count), in order."""
    return "\n".join(slack.answer_parts(CHANNEL, thread_ts))


def shows_once(slack: FakeSlack, thread_ts: str, tag: str) -> bool:
    """The thread shows the whole answer to `tag` exactly once and no part of it elsewhere."""
    text = answer_text(slack, thread_ts)
    return (
        text.count(full_answer(tag)) == 1
        and text.count(f"BEGIN-{tag}") == 1
        and text.count(f"END-{tag}") == 1
    )


STILL_WORKING = (THINKING, "Waiting for the answer above")  # a placeholder nobody replaced


def settled(slack: FakeSlack, thread_ts: str) -> bool:
    """No placeholder of the thread still says it is thinking or waiting."""
    return not any(sign in body for body in slack.bodies(CHANNEL, thread_ts) for sign in STILL_WORKING)


async def until(
    predicate: Callable[[], bool], limit_s: float = 20.0, what: str = "", stack: Stack | None = None
) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():  # noqa: ASYNC110 - the state lives in other processes' effects
                await asyncio.sleep(0.02)
    except TimeoutError:
        if stack is not None and os.environ.get("DEBUG_INTERLEAVINGS"):
            for m in stack.slack.messages[CHANNEL]:
                print(
                    {k: (v[:60] if isinstance(v, str) else v) for k, v in m.items() if k not in ("blocks",)}
                )
            for c in stack.slack.calls:
                print(
                    c.method, {k: (str(v)[:60]) for k, v in c.args.items() if k in ("ts", "_result", "text")}
                )
        raise AssertionError(f"not within {limit_s} s: {what}\n{stack.logs() if stack else ''}") from None


def seed_thread(slack: FakeSlack, root: str, *follow_ups: str) -> None:
    slack.seed(CHANNEL, user=ALICE, text="root", ts=root)
    for ts in follow_ups:
        slack.seed(CHANNEL, user=ALICE, text="follow-up", ts=ts, thread_ts=root)


def history_shape(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """("user", question ts) and ("assistant", answer tag, or "partial ..."/"other ...") per entry."""
    shape = []
    for entry in history:
        if entry["role"] == "user":
            shape.append(("user", str(entry.get("ts"))))
            continue
        content = str(entry.get("content") or "")
        found = re.search(r"BEGIN-(\S+)", content)
        if found and content == full_answer(found.group(1)):
            shape.append(("assistant", found.group(1)))
        else:
            shape.append(("assistant", f"other {content[:60]!r}"))
    return shape


def expected_shape(*pairs: tuple[str, str]) -> list[tuple[str, str]]:
    shape: list[tuple[str, str]] = []
    for ts, tag in pairs:
        shape += [("user", ts), ("assistant", tag)]
    return shape


REF = re.compile(r"\(ref `([0-9a-f]+)`\)")


def refs(slack: FakeSlack, thread_ts: str) -> list[str]:
    """Reference ids of the one-sentence failure notices the thread shows."""
    return [found for body in slack.bodies(CHANNEL, thread_ts) for found in REF.findall(body)]


async def quiet(stack: Stack, limit_s: float = 20.0) -> None:
    """Until no thread has jobs waiting or running (every lease released)."""
    async with asyncio.timeout(limit_s):
        while await stack.redis.zcard(READY_KEY):  # noqa: ASYNC110 - state in Redis
            await asyncio.sleep(0.05)


def placeholders(slack: FakeSlack) -> int:
    """Placeholders posted (thinking, or waiting behind an earlier question)."""
    return len(
        [c for c in slack.calls_of("chat.postMessage") if c.args.get("text") in (THINKING, "Waiting…")]
    )


async def inbox_length(stack: Stack, thread_ts: str) -> int:
    return int(await stack.redis.llen(ThreadKeys(thread_key(thread_ts)).inbox))  # type: ignore[misc]


# ---- 1. kill -9 with a follow-up queued, default settings: both answered, in order, within 15 s ------
async def test_kill_9_mid_answer_with_a_follow_up_queued_answers_both_once_in_order_within_15_s(
    stack: Stack,
) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(Reply(content=answer_to, chunk_chars=20, chunk_delay=0.05), *(fast() for _ in range(4)))
    root, follow = "1700000100.000100", "1700000100.000200"
    seed_thread(slack, root, follow)
    bot = await stack.start()  # the defaults: JOB_VISIBILITY_TIMEOUT 10 s
    assert await bot.post(stack.session, envelope(mention("question Q1 please, at length", root))) == 200
    await until(lambda: len(slack.calls_of("chat.appendStream")) >= 2, 20, "Q1 streaming", stack)
    follow_up = envelope(message("and question Q2 after that", follow, thread_ts=root))
    assert await bot.post(stack.session, follow_up) == 200
    assert await inbox_length(stack, root) == 2  # Q2 waits behind Q1
    await bot.kill()
    assert not shows_once(slack, root, "Q1")  # the first run was cut mid-answer

    again = stack.spawn()
    restarted = again.started_at
    await until(
        lambda: shows_once(slack, root, "Q1") and shows_once(slack, root, "Q2") and settled(slack, root),
        30,
        "both answers after the restart",
        stack,
    )
    took = time.monotonic() - restarted
    print(f"\nkill -9 + restart with defaults: both questions answered {took:.1f} s after the restart")
    assert took <= 15.0

    text = answer_text(slack, root)
    assert text.index("BEGIN-Q1") < text.index("BEGIN-Q2")
    assert [tag_of(r) for r in kimi.requests] == ["Q1", "Q1", "Q2"]
    assistant = [m["content"] for m in kimi.requests[-1]["messages"] if m["role"] == "assistant"]
    assert assistant == [full_answer("Q1")]  # the follow-up was asked with the complete first answer
    assert placeholders(slack) <= 3  # Q1's re-run reused its placeholder (Q2 may have had a waiting one)
    await quiet(stack)
    assert history_shape(await stack.history(root)) == expected_shape((root, "Q1"), (follow, "Q2"))
    assert slack.problems == []


# ---- 2. kill -9 at each step of a job, another question queued behind it ------------------------------
@pytest.mark.parametrize(
    ("method", "what"),
    [
        ("chat.postMessage", "the placeholder was posted, the worker never heard back"),
        ("chat.startStream", "the answer's first text is in Slack, its ts not yet recorded"),
        ("chat.appendStream", "the first append of the answer"),
        ("chat.stopStream", "the answer fully delivered but not yet recorded"),
        ("chat.update", "streams refused: the answer's first text put into the placeholder"),
    ],
    ids=["placeholder", "stream-start", "first-append", "final-stop", "first-update"],
)
async def test_kill_9_at_each_step_of_a_job_leaves_one_complete_answer_per_question_in_order(
    stack: Stack, method: str, what: str
) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(slow(), *(fast() for _ in range(4)))
    if method == "chat.update":  # post-and-update: the first chat.update is the answer's first text
        slack.fail("chat.startStream", "not_allowed_token_type", times=50)
    root, follow = "1700000200.000100", "1700000200.000200"
    seed_thread(slack, root, follow)
    hold = slack.hold(method)
    bot = await stack.start(**FAST_LEASE)
    assert await bot.post(stack.session, envelope(mention("question Q1 please", root))) == 200
    assert await bot.post(stack.session, envelope(message("question Q2 next", follow, thread_ts=root))) == 200
    await hold.wait()
    await bot.kill()  # exactly while Slack has done the call and the worker has not heard back
    hold.release()

    await stack.start(**FAST_LEASE)
    await until(
        lambda: shows_once(slack, root, "Q1") and shows_once(slack, root, "Q2") and settled(slack, root),
        30,
        f"both answers after a kill at {method}",
        stack,
    )
    await quiet(stack)
    if os.environ.get("DEBUG_INTERLEAVINGS"):
        for m in slack.messages[CHANNEL]:
            print({k: (v[:50] if isinstance(v, str) else v) for k, v in m.items() if k != "blocks"})
        for c in slack.calls:
            print(c.method, {k: (str(v)[:40]) for k, v in c.args.items() if k in ("ts", "_result")})
    text = answer_text(slack, root)
    assert text.index("BEGIN-Q1") < text.index("BEGIN-Q2")
    assert history_shape(await stack.history(root)) == expected_shape((root, "Q1"), (follow, "Q2"))
    if method == "chat.stopStream":  # Kimi had finished: the re-run delivers what it said, not a new answer
        assert [tag_of(r) for r in kimi.requests].count("Q1") == 1
    assert slack.problems == []


async def test_kill_9_while_a_slash_command_is_announced_asks_and_answers_it_once(stack: Stack) -> None:
    """/kimi posts "@user asked: …" and answers in its thread; a kill -9 right after Slack posted it (before
    the worker heard back) must not announce, and answer, the question twice."""
    slack, kimi = stack.slack, stack.kimi
    kimi.script(*(fast() for _ in range(3)))
    slack.add_conversation(CHANNEL, "general")
    hold = slack.hold("chat.postMessage")
    bot = await stack.start(**FAST_LEASE)
    body = command_body("question C1 via the command", response_url=slack.response_url())
    headers = {"Content-Type": "application/x-www-form-urlencoded", **sign(body)}
    async with stack.session.post(f"{bot.base}/slack/events", data=body, headers=headers) as response:
        assert response.status == 200
    await hold.wait()
    await bot.kill()
    hold.release()
    await stack.start(**FAST_LEASE)

    def announcements() -> list[dict[str, Any]]:
        return [m for m in slack.messages[CHANNEL] if "asked:" in str(m.get("text")) and not m.get("deleted")]

    await until(
        lambda: bool(announcements()) and shows_once(slack, announcements()[-1]["ts"], "C1"),
        20,
        "the command answered",
        stack,
    )
    await quiet(stack)
    assert len(announcements()) == 1, announcements()
    assert [tag_of(r) for r in kimi.requests] == ["C1"]


# ---- 3. two processes racing for the same threads --------------------------------------------------
async def test_two_serve_processes_answer_every_question_once_in_thread_order(stack: Stack) -> None:
    slack, kimi = stack.slack, stack.kimi
    threads, per_thread = 4, 3
    kimi.script(*(fast() for _ in range(threads * per_thread)))

    def ts(t: int, j: int) -> str:
        return f"{1700000300 + t}.{100 * (j + 1):06d}"

    for t in range(threads):
        seed_thread(slack, ts(t, 0), *(ts(t, j) for j in range(1, per_thread)))
    a, b = await asyncio.gather(stack.start(**FAST_LEASE), stack.start(**FAST_LEASE))

    async def deliver(t: int) -> None:
        root = ts(t, 0)
        for j in range(per_thread):
            text = f"question T{t}Q{j}"
            thread = None if j == 0 else root
            first, second = (a, b) if (t + j) % 2 else (b, a)
            app_mention = envelope(mention(text, ts(t, j), thread_ts=thread))
            as_message = envelope(message(f"<@U07F3N1BOTX> {text}", ts(t, j), thread_ts=thread))
            statuses = await asyncio.gather(
                first.post(stack.session, app_mention),
                second.post(stack.session, as_message),
                second.post(stack.session, app_mention, RETRY),  # Slack's retry lands on the other one
            )
            assert statuses == [200, 200, 200]

    await asyncio.gather(*(deliver(t) for t in range(threads)))
    tags = [(t, [f"T{t}Q{j}" for j in range(per_thread)]) for t in range(threads)]
    await until(
        lambda: all(all(shows_once(slack, ts(t, 0), tag) for tag in names) for t, names in tags),
        40,
        "every question answered",
        stack,
    )
    await quiet(stack)
    for t, names in tags:
        assert history_shape(await stack.history(ts(t, 0))) == expected_shape(
            *((ts(t, j), names[j]) for j in range(per_thread))
        )
    asked = [tag_of(r) for r in kimi.requests]
    assert sorted(asked) == sorted(tag for _, names in tags for tag in names)  # each asked once
    for request in kimi.requests:  # and each with every earlier answer of its thread
        tag = tag_of(request)
        t, j = int(tag[1 : tag.index("Q")]), int(tag[tag.index("Q") + 1 :])
        assistant = [m["content"] for m in request["messages"] if m["role"] == "assistant"]
        assert assistant == [full_answer(f"T{t}Q{k}") for k in range(j)]
    answered_by = [p.output().count('"msg": "answered"') for p in (a, b)]
    print(f"\nanswers per process: {answered_by}")
    assert sum(answered_by) == threads * per_thread
    assert slack.problems == []
    for t, names in tags:
        assert settled(slack, ts(t, 0)), slack.bodies(CHANNEL, ts(t, 0))  # no placeholder left behind
        text = answer_text(slack, ts(t, 0))
        assert sorted(names, key=lambda tag: text.index(f"BEGIN-{tag}")) == names, "shown out of order"


async def test_a_thread_with_many_questions_queued_keeps_its_lease_and_answers_them_all_in_order(
    stack: Stack,
) -> None:
    """One process: whatever the worker does for the questions waiting behind the running answer (their
    placeholders, paced at about one post a second per channel) must not hold up the lease's renewals."""
    slack, kimi = stack.slack, stack.kimi
    waiting = 6
    kimi.script(slow(), *(fast() for _ in range(waiting)))
    root = "1700000350.000100"
    follow_ups = [f"1700000350.{200 + 100 * i:06d}" for i in range(waiting)]
    seed_thread(slack, root, *follow_ups)
    bot = await stack.start(**FAST_LEASE)
    assert await bot.post(stack.session, envelope(mention("question W0 first", root))) == 200
    for i, ts in enumerate(follow_ups, start=1):
        assert (
            await bot.post(stack.session, envelope(mention(f"question W{i} next", ts, thread_ts=root))) == 200
        )
    tags = [f"W{i}" for i in range(waiting + 1)]
    await until(
        lambda: all(shows_once(slack, root, tag) for tag in tags), 40, "every queued question answered", stack
    )
    await quiet(stack)
    assert "lease lost" not in bot.output()
    assert [tag_of(r) for r in kimi.requests] == tags
    assert history_shape(await stack.history(root)) == expected_shape(
        *zip([root, *follow_ups], tags, strict=True)
    )
    assert slack.problems == []
    assert settled(slack, root), slack.bodies(CHANNEL, root)  # no "Waiting…" left behind
    text = answer_text(slack, root)
    assert sorted(tags, key=lambda tag: text.index(f"BEGIN-{tag}")) == tags, "shown out of order"


# ---- 4. fenced take-over: a worker cut off and resumed writes nothing more ----------------------------
async def test_a_cut_off_worker_resumed_after_a_take_over_writes_nothing_more(stack: Stack) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(Reply(content=answer_to, chunk_chars=20, chunk_delay=0.05), *(fast() for _ in range(3)))
    root = "1700000400.000100"
    seed_thread(slack, root)
    first = await stack.start(**FAST_LEASE)
    assert await first.post(stack.session, envelope(mention("question Q1 please", root))) == 200
    await until(lambda: len(slack.calls_of("chat.appendStream")) >= 1, 20, "Q1 streaming", stack)
    first.pause()  # cut off: no renewals, its lease runs out (it does not know)
    paused_at, calls_at_pause = time.monotonic(), len(slack.calls)
    await stack.start(**FAST_LEASE)
    await until(lambda: shows_once(slack, root, "Q1") and settled(slack, root), 30, "take-over", stack)
    await quiet(stack)
    # Not taken over before the lease ran out (2 s after its last renewal, at most 0.5 s before the stop).
    taken_over_at = min(
        c.at for c in slack.calls[calls_at_pause:] if c.method != "auth.test" and c.at > paused_at + 0.3
    )
    assert taken_over_at - paused_at > 1.4
    await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - paused_at)))  # well past its lease
    calls_before, kimi_before = len(slack.calls), len(kimi.requests)

    first.resume()
    await until(lambda: "lease lost" in first.output(), 10, "the resumed worker notices", stack)
    await asyncio.sleep(1.0)  # whatever it would still send has been sent by now
    late = slack.calls[calls_before:]
    assert [c for c in late if c.args.get("_result", {}).get("ok")] == [], [(c.method, c.args) for c in late]
    assert len(kimi.requests) == kimi_before
    assert shows_once(slack, root, "Q1") and settled(slack, root)
    assert history_shape(await stack.history(root)) == expected_shape((root, "Q1"))
    assert first.process.poll() is None  # it carries on (for other threads), it just stopped this one
    assert slack.problems == []


# ---- 5. Redis silent for 6 s while Slack delivers -------------------------------------------------
async def test_redis_silent_for_6_s_slack_hears_back_within_3_s_and_the_redelivery_is_answered_once(
    stack: Stack,
) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(*(fast() for _ in range(4)))
    engaged, root, follow = "1700000500.000100", "1700000510.000100", "1700000500.000200"
    seed_thread(slack, engaged, follow)
    seed_thread(slack, root)
    bot = await stack.start(**FAST_LEASE)
    assert await bot.post(stack.session, envelope(mention("question Q0 first", engaged))) == 200
    await until(lambda: shows_once(slack, engaged, "Q0") and settled(slack, engaged), 20, "Q0", stack)
    await quiet(stack)

    new_thread = envelope(mention("question Q1 while Redis sleeps", root))
    reply = envelope(message("question Q2 in an engaged thread", follow, thread_ts=engaged))

    async def timed(payload: dict[str, Any]) -> tuple[int, float]:
        sent = time.monotonic()
        status = await bot.post(stack.session, payload)
        return status, time.monotonic() - sent

    stack.redis_server.pause()
    paused_at = time.monotonic()
    try:
        (status_1, took_1), (status_2, took_2) = await asyncio.gather(timed(new_thread), timed(reply))
        print(
            f"\nRedis stopped: Slack heard back in {took_1:.2f} s ({status_1}), {took_2:.2f} s ({status_2})"
        )
        assert took_1 < 3.0 and took_2 < 3.0
        assert status_1 in (200, 503) and status_2 in (200, 503)
        await asyncio.sleep(max(0.0, 6.0 - (time.monotonic() - paused_at)))
    finally:
        stack.redis_server.resume()

    # Slack redelivers what did not get 200: the same events, marked as retries.
    for payload, status in ((new_thread, status_1), (reply, status_2)):
        if status != 200:
            assert await bot.post(stack.session, payload, RETRY) == 200
    await until(
        lambda: shows_once(slack, root, "Q1") and shows_once(slack, engaged, "Q2") and settled(slack, root),
        30,
        "the redelivered questions answered",
        stack,
    )
    await quiet(stack)
    await asyncio.sleep(0.5)
    assert sorted(tag_of(r) for r in kimi.requests) == ["Q0", "Q1", "Q2"]  # once each
    assert history_shape(await stack.history(root)) == expected_shape((root, "Q1"))
    assert history_shape(await stack.history(engaged)) == expected_shape((engaged, "Q0"), (follow, "Q2"))
    assert placeholders(slack) == 3
    assert slack.problems == []


async def test_redis_silent_for_6_s_mid_answer_past_the_lease_the_answer_shows_once(stack: Stack) -> None:
    """The worker cannot renew while Redis is silent: its writes wait, its lease runs out, and once Redis
    is back it finds the lease lost, stops, and the thread's next claim re-runs the job over the partial
    answer."""
    slack, kimi = stack.slack, stack.kimi
    kimi.script(Reply(content=answer_to, chunk_chars=20, chunk_delay=0.05), *(fast() for _ in range(3)))
    root, follow = "1700000520.000100", "1700000520.000200"
    seed_thread(slack, root, follow)
    bot = await stack.start(**FAST_LEASE)
    assert await bot.post(stack.session, envelope(mention("question Q1 at length", root))) == 200
    assert (
        await bot.post(stack.session, envelope(message("question Q2 after", follow, thread_ts=root))) == 200
    )
    await until(lambda: len(slack.calls_of("chat.appendStream")) >= 1, 20, "Q1 streaming", stack)
    stack.redis_server.pause()
    try:
        await asyncio.sleep(6.0)
    finally:
        stack.redis_server.resume()
    await until(
        lambda: shows_once(slack, root, "Q1") and shows_once(slack, root, "Q2") and settled(slack, root),
        30,
        "both answered after the stall",
        stack,
    )
    await quiet(stack)
    text = answer_text(slack, root)
    assert text.index("BEGIN-Q1") < text.index("BEGIN-Q2")
    assert history_shape(await stack.history(root)) == expected_shape((root, "Q1"), (follow, "Q2"))
    assert [tag_of(r) for r in kimi.requests][-1] == "Q2" and len(kimi.requests) <= 3
    status, health = await bot.healthz(stack.session)
    assert status == 200, health
    assert slack.problems == []


# ---- 6. poison jobs: a job that kills its process, and entries that are not jobs ------------------
async def test_a_job_that_crashes_its_process_is_dead_lettered_after_3_attempts_and_the_thread_goes_on(
    stack: Stack,
) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(
        *(Reply(content=answer_to, first_byte_delay=8) for _ in range(3)), *(fast() for _ in range(3))
    )
    root, follow = "1700000600.000100", "1700000600.000200"
    seed_thread(slack, root, follow)
    bot = await stack.start(**FAST_LEASE)
    assert await bot.post(stack.session, envelope(mention("question P1 that kills", root))) == 200
    assert (
        await bot.post(stack.session, envelope(message("question Q2 after it", follow, thread_ts=root)))
        == 200
    )
    for attempt in range(1, 4):  # each attempt's request to Kimi "crashes" the process
        await until(lambda n=attempt: len(kimi.requests) >= n, 20, f"attempt {attempt}", stack)  # type: ignore[misc]
        await bot.kill()
        bot = stack.spawn(**FAST_LEASE)
    await bot.wait_healthy(stack.session)
    await until(
        lambda: shows_once(slack, root, "Q2") and settled(slack, root), 30, "Q2 after the poison", stack
    )
    await quiet(stack)

    dead = await stack.dead_letters()
    assert [(d["reason"], d["thread"]) for d in dead] == [("attempts", str(thread_key(root)))]
    assert root in dead[0]["job"] and dead[0]["reference"]
    assert refs(slack, root) == [dead[0]["reference"]]  # the user told once, with the same reference
    bodies = slack.bodies(CHANNEL, root)
    told = next(i for i, body in enumerate(bodies) if dead[0]["reference"] in body)
    assert told < next(i for i, body in enumerate(bodies) if "BEGIN-Q2" in body)
    assert [tag_of(r) for r in kimi.requests] == ["P1", "P1", "P1", "Q2"]
    assert slack.problems == []


async def test_entries_that_are_not_jobs_are_dead_lettered_and_the_worker_carries_on(stack: Stack) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(*(fast() for _ in range(2)))
    root, follow = "1700000610.000100", "1700000610.000200"
    seed_thread(slack, root, follow)
    bot = await stack.start(**FAST_LEASE)
    keys = ThreadKeys(thread_key(root))
    await stack.redis.rpush(keys.inbox, "{not json at all", "[1, 2]")  # type: ignore[misc]
    await stack.redis.zadd(READY_KEY, {str(thread_key(root)): 0})
    async with asyncio.timeout(10):
        while len(await stack.dead_letters()) < 2:  # noqa: ASYNC110 - state in Redis
            await asyncio.sleep(0.05)
    dead = await stack.dead_letters()
    assert [(d["reason"], d["job"]) for d in dead] == [
        ("malformed", "{not json at all"),
        ("malformed", "[1, 2]"),
    ]
    status, health = await bot.healthz(stack.session)
    assert status == 200, health

    assert (
        await bot.post(
            stack.session, envelope(mention("question Q1 after the garbage", follow, thread_ts=root))
        )
        == 200
    )
    await until(lambda: shows_once(slack, root, "Q1") and settled(slack, root), 20, "Q1 answered", stack)
    status, health = await bot.healthz(stack.session)
    assert status == 200, health
    assert slack.problems == []


# ---- 7. failures outside the answer's own error handling ------------------------------------------
async def test_a_job_whose_turn_cannot_be_read_tells_the_thread_and_the_next_question_is_answered(
    stack: Stack,
) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(*(fast() for _ in range(2)))
    root, follow = "1700000700.000100", "1700000700.000200"
    seed_thread(slack, root, follow)
    bot = await stack.start(**FAST_LEASE)
    broken = json.dumps(
        {"kind": "turn", "data": {"job_id": f"{CHANNEL}:{root}", "turn": {"channel": CHANNEL}}}
    )
    await stack.redis.rpush(ThreadKeys(thread_key(root)).inbox, broken)  # type: ignore[misc]
    await stack.redis.zadd(READY_KEY, {str(thread_key(root)): 0})
    await until(lambda: len(refs(slack, root)) == 1, 15, "the thread told, with a reference", stack)
    assert refs(slack, root)[0] in bot.output()  # the same reference is in the log

    assert await bot.post(stack.session, envelope(mention("question Q1 next", follow, thread_ts=root))) == 200
    await until(lambda: shows_once(slack, root, "Q1") and settled(slack, root), 20, "Q1 answered", stack)
    assert len(refs(slack, root)) == 1
    assert slack.problems == []


async def test_an_unreadable_job_waiting_behind_an_answer_holds_up_nothing_after_it(stack: Stack) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(slow(), *(fast() for _ in range(2)))
    root, broken_ts, third = "1700000705.000100", "1700000705.000200", "1700000705.000300"
    seed_thread(slack, root, third)
    bot = await stack.start(**FAST_LEASE)
    assert await bot.post(stack.session, envelope(mention("question Q0 first", root))) == 200
    await until(lambda: bool(slack.calls_of("chat.startStream")), 20, "Q0 streaming", stack)
    broken = json.dumps(
        {"kind": "turn", "data": {"job_id": f"{CHANNEL}:{broken_ts}", "turn": {"channel": CHANNEL}}}
    )
    await stack.redis.rpush(ThreadKeys(thread_key(root)).inbox, broken)  # type: ignore[misc]
    assert await bot.post(stack.session, envelope(mention("question Q2 next", third, thread_ts=root))) == 200
    await until(
        lambda: (
            shows_once(slack, root, "Q0") and shows_once(slack, root, "Q2") and len(refs(slack, root)) == 1
        ),
        30,
        "Q0, the broken job's notice, Q2",
        stack,
    )
    await quiet(stack)
    assert settled(slack, root), slack.bodies(CHANNEL, root)
    text = answer_text(slack, root)
    assert text.index("BEGIN-Q0") < text.index("BEGIN-Q2")
    assert [tag_of(r) for r in kimi.requests] == ["Q0", "Q2"]
    # The questions behind the unreadable one still got their "Waiting…" sign of life, without errors.
    assert "showing waiting questions failed" not in bot.output()
    assert any(c.args.get("text") == "Waiting…" for c in slack.calls_of("chat.postMessage"))
    assert slack.problems == []


async def test_corrupted_thread_metadata_gets_one_sentence_with_a_reference_and_the_thread_is_not_stuck(
    stack: Stack,
) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(*(fast() for _ in range(4)))
    root, second, third = "1700000710.000100", "1700000710.000200", "1700000710.000300"
    seed_thread(slack, root, second, third)
    bot = await stack.start(**FAST_LEASE)
    assert await bot.post(stack.session, envelope(mention("question Q1 first", root))) == 200
    await until(lambda: shows_once(slack, root, "Q1") and settled(slack, root), 20, "Q1", stack)
    await quiet(stack)
    # A failure the pipeline does not expect (the window's start index is not a number).
    await stack.redis.hset(ThreadKeys(thread_key(root)).meta, "start", "not a number")  # type: ignore[misc]

    assert await bot.post(stack.session, envelope(message("question Q2 then", second, thread_ts=root))) == 200
    await until(lambda: len(refs(slack, root)) == 1 and settled(slack, root), 20, "Q2 told why not", stack)
    assert refs(slack, root)[0] in bot.output()
    await quiet(stack)
    # The thread is not stuck: the next question gets its outcome too.
    assert await bot.post(stack.session, envelope(message("question Q3 then", third, thread_ts=root))) == 200
    await until(
        lambda: (len(refs(slack, root)) == 2 or shows_once(slack, root, "Q3")) and settled(slack, root),
        20,
        "Q3 handled",
        stack,
    )
    await quiet(stack)
    assert slack.problems == []


async def test_a_corrupted_history_entry_does_not_cost_the_thread_its_later_answers(stack: Stack) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(*(fast() for _ in range(4)))
    root, second, third = "1700000715.000100", "1700000715.000200", "1700000715.000300"
    seed_thread(slack, root, second, third)
    bot = await stack.start(**FAST_LEASE)
    assert await bot.post(stack.session, envelope(mention("question Q1 first", root))) == 200
    await until(lambda: shows_once(slack, root, "Q1") and settled(slack, root), 20, "Q1", stack)
    await quiet(stack)
    await stack.redis.rpush(ThreadKeys(thread_key(root)).history, "{half an entry")  # type: ignore[misc]
    for ts, text in ((second, "question Q2 then"), (third, "question Q3 then")):
        assert await bot.post(stack.session, envelope(message(text, ts, thread_ts=root))) == 200
    await until(lambda: shows_once(slack, root, "Q3") or len(refs(slack, root)) >= 2, 20, "Q3 handled", stack)
    await quiet(stack)
    assert shows_once(slack, root, "Q3"), slack.bodies(CHANNEL, root)


async def test_users_info_answering_with_a_proxy_page_does_not_cost_the_answer(stack: Stack) -> None:
    slack, kimi = stack.slack, stack.kimi
    kimi.script(fast())
    root = "1700000720.000100"
    slack.seed(CHANNEL, user=BOB, text="root", ts=root)
    slack.fail_raw(
        "users.info", 502, "<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html", times=5
    )
    bot = await stack.start(**FAST_LEASE)
    assert await bot.post(stack.session, envelope(mention("question Q1 from bob", root, user=BOB))) == 200
    await until(lambda: shows_once(slack, root, "Q1") and settled(slack, root), 20, "Q1 answered", stack)
    assert refs(slack, root) == []
    assert slack.calls_of("users.info")  # it was asked, and failed
    users = [m["content"] for m in kimi.requests[0]["messages"] if m["role"] == "user"]
    assert users == [f"{BOB}: question Q1 from bob"]  # the id stands in for the name
    assert slack.problems == []
