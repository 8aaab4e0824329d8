"""The SSRF guard: every refused range, the URL rules, and fetches through the guard against a local server
(a hostname resolving to 127.0.0.1, IP literals, redirects to 169.254.169.254 and back to loopback)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from bot.tools.net import (
    AddressGuard,
    BlockedAddress,
    FetchFailed,
    FetchRefused,
    blocked_reason,
    guarded_get,
    host_allowed,
    parse_allowed_hosts,
    url_problem,
)

REFUSED = {
    # loopback, "this network", RFC 1918
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "0.0.0.0": "this network",
    "0.1.2.3": "this network",
    "10.0.0.1": "RFC 1918",
    "10.255.255.255": "RFC 1918",
    "172.16.0.1": "RFC 1918",
    "172.31.255.254": "RFC 1918",
    "192.168.0.1": "RFC 1918",
    # link-local and cloud metadata
    "169.254.169.254": "link-local",
    "169.254.0.1": "link-local",
    # CGNAT
    "100.64.0.1": "carrier-grade NAT",
    "100.127.255.254": "carrier-grade NAT",
    # multicast, reserved, broadcast and other special ranges
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "192.0.0.8": "IETF",
    "192.0.2.1": "documentation",
    "198.18.0.1": "benchmarking",
    # IPv6: loopback, unspecified, link-local, ULA (incl. AWS's IPv6 metadata address), multicast
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fe80::a9fe:a9fe%1": "scoped",
    "fc00::1": "unique local",
    "fd00:ec2::254": "unique local",
    "ff02::1": "multicast",
    "2001:db8::1": "documentation",
    # IPv4 wrapped in IPv6: mapped, compatible, SIIT, NAT64, 6to4, Teredo
    "::ffff:127.0.0.1": "loopback, wrapped",
    "::ffff:169.254.169.254": "link-local",
    "::ffff:10.0.0.1": "RFC 1918",
    "::127.0.0.1": "loopback, wrapped",
    "::ffff:0:a9fe:a9fe": "link-local",
    "64:ff9b::a9fe:a9fe": "link-local",
    "64:ff9b::7f00:1": "loopback",
    "64:ff9b::c0a8:101": "RFC 1918",
    "64:ff9b:1::a9fe:a9fe": "local-use NAT64",
    "2002:a9fe:a9fe::": "6to4",
    "2002:7f00:1::1": "loopback, wrapped in 6to4",
    "2002:c0a8:101::": "RFC 1918",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "Teredo",
}

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",
    "100.128.0.1",
    "172.32.0.1",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize("address", sorted(REFUSED))
def test_every_private_reserved_and_wrapped_range_is_refused(address: str) -> None:
    reason = blocked_reason(address)
    assert reason is not None, address
    assert REFUSED[address].split(",")[0].lower() in reason.lower(), (address, reason)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(address) is None


def test_a_non_address_is_refused() -> None:
    assert blocked_reason("localhost") == "not an IP address"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://example.com/x", "only http and https"),
        ("gopher://example.com/", "only http and https"),
        ("javascript:alert(1)", "only http and https"),
        ("/relative/path", "only http and https"),
        ("http://", "no host"),
        ("http://user:secret@example.com/", "credentials"),
        ("http://example.com:99999/", "not a valid URL"),
    ],
)
def test_only_plain_http_and_https_urls_are_fetched(url: str, why: str) -> None:
    problem = url_problem(url)
    assert problem is not None and why in problem


def test_http_and_https_urls_pass() -> None:
    assert url_problem("https://example.com/a?b=c") is None
    assert url_problem("HTTP://Example.com:8080/") is None


def test_allowed_hosts_are_exact_names_or_wildcard_suffixes() -> None:
    allowed = parse_allowed_hosts(" Wiki.Corp , *.intra.example,10.0.0.5,, ")
    assert allowed == frozenset({"wiki.corp", "*.intra.example", "10.0.0.5"})
    assert host_allowed("wiki.corp", allowed)
    assert host_allowed("WIKI.CORP.", allowed)
    assert host_allowed("a.b.intra.example", allowed)
    assert not host_allowed("intra.example", allowed)
    assert not host_allowed("evilintra.example", allowed)
    assert not host_allowed("wiki.corp.evil.com", allowed)
    assert host_allowed("10.0.0.5", allowed)
    assert not parse_allowed_hosts("")


def test_the_socket_factory_refuses_before_any_socket_exists() -> None:
    guard = AddressGuard()
    with pytest.raises(BlockedAddress):
        guard.socket_factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80)))
    with pytest.raises(BlockedAddress):
        guard.socket_factory((socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:127.0.0.1", 80, 0, 0)))
    assert [address for address, _ in guard.refused] == ["169.254.169.254", "::ffff:127.0.0.1"]
    sock = guard.socket_factory((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)))
    sock.close()  # a public address gets a socket (nothing connects in this test)


# ---- fetches through the guard -------------------------------------------------------------------


class MapResolver(AbstractResolver):
    """DNS for tests: names -> addresses, no network (as a hostile DNS server would answer)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.names:
            raise OSError(f"no such host {host}")
        address = self.names[host]
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


@dataclass
class Site:
    server: TestServer
    hits: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    """A web server on 127.0.0.1 that serves a page, redirects anywhere, and loops."""
    hits: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        hits.append(request.path_qs)
        if request.path == "/go":
            raise web.HTTPFound(request.query["to"])
        if request.path == "/loop":
            raise web.HTTPFound("/loop")
        if request.path == "/big":
            return web.Response(body=b"x" * 300_000, content_type="text/plain")
        if request.path == "/slow":
            await asyncio.sleep(5)
        return web.Response(
            text=f"<html><body><p>page {request.path}</p></body></html>", content_type="text/html"
        )

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Site(server, hits)
    await server.close()


