"""Build Slack requests the way Slack sends them: exact bytes, signed with v0 HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

from bot.turn import ThreadKey
from tests.fakes.slack_api import APP_ID, BOT_USER_ID, TEAM_ID

SIGNING_SECRET = "test-signing-secret"
ALICE, BOB = "U04RZ8N2PQM", "U03MX5W1TYH"
CHANNEL, DM = "C06H4T2MZ8R", "D07F4A8KLMN"

_event_ids = itertools.count(1)


def sign(body: bytes, *, secret: str = SIGNING_SECRET, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


def http_request(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One HTTP/1.1 POST of `body` to `url`, keep-alive."""
    parts = urlsplit(url)
    lines = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def envelope(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "token": "legacy-verification-token",
        "team_id": TEAM_ID,
        "api_app_id": APP_ID,
        "event": event,
        "type": "event_callback",
        "event_id": event_id or f"Ev{next(_event_ids):08d}",
        "event_time": int(time.time()),
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": TEAM_ID,
                "user_id": BOT_USER_ID,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
    }


def mention(
    text: str, ts: str, *, user: str = ALICE, channel: str = CHANNEL, thread_ts: str | None = None
) -> dict[str, Any]:
    event = {
        "type": "app_mention",
        "user": user,
        "text": f"<@{BOT_USER_ID}> {text}",
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
        "team": TEAM_ID,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def message(
    text: str,
    ts: str,
    *,
    user: str = ALICE,
    channel: str = CHANNEL,
    channel_type: str = "channel",
    thread_ts: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    event = {
        "type": "message",
        "user": user,
        "text": text,
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
        "channel_type": channel_type,
        "team": TEAM_ID,
        **extra,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
        event["parent_user_id"] = user
    return event


def json_body(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


_TRIGGERS = itertools.count(1)


def command_body(
    text: str, *, user: str = ALICE, channel: str = CHANNEL, response_url: str = "", command: str = "/kimi"
) -> bytes:
    fields = {
        "token": "legacy",
        "team_id": TEAM_ID,
        "team_domain": "fake",
        "channel_id": channel,
        "channel_name": "general",
        "user_id": user,
        "user_name": "alice",
        "command": command,
        "text": text,
        "api_app_id": APP_ID,
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": f"{int(time.time())}.{next(_TRIGGERS)}.abc",  # unique, as Slack's are
    }
    return urlencode(fields).encode()


def thread_key(thread_ts: str, channel: str = CHANNEL) -> ThreadKey:
    return ThreadKey(TEAM_ID, channel, thread_ts)
