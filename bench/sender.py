"""Slack's side of a load round: signed requests sent at set times, each on its own connection, from a process
of their own, and when each ack came back.

Slack delivers a burst from many machines at once; a client in the benchmark's own event loop (which also
runs the fake Slack and the fake Kimi) times its own queueing instead: the 30th request of a "same instant"
burst left ~50 ms after the first, and a response read late was counted against the bot. Here the
connections are opened (and accepted by the bot) before the clock starts, every request is built and signed
beforehand, all are written in one pass, and each reply is timed when its last byte arrives (plain sockets
and a selector: a few microseconds per request). Times are time.monotonic(), the fakes' clock too (one clock
for every process on the machine).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import selectors
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from tests.slack_requests import http_request, sign


@dataclass(frozen=True)
class Ack:
    sent_at: float  # time.monotonic() when the request was written
    seconds: float  # until the whole response was read
    status: int


def _complete(buffer: bytes) -> int | None:
    """The status of the response in `buffer` once all of it has arrived."""
    head, separator, rest = buffer.partition(b"\r\n\r\n")
    if not separator:
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(head.split(b" ", 2)[1]) if len(rest) >= length else None


def send_round(url: str, bodies: list[bytes], gap_s: float, limit_s: float = 60.0) -> list[Ack]:
    """Send `bodies` (signed now) `gap_s` apart (0: all at once), each on its own open connection; an Ack
    per body, in order."""
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    connections = [socket.create_connection(address) for _ in bodies]
    requests = [
        http_request(url, body, {"Content-Type": "application/json", **sign(body)}) for body in bodies
    ]
    selector = selectors.DefaultSelector()
    for index, connection in enumerate(connections):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection.setblocking(False)
        selector.register(connection, selectors.EVENT_READ, index)
    time.sleep(0.2)  # the bot has accepted every connection before the clock starts
    buffers = [b""] * len(bodies)
    sent = [0.0] * len(bodies)
    acks: list[Ack | None] = [None] * len(bodies)
    start = time.monotonic()
    next_send, left = 0, len(bodies)
    try:
        while left:
            now = time.monotonic()
            if now - start > limit_s:
                raise TimeoutError(f"{left} of {len(bodies)} requests unanswered after {limit_s} s")
            while next_send < len(bodies) and now >= start + next_send * gap_s:
                sent[next_send] = time.monotonic()
                connections[next_send].sendall(requests[next_send])
                next_send += 1
            wait = (start + next_send * gap_s - time.monotonic()) if next_send < len(bodies) else 1.0
            for key, _ in selector.select(max(wait, 0.0)):
                index = key.data
                chunk = connections[index].recv(65536)
                arrived = time.monotonic()
                if not chunk:
                    raise ConnectionError(f"the bot closed connection {index} without a response")
                buffers[index] += chunk
                status = _complete(buffers[index])
                if status is not None:
                    acks[index] = Ack(sent[index], arrived - sent[index], status)
                    selector.unregister(connections[index])
                    left -= 1
    finally:
        selector.close()
        for connection in connections:
            connection.close()
    return [ack for ack in acks if ack is not None]


async def send_round_apart(url: str, bodies: list[bytes], gap_s: float) -> list[Ack]:
    """`send_round` in a process of its own (spawned: no copy of this process's event loop), while this
    process's loop (the fakes) runs on."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, send_round, url, bodies, gap_s)
