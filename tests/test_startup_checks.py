"""First run: `kimibot serve` asks Slack and Kimi whether its settings work, says plainly what is wrong,
waits (and says so on /healthz) while they cannot be asked, and stops when told in every state."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.settings import Settings
from tests.fakes.kimi_api import API_KEY, FakeKimi
from tests.fakes.slack_api import APP_TOKEN, TOKEN, FakeSlack
from tests.slack_requests import CHANNEL, SIGNING_SECRET, envelope, mention
from tests.test_serve_process import ServeProcess, answered, free_port, wait_for

EXIT_LIMIT_S = 15.0  # the bound for a definitive rejection
GRACE_S = 5.0  # SHUTDOWN_GRACE_SECONDS in these tests


def closed_port_url() -> str:
    """An address where nothing listens: Slack "unreachable" (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/api/"


def serve_env(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, home: Path, **extra: str
) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "SLACK_BOT_TOKEN": TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": fake_slack.api_url,
        "MOONSHOT_API_KEY": API_KEY,
        "KIMI_BASE_URL": fake_kimi.base_url,
        "REDIS_URL": redis_url,
        "PORT": str(free_port()),
        "SHUTDOWN_GRACE_SECONDS": str(GRACE_S),
        **extra,
    }
    return {name: value for name, value in env.items() if value != ""}


async def exit_of(bot: ServeProcess, limit_s: float) -> tuple[int, str, float]:
    """Wait (in a thread, so the fakes keep answering) for the process to end: code, output, seconds."""
    started = time.monotonic()
    try:
        output, _ = await asyncio.to_thread(bot.process.communicate, timeout=limit_s)
    except Exception:
        bot.process.kill()
        output, _ = await asyncio.to_thread(bot.process.communicate)
        raise AssertionError(f"kimibot did not exit within {limit_s}s:\n{output}") from None
    return bot.process.returncode, output, time.monotonic() - started


def lines_naming(output: str, name: str) -> list[str]:
    return [line for line in output.splitlines() if name in line]


async def health(bot: ServeProcess, path: str = "/healthz") -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(bot.base + path) as response:
        return response.status, await response.json()


async def wait_health(bot: ServeProcess, status: int, limit_s: float = 15.0) -> dict[str, Any]:
    """Poll /healthz until it answers `status`; return its body."""
    body: dict[str, Any] = {}
    async with asyncio.timeout(limit_s):
        while True:
            if bot.process.poll() is not None:
                output = bot.process.stdout.read() if bot.process.stdout else ""
                raise AssertionError(f"kimibot exited ({bot.process.returncode}):\n{output}")
            try:
                got, body = await health(bot)
                if got == status:
                    return body
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


@pytest.fixture
def processes() -> Any:
    started: list[ServeProcess] = []
    yield started
    for bot in started:
        if bot.process.poll() is None:
            bot.process.kill()
            bot.process.wait()


def start(processes: list[ServeProcess], env: dict[str, str], home: Path) -> ServeProcess:
    bot = ServeProcess(env, home)
    processes.append(bot)
    return bot


def assert_one_plain_line(code: int, output: str, took: float, setting: str, said: str) -> None:
    assert code == 2, output
    assert took < EXIT_LIMIT_S
    assert "Traceback" not in output, output
    named = [line for line in lines_naming(output, setting) if "cannot start" in line]
    assert len(named) == 1, output
    assert said in named[0], output


@pytest.mark.parametrize("error", ["invalid_auth", "account_inactive"])
async def test_a_bot_token_slack_rejects_stops_kimibot_with_one_line_naming_it(
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    redis_url: str,
    tmp_path: Path,
    processes: list[ServeProcess],
    error: str,
) -> None:
    fake_slack.revoked[TOKEN] = error
    bot = start(processes, serve_env(fake_slack, fake_kimi, redis_url, tmp_path), tmp_path)
    code, output, took = await exit_of(bot, EXIT_LIMIT_S + 5)
    assert_one_plain_line(code, output, took, "SLACK_BOT_TOKEN", error)
    assert "OAuth & Permissions" in output  # where to get a good one


