"""kimibot's one Redis client: a single Redis or a Redis Cluster, with timeouts that answer Slack in time.

`REDIS_CLUSTER=auto` (the default) asks the server at `REDIS_URL` once, when the client is built, whether
it is a cluster node (`INFO cluster` -> `cluster_enabled:1`). It asks with a short synchronous probe
(one attempt, 1 s to connect, 1 s to answer) because `build_deps` is synchronous and every caller uses the
client right after; a client that decides lazily would have to defer `pipeline()` and every other
synchronous call as well, for the sake of the first few milliseconds. If Redis cannot be reached at that
moment, the client is built for a single Redis and a warning says how to make the choice explicit
(`REDIS_CLUSTER=true`); a cluster needs `REDIS_CLUSTER=true` (or a restart once Redis is up) in that case.

Timeouts: every call gives up after `SOCKET_TIMEOUT_S` without an answer (redis-py's default is 5 s, and its
default Retry would repeat a timed-out call up to 10 times). A timed-out call is not repeated: the caller
sees `redis.exceptions.TimeoutError` within ~2 s and can answer Slack 503 in time. A dropped connection
is retried once, at once, on a new connection (a server restart leaves stale pooled connections).
Blocking commands (BLPOP, XREADGROUP BLOCK) must wait at most `MAX_BLOCK_S`, less than the read timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from copy import copy
from typing import Any, Literal, cast
from urllib.parse import urlparse

import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import AbstractStrategy, ClusterPipeline, RedisCluster, TransactionStrategy
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 2.0  # longest wait for any one answer from Redis
CONNECT_TIMEOUT_S = 1.0  # longest wait for a new connection
MAX_BLOCK_S = 1.0  # longest timeout a blocking command may ask for; below SOCKET_TIMEOUT_S
HEALTH_CHECK_S = 30  # PING a pooled connection idle for this long before using it again
PROBE_TIMEOUT_S = 1.0
# Connections per process to a single Redis (redis-py's default pool size). A caller that finds them all in
# use waits for one, up to SOCKET_TIMEOUT_S: a burst of events (300 answers starting at once) queues for a
# moment instead of failing with "Too many connections" (a 503 to Slack, a job run again).
POOL_SIZE = 100

ClusterSetting = Literal["auto", "true", "false"]
CLUSTER_RETRIED = (ConnectionError, ClusterDownError, SlotNotCoveredError)  # not TimeoutError


def _slot_without_io(client: RedisCluster, args: tuple[Any, ...]) -> int | None:
    """The slot a command goes to, when working it out needs no round trip (None otherwise): always so for
    EVAL and for commands at fixed key positions once the client has loaded the server's command table."""
    name = str(args[0]).upper()
    if name not in ("EVAL", "EVALSHA"):
        commands = client.commands_parser.commands
        spec: Any = commands.get(name.lower()) or commands.get(name.lower().split(" ")[0])
        if client._initialize or not isinstance(spec, dict) or "movablekeys" in spec.get("flags", ()):
            return None
    coro = client._determine_slot(*args)
    try:
        coro.send(None)
    except StopIteration as done:
        return int(done.value)
    coro.close()  # it wanted a round trip after all
    return None


class _InlineTransaction(TransactionStrategy):
    """MULTI/EXEC on a cluster, queued in place.

    redis-py 8.1 queues each command of a cluster transaction by running `asyncio.run()` in a new thread (its
    queueing API is synchronous, finding a command's slot is not), blocking the event loop meanwhile: a
    4-command transaction took 7.3 ms instead of 0.7 ms. When the slot is known without a round trip it is
    queued here directly; anything else (WATCH, keys only the server can find) goes redis-py's way."""

    def __init__(self, pipe: ClusterPipeline) -> None:
        super().__init__(pipe)
        # Retry what the client retries (not a timed-out EXEC), plus redirections.
        self._retry = copy(pipe.cluster_client.retry)
        errors: list[Any] = [ConnectionError, ClusterDownError, SlotNotCoveredError]
        errors += [AskError, MovedError]  # CLUSTER_RETRIED, plus redirections
        self._retry.update_supported_errors(errors)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if not self._watching and args[0] not in self.IMMEDIATE_EXECUTE_COMMANDS | self.NO_SLOTS_COMMANDS:
            slot = _slot_without_io(self._pipe.cluster_client, args)
            if slot is not None:
                self._pipeline_slots.add(slot)
                return AbstractStrategy.execute_command(self, *args, **kwargs)
        return super().execute_command(*args, **kwargs)


