"""Download a Slack file with the bot token: only from Slack's file host, streamed with a size cap and a
timeout. Slack answers a request it does not authorize with its HTML sign-in page (HTTP 200), so an HTML
body where the file is not HTML is "no access" too."""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp

DOWNLOAD_TIMEOUT_S = 30.0
CHUNK_BYTES = 64 * 1024
HTML_STARTS = (b"<!doctype html", b"<html")


class NoAccess(Exception):
    """The file is not ours to read: gone (404, 410), refused, or Slack's sign-in page. Definitive."""


class Busy(Exception):
    """Slack could not serve the file just now (429, a 5xx, a timeout, a broken connection): worth
    another try in a while."""


def transient(status: int) -> bool:
    return status == 429 or status >= 500


class TooBig(Exception):
    """The body is larger than the cap (whatever the file object's `size` said)."""


def allowed_hosts(slack_api_url: str) -> frozenset[str]:
    """Where the bot token may be sent for a file: the Web API's own host (and port), and its `files.`
    host (https://slack.com/api/ -> files.slack.com; a GovSlack URL -> files.slack-gov.com)."""
    api = urlsplit(slack_api_url)
    host = (api.hostname or "").lower()
    domain = host.removeprefix("api.").removeprefix("www.")
    return frozenset({api.netloc.lower(), f"files.{domain}"} if domain else set())


def may_send_token(url: str, slack_api_url: str) -> bool:
    """True when `url` is on Slack's file host (https) or on the API's own host with its scheme. Any other
    URL (a file object pointing elsewhere) never gets the token."""
    target, api = urlsplit(url), urlsplit(slack_api_url)
    netloc = target.netloc.lower()
    if "@" in netloc or netloc not in allowed_hosts(slack_api_url):
        return False
    if netloc == api.netloc.lower():
        return target.scheme == api.scheme or target.scheme == "https"
    return target.scheme == "https"


def looks_like_html(head: bytes) -> bool:
    return head.lstrip()[:20].lower().startswith(HTML_STARTS)


async def download(
    session: aiohttp.ClientSession, url: str, token: str, *, max_bytes: int, html_expected: bool = False
) -> bytes:
    """The file's bytes, at most `max_bytes` (else TooBig); Busy when Slack is (429, 5xx, timeout,
    connection); NoAccess for anything else but a 200 with the file. Redirects are not followed (the token
    would go with them)."""
    timeout = aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_S)
    try:
        async with session.get(
            url, headers={"Authorization": f"Bearer {token}"}, allow_redirects=False, timeout=timeout
        ) as response:
            if response.status != 200:
                raise (Busy if transient(response.status) else NoAccess)(f"HTTP {response.status}")
            declared = response.content_length
            if declared is not None and declared > max_bytes:
                raise TooBig(f"{declared} bytes")
            if not html_expected and response.content_type == "text/html":
                raise NoAccess("an HTML page, not the file")
            body = bytearray()
            async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                body.extend(chunk)
                if len(body) > max_bytes:
                    raise TooBig(f"over {max_bytes} bytes")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Busy(f"{type(exc).__name__}") from exc
    if not html_expected and looks_like_html(bytes(body[:64])):
        raise NoAccess("an HTML page, not the file")
    return bytes(body)