async def test_a_revoked_app_token_stops_socket_mode_with_one_line_naming_it(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    fake_slack.revoked[APP_TOKEN] = "token_revoked"
    env = serve_env(
        fake_slack, fake_kimi, redis_url, tmp_path, SLACK_APP_TOKEN=APP_TOKEN, SLACK_SIGNING_SECRET=""
    )
    bot = start(processes, env, tmp_path)
    code, output, took = await exit_of(bot, EXIT_LIMIT_S + 5)
    assert_one_plain_line(code, output, took, "SLACK_APP_TOKEN", "token_revoked")
    assert fake_slack.calls_of("apps.connections.open")


async def test_a_kimi_key_kimi_rejects_stops_kimibot_with_one_line_naming_it(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    env = serve_env(fake_slack, fake_kimi, redis_url, tmp_path, MOONSHOT_API_KEY="sk-revoked-key")
    bot = start(processes, env, tmp_path)
    code, output, took = await exit_of(bot, EXIT_LIMIT_S + 5)
    assert_one_plain_line(code, output, took, "MOONSHOT_API_KEY", "Invalid Authentication")
    assert "sk-revoked-key" not in output  # the secret itself is never printed


async def test_a_model_kimi_does_not_offer_stops_kimibot_with_one_line_naming_it(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    env = serve_env(fake_slack, fake_kimi, redis_url, tmp_path, KIMI_MODEL="kimi-k9-imaginary")
    bot = start(processes, env, tmp_path)
    code, output, took = await exit_of(bot, EXIT_LIMIT_S + 5)
    assert_one_plain_line(code, output, took, "KIMI_MODEL", "kimi-k9-imaginary")
    assert "kimi-k2.6" in output  # what it could be instead


async def test_slack_unreachable_in_socket_mode_is_503_on_healthz_and_sigterm_still_stops_it(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    env = serve_env(
        fake_slack,
        fake_kimi,
        redis_url,
        tmp_path,
        SLACK_APP_TOKEN=APP_TOKEN,
        SLACK_SIGNING_SECRET="",
        SLACK_API_URL=closed_port_url(),
    )
    bot = start(processes, env, tmp_path)
    body = await wait_health(bot, 503)
    assert "SLACK_BOT_TOKEN" in body["failing"] and "slack_connection" in body["failing"], body
    assert "unreachable" in body["failing"]["SLACK_BOT_TOKEN"]
    status, alive = await health(bot, "/livez")
    assert status == 200 and alive["ok"]
    await asyncio.sleep(2.5)  # a few attempts to connect
    bot.process.send_signal(signal.SIGTERM)
    code, output, took = await exit_of(bot, GRACE_S + 10)
    assert code == 0, output
    assert took < GRACE_S
    assert "Traceback" not in output
    attempts = [json.loads(line) for line in output.splitlines() if "retrying" in line]
    assert len(attempts) >= 2 and all("error" in line and "exc" not in line for line in attempts), output
    assert "kimibot running" not in output


async def test_sigint_stops_kimibot_while_kimi_cannot_be_asked_and_it_recovers_when_kimi_does(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    fake_kimi.models_status = 503
    bot = start(processes, serve_env(fake_slack, fake_kimi, redis_url, tmp_path), tmp_path)
    body = await wait_health(bot, 503)
    await wait_for(lambda: fake_kimi.models_requests >= 1)
    body = await wait_health(bot, 503)
    assert "MOONSHOT_API_KEY" in body["failing"], body
    fake_kimi.models_status = 200
    body = await wait_health(bot, 200)
    assert body["checks"] == {"SLACK_BOT_TOKEN": "ok", "MOONSHOT_API_KEY": "ok"}
    assert body["job_loop"] == "ok"
    bot.process.send_signal(signal.SIGINT)
    code, output, _ = await exit_of(bot, GRACE_S + 10)
    assert code == 0, output
    assert "Traceback" not in output


async def test_sigterm_while_answering_ends_within_the_grace_period(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    from tests.fakes.kimi_api import Reply

    fake_kimi.script(Reply(content="slow " * 400, chunk_chars=5, chunk_delay=0.05))  # ~20 s of answer
    bot = start(processes, serve_env(fake_slack, fake_kimi, redis_url, tmp_path), tmp_path)
    await wait_health(bot, 200)
    root = fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="take your time")
    async with aiohttp.ClientSession() as session:
        assert await bot.send(session, mention("take your time", root)) == 200
    await wait_for(lambda: bool(fake_kimi.requests))
    bot.process.send_signal(signal.SIGTERM)
    code, output, took = await exit_of(bot, GRACE_S + 10)
    assert code == 0, output
    assert took < GRACE_S + 3  # the grace for the answer, then a bounded close
    assert "handed back" in output


async def test_kimibot_worker_starts_without_a_signing_secret(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    env = serve_env(fake_slack, fake_kimi, redis_url, tmp_path, SLACK_SIGNING_SECRET="")
    bot = ServeProcess(env, tmp_path, command="worker")
    processes.append(bot)
    body = await wait_health(bot, 200)
    assert body["job_loop"] == "ok" and "slack_connection" not in body
    code, output = await bot.terminate()
    assert code == 0, output


async def test_socket_mode_reconnects_after_slack_drops_the_connection_and_healthz_follows(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    env = serve_env(
        fake_slack, fake_kimi, redis_url, tmp_path, SLACK_APP_TOKEN=APP_TOKEN, SLACK_SIGNING_SECRET=""
    )
    bot = start(processes, env, tmp_path)
    body = await wait_health(bot, 200)
    assert body["slack_connection"] == "connected"
    fake_slack.fail("apps.connections.open", status=503, times=2)  # Slack's side is not back at once
    await fake_slack.drop_sockets()
    body = await wait_health(bot, 503)
    assert body["failing"]["slack_connection"].startswith("reconnecting"), body
    body = await wait_health(bot, 200)
    await wait_for(lambda: len(fake_slack.sockets) == 1)
    root = fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="still there?")
    await fake_slack.send_envelope("events_api", envelope(mention("still there?", root)), "env-after-drop")
    await wait_for(lambda: answered(fake_slack, CHANNEL, root, 1))
    bot.process.send_signal(signal.SIGTERM)
    code, output, _ = await exit_of(bot, GRACE_S + 10)
    assert code == 0, output
    assert "socket mode reconnected" in output and "Traceback" not in output


async def test_sigterm_stops_socket_mode_while_it_keeps_failing_to_reconnect(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    env = serve_env(
        fake_slack, fake_kimi, redis_url, tmp_path, SLACK_APP_TOKEN=APP_TOKEN, SLACK_SIGNING_SECRET=""
    )
    bot = start(processes, env, tmp_path)
    await wait_health(bot, 200)
    fake_slack.fail("apps.connections.open", "internal_error", times=1_000)  # Slack's side stays broken
    await fake_slack.drop_sockets()
    body = await wait_health(bot, 503)
    assert body["failing"]["slack_connection"].startswith("reconnecting"), body
    await wait_for(lambda: len(fake_slack.calls_of("apps.connections.open")) >= 3)
    bot.process.send_signal(signal.SIGTERM)
    code, output, took = await exit_of(bot, GRACE_S + 10)
    assert code == 0, output
    assert took < GRACE_S
    assert "Traceback" not in output


async def test_a_second_stop_signal_hands_running_answers_back_at_once(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    from tests.fakes.kimi_api import Reply

    fake_kimi.script(Reply(content="slow " * 400, chunk_chars=5, chunk_delay=0.05))  # ~20 s of answer
    env = serve_env(fake_slack, fake_kimi, redis_url, tmp_path, SHUTDOWN_GRACE_SECONDS="60")
    bot = start(processes, env, tmp_path)
    await wait_health(bot, 200)
    root = fake_slack.seed(CHANNEL, user="U04RZ8N2PQM", text="take your time")
    async with aiohttp.ClientSession() as session:
        assert await bot.send(session, mention("take your time", root)) == 200
    await wait_for(lambda: bool(fake_kimi.requests))
    bot.process.send_signal(signal.SIGINT)
    await asyncio.sleep(0.5)
    bot.process.send_signal(signal.SIGINT)  # Ctrl-C again: don't wait a minute
    code, output, took = await exit_of(bot, 30)
    assert code == 0, output
    assert took < 10
    assert "second stop signal" in output and "handed back" in output


async def test_an_app_token_revoked_while_running_stops_kimibot_at_the_next_reconnect(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path, processes: list[ServeProcess]
) -> None:
    env = serve_env(
        fake_slack, fake_kimi, redis_url, tmp_path, SLACK_APP_TOKEN=APP_TOKEN, SLACK_SIGNING_SECRET=""
    )
    bot = start(processes, env, tmp_path)
    await wait_health(bot, 200)
    fake_slack.revoked[APP_TOKEN] = "token_revoked"
    await fake_slack.drop_sockets()
    code, output, took = await exit_of(bot, EXIT_LIMIT_S + 5)
    assert code == 2, output
    assert took < EXIT_LIMIT_S and "Traceback" not in output
    named = [line for line in lines_naming(output, "SLACK_APP_TOKEN") if line.startswith("kimibot stopped")]
    assert len(named) == 1 and "token_revoked" in named[0], output


async def test_only_slacks_own_refusals_count_as_rejections(
    fake_slack: FakeSlack, make_settings: Callable[..., Settings]
) -> None:
    from bot.startup import NotYet, Rejected, check_bot_token, check_client

    client = check_client(make_settings())
    fake_slack.fail_raw("auth.test", 403, "<html><body>Forbidden by proxy</body></html>", "text/html")
    with pytest.raises(NotYet):  # a corporate proxy's page says nothing about the token
        await check_bot_token(client)
    fake_slack.fail("auth.test", status=503)
    with pytest.raises(NotYet):
        await check_bot_token(client)
    fake_slack.fail("auth.test", "ratelimited", status=429, retry_after=1)
    with pytest.raises(NotYet):
        await check_bot_token(client)
    assert (await check_bot_token(client))["user_id"]
    fake_slack.revoked[TOKEN] = "not_authed"
    with pytest.raises(Rejected) as refused:
        await check_bot_token(client)
    assert refused.value.setting == "SLACK_BOT_TOKEN" and "not_authed" in refused.value.line()


async def test_a_kimi_host_without_models_is_not_refused_and_a_busy_one_is_retried(
    fake_kimi: FakeKimi, make_settings: Callable[..., Settings]
) -> None:
    from bot.startup import NotYet, check_kimi

    settings = make_settings()
    fake_kimi.models_status = 404  # some OpenAI-compatible hosts have no GET /models
    await check_kimi(settings)
    fake_kimi.models_status = 503
    with pytest.raises(NotYet):
        await check_kimi(settings)


async def test_a_job_loop_that_dies_stops_serve_instead_of_idling_as_if_healthy(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    import bot.server
    from bot.deps import build_deps

    real = bot.server.build_worker

    def broken_worker(deps: Any, block_ms: int = 1_000) -> Any:
        worker = real(deps, block_ms)

        async def run() -> None:
            raise RuntimeError("bug in the job loop")

        worker.run = run
        return worker

    monkeypatch.setattr(bot.server, "build_worker", broken_worker)
    deps = build_deps(make_settings(port=free_port()))
    with pytest.raises(bot.server.Stopped, match="job loop failed"):
        async with asyncio.timeout(15):
            await bot.server.serve(deps)


@pytest.mark.parametrize("status", [200, 401, 403, 407])
async def test_a_page_from_something_in_front_of_kimi_is_retried_not_taken_for_kimis_word(
    fake_kimi: FakeKimi, make_settings: Callable[..., Settings], status: int
) -> None:
    from bot.startup import NotYet, check_kimi

    fake_kimi.models_page = (status, "<html><body><h1>Access denied by the proxy</h1></body></html>")
    with pytest.raises(NotYet):
        await check_kimi(make_settings())
    fake_kimi.models_page = None
    assert await check_kimi(make_settings()) is True
