"""OAuth installs in Redis: our own AsyncInstallationStore and AsyncOAuthStateStore (none maintained exists),
token rotation under a lock, and the one path that turns a team into the bot token to act with.

Keys (see the team's key layout): `kimibot:install:{<id>}:...`, where <id> is the enterprise id of an
org-wide install and the team id otherwise; `kimibot:oauth-state:<state>` for the one-time OAuth states.
The semantics mirror slack_sdk's FileInstallationStore: the latest bot per workspace/org, the latest
installation per workspace/org and per installing user, and an installation read with the latest bot's
token merged in. Values are JSON, Fernet-encrypted whole when KIMIBOT_ENCRYPTION_KEY is set (several
comma-separated keys: the first encrypts, all decrypt; a value read with an older key, or saved unencrypted
before the key was set, is sealed again with the first).

"Not installed" (None) is said only when Redis has no installation. An installation that cannot be used
now (its token expired and cannot be refreshed yet, or it cannot be decrypted) raises
`InstallationUnavailable`: a request gets a 5xx (Slack redelivers), a job runs again later.
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

import aiohttp
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from redis.asyncio import Redis
from slack_sdk.errors import SlackTokenRotationError
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.installation_store.models.bot import Bot
from slack_sdk.oauth.installation_store.models.installation import Installation
from slack_sdk.oauth.state_store.async_state_store import AsyncOAuthStateStore
from slack_sdk.oauth.token_rotation.async_rotator import AsyncTokenRotator
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.acting import TeamBot
from bot.usage import UsageKeys

log = logging.getLogger(__name__)

PREFIX = "kimibot:install"
STATE_PREFIX = "kimibot:oauth-state"
STATE_TTL_S = 600  # Bolt's default: an install started more than 10 minutes ago starts again
ROTATE_BEFORE_S = 120 * 60  # refresh a rotating token when it has less than this left (Bolt's default)
LOCK_TTL_MS = 15_000  # renewed every third of it while the refresh is in flight
REFRESH_TIMEOUT_S = 5  # one oauth.v2.access call, no retries: well under LOCK_TTL_MS
LOCK_WAIT_S = 20.0  # a job (no ack to send) waits this long for another replica's refresh
REQUEST_LOCK_WAIT_S = 1.5  # a request (acked within 3 s) waits this long, and only for an expired token
VALID_MARGIN_S = 60  # a token with less than this left counts as expired (a job must not lose it midway)
ENCRYPTED = "fernet:"

# Delete the lock only if it is still ours (a slow holder must not free a lock another one took since).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Extend the lock only if it is still ours. KEYS: lock. ARGV: holder, ttl ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Store a refreshed bot only if the stored bot is still the one whose refresh token was spent (not a
# reinstall's, nor another refresh's): that comparison is what keeps a newer token. Stored even when the
# lock lapsed meanwhile (Slack has revoked the old pair by now: dropping the new one would strand the
# workspace). KEYS: lock, bot. ARGV: holder, the value read under the lock, the new value.
# -> 1 stored | 2 stored, though the lock had lapsed | 0 the bot changed meanwhile (not stored)
_SAVE_REFRESHED = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 2 end
return 1
"""

# Re-seal a value (read with an older key, or unencrypted) only if it is unchanged and no refresh is in
# flight (a refresh compares the raw value it read). KEYS: lock, key. ARGV: the value read, the new value.
_RESEAL = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""


class InstallationUnavailable(Exception):
    """An installation exists but cannot be used now: not "not installed" (that drops events silently)."""


class Undecryptable(InstallationUnavailable):
    """KIMIBOT_ENCRYPTION_KEY cannot decrypt a stored installation (another key, or none set)."""


class RotationFailed(Exception):
    """A token refresh did not happen now: Slack refused or did not answer, or another replica holds the
    lock. The caller uses the current token while it is valid."""


def install_id(enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None) -> str:
    """Org-wide installs are keyed by enterprise, the rest by team."""
    if is_enterprise_install and enterprise_id:
        return enterprise_id
    return team_id or enterprise_id or "-"


def install_tag(ident: str) -> str:
    return f"{PREFIX}:{{{ident}}}"


def lock_key(ident: str) -> str:
    """The token-rotation lock of an installation (in its hash slot)."""
    return f"{install_tag(ident)}:rotate-lock"