class KimibotRedisCluster(RedisCluster):
    """redis-py's async RedisCluster with three changes: a timed-out command or transaction is not repeated
    (it still re-maps and retries once after a dropped connection or during a failover), so a silent node
    costs one socket timeout, not eleven, and is asked last when the cluster map is loaded again; the map
    is loaded before a command's slot is worked out; and MULTI/EXEC is queued in place
    (`_InlineTransaction`). Pipelines without a transaction still repeat
    a timed-out batch once (redis-py hard-codes that)."""

    ERRORS_ALLOW_RETRY = CLUSTER_RETRIED  # type: ignore[assignment]

    _last_failed: str | None = None  # the node that last timed out or dropped us: asked last when re-mapping

    async def initialize(
        self,
        additional_startup_nodes_info: list[tuple[str, int]] | None = None,
        last_failed_node_name: str | None = None,
    ) -> RedisCluster:
        # redis-py asks the nodes for the cluster map in random order; a silent node asked first would cost
        # a second timeout right after the first one.
        return await super().initialize(
            additional_startup_nodes_info, last_failed_node_name or self._last_failed
        )

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py 8.1 works out a command's slot before it makes sure the cluster map and its command
        # table are loaded; a two-word command (XGROUP CREATE, ...) sent while another call is still
        # loading them fails with "No way to dispatch this command ... Missing key". Load them first.
        if self._initialize:
            await self.initialize()
        try:
            return await super().execute_command(*args, **kwargs)
        except (ConnectionError, RedisTimeoutError) as exc:
            self._last_failed = getattr(exc, "last_failed_node_name", None) or self._last_failed
            raise

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        pipe = super().pipeline(transaction, shard_hint)
        if transaction:
            pipe._execution_strategy = _InlineTransaction(pipe)
        return pipe


def _retry() -> Retry:
    return Retry(NoBackoff(), retries=1, supported_errors=(ConnectionError,))


# Who we are in CLIENT SETINFO, resolved once: redis-py otherwise reads its own package metadata for every
# new connection (~1 ms of CPU each, 30 of them when a burst of events first fills the pool).
_DRIVER_INFO = DriverInfo()


def _common_options() -> dict[str, Any]:
    return {
        "driver_info": _DRIVER_INFO,
        "decode_responses": True,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_S,
        "retry": _retry(),
    }


def probe_cluster(url: str) -> bool | None:
    """Is the server at `url` a Redis Cluster node? None when it cannot be reached (or will not say)."""
    if urlparse(url).scheme == "unix":
        return False  # Redis Cluster does not serve unix sockets
    client = redis.Redis.from_url(
        url,
        socket_timeout=PROBE_TIMEOUT_S,
        socket_connect_timeout=PROBE_TIMEOUT_S,
        retry=SyncRetry(NoBackoff(), retries=0),
    )
    client.connection_pool.connection_kwargs["db"] = 0  # a cluster node refuses SELECT n
    try:
        try:
            info = client.info("cluster")
            return bool(int(info.get("cluster_enabled") or 0))
        except ResponseError:  # INFO not allowed (ACLs, some managed services): ask CLUSTER itself
            try:
                client.execute_command("CLUSTER", "MYID")  # type: ignore[no-untyped-call]
                return True
            except ResponseError as exc:
                return False if "cluster support disabled" in str(exc).lower() else None
    except RedisError as exc:
        log.warning(
            "could not ask Redis whether it is a cluster; using it as a single Redis "
            "(set REDIS_CLUSTER=true or false to skip the question)",
            extra={"error": f"{type(exc).__name__}: {exc}"},
        )
        return None
    finally:
        client.close()


class UnprobedRedis(Redis):
    """The single-Redis client built when `REDIS_CLUSTER=auto` could not ask Redis at start. Once Redis
    answers, it asks again (once) and, should REDIS_URL be a cluster node after all, says so in an ERROR
    line naming the setting instead of leaving the admin with MOVED errors."""

    _asked = False

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        try:
            result = await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except ResponseError:  # Redis answered (MOVED among others)
            await self._ask_once()
            raise
        await self._ask_once()
        return result

    async def _ask_once(self) -> None:
        if self._asked:
            return
        self._asked = True
        try:
            info = await super().execute_command("INFO", "cluster")  # type: ignore[no-untyped-call]
        except RedisError:
            return
        if isinstance(info, dict) and int(info.get("cluster_enabled") or 0):
            log.error(
                "REDIS_URL is a Redis Cluster node, but it could not be reached when kimibot started, so it "
                "is being used as a single Redis and commands for other nodes fail: restart kimibot, or set "
                "REDIS_CLUSTER=true"
            )


