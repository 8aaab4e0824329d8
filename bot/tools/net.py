"""The SSRF guard: which addresses a fetch may reach, checked on the socket actually connected.

Three layers, each alone testable:

- `blocked_reason(address)` (pure): why an IP address is off limits (loopback, RFC 1918, link-local and
  cloud metadata, CGNAT, ULA, multicast, reserved, ...), unwrapping IPv4 inside IPv6 (IPv4-mapped,
  IPv4-compatible, SIIT, 6to4, NAT64; Teredo is refused whole), or None for a public address.
- `url_problem(url)` (pure): only http/https, no credentials in the URL, a host at all.
- `guarded_get(url, ...)` (I/O): a GET whose connector creates every socket through `socket_factory`, so
  the address checked is the one about to be connected: a hostname resolving to 127.0.0.1, an IP literal
  (which never passes through a resolver), DNS rebinding between a check and the connect, and every
  redirect hop (followed here, one at a time, each URL checked again) all meet the same check. Proxies
  from the environment are ignored (`trust_env=False`): the address checked must be the one reached.

`FETCH_ALLOWED_HOSTS` names hosts (exact names, or `*.suffix`) an admin opens on purpose, e.g. an
intranet wiki: connections for those hosts skip the address check; every other hop stays guarded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.client_exceptions import ClientError
from yarl import URL

USER_AGENT = "kimibot/0.1 (+https://github.com/; Slack bot fetching a page a user asked about)"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv4 ranges refused, with the reason given to the model. Order matters only for the wording.
_V4_BLOCKS: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        ("0.0.0.0/8", "a 'this network' address (0.0.0.0/8)"),
        ("127.0.0.0/8", "a loopback address"),
        ("10.0.0.0/8", "a private address (RFC 1918)"),
        ("172.16.0.0/12", "a private address (RFC 1918)"),
        ("192.168.0.0/16", "a private address (RFC 1918)"),
        ("169.254.0.0/16", "a link-local address (this range holds cloud metadata services)"),
        ("100.64.0.0/10", "a carrier-grade NAT address (100.64.0.0/10)"),
        ("192.0.0.0/24", "an IETF protocol address (192.0.0.0/24)"),
        ("192.0.2.0/24", "a documentation address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("198.18.0.0/15", "a benchmarking address (198.18.0.0/15)"),
        ("192.88.99.0/24", "a 6to4 relay address (192.88.99.0/24)"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address (240.0.0.0/4)"),
    )
)

_V6_BLOCKS: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("::/128", "the unspecified address"),
        ("::1/128", "a loopback address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("fc00::/7", "a unique local address (fc00::/7, incl. cloud metadata such as fd00:ec2::254)"),
        ("ff00::/8", "a multicast address"),
        ("2001::/32", "a Teredo address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001:db8::/32", "a documentation address"),
    )
)

# IPv6 prefixes that carry an IPv4 address in their low 32 bits: the IPv4 address is checked instead.
_V4_IN_LOW_BITS = (
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated), after ::/128 and ::1/128 above
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix
)
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def parse_address(address: str) -> IPAddress | None:
    """An IP address from a socket address or URL host (brackets and a %zone allowed), or None."""
    text = address.strip().strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def blocked_reason(address: str | IPAddress) -> str | None:
    """Why this address may not be fetched from, or None when it is a public unicast address."""
    ip = parse_address(address) if isinstance(address, str) else address
    if ip is None:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "a scoped (link-local) IPv6 address"
        for net, why in _V6_BLOCKS:
            if ip in net:
                return why
        for net in _V4_IN_LOW_BITS:
            if ip in net:
                inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
                reason = blocked_reason(inner)
                return f"{reason}, wrapped in IPv6 ({inner})" if reason else None
        if ip in _SIX_TO_FOUR:
            inner = ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
            reason = blocked_reason(inner)
            return f"{reason}, wrapped in 6to4 ({inner})" if reason else None
        if ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local or ip.is_unspecified:
            return "a reserved address"
        if not ip.is_global:
            return "an address that is not publicly routable"
        return None
    for v4net, why in _V4_BLOCKS:
        if ip in v4net:
            return why
    if ip == ipaddress.IPv4Address("255.255.255.255") or ip.is_reserved:
        return "a reserved address"
    if not ip.is_global or ip.is_multicast:
        return "an address that is not publicly routable"
    return None


def parse_allowed_hosts(value: str) -> frozenset[str]:
    """`FETCH_ALLOWED_HOSTS`: comma-separated host names (or `*.suffix`, or IP literals), lower-cased."""
    return frozenset(
        part.strip().lower().rstrip(".").strip("[]") for part in value.split(",") if part.strip()
    )


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether an admin opened this host by name (`wiki.corp`, or `*.corp` for any name under corp)."""
    host = host.lower().rstrip(".").strip("[]")
    for entry in allowed:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return True
        elif host == entry:
            return True
    return False


