"""The contract end to end: `kimibot serve` as its own process, driven through /slack/events."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from bot.redis_client import WARM_CONNECTIONS, probe_cluster
from tests.fakes.kimi_api import API_KEY, FakeKimi
from tests.fakes.slack_api import TOKEN, FakeSlack
from tests.slack_requests import CHANNEL, DM, SIGNING_SECRET, envelope, json_body, mention, message, sign
from tests.test_settings_cli import kimibot_command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    def __init__(self, env: dict[str, str], cwd: Path, command: str = "serve") -> None:
        self.port = int(env["PORT"])
        self.process = subprocess.Popen(
            [*kimibot_command(), command],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_healthy(self, session: aiohttp.ClientSession) -> None:
        for _ in range(300):
            if self.process.poll() is not None:
                raise AssertionError(
                    f"kimibot exited: {self.process.stdout.read() if self.process.stdout else ''}"
                )
            try:
                async with session.get(f"{self.base}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("kimibot never became healthy")

    async def send(self, session: aiohttp.ClientSession, event: dict[str, Any], **headers: str) -> int:
        body = json_body(envelope(event))
        all_headers = {"Content-Type": "application/json", **sign(body), **headers}
        async with session.post(f"{self.base}/slack/events", data=body, headers=all_headers) as response:
            return response.status

    async def terminate(self) -> tuple[int, str]:
        """SIGTERM, then wait in a thread: the fake servers in this process must keep answering meanwhile."""
        self.process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(self.process.communicate, timeout=40)
        return self.process.returncode, output


@pytest.fixture
async def start_serve(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., ServeProcess]]:
    processes: list[ServeProcess] = []
    port = free_port()

    def start(command: str = "serve", **extra: str) -> ServeProcess:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "SLACK_BOT_TOKEN": TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SLACK_API_URL": fake_slack.api_url,
            "MOONSHOT_API_KEY": API_KEY,
            "KIMI_BASE_URL": fake_kimi.base_url,
            "KIMI_MODEL": "kimi-k2.6",
            "REDIS_URL": redis_url,
            "PORT": str(port),
            **extra,
        }
        process = ServeProcess(env, tmp_path, command)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.process.poll() is None:
            process.process.kill()
            process.process.wait()


def answered(slack: FakeSlack, channel: str, thread_ts: str, count: int) -> bool:
    """The thread shows `count` finished answers (no placeholder still thinking)."""
    bodies = slack.bodies(channel, thread_ts)
    return len(bodies) == count and not any("Thinking…" in body for body in bodies)


async def wait_for(predicate: Callable[[], bool], limit_s: float = 15.0) -> None:
    async with asyncio.timeout(limit_s):
        while not predicate():  # noqa: ASYNC110 - the state lives in another process's effects
            await asyncio.sleep(0.02)


async def test_kimibot_serve_answers_mentions_and_dms_and_keeps_context_across_restarts(
    start_serve: Callable[..., ServeProcess], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    async with aiohttp.ClientSession() as session:
        bot = start_serve()
        await bot.wait_healthy(session)
        root = "1700000004.000100"
        fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="hi", ts=root)
        assert await bot.send(session, mention("Remember: the password is swordfish", root)) == 200
        assert (
            await bot.send(
                session,
                mention("Remember: the password is swordfish", root),
                **{"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"},
            )
            == 200
        )
        await wait_for(lambda: answered(fake_slack, CHANNEL, root, 1))
        dm_ts = "1700000004.000200"
        fake_slack.seed(DM, user="U04RZ8N2PQM", text="psst", ts=dm_ts)
        assert await bot.send(session, message("psst", dm_ts, channel=DM, channel_type="im")) == 200
        await wait_for(lambda: answered(fake_slack, DM, dm_ts, 1))
        code, output = await bot.terminate()
        assert code == 0, output
        assert '"msg": "answered"' in output  # structured JSON logs

        again = start_serve()
        await again.wait_healthy(session)
        follow = "1700000004.000101"
        fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="x", ts=follow, thread_ts=root)
        assert await again.send(session, message("What is the password?", follow, thread_ts=root)) == 200
        await wait_for(lambda: answered(fake_slack, CHANNEL, root, 2))
        contents = [m["content"] for m in fake_kimi.requests[-1]["messages"]]
        assert "alice: Remember: the password is swordfish" in contents
        await again.terminate()
    assert fake_slack.problems == []


async def test_kimibot_serve_refuses_forged_requests(
    start_serve: Callable[..., ServeProcess], fake_slack: FakeSlack
) -> None:
    async with aiohttp.ClientSession() as session:
        bot = start_serve()
        await bot.wait_healthy(session)
        body = json_body(envelope(mention("hi", "1700000004.000300")))
        headers = {"Content-Type": "application/json", **sign(body, secret="forged")}
        async with session.post(f"{bot.base}/slack/events", data=body, headers=headers) as response:
            assert response.status == 401
        async with session.post(
            f"{bot.base}/slack/events",
            data=b"{oops",
            headers={"Content-Type": "application/json", **sign(b"{oops")},
        ) as response:
            assert response.status == 400
        await bot.terminate()
    assert fake_slack.posts() == []


async def test_an_answer_cut_by_kill_9_is_completed_after_a_restart_exactly_once(
    start_serve: Callable[..., ServeProcess], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from tests.fakes.kimi_api import Reply

    long = "\n\n".join(f"Paragraph {i}: " + "words of a long answer " * 10 for i in range(30))
    fake_kimi.script(
        Reply(content=long, chunk_chars=40, chunk_delay=0.05), Reply(content=long, chunk_chars=500)
    )
    async with aiohttp.ClientSession() as session:
        bot = start_serve(JOB_VISIBILITY_TIMEOUT="1")
        await bot.wait_healthy(session)
        root = "1700000004.000400"
        fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="hi", ts=root)
        assert await bot.send(session, mention("write a long answer", root)) == 200
        await wait_for(lambda: len(fake_slack.calls_of("chat.appendStream")) >= 2)
        bot.process.kill()  # SIGKILL: no goodbye, the job stays claimed by a dead worker
        await asyncio.to_thread(bot.process.wait)
        again = start_serve(JOB_VISIBILITY_TIMEOUT="1")
        await again.wait_healthy(session)
        await wait_for(lambda: answered(fake_slack, CHANNEL, root, 2), limit_s=30)
        await again.terminate()
    text = "".join(fake_slack.answer_parts(CHANNEL, root))
    assert [line.split(":")[0] for line in text.split("\n") if line.startswith("Paragraph")] == [
        f"Paragraph {i}" for i in range(30)
    ]
    assert len([c for c in fake_slack.calls_of("chat.postMessage") if c.args.get("text") == "Thinking…"]) == 1
    assert len(fake_kimi.requests) == 2
    assert fake_slack.problems == []


async def test_a_receiver_and_a_worker_split_the_work_and_each_serves_its_probes_and_metrics(
    start_serve: Callable[..., ServeProcess], fake_slack: FakeSlack
) -> None:
    """KIMIBOT_ROLE=receiver acks and queues; a separate `kimibot worker` answers. Both serve /healthz,
    /livez and /metrics on their PORT; the worker has no /slack/events."""
    async with aiohttp.ClientSession() as session:
        receiver = start_serve(KIMIBOT_ROLE="receiver")
        await receiver.wait_healthy(session)
        root = "1700000004.000900"
        fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="split", ts=root)
        assert await receiver.send(session, mention("who answers me?", root)) == 200
        await asyncio.sleep(0.5)
        assert fake_slack.bodies(CHANNEL, root) == []  # queued: the receiver does not answer
        worker = start_serve("worker", PORT=str(free_port()), SLACK_SIGNING_SECRET="")
        await worker.wait_healthy(session)
        await wait_for(lambda: answered(fake_slack, CHANNEL, root, 1))
        for process in (receiver, worker):
            for path in ("/livez", "/metrics"):
                async with session.get(f"{process.base}{path}") as response:
                    assert response.status == 200, (process.port, path)
                    text = await response.text()
            # What start-up built is frozen out of the collector's reach (a full collection walked it all).
            [frozen] = [line for line in text.splitlines() if line.startswith("kimibot_gc_frozen_objects ")]
            assert float(frozen.split()[1]) > 10_000, frozen
        async with session.post(f"{worker.base}/slack/events", data=b"{}") as response:
            assert response.status == 404
        assert (await worker.terminate())[0] == 0
        assert (await receiver.terminate())[0] == 0
    assert fake_slack.problems == []


async def test_serve_opens_its_redis_connections_before_the_first_request(
    start_serve: Callable[..., ServeProcess], redis_url: str
) -> None:
    """The first burst after a start does not wait for connections to be opened (bot/redis_client.py
    warm_pool): serve opens WARM_CONNECTIONS of them while it starts."""
    observer = Redis.from_url(redis_url)
    try:
        if probe_cluster(redis_url):
            pytest.skip("a cluster client's pools are per node, opened as it learns the slots")
        before = len(await observer.client_list())
        async with aiohttp.ClientSession() as session:
            bot = start_serve()
            await bot.wait_healthy(session)
        async with asyncio.timeout(15):
            while len(await observer.client_list()) < before + WARM_CONNECTIONS:  # noqa: ASYNC110 - in another process
                await asyncio.sleep(0.05)
        code, output = await bot.terminate()
        assert code == 0, output
    finally:
        await observer.aclose()
