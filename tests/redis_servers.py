"""Redis servers the tests start themselves, and which Redis the suite uses.

The suite never touches a Redis it was not told about: it uses `KIMIBOT_TEST_REDIS_URL` when that is set
(scripts/test sets it to servers it started), and otherwise starts a throwaway redis-server of its own.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from bot.redis_client import build_redis, probe_cluster
from tests.test_serve_process import free_port

ENV = "KIMIBOT_TEST_REDIS_URL"


def need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is needed for the tests (scripts/test and .ci/run install it)")


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class PrivateRedis:
    """A redis-server of the test's own (AOF on by default) that can be stopped, paused and started again."""

    def __init__(
        self, directory: Path, *, appendonly: bool = True, extra: tuple[str, ...] = (), port: int = 0
    ) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.appendonly = appendonly
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self) -> None:
        need_redis_server()
        self.directory.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        args += (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        )
        self.process = subprocess.Popen(
            [*args, *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def answers(self) -> bool:
        client = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), retries=0),
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            log = self.directory / "redis.log"
            raise RuntimeError(f"redis-server exited: {log.read_text()[-2000:] if log.exists() else ''}")

    def start_sync(self) -> None:
        self._spawn()
        for _ in range(200):
            if self.answers():
                return
            self._check_alive()
            time.sleep(0.025)
        raise RuntimeError("private redis-server did not start")

    async def start(self) -> None:
        self._spawn()
        for _ in range(200):
            if await asyncio.to_thread(self.answers):
                return
            self._check_alive()
            await asyncio.sleep(0.025)
        raise RuntimeError("private redis-server did not start")

    def stop_sync(self) -> None:
        if self.process is not None:
            self.resume()
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections and accepts new ones, but answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)


class PrivateCluster:
    """A Redis Cluster of `masters` primaries and no replicas, made with `redis-cli --cluster create`."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = [
            PrivateRedis(
                directory / f"node{i}",
                appendonly=False,
                extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                port=cluster_port(),
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start_sync(self) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is needed for a test cluster (it comes with redis-server)")
        for node in self.nodes:
            node.start_sync()
        subprocess.run(
            [
                *("redis-cli", "--cluster", "create"),
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                *("--cluster-replicas", "0", "--cluster-yes"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while not all(self._ok(node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster never reached cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _ok(node: PrivateRedis) -> bool:
        client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1, decode_responses=True)
        try:
            return "cluster_state:ok" in str(client.execute_command("CLUSTER", "INFO"))
        finally:
            client.close()

    def stop_sync(self) -> None:
        for node in self.nodes:
            node.stop_sync()


@dataclass(frozen=True)
class SuiteRedis:
    url: str
    cluster: bool
    started_here: bool


@contextmanager
def suite_redis(directory: Path) -> Iterator[SuiteRedis]:
    """The Redis the whole test session uses: `KIMIBOT_TEST_REDIS_URL` if set, else one started here
    (and stopped on exit). Never whatever happens to answer on the default port."""
    url = os.environ.get(ENV, "")
    if url:
        yield SuiteRedis(url, cluster=probe_cluster(url) is True, started_here=False)
        return
    server = PrivateRedis(directory, appendonly=False)
    server.start_sync()
    try:
        yield SuiteRedis(server.url, cluster=False, started_here=True)
    finally:
        server.stop_sync()


async def flush(target: SuiteRedis) -> None:
    """Empty the test Redis: its selected DB, or on a cluster DB 0 of every primary."""
    client = build_redis(target.url, "true" if target.cluster else "false")
    try:
        if target.cluster:
            await client.flushdb(target_nodes=RedisCluster.PRIMARIES)  # type: ignore[call-arg]
        else:
            await client.flushdb()
    finally:
        await client.aclose()