def split_keys(keys: str) -> list[str]:
    """KIMIBOT_ENCRYPTION_KEY's keys: comma-separated, the first one encrypts."""
    return [k.strip() for k in keys.split(",") if k.strip()]


class Sealer:
    """JSON in and out of Redis, Fernet-encrypted when a key is given (the whole value, tokens included).
    Several keys rotate: the first encrypts, any decrypts (MultiFernet)."""

    def __init__(self, key: str = "") -> None:
        keys = [Fernet(k.encode()) for k in split_keys(key)]
        self.primary = keys[0] if keys else None
        self.fernet = MultiFernet(keys) if keys else None

    def seal(self, data: dict[str, Any]) -> str:
        text = json.dumps(data, separators=(",", ":"))
        if self.fernet is None:
            return text
        return ENCRYPTED + self.fernet.encrypt(text.encode()).decode()

    def open(self, raw: str | bytes | None) -> dict[str, Any] | None:
        """The value's data (None: no value). Raises Undecryptable when it cannot be read."""
        return self.open_stale(raw)[0]

    def open_stale(self, raw: str | bytes | None) -> tuple[dict[str, Any] | None, bool]:
        """The value's data, and whether it should be sealed again (read with an older key, or stored
        unencrypted while a key is set)."""
        if raw is None:
            return None, False
        text = raw.decode() if isinstance(raw, bytes) else raw
        stale = False
        if text.startswith(ENCRYPTED):
            if self.fernet is None or self.primary is None:
                raise Undecryptable("an installation is encrypted but KIMIBOT_ENCRYPTION_KEY is not set")
            token = text[len(ENCRYPTED) :].encode()
            try:
                text = self.primary.decrypt(token).decode()
            except InvalidToken:
                try:
                    text = self.fernet.decrypt(token).decode()
                except InvalidToken:
                    raise Undecryptable(
                        "an installation cannot be decrypted with KIMIBOT_ENCRYPTION_KEY (stored with "
                        "another key? list the old key after the new one, comma-separated)"
                    ) from None
                stale = True
        else:
            stale = self.fernet is not None
        try:
            data = json.loads(text)
        except ValueError:
            raise Undecryptable("an installation is neither JSON nor encrypted (garbled?)") from None
        if not isinstance(data, dict):
            raise Undecryptable("an installation is not a JSON object (garbled?)")
        return data, stale


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

    async def read(self, ident: str, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """A stored value's data and its raw value; one read with an older key (or unencrypted while a
        key is set) is sealed again with the first key."""
        raw = await self.redis.get(key)
        data, stale = self.sealer.open_stale(raw)
        if stale and data is not None and raw is not None:
            sealed = self.sealer.seal(data)
            if await self.redis.eval(_RESEAL, 2, lock_key(ident), key, raw, sealed):  # type: ignore[misc]
                log.info("an installation was sealed again with the first KIMIBOT_ENCRYPTION_KEY")
                raw = sealed
        return data, (raw.decode() if isinstance(raw, bytes) else raw)

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
        # Installed again after an uninstall: its usage is recorded again (an org-wide install: that of the
        # workspaces it still points to; the others' marks go when they are next served, see point_to_org).
        teams = {bot.team_id} if bot.team_id else set()
        if bot.is_enterprise_install and bot.enterprise_id:
            teams |= await self.teams_of_org(bot.enterprise_id)
        for team in sorted(teams):
            await self.redis.delete(UsageKeys(team).gone)

    async def teams_of_org(self, enterprise_id: str) -> set[str]:
        """The workspaces an org-wide install has served (their `org` pointers)."""
        teams: set[str] = set()
        async for key in self.redis.scan_iter(match=f"{PREFIX}:*:org", count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            value = await self.redis.get(name)
            if (value.decode() if isinstance(value, bytes) else value) == enterprise_id:
                teams.add(name.split("{", 1)[1].split("}", 1)[0])
        return teams

    async def point_to_org(self, team_id: str, enterprise_id: str) -> None:
        """Note that the org's install serves this workspace (a job knows only the team). Newly noted (an
        org-wide reinstall, or access granted again after team_access_revoked): the workspace's usage is
        recorded again."""
        before = await self.redis.set(self.org_key(team_id), enterprise_id, get=True)
        if (before.decode() if isinstance(before, bytes) else before) != enterprise_id:
            await self.redis.delete(UsageKeys(team_id).gone)

    async def async_find_bot(
        self,
        *,
        enterprise_id: str | None,
        team_id: str | None,
        is_enterprise_install: bool | None = False,
    ) -> Bot | None:
        ident = install_id(enterprise_id, team_id, is_enterprise_install)
        data, _ = await self.read(ident, self.bot_key(ident))
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
        data, _ = await self.read(ident, self.installer_key(ident, user_id))
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
    """One-time, expiring OAuth states (kept in Redis, and bound to the browser by Bolt's cookie). With
    SLACK_STATE_SECRET each is also signed, so a forged one is refused without a Redis read; without it
    the Redis entry alone decides (so any replica can finish an install another began). Consuming deletes
    it, so a replayed one is refused too."""

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

    def _sign(self, nonce: str) -> bytes:
        return hmac.new(self.secret, nonce.encode(), hashlib.sha256).hexdigest()[:32].encode()

    async def async_issue(self, *args: Any, **kwargs: Any) -> str:
        nonce = secrets.token_urlsafe(24)
        state = f"{nonce}.{self._sign(nonce).decode()}" if self.secret else nonce
        await self.redis.set(self.key(state), str(int(time.time())), ex=self.expiration_seconds)
        return state

    async def async_consume(self, state: str) -> bool:
        state = state or ""
        if not state:
            return False
        if self.secret:
            nonce, _, signature = state.partition(".")
            # Bytes: a state with non-ASCII characters is refused, not a TypeError (a 500).
            if not nonce or not hmac.compare_digest(signature.encode(), self._sign(nonce)):
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
        lock_ttl_ms: int = LOCK_TTL_MS,
        refresh_timeout_s: float = REFRESH_TIMEOUT_S,
    ) -> None:
        self.store = store
        self.redis = store.redis
        self.client = client  # the OAuth flow's code exchange
        # The refresh has its own client: no retry handlers and a timeout well under the lock's TTL, so a
        # refresh never outlives the lock that makes it the only one spending the refresh token.
        rotating_client = AsyncWebClient(
            base_url=client.base_url, timeout=max(1, int(refresh_timeout_s)), retry_handlers=[]
        )
        self.rotator = AsyncTokenRotator(
            client_id=client_id, client_secret=client_secret, client=rotating_client
        )
        self.rotate_before_s = rotate_before_s
        self.lock_ttl_ms = lock_ttl_ms
        self.refresh_timeout_s = refresh_timeout_s
        # Refreshes in flight: requests' (not waited for) and every call-and-store (shielded from its
        # caller's cancellation: once the refresh token is spent, the new pair must be stored).
        self._background: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        """Shutdown: let the refreshes in flight finish and store their tokens (a refresh Slack processed
        has revoked the old pair: cancelling it would strand the workspace); bounded by one call's time."""
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=self.close_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    @property
    def close_timeout_s(self) -> float:
        """How long close() may wait: one refresh call, and its store."""
        return self.refresh_timeout_s + 1

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def lock_key(ident: str) -> str:
        return lock_key(ident)

    async def teams_of_org(self, enterprise_id: str) -> set[str]:
        """The workspaces an org-wide install has served (their `org` pointers), for its uninstall."""
        return await self.store.teams_of_org(enterprise_id)

    async def seed(self, token: str, auth: dict[str, Any]) -> bool:
        """SLACK_BOT_TOKEN beside the app credentials: its workspace is served like an installed one. An
        installation is made from its auth.test answer when that workspace has none (an OAuth install of
        it wins, now or later). True when one was made."""
        team_id = str(auth.get("team_id") or "")
        if not team_id:
            return False
        enterprise_id = str(auth.get("enterprise_id") or "") or None
        org_wide = bool(auth.get("is_enterprise_install")) and enterprise_id is not None
        bot = Bot(
            app_id=str(auth.get("app_id") or "") or None,
            enterprise_id=enterprise_id,
            team_id=None if org_wide else team_id,
            bot_token=token,
            bot_id=str(auth.get("bot_id") or ""),
            bot_user_id=str(auth.get("user_id") or ""),
            is_enterprise_install=org_wide,
            installed_at=time.time(),
        )
        key = self.store.bot_key(install_id(enterprise_id, team_id, org_wide))
        return bool(await self.redis.set(key, self.store.sealer.seal(dict(bot.__dict__)), nx=True))

    async def delete(self, enterprise_id: str | None, team_id: str | None) -> None:
        """Delete an installation (team_id None: the org-wide install of the enterprise): its bot, its
        installers, its rotation lock, and a workspace's pointer to its org's install."""
        await self.store.async_delete_all(enterprise_id=enterprise_id, team_id=team_id)
        await self.redis.delete(lock_key(install_id(enterprise_id, team_id, not team_id)))
        if team_id:
            await self.redis.delete(self.store.org_key(team_id))

    async def has_own_install(self, team_id: str) -> bool:
        """Whether a workspace has a bot installed of its own (not only through its org's install)."""
        return bool(await self.redis.exists(self.store.bot_key(team_id)))

    async def installed_after(self, enterprise_id: str | None, team_id: str | None, when: float) -> bool:
        """Whether the installation (team_id None: org-wide) is newer than `when` (an event's time): an
        uninstall event older than a reinstall must not delete it."""
        if not when:
            return False
        bot = await self.store.async_find_bot(
            enterprise_id=enterprise_id, team_id=team_id, is_enterprise_install=not team_id
        )
        return bot is not None and bot.installed_at is not None and bot.installed_at > when + 1

    async def bot_for(
        self, enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None
    ) -> TeamBot | None:
        """The bot to act with for a request from Slack (ids from its payload); None: not installed.
        Raises InstallationUnavailable when installed but without a usable token now."""
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
            await self.store.point_to_org(team_id, bot.enterprise_id)
        return await self._usable(bot, team_id, wait_s=REQUEST_LOCK_WAIT_S, in_background=True)

    async def bot_for_team(self, team_id: str) -> TeamBot | None:
        """The bot to act with for a job of `team_id` (run outside any request). None: not installed;
        InstallationUnavailable: installed, no usable token now (the job runs again later)."""
        bot = await self.store.async_find_bot(enterprise_id=None, team_id=team_id)
        if bot is None:
            enterprise = await self.redis.get(self.store.org_key(team_id))
            if enterprise:
                enterprise_id = enterprise.decode() if isinstance(enterprise, bytes) else str(enterprise)
                bot = await self.store.async_find_bot(
                    enterprise_id=enterprise_id, team_id=team_id, is_enterprise_install=True
                )
        return await self._usable(bot, team_id, wait_s=LOCK_WAIT_S) if bot is not None else None

    @staticmethod
    def _valid(bot: Bot) -> bool:
        expires = bot.bot_token_expires_at
        return expires is None or expires - time.time() > VALID_MARGIN_S

    async def _usable(
        self, bot: Bot, team_id: str | None, *, wait_s: float, in_background: bool = False
    ) -> TeamBot | None:
        """Refresh a token due for it. While the current token is valid, a refresh that fails or is
        another replica's (lock busy: not waited for) leaves it in use, and a request (`in_background`)
        does not wait for the refresh at all; an expired token waits up to `wait_s` for the refresh, then
        raises InstallationUnavailable."""
        if (
            bot.bot_token_expires_at is not None
            and bot.bot_token_expires_at - time.time() < self.rotate_before_s
        ):
            valid = self._valid(bot)
            if valid and in_background:
                self._track(asyncio.create_task(self._refresh_quietly(bot, team_id)))
                return self._team_bot(bot, team_id)
            try:
                refreshed = await self.refresh(bot, wait_s=0.0 if valid else wait_s)
            except RotationFailed as exc:
                if not valid:
                    raise InstallationUnavailable(
                        f"the bot token expired and was not refreshed: {exc}"
                    ) from exc
                log.warning(
                    "bot token not refreshed now; the current one is used while it is valid",
                    extra={"team_id": team_id, "why": str(exc)},
                )
                refreshed = bot
            if refreshed is None:
                return None  # uninstalled meanwhile
            if not self._valid(refreshed):
                raise InstallationUnavailable("the bot token expired and was not refreshed")
            bot = refreshed
        return self._team_bot(bot, team_id)

    @staticmethod
    def _team_bot(bot: Bot, team_id: str | None) -> TeamBot:
        return TeamBot(
            token=str(bot.bot_token),
            team_id=team_id or bot.team_id or "",
            user_id=bot.bot_user_id or "",
            bot_id=bot.bot_id or "",
            enterprise_id=bot.enterprise_id or "",
        )

    async def _refresh_quietly(self, bot: Bot, team_id: str | None) -> None:
        """A request's refresh, beside it (the token in use is still valid): a failure is logged only."""
        try:
            await self.refresh(bot, wait_s=0.0)
        except RotationFailed as exc:
            log.warning(
                "bot token not refreshed now; the current one is used while it is valid",
                extra={"team_id": team_id, "why": str(exc)},
            )
        except Exception:  # Redis trouble, a bug: the next use tries again
            log.exception("bot token refresh failed", extra={"team_id": team_id})

    async def refresh(self, bot: Bot, *, wait_s: float = LOCK_WAIT_S) -> Bot | None:
        """Spend the refresh token once, whatever the number of replicas: the lock's holder refreshes and
        stores; the others wait (up to `wait_s`) for the lock to go and re-read the stored, refreshed bot.
        None: uninstalled meanwhile. Raises RotationFailed when no refresh happened now."""
        ident = install_id(bot.enterprise_id, bot.team_id, bot.is_enterprise_install)
        lock = self.lock_key(ident)
        mine = secrets.token_hex(8)
        deadline = time.monotonic() + wait_s
        waited = False
        while not await self.redis.set(lock, mine, nx=True, px=self.lock_ttl_ms):
            if time.monotonic() >= deadline:
                raise RotationFailed("another replica is refreshing the token")
            waited = True
            await asyncio.sleep(0.05)
        # Holding the lock from here: re-read, call Slack, store, unlock, whatever happens to our caller
        # (a job cancelled at shutdown must not drop a token pair Slack has already issued).
        locked = asyncio.create_task(self._refresh_locked(bot, ident, mine, waited))
        self._track(locked)
        return await asyncio.shield(locked)

    async def _refresh_locked(self, bot: Bot, ident: str, mine: str, waited: bool) -> Bot | None:
        """refresh() with the lock held: the rest of it, then unlock."""
        lock = self.lock_key(ident)
        bot_key = self.store.bot_key(ident)
        renewing = asyncio.create_task(self._renew(lock, mine))
        try:
            # Re-read under the lock: another replica may have refreshed it while we waited.
            data, raw = await self.store.read(ident, bot_key)
            if data is None or raw is None:
                return None  # uninstalled meanwhile
            current = Bot(**data)
            expires = current.bot_token_expires_at
            if expires is None or expires - time.time() >= self.rotate_before_s:
                return current
            if waited and current.bot_refresh_token != bot.bot_refresh_token and self._valid(current):
                return current  # refreshed by the replica we waited for, if not quite as far ahead
            try:
                refreshed = await self.rotator.perform_bot_token_rotation(
                    bot=current, minutes_before_expiration=int(self.rotate_before_s // 60) + 1
                )
            except SlackTokenRotationError as exc:
                log.error("bot token refresh refused by Slack", extra={"install": ident, "error": str(exc)})
                raise RotationFailed(f"Slack refused the refresh ({exc})") from exc
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.warning("bot token refresh failed", extra={"install": ident, "error": repr(exc)})
                raise RotationFailed(f"Slack did not answer the refresh ({type(exc).__name__})") from exc
            if refreshed is None:
                return current
            stored = await self.redis.eval(  # type: ignore[misc]
                _SAVE_REFRESHED, 2, lock, bot_key, mine, raw, self.store.sealer.seal(dict(refreshed.__dict__))
            )
            if int(stored) == 2:
                log.warning("refreshed token stored after the lock lapsed", extra={"install": ident})
            if int(stored) == 0:
                # The bot changed meanwhile (a reinstall, another refresh): the stored one is the newer.
                log.warning("refreshed token not stored: the installation changed", extra={"install": ident})
                latest, _ = await self.store.read(ident, bot_key)
                return Bot(**latest) if latest is not None else None
            log.info("bot token refreshed", extra={"install": ident})
            return refreshed
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            await self.redis.eval(_UNLOCK, 1, lock, mine)  # type: ignore[misc]

    async def _renew(self, lock: str, mine: str) -> None:
        """Keep the lock while the refresh is in flight (a third of its TTL at a time)."""
        while True:
            await asyncio.sleep(self.lock_ttl_ms / 3000)
            if not await self.redis.eval(_RENEW, 1, lock, mine, self.lock_ttl_ms):  # type: ignore[misc]
                return
