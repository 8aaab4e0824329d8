"""Every setting kimibot reads, and the only module that reads the environment.

Names are a public contract (the README's "Settings" table): never rename one. A missing or malformed
setting becomes one plain sentence naming the variable and where to get it, not a traceback. Every
secret also comes from a file named by `NAME_FILE` (the Docker and Kubernetes secrets convention).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from dotenv import dotenv_values
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SYSTEM_PROMPT = (
    "You are Kimi, a helpful assistant working inside a Slack workspace. "
    "You are talking with a team in a Slack thread; each user message starts with the speaker's name "
    "followed by a colon, so several people may take part. Answer the latest message, using the thread "
    "for context. Be accurate and concise; say so when you are unsure. Format answers with standard "
    "Markdown (headings, lists, bold, `code` and fenced code blocks); avoid HTML and very wide tables."
)

# Where an admin finds each value. Shown next to the variable's name when it is missing or malformed.
WHERE_TO_GET: dict[str, str] = {
    "SLACK_BOT_TOKEN": "Slack app settings > OAuth & Permissions > Bot User OAuth Token (starts with xoxb-)",
    "SLACK_SIGNING_SECRET": "Slack app settings > Basic Information > App Credentials > Signing Secret",
    "SLACK_APP_TOKEN": "Slack app settings > Basic Information > App-Level Tokens, scope connections:write "
    "(starts with xapp-); leave unset for HTTP mode",
    "SLACK_API_URL": "an http(s) URL ending in /api/; the default https://slack.com/api/ is right for Slack",
    "MOONSHOT_API_KEY": "https://platform.kimi.ai > API Keys (China accounts: platform.kimi.com)",
    "KIMI_BASE_URL": "an http(s) URL, default https://api.moonshot.ai/v1 (China: https://api.moonshot.cn/v1)",
    "KIMI_MODEL": "a model id such as kimi-k2.6, kimi-k2.7-code or kimi-k3",
    "REDIS_URL": "a redis:// or rediss:// URL, e.g. redis://localhost:6379/0",
    "REDIS_CLUSTER": "auto (detect a Redis Cluster node at REDIS_URL), true or false",
    "PORT": "a TCP port number between 1 and 65535",
    "LOG_LEVEL": "one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    "MCP_CONFIG": 'the path of a JSON file {"mcpServers": {...}} (README "MCP servers"); empty for none',
    "ALLOWED_USERS": "comma-separated Slack user ids (U…, W…) and user-group ids (S…); empty for everyone",
    "ADMIN_USERS": "comma-separated Slack user ids (U…, W…) of people who may change kimibot's settings; "
    "empty for workspace admins and owners only",
    "KIMI_PRICES": 'JSON {"model id": [input miss, input cache hit, output]} in USD per 1M tokens, e.g. '
    '{"kimi-k2.6": [0.95, 0.16, 4.0]}; empty for the list prices',
    "BUDGET_USER_DAILY_USD": "a number of USD (e.g. 2.50) each person may spend per UTC day; empty for none",
    "BUDGET_TEAM_MONTHLY_USD": "a number of USD (e.g. 500) a workspace may spend per UTC month; empty for "
    "none",
    "ALLOWED_CHANNELS": "comma-separated Slack channel ids (C…, G…, D…) or dm (DMs with kimibot); empty for "
    "everywhere",
    "SLACK_CLIENT_ID": "Slack app settings > Basic Information > App Credentials > Client ID; with "
    "SLACK_CLIENT_SECRET it turns on OAuth installs (many workspaces)",
    "SLACK_CLIENT_SECRET": "Slack app settings > Basic Information > App Credentials > Client Secret",
    "SLACK_STATE_SECRET": "any long random string, the same on every replica (it signs the OAuth state); "
    "unset: states are not signed (still one-time, expiring and bound to the browser's cookie)",
    "SLACK_REDIRECT_URI": "the https URL of GET /slack/oauth_redirect as listed in the app's Redirect URLs; "
    "empty: the one configured in the app",
    "KIMIBOT_ENCRYPTION_KEY": "a Fernet key: python -c 'from cryptography.fernet import Fernet; "
    "print(Fernet.generate_key().decode())'; to change it, the new key, a comma, the old one (the first "
    "encrypts); empty: tokens are stored in Redis unencrypted",
}

# Settings that hold secrets: each may instead name a file with `NAME_FILE` (Docker/Kubernetes secrets).
SECRET_SETTINGS = (
    "SLACK_BOT_TOKEN",
    "SLACK_SIGNING_SECRET",
    "SLACK_APP_TOKEN",
    "MOONSHOT_API_KEY",
    "REDIS_URL",
    "SLACK_CLIENT_SECRET",
    "SLACK_STATE_SECRET",
    "KIMIBOT_ENCRYPTION_KEY",
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ALLOWED_USER_ID = re.compile(r"[UWS][A-Z0-9]{2,}")  # a user (U…, W… on Enterprise Grid) or a user group (S…)
ADMIN_USER_ID = re.compile(r"[UW][A-Z0-9]{2,}")  # people only: no groups
ALLOWED_CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]{2,}|dm")  # a channel, private channel, DM; `dm`: every DM


def split_ids(value: str) -> list[str]:
    """`ALLOWED_USERS` / `ALLOWED_CHANNELS`: comma-separated (spaces allowed), empty items skipped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def is_placeholder(value: str) -> bool:
    """`.env.example`'s stand-ins (`xoxb-...`, `sk-...`) copied without being filled in."""
    return "..." in value or "…" in value