async def test_the_loopback_ip_literal_is_refused_and_never_reached(site: Site) -> None:
    with pytest.raises(FetchRefused, match="loopback"):
        await guarded_get(f"http://127.0.0.1:{site.port}/secret")
    assert site.hits == []


async def test_ipv6_loopback_and_a_decimal_ip_literal_are_refused(site: Site) -> None:
    with pytest.raises(FetchRefused):
        await guarded_get(f"http://[::1]:{site.port}/secret")
    for odd in ("2130706433", "0x7f.1", "017700000001"):  # getaddrinfo would read each as 127.0.0.1
        with pytest.raises((FetchRefused, FetchFailed)):  # yarl refuses non-canonical IPv4 outright
            await guarded_get(f"http://{odd}:{site.port}/secret")
    assert site.hits == []


async def test_a_hostname_that_resolves_to_127_0_0_1_is_refused(site: Site) -> None:
    resolver = MapResolver({"innocent.example": "127.0.0.1"})
    with pytest.raises(FetchRefused, match=r"innocent\.example is a loopback address \(127\.0\.0\.1\)"):
        await guarded_get(f"http://innocent.example:{site.port}/secret", resolver=resolver)
    assert resolver.asked == ["innocent.example"]
    with pytest.raises(FetchRefused, match="loopback"):
        await guarded_get(f"http://localhost:{site.port}/secret")  # the system resolver's localhost
    assert site.hits == []


async def test_an_allowed_host_is_reached_despite_its_private_address(site: Site) -> None:
    resolver = MapResolver({"wiki.corp": "127.0.0.1"})
    page = await guarded_get(
        f"http://wiki.corp:{site.port}/page", allowed_hosts=frozenset({"wiki.corp"}), resolver=resolver
    )
    assert page.status == 200
    assert b"page /page" in page.body
    assert page.content_type == "text/html"
    assert site.hits == ["/page"]


async def test_a_redirect_to_cloud_metadata_is_refused_at_the_hop(site: Site) -> None:
    resolver = MapResolver({"wiki.corp": "127.0.0.1"})
    with pytest.raises(FetchRefused, match=r"169\.254\.169\.254 is a link-local address"):
        await guarded_get(
            f"http://wiki.corp:{site.port}/go?to=http://169.254.169.254/latest/meta-data/iam/",
            allowed_hosts=frozenset({"wiki.corp"}),
            resolver=resolver,
        )
    assert site.hits == ["/go?to=http://169.254.169.254/latest/meta-data/iam/"]


async def test_a_redirect_to_metadata_in_ipv6_clothing_is_refused(site: Site) -> None:
    resolver = MapResolver({"wiki.corp": "127.0.0.1"})
    for target in (
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://[64:ff9b::a9fe:a9fe]/",
    ):
        with pytest.raises(FetchRefused):
            await guarded_get(
                f"http://wiki.corp:{site.port}/go?to={target}",
                allowed_hosts=frozenset({"wiki.corp"}),
                resolver=resolver,
            )


async def test_a_redirect_back_to_loopback_under_another_name_is_refused(site: Site) -> None:
    """The open host may redirect, but every hop is checked again: `sneaky.example` is not open."""
    resolver = MapResolver({"wiki.corp": "127.0.0.1", "sneaky.example": "127.0.0.1"})
    with pytest.raises(FetchRefused, match=r"sneaky\.example is a loopback address"):
        await guarded_get(
            f"http://wiki.corp:{site.port}/go?to=http://sneaky.example:{site.port}/secret",
            allowed_hosts=frozenset({"wiki.corp"}),
            resolver=resolver,
        )
    assert "/secret" not in site.hits


async def test_a_redirect_to_another_scheme_is_refused(site: Site) -> None:
    resolver = MapResolver({"wiki.corp": "127.0.0.1"})
    with pytest.raises(FetchRefused, match="only http and https"):
        await guarded_get(
            f"http://wiki.corp:{site.port}/go?to=file:///etc/passwd",
            allowed_hosts=frozenset({"wiki.corp"}),
            resolver=resolver,
        )


async def test_redirect_loops_size_and_time_are_capped(site: Site) -> None:
    resolver = MapResolver({"wiki.corp": "127.0.0.1"})
    open_host = frozenset({"wiki.corp"})
    with pytest.raises(FetchRefused, match="more than 3 redirects"):
        await guarded_get(
            f"http://wiki.corp:{site.port}/loop", allowed_hosts=open_host, resolver=resolver, max_redirects=3
        )
    page = await guarded_get(
        f"http://wiki.corp:{site.port}/big", allowed_hosts=open_host, resolver=resolver, max_bytes=100_000
    )
    assert page.truncated and len(page.body) == 100_000
    with pytest.raises(FetchFailed, match=r"within 0\.3 s"):
        await guarded_get(
            f"http://wiki.corp:{site.port}/slow", allowed_hosts=open_host, resolver=resolver, timeout_s=0.3
        )


async def test_an_unresolvable_host_is_a_failure_not_a_refusal() -> None:
    with pytest.raises(FetchFailed, match=r"could not reach nowhere\.example"):
        await guarded_get("http://nowhere.example/", resolver=MapResolver({}))