def url_problem(url: str) -> str | None:
    """Why this URL is refused before any network use (scheme, credentials, host), or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a malformed port raises here
    except ValueError:
        return "not a valid URL"
    if parts.scheme.lower() not in ("http", "https"):
        return f"only http and https URLs can be fetched (not {parts.scheme or 'a relative URL'})"
    if not parts.hostname:
        return "the URL has no host"
    if parts.username or parts.password:
        return "URLs with credentials in them are not fetched"
    return None


class BlockedAddress(OSError):
    """Raised by the guarded socket factory: the connection is never attempted."""


@dataclass
class AddressGuard:
    """The connect-time check, one per fetch. `open_hop` is set while a hop goes to an allowed host."""

    open_hop: bool = False
    refused: list[tuple[str, str]] = field(default_factory=list)  # (address, reason) of each refusal

    def socket_factory(self, addr_info: tuple[object, ...]) -> socket.socket:
        """aiohttp 3.14's `TCPConnector(socket_factory=...)`: called with each getaddrinfo-style tuple
        `(family, type, proto, canonname, sockaddr)` just before connecting to `sockaddr`."""
        family, type_, proto, _canonname, sockaddr = addr_info
        host = str(sockaddr[0]) if isinstance(sockaddr, tuple) and sockaddr else ""
        if not self.open_hop:
            reason = blocked_reason(host)
            if reason is not None:
                self.refused.append((host, reason))
                raise BlockedAddress(f"refused to connect to {host}: {reason}")
        return socket.socket(family=int(family), type=int(type_), proto=int(proto))  # type: ignore[call-overload]


class FetchRefused(Exception):
    """The fetch is not allowed (SSRF guard, scheme, too many redirects): a refusal, not an outage."""


class FetchFailed(Exception):
    """The fetch was allowed but did not work (network error, timeout, HTTP error)."""


@dataclass(frozen=True)
class FetchedPage:
    url: str  # after redirects
    status: int
    content_type: str
    charset: str | None
    body: bytes
    truncated: bool  # the body was cut at max_bytes


def _hop_label(url: URL) -> str:
    return url.host or str(url)


async def guarded_get(
    url: str,
    *,
    allowed_hosts: frozenset[str] = frozenset(),
    timeout_s: float = 20.0,
    max_bytes: int = 5_000_000,
    max_redirects: int = 5,
    resolver: AbstractResolver | None = None,
    accept: str = "text/html,application/xhtml+xml,text/plain,text/markdown,application/json;q=0.9,*/*;q=0.5",
) -> FetchedPage:
    """GET `url` with every hop checked; raises FetchRefused or FetchFailed, else the (capped) page."""
    guard = AddressGuard()
    connector = aiohttp.TCPConnector(
        socket_factory=guard.socket_factory,  # type: ignore[arg-type]
        resolver=resolver,
        use_dns_cache=False,
        force_close=True,
    )
    client_timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 10.0))
    try:
        async with (
            asyncio.timeout(timeout_s),
            aiohttp.ClientSession(
                connector=connector,
                timeout=client_timeout,
                trust_env=False,
                headers={"User-Agent": USER_AGENT, "Accept": accept},
            ) as session,
        ):
            current = url
            for _hop in range(max_redirects + 1):
                problem = url_problem(current)
                if problem is not None:
                    raise FetchRefused(problem)
                target = URL(current)
                guard.open_hop = host_allowed(target.host or "", allowed_hosts)
                try:
                    async with session.get(target, allow_redirects=False) as response:
                        if response.status in REDIRECT_STATUSES and "Location" in response.headers:
                            current = str(target.join(URL(response.headers["Location"])))
                            continue
                        if response.status >= 400:
                            raise FetchFailed(f"the server answered HTTP {response.status}")
                        body, truncated = await _read_capped(response, max_bytes)
                        return FetchedPage(
                            url=str(response.url),
                            status=response.status,
                            content_type=response.content_type,
                            charset=response.charset,
                            body=body,
                            truncated=truncated,
                        )
                except (ClientError, OSError) as exc:
                    if isinstance(exc, TimeoutError) and not guard.refused:
                        raise FetchFailed(f"no complete answer within {timeout_s:g} s") from exc
                    if guard.refused:
                        address, reason = guard.refused[-1]
                        raise FetchRefused(
                            f"{_hop_label(target)} is {reason} ({address}); only public addresses "
                            "can be fetched"
                        ) from exc
                    raise FetchFailed(f"could not reach {_hop_label(target)}: {_short(exc)}") from exc
            raise FetchRefused(f"more than {max_redirects} redirects")
    except TimeoutError as exc:
        raise FetchFailed(f"no complete answer within {timeout_s:g} s") from exc


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size >= max_bytes:
            return b"".join(chunks)[:max_bytes], True
    return b"".join(chunks), False


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"