def use_cluster(url: str, setting: ClusterSetting) -> bool | None:
    """Whether to use the cluster client; None when `auto` could not find out."""
    if setting != "auto":
        return setting == "true"
    return probe_cluster(url)


def database_of(url: str) -> int:
    """The logical database a redis:// URL selects (path /N or ?db=N), 0 when none."""
    parsed = urlparse(url)
    for part in parsed.query.split("&"):
        if part.startswith("db="):
            return int(part[3:] or 0)
    path = parsed.path.strip("/")
    return int(path) if path.isdigit() else 0


def _waiting_pool(url: str) -> BlockingConnectionPool:
    """At most POOL_SIZE connections; more callers wait their turn (see POOL_SIZE)."""
    return BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=SOCKET_TIMEOUT_S, **_common_options()
    )


def build_redis(url: str, setting: ClusterSetting = "auto") -> Redis:
    """The client for REDIS_URL. Typed as `Redis`: a RedisCluster answers the same commands, and kimibot
    keeps every multi-key script, transaction and pipeline within one hash slot (bot/store.py)."""
    cluster = use_cluster(url, setting)
    if cluster is None:
        return UnprobedRedis.from_pool(_waiting_pool(url))
    if not cluster:
        return Redis.from_pool(_waiting_pool(url))
    if database_of(url) != 0:
        # Imported here: settings imports nothing from us, and this is the one error it does not catch.
        from bot.settings import SettingsError

        raise SettingsError(
            [
                f"REDIS_URL selects database {database_of(url)}, but it is a Redis Cluster node and "
                "a cluster has only database 0. Expected: the same URL ending in /0."
            ]
        )
    log.info("Redis at REDIS_URL is a cluster: using the cluster client")
    return cast(Redis, KimibotRedisCluster.from_url(url, **_common_options()))


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


class Script:
    """A Lua script sent by its SHA1 (EVALSHA), its text only when the server does not have it yet (NOSCRIPT:
    the first call, or after a restart, a failover or SCRIPT FLUSH; EVAL then caches it on that server).

    Not redis-py's `register_script`: in a pipeline it asks SCRIPT EXISTS before every execute (a second
    round trip), and alone it is the same EVALSHA-then-EVAL. On a cluster the call goes to the node of the
    keys' slot, which loads the script on its own first NOSCRIPT."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, client: Redis, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]
        except NoScriptError:
            return await client.eval(self.text, len(keys), *keys, *args)  # type: ignore[misc]


# Connections opened at start-up: about what a burst of Slack requests and the jobs they start use at once.
WARM_CONNECTIONS = 32
WARM_TIMEOUT_S = 0.5  # start-up waits no longer for them (a silent Redis would hold it a socket timeout)


async def warm_pool(client: Redis, count: int = WARM_CONNECTIONS, timeout_s: float = WARM_TIMEOUT_S) -> int:
    """Open up to `count` pooled connections now, so the first burst of requests after start-up does not
    pay for them on its way to the acks (each a TCP connect and CLIENT SETINFO round trips: bench.load's
    first 30-mention burst acked in 25-46 ms while it opened them, 15-16 ms with them open).

    Best effort, within `timeout_s`: what is not open by then is opened on first use as before, and a
    cancelled warm-up keeps no connection out of the pool. A cluster client is left as it is (its pools
    are per node, made as it learns the slots). Returns the connections opened."""
    if is_cluster(client):
        return 0
    pool = client.connection_pool
    tasks = [
        asyncio.ensure_future(pool.get_connection())  # type: ignore[no-untyped-call]
        for _ in range(min(count, POOL_SIZE))
    ]
    if not tasks:
        return 0
    try:
        await asyncio.wait(tasks, timeout=timeout_s)
    finally:
        # The opened ones go back first, before any await a second cancel could interrupt; the unfinished
        # ones are cancelled (redis-py gives back a connection it was opening).
        opened = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
        for task in tasks:
            task.cancel()
        for connection in opened:
            await pool.release(connection)
        await asyncio.gather(*tasks, return_exceptions=True)  # the cancelled ones have given theirs back
    return len(opened)
