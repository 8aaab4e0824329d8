"""Settings and the `kimibot` command: plain start-up errors, and the contract's names and defaults."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.settings import SECRET_SETTINGS, Settings, SettingsError, load_settings


def kimibot_command() -> list[str]:
    script = Path(sys.executable).parent / "kimibot"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bot.cli"]


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd)}
    return subprocess.run(
        [*kimibot_command(), *args], env={**base, **env}, cwd=cwd, capture_output=True, text=True, timeout=30
    )


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLACK_API_URL", "KIMI_BASE_URL", "REDIS_URL", "PORT", "KIMI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(
        _env_file=None, slack_bot_token="xoxb-1", slack_signing_secret="s", moonshot_api_key="sk"
    )
    assert settings.slack_api_url == "https://slack.com/api/"
    assert settings.kimi_base_url == "https://api.moonshot.ai/v1"
    assert settings.redis_url == "redis://localhost:6379/0"
    assert settings.port == 3000
    assert settings.kimi_model == "kimi-k2.6"
    assert settings.thread_ttl_days == 30
    assert not settings.socket_mode


def test_settings_are_read_from_the_environment_by_their_contract_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {
        "SLACK_BOT_TOKEN": "xoxb-env",
        "SLACK_SIGNING_SECRET": "sig",
        "SLACK_APP_TOKEN": "xapp-1",
        "SLACK_API_URL": "http://127.0.0.1:9/api/",
        "MOONSHOT_API_KEY": "sk-env",
        "KIMI_BASE_URL": "http://127.0.0.1:9/v1",
        "KIMI_MODEL": "kimi-k3",
        "REDIS_URL": "redis://r:6379/2",
        "PORT": "8080",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(_env_file=None)
    assert (settings.slack_bot_token, settings.slack_app_token, settings.port) == ("xoxb-env", "xapp-1", 8080)
    assert settings.socket_mode and settings.kimi_model == "kimi-k3"


def test_socket_mode_does_not_need_a_signing_secret() -> None:
    settings = load_settings(
        _env_file=None,
        slack_bot_token="xoxb-1",
        slack_app_token="xapp-1",
        slack_signing_secret="",
        moonshot_api_key="sk",
    )
    assert settings.socket_mode


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            _env_file=None,
            slack_bot_token="",
            slack_signing_secret="",
            moonshot_api_key="",
            port="not-a-port",
            redis_url="http://nope",
            slack_app_token="",
        )
    text = str(caught.value)
    for name in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "MOONSHOT_API_KEY", "PORT", "REDIS_URL"):
        assert name in text
    assert "OAuth & Permissions" in text  # where to get it


def test_kimibot_serve_without_settings_exits_with_a_plain_message(tmp_path: Path) -> None:
    result = run_cli("serve", env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert "kimibot cannot start" in result.stderr
    assert "SLACK_BOT_TOKEN is not set" in result.stderr and "MOONSHOT_API_KEY is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_kimibot_reads_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SLACK_BOT_TOKEN=xoxb-1\nSLACK_SIGNING_SECRET=s\nPORT=70000\n")
    result = run_cli("serve", env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert "PORT is malformed" in result.stderr and "MOONSHOT_API_KEY is not set" in result.stderr
    assert "SLACK_BOT_TOKEN" not in result.stderr


def test_kimibot_help_lists_serve(tmp_path: Path) -> None:
    result = run_cli("--help", env={}, cwd=tmp_path)
    assert result.returncode == 0 and "serve" in result.stdout
    result = run_cli("serve", "--help", env={}, cwd=tmp_path)
    assert result.returncode == 0 and "/slack/events" in result.stdout


async def test_an_unknown_model_id_starts_with_a_warning_and_a_conservative_profile(
    make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    from bot.deps import build_deps

    with caplog.at_level(logging.WARNING):
        deps = build_deps(make_settings(kimi_model="some-new-model"))
    try:
        assert not deps.kimi.profile.known
        assert any("unknown model id" in r.getMessage() for r in caplog.records)
        assert "extra_body" not in deps.kimi.request_kwargs([])
    finally:
        await deps.close()


def _base_env(**extra: str) -> dict[str, str]:
    return {
        "SLACK_BOT_TOKEN": "xoxb-1",
        "SLACK_SIGNING_SECRET": "s",
        "MOONSHOT_API_KEY": "sk-1",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        **extra,
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [("LOG_LEVEL", "verbose"), ("REDIS_URL", "redis://h:abc/0"), ("REDIS_URL", "redis://h:99999/0")],
)
def test_a_malformed_log_level_or_redis_port_is_one_line_naming_it_and_exit_2(
    tmp_path: Path, name: str, value: str
) -> None:
    result = run_cli("serve", env=_base_env(**{name: value}), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    named = [line for line in result.stderr.splitlines() if name in line]
    assert len(named) == 1 and value.split("//")[-1] in named[0], result.stderr


def test_the_env_example_placeholders_are_refused_as_placeholders(tmp_path: Path) -> None:
    env = _base_env(SLACK_BOT_TOKEN="xoxb-...", MOONSHOT_API_KEY="sk-...", SLACK_SIGNING_SECRET="...")
    result = run_cli("serve", env=env, cwd=tmp_path)
    assert result.returncode == 2
    for name in ("SLACK_BOT_TOKEN", "MOONSHOT_API_KEY", "SLACK_SIGNING_SECRET"):
        assert f"{name} still holds the placeholder from .env.example" in result.stderr


def test_a_socket_mode_user_without_an_app_token_hears_about_both_ways() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            _env_file=None, slack_bot_token="xoxb-1", moonshot_api_key="sk", slack_signing_secret=""
        )
    text = str(caught.value)
    assert "SLACK_SIGNING_SECRET" in text and "SLACK_APP_TOKEN" in text and "Socket Mode" in text


def test_a_worker_needs_no_signing_secret_nor_app_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLACK_SIGNING_SECRET", raising=False)
    monkeypatch.delenv("SLACK_APP_TOKEN", raising=False)
    settings = load_settings(
        _env_file=None, slack_bot_token="xoxb-1", moonshot_api_key="sk", kimibot_role="worker"
    )
    assert settings.kimibot_role == "worker" and not settings.slack_signing_secret
    monkeypatch.setenv("KIMIBOT_ROLE", "worker")
    assert load_settings(_env_file=None, slack_bot_token="xoxb-1", moonshot_api_key="sk").kimibot_role == (
        "worker"
    )


@pytest.mark.parametrize("name", SECRET_SETTINGS)
def test_every_secret_can_come_from_a_file_named_by_name_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    values = {
        "SLACK_BOT_TOKEN": "xoxb-from-file",
        "SLACK_SIGNING_SECRET": "secret-from-file",
        "SLACK_APP_TOKEN": "xapp-from-file",
        "MOONSHOT_API_KEY": "sk-from-file",
        "REDIS_URL": "redis://:pw@redis:6379/3",
        "SLACK_CLIENT_SECRET": "client-secret-from-file",
        "SLACK_STATE_SECRET": "state-secret-from-file",
        "KIMIBOT_ENCRYPTION_KEY": "aOUDcPyGGs0l2ZUfrtPeVNnO_0lAHvAEJ-rvtpJbU3s=",
    }
    assert set(values) == set(SECRET_SETTINGS)  # a new secret setting is tested here too
    for other, value in _base_env().items():
        monkeypatch.setenv(other, value)
    if name == "SLACK_CLIENT_SECRET":
        monkeypatch.setenv("SLACK_CLIENT_ID", "123.456")  # the secret alone is refused: it needs its id
    monkeypatch.delenv(name, raising=False)
    secret = tmp_path / "secret"
    secret.write_text(values[name] + "\n")  # files written by editors and `echo` end with a newline
    monkeypatch.setenv(f"{name}_FILE", str(secret))
    settings = load_settings(_env_file=None)
    assert getattr(settings, name.lower()) == values[name]


def test_a_secret_file_that_cannot_be_read_or_clashes_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for other, value in _base_env().items():
        monkeypatch.setenv(other, value)
    monkeypatch.delenv("MOONSHOT_API_KEY")
    monkeypatch.setenv("MOONSHOT_API_KEY_FILE", str(tmp_path / "missing"))
    (tmp_path / "token").write_text("xoxb-2")
    monkeypatch.setenv("SLACK_BOT_TOKEN_FILE", str(tmp_path / "token"))  # SLACK_BOT_TOKEN is set too
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    text = str(caught.value)
    assert "MOONSHOT_API_KEY_FILE names a file that cannot be read" in text
    assert "SLACK_BOT_TOKEN and SLACK_BOT_TOKEN_FILE are both set" in text


def test_the_settings_module_cites_only_files_that_exist() -> None:
    import re

    import bot.settings

    root = Path(__file__).resolve().parents[1]
    source = Path(bot.settings.__file__).read_text()
    for cited in re.findall(r"\b([A-Za-z_./-]+\.(?:md|txt|yml|yaml))\b", source):
        assert (root / cited).exists(), cited


def test_a_malformed_redis_url_is_named_without_its_password(tmp_path: Path) -> None:
    result = run_cli("serve", env=_base_env(REDIS_URL="redis://:hunter2@h:abc/0"), cwd=tmp_path)
    assert result.returncode == 2 and "REDIS_URL" in result.stderr
    assert "hunter2" not in result.stderr


def test_name_file_works_from_the_dotenv_file_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MOONSHOT_API_KEY", "MOONSHOT_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "key").write_text("sk-from-a-file\n")
    (tmp_path / ".env").write_text(
        f"SLACK_BOT_TOKEN=xoxb-1\nSLACK_SIGNING_SECRET=s\nMOONSHOT_API_KEY_FILE={tmp_path / 'key'}\n"
    )
    settings = load_settings(_env_file=tmp_path / ".env")
    assert settings.moonshot_api_key == "sk-from-a-file"


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("REDIS_URL", "redis://localhost:6379/abc", "names a database that is not a number"),
        ("SLACK_BOT_TOKEN", "xoxp-1234-5678-user-token", "is not a bot token"),
    ],
)
def test_settings_that_would_quietly_misbehave_are_refused_in_one_line(
    tmp_path: Path, name: str, value: str, said: str
) -> None:
    result = run_cli("serve", env=_base_env(**{name: value}), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if name in line]
    assert said in line


def test_a_port_already_in_use_is_named(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _base_env(PORT=str(port), REDIS_URL="redis://127.0.0.1:1/0", KIMIBOT_ROLE="worker")
        result = run_cli("serve", env=env, cwd=tmp_path)
    assert result.returncode == 2 and f"PORT {port} is already in use" in result.stderr, result.stderr
