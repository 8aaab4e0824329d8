"""`kimibot doctor`, run as the real command against the fake Slack and Kimi and the test Redis: one line per
check, ✓ or ✗, the failing line naming the setting; exit code 1 when any check fails."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from bot.doctor import BOT_SCOPES
from tests import test_cluster
from tests.fakes.kimi_api import API_KEY, FakeKimi
from tests.fakes.slack_api import APP_TOKEN, TOKEN, FakeSlack
from tests.test_settings_cli import kimibot_command

# The Redis Cluster of tests/test_cluster.py (started there unless KIMIBOT_TEST_CLUSTER_URL names one).
cluster_nodes = test_cluster.cluster_nodes
cluster_url = test_cluster.cluster_url

ROOT = Path(__file__).resolve().parent.parent
FAKE_MCP = str(ROOT / "tests" / "fakes" / "mcp_server.py")


async def doctor(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, cwd: Path, **env: str
) -> tuple[int, list[str], str]:
    """Run `kimibot doctor` as a child process (the fakes keep answering meanwhile)."""
    values = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(cwd),
        "SLACK_BOT_TOKEN": TOKEN,
        "SLACK_SIGNING_SECRET": "s",
        "SLACK_API_URL": fake_slack.api_url,
        "MOONSHOT_API_KEY": API_KEY,
        "KIMI_BASE_URL": fake_kimi.base_url,
        "REDIS_URL": redis_url,
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        *kimibot_command(),
        "doctor",
        env={k: v for k, v in values.items() if v != ""},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines(), err.decode()


def failing(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("✗")]


def test_the_doctor_knows_the_manifests_scopes() -> None:
    for path in sorted((ROOT / "manifests").glob("manifest-*.yml")):
        scopes = set(yaml.safe_load(path.read_text())["oauth_config"]["scopes"]["bot"])
        assert scopes == set(BOT_SCOPES), f"bot/doctor.py BOT_SCOPES must list {path.name}'s bot scopes"


async def test_good_settings_pass_every_check(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    code, lines, err = await doctor(fake_slack, fake_kimi, redis_url, tmp_path)
    assert code == 0, (lines, err)
    assert lines and all(line.startswith("✓ ") for line in lines), lines
    text = "\n".join(lines)
    for name in ("settings", "REDIS_URL", "SLACK_BOT_TOKEN", "MOONSHOT_API_KEY", "KIMI_MODEL"):
        assert name in text
    assert "every scope the manifest asks for" in text
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("env", "setting", "said"),
    [
        ({"SLACK_BOT_TOKEN": "xoxb-wrong"}, "SLACK_BOT_TOKEN", "invalid_auth"),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, "REDIS_URL", "cannot be reached"),
        ({"KIMI_MODEL": "kimi-nonexistent"}, "KIMI_MODEL", "not offered"),
        ({"MOONSHOT_API_KEY": "sk-wrong"}, "MOONSHOT_API_KEY", "rejected by Kimi"),
        ({"SLACK_APP_TOKEN": "xapp-wrong", "SLACK_SIGNING_SECRET": ""}, "SLACK_APP_TOKEN", "invalid_auth"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL", "not a log level"),
        ({"KIMI_PRICES": "{not json"}, "KIMI_PRICES", "KIMI_PRICES"),
        # Asked once, no retries: an unreachable service is a line saying so, not a hang or a traceback.
        ({"SLACK_API_URL": "http://127.0.0.1:1/api/"}, "SLACK_BOT_TOKEN", "reach"),
        ({"KIMI_BASE_URL": "http://127.0.0.1:1/v1"}, "MOONSHOT_API_KEY", "reach"),
    ],
)
async def test_a_broken_setting_fails_with_a_line_naming_it(
    fake_slack: FakeSlack,
    fake_kimi: FakeKimi,
    redis_url: str,
    tmp_path: Path,
    env: dict[str, str],
    setting: str,
    said: str,
) -> None:
    code, lines, err = await doctor(fake_slack, fake_kimi, redis_url, tmp_path, **env)
    assert code == 1, (lines, err)
    bad = failing(lines)
    assert len(bad) == 1 and setting in bad[0] and said in bad[0], lines
    assert "Traceback" not in err
    # The other checks still ran (a broken setting does not hide the state of the rest).
    assert any(line.startswith("✓ REDIS_URL") for line in lines) or setting == "REDIS_URL"


async def test_a_missing_scope_is_named(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    fake_slack.scopes -= {"chat:write", "users:read"}
    code, lines, _ = await doctor(fake_slack, fake_kimi, redis_url, tmp_path)
    assert code == 1
    [bad] = failing(lines)
    assert "SLACK_BOT_TOKEN lacks scopes" in bad and "chat:write" in bad and "users:read" in bad
    assert "reinstall" in bad


async def test_a_missing_setting_is_named_and_the_rest_is_checked(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    code, lines, _ = await doctor(fake_slack, fake_kimi, redis_url, tmp_path, MOONSHOT_API_KEY="")
    assert code == 1
    [bad] = failing(lines)
    assert bad.startswith("✗ MOONSHOT_API_KEY is not set")
    assert any(line.startswith("✓ SLACK_BOT_TOKEN") for line in lines)


async def test_socket_mode_and_mcp_servers_are_checked(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "mcp.json"
    config.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "fake": {"command": sys.executable, "args": [FAKE_MCP]},
                    "gone": {"command": str(tmp_path / "no-such-server")},
                }
            }
        )
    )
    code, lines, err = await doctor(
        fake_slack,
        fake_kimi,
        redis_url,
        tmp_path,
        SLACK_APP_TOKEN=APP_TOKEN,
        SLACK_SIGNING_SECRET="",
        MCP_CONFIG=str(config),
    )
    assert code == 1, (lines, err)
    assert any(line.startswith("✓ SLACK_APP_TOKEN") for line in lines), lines
    assert any(line.startswith("✓ MCP_CONFIG server 'fake': connected") for line in lines), lines
    [bad] = failing(lines)
    assert bad.startswith("✗ MCP_CONFIG server 'gone': not available ("), lines


async def test_a_redis_cluster_is_recognised_and_a_wrong_redis_cluster_setting_named(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, cluster_url: str, tmp_path: Path
) -> None:
    code, lines, err = await doctor(fake_slack, fake_kimi, cluster_url, tmp_path)
    assert code == 0, (lines, err)
    assert any(line.startswith("✓ REDIS_URL") and "Redis Cluster node" in line for line in lines), lines
    code, lines, _ = await doctor(fake_slack, fake_kimi, cluster_url, tmp_path, REDIS_CLUSTER="false")
    assert code == 1 and failing(lines)[0].startswith("✗ REDIS_CLUSTER is false"), lines
    other_db = cluster_url.rsplit("/", 1)[0] + "/3"
    code, lines, _ = await doctor(fake_slack, fake_kimi, other_db, tmp_path)
    assert code == 1 and "REDIS_URL selects database 3" in failing(lines)[0], lines


async def test_the_doctor_changes_nothing_in_redis(
    fake_slack: FakeSlack, fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url, decode_responses=True)
    await redis.set("kimibot:test:bystander", "kept")
    before = {key: await redis.dump(key) for key in await redis.keys("*")}
    code, lines, err = await doctor(fake_slack, fake_kimi, redis_url, tmp_path)
    assert code == 0, (lines, err)
    after = {key: await redis.dump(key) for key in await redis.keys("*")}
    assert after == before
    await redis.aclose()
    # Nor in Slack: only reads (auth.test, apps.connections.open when set), no message, no reaction.
    assert {call.method for call in fake_slack.calls} <= {"auth.test", "apps.connections.open"}
