"""OAuth installs in Redis: our own AsyncInstallationStore and AsyncOAuthStateStore (none maintained exists),
token rotation under a lock, and the one path that turns a team into the bot token to act with.

Keys (see the team's key layout): `kimibot:install:{<id>}:...`, where <id> is the enterprise id of an
org-wide install and the team id otherwise; `kimibot:oauth-state:<state>` for the one-time OAuth states.
The semantics mirror slack_sdk's FileInstallationStore: the latest bot per workspace/org, the latest
installation per workspace/org and per installing user, and an installation read with the latest bot's
token merged in. Values are JSON, Fernet-encrypted whole when KIMIBOT_ENCRYPTION_KEY is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from redis.asyncio import Redis
from slack_sdk.errors import SlackTokenRotationError
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.installation_store.models.bot import Bot
from slack_sdk.oauth.installation_store.models.installation import Installation
from slack_sdk.oauth.state_store.async_state_store import AsyncOAuthStateStore
from slack_sdk.oauth.token_rotation.async_rotator import AsyncTokenRotator
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.acting import TeamBot

log = logging.getLogger(__name__)

PREFIX = "kimibot:install"
STATE_PREFIX = "kimibot:oauth-state"
STATE_TTL_S = 600  # Bolt's default: an install started more than 10 minutes ago starts again
ROTATE_BEFORE_S = 120 * 60  # refresh a rotating token when it has less than this left (Bolt's default)
LOCK_TTL_MS = 15_000  # one refresh's HTTP round trip, with room
LOCK_WAIT_S = 20.0
ENCRYPTED = "fernet:"

# Delete the lock only if it is still ours (a slow holder must not free a lock another one took since).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def install_id(enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None) -> str:
    """Org-wide installs are keyed by enterprise, the rest by team."""
    if is_enterprise_install and enterprise_id:
        return enterprise_id
    return team_id or enterprise_id or "-"


def install_tag(ident: str) -> str:
    return f"{PREFIX}:{{{ident}}}"


class Sealer:
    """JSON in and out of Redis, Fernet-encrypted when a key is given (the whole value, tokens included)."""

    def __init__(self, key: str = "") -> None:
        self.fernet = Fernet(key.encode()) if key else None

    def seal(self, data: dict[str, Any]) -> str:
        text = json.dumps(data, separators=(",", ":"))
        if self.fernet is None:
            return text
        return ENCRYPTED + self.fernet.encrypt(text.encode()).decode()

    def open(self, raw: str | bytes | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        if text.startswith(ENCRYPTED):
            if self.fernet is None:
                log.error("an installation is encrypted but KIMIBOT_ENCRYPTION_KEY is not set")
                return None
            try:
                text = self.fernet.decrypt(text[len(ENCRYPTED) :].encode()).decode()
            except InvalidToken:
                log.error("an installation cannot be decrypted with KIMIBOT_ENCRYPTION_KEY (another key?)")
                return None
        data = json.loads(text)
        return data if isinstance(data, dict) else None


class RedisInstallationStore(AsyncInstallationStore):  # type: ignore[misc]
    """Installations and bots in Redis, like slack_sdk's FileInstallationStore (latest only, no history)."""

    def __init__(self, redis: Redis, sealer: Sealer | None = None) -> None:
        self.redis = redis
        self.sealer = sealer or Sealer()
        self._logger = log

    @property
    def logger(self) -> logging.Logger:
        return self._logger

    @staticmethod
    def bot_key(ident: str) -> str:
        return f"{install_tag(ident)}:bot"

    @staticmethod
    def installer_key(ident: str, user_id: str | None = None) -> str:
        return f"{install_tag(ident)}:installer" + (f":{user_id}" if user_id else "")

    @staticmethod
    def org_key(team_id: str) -> str:
        """A workspace served by its org's install: which enterprise (the worker knows only the team)."""
        return f"{install_tag(team_id)}:org"

    async def async_save(self, installation: Installation) -> None:
        ident = install_id(
            installation.enterprise_id, installation.team_id, installation.is_enterprise_install
        )
        await self.async_save_bot(installation.to_bot())
        value = self.sealer.seal(dict(installation.__dict__))  # as FileInstallationStore
        await self.redis.set(self.installer_key(ident), value)
        await self.redis.set(self.installer_key(ident, installation.user_id or "-"), value)

    async def async_save_bot(self, bot: Bot) -> None:
        if bot.bot_token is None:
            return  # as FileInstallationStore: nothing to keep without a bot token
        ident = install_id(bot.enterprise_id, bot.team_id, bot.is_enterprise_install)
        await self.redis.set(self.bot_key(ident), self.sealer.seal(dict(bot.__dict__)))

    async def async_find_bot(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        is_enterprise_install: bool | None = False,
    ) -> Bot | None:
        data = self.sealer.open(
            await self.redis.get(self.bot_key(install_id(enterprise_id, team_id, is_enterprise_install)))
        )
        return Bot(**data) if data is not None else None

    async def async_find_installation(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        user_id: str | None = None,
        is_enterprise_install: bool | None = False,
    ) -> Installation | None:
        ident = install_id(enterprise_id, team_id, is_enterprise_install)
        data = self.sealer.open(await self.redis.get(self.installer_key(ident, user_id)))
        if data is None:
            return None
        installation = Installation(**data)
        if user_id is not None or installation.bot_token is None:
            # The latest bot token, as FileInstallationStore does (bolt-python#664)
            latest = await self.async_find_bot(
                enterprise_id=enterprise_id, team_id=team_id, is_enterprise_install=is_enterprise_install
            )
            if latest is not None and installation.bot_token != latest.bot_token:
                installation.bot_id = latest.bot_id
                installation.bot_user_id = latest.bot_user_id
                installation.bot_token = latest.bot_token
                installation.bot_scopes = latest.bot_scopes
                installation.bot_refresh_token = latest.bot_refresh_token
                installation.bot_token_expires_at = latest.bot_token_expires_at
        return installation

    async def async_delete_bot(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        # As Bolt calls it: team_id None means the org-wide install of the enterprise.
        await self.redis.delete(self.bot_key(install_id(enterprise_id, team_id, not team_id)))

    async def async_delete_installation(
        self, *, enterprise_id: str | None, team_id: str | None, user_id: str | None = None
    ) -> None:
        ident = install_id(enterprise_id, team_id, not team_id)  # team_id None: the org-wide install
        if user_id is not None:
            await self.redis.delete(self.installer_key(ident, user_id))
            return
        keys = [self.installer_key(ident)]
        async for key in self.redis.scan_iter(match=f"{self.installer_key(ident)}:*", count=500):
            keys.append(key.decode() if isinstance(key, bytes) else str(key))
        for key in keys:
            await self.redis.delete(key)

    async def count(self) -> int:
        """How many workspaces/orgs have a bot installed (kimibot doctor, start-up)."""
        found = 0
        async for _ in self.redis.scan_iter(match=f"{PREFIX}:*:bot", count=500):
            found += 1
        return found


class RedisOAuthStateStore(AsyncOAuthStateStore):  # type: ignore[misc]
    """One-time, expiring OAuth states. Each is signed with SLACK_STATE_SECRET, so a forged one is refused
    without a Redis read; consuming deletes it, so a replayed one is refused too."""

    def __init__(self, redis: Redis, secret: str, expiration_seconds: int = STATE_TTL_S) -> None:
        self.redis = redis
        self.secret = secret.encode()
        self.expiration_seconds = expiration_seconds

    @property
    def logger(self) -> logging.Logger:
        return log

    @staticmethod
    def key(state: str) -> str:
        return f"{STATE_PREFIX}:{state}"

    def _sign(self, nonce: str) -> str:
        return hmac.new(self.secret, nonce.encode(), hashlib.sha256).hexdigest()[:32]

    async def async_issue(self, *args: Any, **kwargs: Any) -> str:
        nonce = secrets.token_urlsafe(24)
        state = f"{nonce}.{self._sign(nonce)}"
        await self.redis.set(self.key(state), str(int(time.time())), ex=self.expiration_seconds)
        return state

    async def async_consume(self, state: str) -> bool:
        nonce, _, signature = (state or "").partition(".")
        if not nonce or not hmac.compare_digest(signature, self._sign(nonce)):
            return False
        return bool(await self.redis.delete(self.key(state)))


class Installations:
    """The one path from (enterprise, team) to a bot token: read the installation, refresh a rotating token
    shortly before it expires (one replica at a time, under a Redis lock), and say who the bot is."""

    def __init__(
        self,
        store: RedisInstallationStore,
        *,
        client_id: str,
        client_secret: str,
        client: AsyncWebClient,
        rotate_before_s: float = ROTATE_BEFORE_S,
    ) -> None:
        self.store = store
        self.redis = store.redis
        self.rotator = AsyncTokenRotator(client_id=client_id, client_secret=client_secret, client=client)
        self.rotate_before_s = rotate_before_s

    @staticmethod
    def lock_key(ident: str) -> str:
        return f"{install_tag(ident)}:rotate-lock"

    async def teams_of_org(self, enterprise_id: str) -> set[str]:
        """The workspaces an org-wide install has served (their `org` pointers), for its uninstall."""
        teams: set[str] = set()
        async for key in self.redis.scan_iter(match=f"{PREFIX}:*:org", count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            value = await self.redis.get(name)
            if (value.decode() if isinstance(value, bytes) else value) == enterprise_id:
                teams.add(name.split("{", 1)[1].split("}", 1)[0])
        return teams

    async def bot_for(
        self, enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None
    ) -> TeamBot | None:
        """The bot to act with for a request from Slack (ids from its payload); None: not installed."""
        bot = await self.store.async_find_bot(
            enterprise_id=enterprise_id, team_id=team_id, is_enterprise_install=is_enterprise_install
        )
        if bot is None and enterprise_id and not is_enterprise_install:
            bot = await self.store.async_find_bot(
                enterprise_id=enterprise_id, team_id=team_id, is_enterprise_install=True
            )
        if bot is None:
            return None
        if bot.is_enterprise_install and team_id and bot.enterprise_id:
            # So that a job of this workspace (which knows only the team) finds the org's install.
            await self.redis.set(self.store.org_key(team_id), bot.enterprise_id)
        return await self._usable(bot, team_id)

    async def bot_for_team(self, team_id: str) -> TeamBot | None:
        """The bot to act with for a job of `team_id` (run outside any request)."""
        bot = await self.store.async_find_bot(enterprise_id=None, team_id=team_id)
        if bot is None:
            enterprise = await self.redis.get(self.store.org_key(team_id))
            if enterprise:
                enterprise_id = enterprise.decode() if isinstance(enterprise, bytes) else str(enterprise)
                bot = await self.store.async_find_bot(
                    enterprise_id=enterprise_id, team_id=team_id, is_enterprise_install=True
                )
        return await self._usable(bot, team_id) if bot is not None else None

    async def _usable(self, bot: Bot, team_id: str | None) -> TeamBot | None:
        if (
            bot.bot_token_expires_at is not None
            and bot.bot_token_expires_at - time.time() < self.rotate_before_s
        ):
            refreshed = await self.refresh(bot)
            if refreshed is None:
                return None
            bot = refreshed
        return TeamBot(
            token=str(bot.bot_token),
            team_id=team_id or bot.team_id or "",
            user_id=bot.bot_user_id or "",
            bot_id=bot.bot_id or "",
            enterprise_id=bot.enterprise_id or "",
        )

    async def refresh(self, bot: Bot) -> Bot | None:
        """Spend the refresh token once, whatever the number of replicas: the lock's holder refreshes and
        stores; the others wait for the lock to go and re-read the stored, refreshed bot."""
        ident = install_id(bot.enterprise_id, bot.team_id, bot.is_enterprise_install)
        lock = self.lock_key(ident)
        mine = secrets.token_hex(8)
        deadline = time.monotonic() + LOCK_WAIT_S
        while not await self.redis.set(lock, mine, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                log.warning("token refresh lock not released in time", extra={"install": ident})
                return None
            await asyncio.sleep(0.05)
        try:
            # Re-read under the lock: another replica may have refreshed it while we waited.
            current = await self.store.async_find_bot(
                enterprise_id=bot.enterprise_id,
                team_id=bot.team_id,
                is_enterprise_install=bot.is_enterprise_install,
            )
            if current is None:
                return None  # uninstalled meanwhile
            expires = current.bot_token_expires_at
            if expires is None or expires - time.time() >= self.rotate_before_s:
                return current
            try:
                refreshed = await self.rotator.perform_bot_token_rotation(
                    bot=current, minutes_before_expiration=int(self.rotate_before_s // 60) + 1
                )
            except SlackTokenRotationError as exc:
                log.error("bot token refresh refused by Slack", extra={"install": ident, "error": str(exc)})
                return None
            if refreshed is None:
                return current
            await self.store.async_save_bot(refreshed)
            log.info("bot token refreshed", extra={"install": ident})
            return refreshed
        finally:
            await self.redis.eval(_UNLOCK, 1, lock, mine)  # type: ignore[misc]