class SettingsError(Exception):
    """Start-up cannot go on: one line per bad or missing variable."""

    def __init__(self, problems: list[str], settings: Settings | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.settings = settings  # as far as they could be read (bad values replaced by defaults)


class Settings(BaseSettings):
    """kimibot's configuration, from the environment or a .env file."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- The contract (README "Settings") ---
    slack_bot_token: str = ""
    slack_signing_secret: str = ""
    slack_app_token: str = ""
    slack_api_url: str = "https://slack.com/api/"
    moonshot_api_key: str = ""
    kimi_base_url: str = "https://api.moonshot.ai/v1"
    kimi_model: str = "kimi-k2.6"
    redis_url: str = "redis://localhost:6379/0"
    redis_cluster: Literal["auto", "true", "false"] = "auto"  # is REDIS_URL a Redis Cluster node?
    port: int = Field(default=3000, ge=1, le=65535)

    # --- Model behaviour ---
    kimi_reasoning_effort: Literal["low", "high", "max"] = "high"
    kimi_max_completion_tokens: int = Field(default=0, ge=0)  # 0: the model profile's budget
    kimi_idle_timeout: float = Field(default=180.0, gt=0)  # seconds without a byte before a stream is dead
    kimi_retry_budget: float = Field(default=120.0, ge=0)  # total seconds spent backing off per answer
    kimi_max_attempts: int = Field(default=4, ge=1)
    kimi_retry_base_delay: float = Field(default=1.0, ge=0)  # first backoff step, doubled each retry
    kimi_concurrency: int = Field(default=8, ge=1)  # answers in flight at once; match the account tier
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    # --- The agent loop (bot/agent) ---
    tools_enabled: bool = True  # offer tools (built-ins, MCP servers); false: every answer is one request
    kimi_max_tool_steps: int = Field(default=100, ge=0)  # model steps with tool calls per answer
    agent_max_seconds: float = Field(default=600.0, gt=0)  # wall time for tool use per answer
    tool_approval_timeout: float = Field(default=300.0, gt=0)  # wait for Approve/Deny this long

    # --- Threads and Slack ---
    thread_ttl_days: int = Field(default=30, ge=1)
    dedup_ttl_seconds: int = Field(default=86_400, ge=60)
    backfill_limit: int = Field(default=200, ge=0)
    slash_command: str = "/kimi"

    # --- Files in the conversation (bot/files) ---
    files_max_bytes: int = Field(default=20_000_000, ge=1_000)  # one file is downloaded up to this size
    files_max_message_bytes: int = Field(default=50_000_000, ge=1_000)  # one message's files together
    files_max_text_chars: int = Field(default=100_000, ge=1_000)  # text read from one file (cut after)
    files_image_max_bytes: int = Field(default=3_000_000, ge=10_000)  # an image sent to Kimi, re-encoded
    files_image_max_pixels: int = Field(default=2_359_296, ge=10_000)  # width x height (1536 x 1536)
    files_max_per_turn: int = Field(default=20, ge=1)  # files read for one answer, the newest first
    files_read_timeout: float = Field(default=30.0, gt=0)  # seconds parsing one file may take (then killed)
    files_read_max_memory_mb: int = Field(default=512, ge=256)  # memory of the process parsing one file

    # --- Built-in tools (bot/tools) ---
    tool_call_timeout: float = Field(default=60.0, gt=0)  # seconds one tool call may take
    tool_result_max_chars: int = Field(default=20_000, ge=1_000)  # longer results are cut or paged
    fetch_allowed_hosts: str = ""  # comma-separated hosts fetch_url may reach despite private addresses
    fetch_max_bytes: int = Field(default=5_000_000, ge=10_000)  # a fetched page is read up to this size
    web_search_enabled: bool = True  # offer web_search (Moonshot's formula; billed per search)
    slack_access_cache_seconds: int = Field(default=300, ge=0)  # who may read what, cached this long

    # --- Jobs and processes ---
    kimibot_role: Literal["all", "receiver", "worker"] = "all"  # receive Slack requests, run answers, or both
    # A killed or cut-off worker's thread is taken over this long after its last lease renewal.
    job_visibility_timeout: float = Field(default=10.0, gt=0)
    # Starts of one job before it is set aside (dead-letter stream) and the asker told.
    job_max_attempts: int = Field(default=3, ge=1)
    shutdown_grace_seconds: float = Field(
        default=30.0, ge=0
    )  # how long running answers may finish on SIGTERM
    log_level: str = "INFO"

    # --- MCP servers (bot/tools/mcp.py) ---
    mcp_config: str = ""  # path of a JSON file {"mcpServers": {...}}; empty: no MCP servers

    # --- Access control (bot/admission.py) ---
    allowed_users: str = ""  # comma-separated user ids (U…/W…) and user-group ids (S…); empty: everyone
    allowed_channels: str = ""  # comma-separated channel ids (C…/G…/D…, or `dm`); empty: everywhere
    allow_guests: bool = False  # may guests (restricted / ultra-restricted accounts) use kimibot?
    admin_users: str = ""  # comma-separated user ids who may change settings and see all usage (and admins)

    # --- OAuth installs, many workspaces (bot/installations.py) ---
    slack_client_id: str = ""  # with slack_client_secret: OAuth mode, SLACK_BOT_TOKEN not needed
    slack_client_secret: str = ""
    slack_state_secret: str = ""  # empty: OAuth states are not signed (one-time in Redis, cookie-bound)
    slack_redirect_uri: str = ""  # empty: the app's configured redirect URL
    slack_install_scopes: str = ""  # empty: the OAuth manifest's bot scopes
    kimibot_encryption_key: str = ""  # a Fernet key: installation tokens encrypted at rest in Redis

    # --- Usage, cost and budgets (bot/usage.py) ---
    kimi_prices: str = ""  # JSON {"model": [miss, hit, out]} USD per 1M tokens; overrides the profile table
    budget_user_daily_usd: float | None = Field(default=None, ge=0)  # per person per UTC day; None: no cap
    budget_team_monthly_usd: float | None = Field(default=None, ge=0)  # per workspace per UTC month

    @field_validator("budget_user_daily_usd", "budget_team_monthly_usd", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """An empty variable (as .env.example leaves it) means no budget."""
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def socket_mode(self) -> bool:
        return bool(self.slack_app_token)

    @property
    def oauth(self) -> bool:
        """Many workspaces: installations come from Slack's OAuth flow, not SLACK_BOT_TOKEN."""
        return bool(self.slack_client_id and self.slack_client_secret)

    @property
    def thread_ttl_seconds(self) -> int:
        return self.thread_ttl_days * 86_400


def _check_url(value: str, schemes: tuple[str, ...]) -> bool:
    parsed = urlparse(value)
    return parsed.scheme in schemes and (bool(parsed.netloc) or parsed.scheme == "unix")


def problems_with(settings: Settings) -> list[str]:
    """Every reason these settings cannot run the bot, one sentence each (empty when fine)."""
    problems: list[str] = []

    def missing(name: str) -> None:
        problems.append(f"{name} is not set. Get it from: {WHERE_TO_GET[name]}.")

    def malformed(name: str, why: str) -> None:
        problems.append(f"{name} {why}. Expected: {WHERE_TO_GET[name]}.")

    def placeholder(name: str) -> None:
        problems.append(
            f"{name} still holds the placeholder from .env.example. Get the real value from: "
            f"{WHERE_TO_GET[name]}."
        )

    receives = settings.kimibot_role != "worker"  # a worker never hears from Slack, only writes to it
    if settings.slack_client_id and not settings.slack_client_secret:
        missing("SLACK_CLIENT_SECRET")
    elif settings.slack_client_secret and not settings.slack_client_id:
        missing("SLACK_CLIENT_ID")
    for name, secret in (
        ("SLACK_CLIENT_ID", settings.slack_client_id),
        ("SLACK_CLIENT_SECRET", settings.slack_client_secret),
    ):
        if secret and is_placeholder(secret):
            placeholder(name)
    if settings.kimibot_encryption_key and not fernet_key_ok(settings.kimibot_encryption_key):
        malformed(
            "KIMIBOT_ENCRYPTION_KEY",
            "is not a Fernet key (32 url-safe base64-encoded bytes), nor several separated by commas",
        )
    if settings.slack_redirect_uri and not _check_url(settings.slack_redirect_uri, ("https", "http")):
        malformed("SLACK_REDIRECT_URI", f"is not an http(s) URL ({settings.slack_redirect_uri!r})")
    if not settings.slack_bot_token:
        if not settings.oauth:  # OAuth mode: each workspace's bot token comes from its installation
            missing("SLACK_BOT_TOKEN")
    elif is_placeholder(settings.slack_bot_token):
        placeholder("SLACK_BOT_TOKEN")
    elif not settings.slack_bot_token.startswith("xox"):
        malformed("SLACK_BOT_TOKEN", "does not look like a Slack token")
    elif not settings.slack_bot_token.startswith(("xoxb-", "xoxe.xoxb-")):  # a bot token, plain or rotating
        malformed("SLACK_BOT_TOKEN", "is not a bot token (a user or other token: the bot needs its own)")
    if settings.slack_signing_secret and is_placeholder(settings.slack_signing_secret):
        placeholder("SLACK_SIGNING_SECRET")
    if receives and not settings.socket_mode and not settings.slack_signing_secret:
        problems.append(
            "SLACK_SIGNING_SECRET is not set (HTTP mode), nor SLACK_APP_TOKEN (Socket Mode): set one. "
            f"Signing secret: {WHERE_TO_GET['SLACK_SIGNING_SECRET']}. "
            f"App-level token: {WHERE_TO_GET['SLACK_APP_TOKEN']}."
        )
    if settings.slack_app_token and is_placeholder(settings.slack_app_token):
        placeholder("SLACK_APP_TOKEN")
    elif settings.slack_app_token and not settings.slack_app_token.startswith("xapp-"):
        malformed("SLACK_APP_TOKEN", "is not an app-level token")
    if not settings.moonshot_api_key:
        missing("MOONSHOT_API_KEY")
    elif is_placeholder(settings.moonshot_api_key):
        placeholder("MOONSHOT_API_KEY")
    if not settings.kimi_model.strip():
        missing("KIMI_MODEL")
    for name, value in (("SLACK_API_URL", settings.slack_api_url), ("KIMI_BASE_URL", settings.kimi_base_url)):
        if not _check_url(value, ("http", "https")):
            malformed(name, f"is not an http(s) URL ({value!r})")
    if not _check_url(settings.redis_url, ("redis", "rediss", "unix")):
        malformed("REDIS_URL", f"is not a Redis URL ({_without_password(settings.redis_url)!r})")
    else:
        parsed_redis = urlparse(settings.redis_url)
        try:
            parsed_redis.port  # noqa: B018 - parsing it is the check
        except ValueError:
            malformed(
                "REDIS_URL", f"has a port that is not a number ({_without_password(settings.redis_url)!r})"
            )
        database = parsed_redis.path.strip("/")
        if parsed_redis.scheme != "unix" and database and not database.isdigit():
            # redis-py would quietly use database 0 (someone else's data, perhaps) instead.
            malformed(
                "REDIS_URL",
                f"names a database that is not a number ({_without_password(settings.redis_url)!r})",
            )
    if settings.log_level.upper() not in LOG_LEVELS:
        malformed("LOG_LEVEL", f"is not a log level ({settings.log_level!r})")
    for name, value, pattern in (
        ("ALLOWED_USERS", settings.allowed_users, ALLOWED_USER_ID),
        ("ALLOWED_CHANNELS", settings.allowed_channels, ALLOWED_CHANNEL_ID),
        ("ADMIN_USERS", settings.admin_users, ADMIN_USER_ID),
    ):
        if bad := [item for item in split_ids(value) if not pattern.fullmatch(item)]:
            malformed(name, f"holds {', '.join(repr(b) for b in bad[:3])}, not ids")
    if settings.kimi_prices:
        from bot.kimi.profiles import parse_prices

        try:
            parse_prices(settings.kimi_prices)
        except ValueError as exc:
            malformed("KIMI_PRICES", str(exc))
    if settings.mcp_config:
        from bot.tools.mcp import config_problem  # imported only when MCP servers are configured

        if problem := config_problem(settings.mcp_config):
            problems.append(problem)
    return problems


def fernet_key_ok(keys: str) -> bool:
    """Whether `keys` are usable Fernet keys, comma-separated (what KIMIBOT_ENCRYPTION_KEY must hold: the
    first encrypts, the others only decrypt, for a key rotation)."""
    from cryptography.fernet import Fernet

    parts = [k.strip() for k in keys.split(",")]
    try:
        for key in parts:
            Fernet(key.encode())
    except (ValueError, TypeError):
        return False
    return bool(parts)


def _without_password(url: str) -> str:
    """A Redis URL fit for a message: the password (if any) replaced by ***."""
    parsed = urlparse(url)
    if not parsed.password:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


def secrets_from_files(
    env_file: str | Path | None, overrides: dict[str, object]
) -> tuple[dict[str, str], list[str]]:
    """Values of `NAME_FILE` settings (read from the environment or the .env file), and any problems.

    A secret given both directly in the environment and as a file is refused: which one wins would be a
    guess. A value passed in code (`overrides`) needs no file.
    """
    from_dotenv: dict[str, str | None] = {}
    if env_file is not None and Path(env_file).is_file():
        from_dotenv = dotenv_values(env_file)
    values: dict[str, str] = {}
    problems: list[str] = []
    for name in SECRET_SETTINGS:
        if name.lower() in overrides:
            continue
        path = os.environ.get(f"{name}_FILE") or from_dotenv.get(f"{name}_FILE")
        if not path:
            continue
        if os.environ.get(name):
            problems.append(f"{name} and {name}_FILE are both set: keep one.")
            continue
        try:
            values[name.lower()] = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            problems.append(f"{name}_FILE names a file that cannot be read ({path}: {reason}).")
    return values, problems


# Settings only the Slack side reads: a command that never talks to Slack (`kimibot chat`) does not need them
# set, nor right. Every problem sentence starts with its variable's name.
SLACK_ONLY_SETTINGS = (
    "SLACK_",
    "KIMIBOT_ENCRYPTION_KEY",
    "ALLOWED_USERS",
    "ALLOWED_CHANNELS",
    "ADMIN_USERS",
)


def load_settings_without_slack(**overrides: object) -> Settings:
    """`load_settings` for a command that never talks to Slack (`kimibot chat`): problems with the
    Slack-only settings are not reported."""
    return load_settings(**overrides, _slack=False)


def load_settings(**overrides: object) -> Settings:
    """Read and check the settings; raise SettingsError with plain sentences when they cannot work."""
    slack = overrides.pop("_slack", True)
    env_file = overrides.get("_env_file", Settings.model_config.get("env_file"))
    from_files, malformed = secrets_from_files(
        env_file if isinstance(env_file, str | Path) else None, overrides
    )
    overrides = {**from_files, **overrides}
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        bad_fields: dict[str, object] = {}
        for error in exc.errors():
            field_name = str(error["loc"][0]) if error["loc"] else "setting"
            hint = WHERE_TO_GET.get(field_name.upper(), "")
            malformed.append(
                f"{field_name.upper()} is malformed: {error['msg']}."
                + (f" Expected: {hint}." if hint else "")
            )
            if field_name in Settings.model_fields:
                bad_fields[field_name] = Settings.model_fields[field_name].default
        # Read the rest with the bad values replaced by defaults, so missing ones are reported too.
        settings = Settings(**{**overrides, **bad_fields})  # type: ignore[arg-type]
    found = malformed + problems_with(settings)
    if not slack:
        found = [problem for problem in found if not problem.startswith(SLACK_ONLY_SETTINGS)]
    if found:
        raise SettingsError(found, settings)
    return settings
