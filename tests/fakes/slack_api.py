"""A fake Slack Web API (and response_url endpoint) over loopback HTTP.

It speaks Slack's wire format (JSON bodies with `ok`/`error`, HTTP 429 + Retry-After), checks every
call against the method reference data in `slack_api_ref/` (required and known arguments, from
docs.slack.dev via slack-ruby/slack-api-ref, MIT), and enforces the documented size limits. Anything
the bot sends that real Slack would refuse is answered with Slack's error and recorded in `problems`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.test_utils import TestServer

REF_DIR = Path(__file__).parent / "slack_api_ref"

TEAM_ID = "T05KQ2R7JNB"
BOT_USER_ID = "U07F3N1BOTX"
BOT_ID = "B07F3N1QRST"
APP_ID = "A07F3M9XQ2L"
TOKEN = "xoxb-test-token"
APP_TOKEN = "xapp-1-test-app-token"
CLIENT_ID = "5284817632.7301928374650"  # the app's OAuth credentials (oauth.v2.access)
CLIENT_SECRET = "c1f0e5b2a9d84e7f6a3b2c1d0e9f8a7b"

MARKDOWN_TEXT_LIMIT = 12_000
TEXT_LIMIT = 40_000
UPDATE_TEXT_LIMIT = 4_000
SECTION_TEXT_LIMIT = 3_000
MESSAGE_BLOCKS_LIMIT = 50
MODAL_BLOCKS_LIMIT = 100
BUTTON_VALUE_LIMIT = 2_000
STREAM_CHUNK_BLOCKS_LIMIT = 50  # chat.stopStream: 50 blocks in chunks (task cards count) plus 50 in blocks
# Streaming chunks (slack_sdk.models.messages.chunk, the chunks the SDK's ChatStream sends): their types,
# the fields each may carry, and a task card's states. The method reference only says "array of chunks".
CHUNK_FIELDS = {
    "markdown_text": {"type", "text"},
    "task_update": {"type", "id", "title", "status", "details", "output", "sources"},
    "plan_update": {"type", "title"},
    "blocks": {"type", "blocks"},
}
TASK_STATUSES = ("pending", "in_progress", "complete", "error")
TASK_DISPLAY_MODES = ("timeline", "plan")


def visible_text(message: dict[str, Any]) -> str:
    """What a person sees of a message: streamed or markdown text, then the text of its blocks."""
    parts = []
    if message.get("stream_text"):
        parts.append(message["stream_text"])
    for block in message.get("blocks") or []:
        if block.get("type") == "markdown":
            parts.append(block.get("text", ""))
        elif block.get("type") == "section" and block.get("text"):
            parts.append(block["text"].get("text", ""))
        elif block.get("type") == "context":
            parts.extend(e.get("text", "") for e in block.get("elements", []))
    if not parts:
        parts.append(message.get("text", ""))
    return "\n".join(parts)


def _blocks(blocks: Any) -> list[dict[str, Any]]:
    if isinstance(blocks, str):
        return list(json.loads(blocks))
    return list(blocks or [])


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    at: float
    basic: tuple[str, str] | None = None  # HTTP Basic credentials (oauth.v2.access: client id, secret)
    peer: str = ""  # the client's address and port: calls over one kept-alive connection share it


@dataclass
class Workspace:
    """A workspace the app is installed in: its bot token answers for it (auth.test says who)."""

    team_id: str
    bot_user_id: str
    bot_id: str
    name: str = "Fake"
    enterprise_id: str | None = None
    is_enterprise_install: bool = False


@dataclass
class Grant:
    """Someone approved the install on Slack's consent page: the code kimibot exchanges once."""

    workspace: Workspace
    installer: str
    rotating: bool = False  # token_rotation_enabled: the token expires and comes with a refresh token
    expires_in: int = 43_200


@dataclass
class Failure:
    error: str = ""
    status: int = 200
    retry_after: int | None = None


@dataclass
class RawFailure:
    """An answer that is not Slack's JSON: a proxy's or load balancer's error page."""

    status: int
    body: str | bytes
    content_type: str


@dataclass
class Hold:
    """One call the fake carries out but does not answer until the test says so (see `FakeSlack.hold`)."""

    method: str
    nth: int
    when: Callable[[dict[str, Any]], bool] | None = None  # only calls whose arguments pass this count
    seen: int = 0
    call: Call | None = None
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # the call was carried out; no answer yet
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.released.set()

    async def wait(self, limit_s: float = 30.0) -> Call:
        """Until the held call has come (and been carried out); the call."""
        async with asyncio.timeout(limit_s):
            await self.reached.wait()
        assert self.call is not None
        return self.call


# Block Kit limits of the view surfaces (docs.slack.dev/reference/views, .../block-kit/block-elements)
VIEW_TITLE_LIMIT = 24
PRIVATE_METADATA_LIMIT = 3_000
CALLBACK_ID_LIMIT = 255
OPTION_TEXT_LIMIT = 75
OPTION_VALUE_LIMIT = 150
ELEMENT_OPTIONS = {"static_select": 100, "radio_buttons": 10, "checkboxes": 10}
INPUT_ELEMENTS = {*ELEMENT_OPTIONS, "plain_text_input", "number_input"}


def _plain(text: Any, limit: int) -> str:
    if not isinstance(text, dict) or text.get("type") != "plain_text" or not text.get("text"):
        return "not a plain_text object"
    return f"text over {limit}" if len(text["text"]) > limit else ""


def input_problems(block: dict[str, Any]) -> list[str]:
    """An input block's limits: label, element type and action_id, options, initial values, lengths."""
    problems = []
    if problem := _plain(block.get("label"), 2_000):
        problems.append(f"input label: {problem}")
    if "hint" in block and (problem := _plain(block["hint"], 2_000)):
        problems.append(f"input hint: {problem}")
    if len(str(block.get("block_id", ""))) > 255:
        problems.append("block_id over 255")
    element = block.get("element") or {}
    kind = element.get("type")
    if kind not in INPUT_ELEMENTS:
        return [*problems, f"input element {kind!r} unknown"]
    if not element.get("action_id") or len(element["action_id"]) > 255:
        problems.append(f"{kind}: action_id missing or over 255")
    if kind in ELEMENT_OPTIONS:
        options = element.get("options") or []
        if not 1 <= len(options) <= ELEMENT_OPTIONS[kind]:
            problems.append(f"{kind}: {len(options)} options (1 to {ELEMENT_OPTIONS[kind]})")
        values = []
        for option in options:
            if problem := _plain(option.get("text"), OPTION_TEXT_LIMIT):
                problems.append(f"{kind} option: {problem}")
            if not option.get("value") or len(option["value"]) > OPTION_VALUE_LIMIT:
                problems.append(f"{kind} option value missing or over {OPTION_VALUE_LIMIT}")
            values.append(option.get("value"))
        if len(values) != len(set(values)):
            problems.append(f"{kind}: duplicate option values")
        chosen = [element["initial_option"]] if "initial_option" in element else []
        if "initial_options" in element:
            chosen = element["initial_options"]
            if not chosen:
                problems.append(f"{kind}: empty initial_options")
        if any(c not in options for c in chosen):
            problems.append(f"{kind}: an initial option is not one of its options")
    if kind == "plain_text_input":
        if not 1 <= int(element.get("max_length", 3_000)) <= 3_000:
            problems.append("plain_text_input: max_length not within 1..3000")
        if len(str(element.get("initial_value", ""))) > int(element.get("max_length", 3_000)):
            problems.append("plain_text_input: initial_value over max_length")
    if kind == "number_input":
        if not isinstance(element.get("is_decimal_allowed"), bool):
            problems.append("number_input: is_decimal_allowed is required")
        for name in ("min_value", "max_value", "initial_value"):
            if name in element and not isinstance(element[name], str):
                problems.append(f"number_input: {name} must be a string")
    return problems


def view_problems(view: dict[str, Any], kind: str) -> list[str]:
    """A view object's own fields: type, title and buttons, callback_id and private_metadata lengths."""
    problems = []
    if view.get("type") != kind:
        problems.append(f"view type {view.get('type')!r}, expected {kind}")
    if kind == "modal":
        if problem := _plain(view.get("title"), VIEW_TITLE_LIMIT):
            problems.append(f"title: {problem}")
        for button in ("submit", "close"):
            if button in view and (problem := _plain(view[button], 24)):
                problems.append(f"{button}: {problem}")
        if any(b.get("type") == "input" for b in view.get("blocks") or []) and "submit" not in view:
            problems.append("input blocks without a submit button")
    if len(str(view.get("callback_id", ""))) > CALLBACK_ID_LIMIT:
        problems.append("callback_id over 255")
    if len(str(view.get("private_metadata", ""))) > PRIVATE_METADATA_LIMIT:
        problems.append("private_metadata over 3000")
    return problems


@functools.cache
def method_reference(method: str) -> dict[str, Any] | None:
    """Slack's reference data for a method (read once: the benchmarks make thousands of calls)."""
    path = REF_DIR / f"{method}.json"
    return json.loads(path.read_text()) if path.exists() else None


def manifest_scopes() -> set[str]:
    """Every bot scope the app's manifests ask for: what a token of an installed kimibot has."""
    import yaml

    found: set[str] = set()
    for path in (Path(__file__).resolve().parents[2] / "manifests").glob("manifest-*.yml"):
        found |= set(yaml.safe_load(path.read_text())["oauth_config"]["scopes"]["bot"])
    return found


@dataclass
class FakeSlack:
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    reactions: dict[tuple[str, str], set[str]] = field(default_factory=lambda: defaultdict(set))
    responses: list[dict[str, Any]] = field(default_factory=list)  # what arrived at response_url
    not_member_of: set[str] = field(default_factory=set)  # channels where posting gives not_in_channel
    stream_lifetime_s: float | None = None  # Slack closes streams after about 5 minutes; tests shorten it
    views: list[dict[str, Any]] = field(default_factory=list)  # modals opened (views.open)
    home_views: dict[str, dict[str, Any]] = field(default_factory=dict)  # user -> Home tab (views.publish)
    updated_views: list[dict[str, Any]] = field(default_factory=list)  # modals redrawn (views.update)
    # Rate limits, when enforced: chat.postMessage per channel (burst, then one a second), others per tier.
    enforce_limits: bool = False
    limit_hits: list[str] = field(default_factory=list)
    _allowance: dict[str, tuple[float, float]] = field(default_factory=dict)
    ephemerals: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, list[Failure]] = field(default_factory=lambda: defaultdict(list))
    raw_failures: dict[str, list[RawFailure]] = field(default_factory=lambda: defaultdict(list))
    delay: dict[str, float] = field(default_factory=dict)  # seconds to wait before answering a method
    holds: list[Hold] = field(default_factory=list)  # calls whose answer waits for the test (`hold`)
    sockets: list[web.WebSocketResponse] = field(default_factory=list)  # Socket Mode connections
    socket_acks: list[dict[str, Any]] = field(default_factory=list)
    revoked: dict[str, str] = field(default_factory=dict)  # token -> the error Slack now answers it with
    # For the built-in tools (bot/tools): conversations.info/members/history, chat.getPermalink, search
    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> conversations.info object
    conversation_members: dict[str, list[str]] = field(default_factory=dict)
    search_results: list[dict[str, Any]] = field(default_factory=list)  # assistant.search.context messages
    action_tokens: set[str] = field(default_factory=set)  # the action_tokens search accepts
    usergroups: dict[str, list[str]] = field(default_factory=dict)  # user group id -> member ids
    # The bot token's scopes, sent in every answer's x-oauth-scopes header as Slack does (kimibot doctor)
    scopes: set[str] = field(default_factory=lambda: manifest_scopes())
    # OAuth installs: tokens beyond TOKEN (-> their workspace), consent codes not yet exchanged, refresh
    # tokens not yet spent (-> the workspace); a spent code or refresh token is refused, as Slack does.
    workspaces: dict[str, Workspace] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)
    refresh_tokens: dict[str, Workspace] = field(default_factory=dict)
    token_expires: dict[str, float] = field(default_factory=dict)  # token -> time.time() it stops working
    # Files (url_private_download): file id -> its bytes; the downloads asked for (file id, token)
    file_bodies: dict[str, bytes] = field(default_factory=dict)
    file_downloads: list[tuple[str, str]] = field(default_factory=list)
    server: TestServer | None = None
    _clock: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # ---- test helpers -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    def response_url(self, name: str = "cmd") -> str:
        return f"{self.url}/response/{name}"

    def fail(
        self,
        method: str,
        error: str = "",
        *,
        status: int = 200,
        retry_after: int | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` calls of `method` fail this way (Slack error, 5xx, or 429 + Retry-After)."""
        self.failures[method].extend(Failure(error, status, retry_after) for _ in range(times))

    def fail_raw(
        self,
        method: str,
        status: int,
        body: str | bytes,
        content_type: str = "text/plain",
        *,
        times: int = 1,
    ) -> None:
        """The next `times` calls of `method` are answered by something in front of Slack (an Envoy
        503, a corporate proxy's HTML 403): `body` as is, with this status and Content-Type."""
        self.raw_failures[method].extend(RawFailure(status, body, content_type) for _ in range(times))

    def hold(
        self, method: str, nth: int = 1, *, when: Callable[[dict[str, Any]], bool] | None = None
    ) -> Hold:
        """The `nth` call of `method` from now on (of those whose arguments pass `when`) is carried out
        (Slack did the work: a message is posted, text appended...) but its answer waits until
        `Hold.release()`: the caller has not heard back yet, so a test can kill it exactly then. Release
        every hold before the fake stops."""
        hold = Hold(method, nth, when)
        self.holds.append(hold)
        return hold

    def release_holds(self) -> None:
        for hold in self.holds:
            hold.release()

    def approve_install(
        self,
        team_id: str,
        *,
        bot_user_id: str,
        bot_id: str,
        installer: str = "U0INSTALLER",
        name: str = "Second",
        enterprise_id: str | None = None,
        is_enterprise_install: bool = False,
        rotating: bool = False,
        expires_in: int = 43_200,
    ) -> str:
        """What Slack's consent page does when someone clicks Allow: a one-time code for the redirect."""
        code = f"code-{team_id}-{next(self._clock)}"
        workspace = Workspace(team_id, bot_user_id, bot_id, name, enterprise_id, is_enterprise_install)
        self.grants[code] = Grant(workspace, installer, rotating, expires_in)
        return code

    def tokens_used(self, method: str) -> list[str]:
        """The token each call of `method` carried (Authorization header or token argument)."""
        return [str(c.args.get("token") or "") for c in self.calls_of(method)]

    def add_user(self, user_id: str, display_name: str, real_name: str = "") -> None:
        self.users[user_id] = {
            "id": user_id,
            "name": display_name.lower(),
            "real_name": real_name or display_name,
            "profile": {"display_name": display_name, "real_name": real_name or display_name},
        }

    def new_ts(self) -> str:
        return f"{1_760_000_000 + next(self._clock)}.{next(self._clock) % 1_000_000:06d}"

    def seed(
        self,
        channel: str,
        *,
        user: str,
        text: str,
        ts: str | None = None,
        thread_ts: str | None = None,
        **extra: Any,
    ) -> str:
        """Put a message into the fake workspace (for conversations.replies backfill)."""
        ts = ts or self.new_ts()
        message = {"type": "message", "user": user, "text": text, "ts": ts, **extra}
        if thread_ts:
            message["thread_ts"] = thread_ts
        self.messages[channel].append(message)
        return ts

    def add_file(
        self,
        name: str,
        data: bytes,
        *,
        mimetype: str = "text/plain",
        filetype: str = "text",
        size: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """A file uploaded to the fake workspace: its Slack file object (for an event's or a seeded
        message's `files`), whose url_private_download serves `data` to the bot token (with files:read)."""
        file_id = f"F{next(self._clock):09d}"
        self.file_bodies[file_id] = data
        url = f"{self.url}/files-pri/{TEAM_ID}-{file_id}/download/{name}"
        return {
            "id": file_id,
            "created": 1_760_000_000,
            "name": name,
            "title": name,
            "mimetype": mimetype,
            "filetype": filetype,
            "pretty_type": filetype.upper(),
            "user": "U04RZ8N2PQM",
            "mode": "hosted",
            "editable": False,
            "is_external": False,
            "external_type": "",
            "size": len(data) if size is None else size,
            "url_private": url.replace("/download/", "/"),
            "url_private_download": url,
            "permalink": f"https://example.slack.com/files/U04RZ8N2PQM/{file_id}/{name}",
            **extra,
        }

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def posts(self, channel: str | None = None, thread_ts: str | None = None) -> list[dict[str, Any]]:
        """Messages the bot posted (chat.postMessage), optionally in one channel/thread."""
        return [
            c.args
            for c in self.calls_of("chat.postMessage")
            if "ts" in c.args.get("_result", {})
            and (channel is None or c.args.get("channel") == channel)
            and (thread_ts is None or c.args.get("thread_ts") == thread_ts)
        ]

    @staticmethod
    def body_of(post: dict[str, Any]) -> str:
        return str(post.get("markdown_text") or post.get("text") or "")

    def replies(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        """The bot's messages in a thread as they stand now (after updates, streams and deletions)."""
        return sorted(
            (
                m
                for m in self.messages[channel]
                if m.get("thread_ts") == thread_ts and m.get("bot_id") == BOT_ID and not m.get("deleted")
            ),
            key=lambda m: float(m["ts"]),
        )

    def bodies(self, channel: str, thread_ts: str) -> list[str]:
        return [visible_text(m) for m in self.replies(channel, thread_ts)]

    def answer_parts(self, channel: str, thread_ts: str) -> list[str]:
        """The answer's own Markdown in each of the bot's thread messages (streams and markdown blocks)."""
        parts = []
        for message in self.replies(channel, thread_ts):
            text = message.get("stream_text", "") + "".join(
                b.get("text", "") for b in message.get("blocks") or [] if b.get("type") == "markdown"
            )
            if text:
                parts.append(text)
        return parts

    def find(self, channel: str, ts: str) -> dict[str, Any] | None:
        return next((m for m in self.messages[channel] if m["ts"] == ts and not m.get("deleted")), None)

    # ---- server ---------------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(client_max_size=10 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{name}", self._response_url)
        app.router.add_get("/socket-mode", self._socket_mode)
        app.router.add_get("/files-pri/{team_file}/download/{name}", self._file_download)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def send_envelope(
        self, kind: str, payload: dict[str, Any], envelope_id: str, retry_attempt: int = 0
    ) -> None:
        """Push a Socket Mode envelope (events_api, slash_commands, interactive) to every connection."""
        message = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": kind != "events_api",
            "retry_attempt": retry_attempt,
            "retry_reason": "timeout" if retry_attempt else "",
        }
        for socket in list(self.sockets):
            await socket.send_json(message)

    async def drop_sockets(self) -> None:
        """Close every Socket Mode connection from Slack's side, as when Slack restarts a server."""
        for socket in list(self.sockets):
            await socket.close()

    async def _socket_mode(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self.sockets.append(socket)
        await socket.send_json(
            {
                "type": "hello",
                "num_connections": len(self.sockets),
                "connection_info": {"app_id": APP_ID},
                "debug_info": {"host": "fake"},
            }
        )
        async for frame in socket:
            if frame.type == web.WSMsgType.TEXT:
                data = json.loads(frame.data)
                if "envelope_id" in data:
                    self.socket_acks.append(data)
        self.sockets.remove(socket)
        return socket

    def team_of(self, token: Any) -> str:
        """The workspace a bot token acts in: an installed workspace's, or the default one's."""
        workspace = self.workspaces.get(str(token or ""))
        return workspace.team_id if workspace is not None else TEAM_ID

    def _allowed(self, method: str, args: dict[str, Any]) -> bool:
        """Slack's documented rates, per app per workspace: postMessage about 1/s per channel (bursts of
        3), the tiers per minute per method per workspace (the token says which workspace)."""
        per_minute = {"t2": 20, "t3": 50, "t4": 100}
        if method == "chat.postMessage":
            key, capacity, per_s = f"post:{args.get('channel')}", 3.0, 1.0
        else:
            reference = method_reference(method)
            tier = reference.get("rate_limits") if reference is not None else None
            if tier not in per_minute:
                return True
            team = self.team_of(args.get("token"))
            key, capacity, per_s = f"{team}:{method}", float(per_minute[tier]), per_minute[tier] / 60
        now = time.monotonic()
        tokens, last = self._allowance.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * per_s)
        if tokens < 1:
            self._allowance[key] = (tokens, now)
            return False
        self._allowance[key] = (tokens - 1, now)
        return True

    async def _file_download(self, request: web.Request) -> web.Response:
        """url_private_download as Slack serves it: the bytes for a bot token with files:read; without
        one, Slack's sign-in page (HTML, HTTP 200); 404 for a file that is not there."""
        file_id = request.match_info["team_file"].rsplit("-", 1)[-1]
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else ""
        self.file_downloads.append((file_id, token))
        if (token != TOKEN and token not in self.workspaces) or "files:read" not in self.scopes:
            page = "<!DOCTYPE html><html><head><title>Slack</title></head><body>Sign in</body></html>"
            return web.Response(text=page, content_type="text/html")
        if file_id not in self.file_bodies:
            return web.Response(status=404, text="file not found")
        return web.Response(body=self.file_bodies[file_id], content_type="application/octet-stream")

    async def _response_url(self, request: web.Request) -> web.Response:
        self.responses.append(await request.json())
        return web.Response(text="ok")

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await self._args(request)
        call = Call(
            method,
            args,
            time.monotonic(),
            basic=self._basic(request),
            peer=str(request.transport.get_extra_info("peername") if request.transport else ""),
        )
        self.calls.append(call)
        held = None
        for hold in self.holds:
            if hold.method == method and not hold.reached.is_set() and (hold.when is None or hold.when(args)):
                hold.seen += 1
                if hold.seen == hold.nth:
                    held = hold
        response = await self._answer(method, args, call)
        if held is not None:
            held.call = call
            held.reached.set()
            await held.released.wait()
        return response

    async def _answer(self, method: str, args: dict[str, Any], call: Call) -> web.Response:
        if method in self.delay:
            await asyncio.sleep(self.delay[method])
        if self.enforce_limits and not self._allowed(method, args):
            self.limit_hits.append(method)
            return web.json_response(
                {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "1"}
            )
        if self.raw_failures.get(method):
            raw = self.raw_failures[method].pop(0)
            call.args["_result"] = {"ok": False, "error": f"raw {raw.status}"}
            body = raw.body.encode() if isinstance(raw.body, str) else raw.body
            return web.Response(status=raw.status, body=body, headers={"Content-Type": raw.content_type})
        if self.failures.get(method):
            failure = self.failures[method].pop(0)
            if failure.status == 429:
                return web.json_response(
                    {"ok": False, "error": "ratelimited"},
                    status=429,
                    headers={"Retry-After": str(failure.retry_after or 1)},
                )
            if failure.status >= 500:
                return web.Response(status=failure.status, text="upstream trouble")
            return self._error(call, failure.error)
        ref_error = self._check_reference(method, args)
        if ref_error:
            return self._error(call, ref_error)
        if method == "oauth.v2.access":
            return self._oauth_v2_access(args, call)
        if args.get("token") in self.revoked:
            return self._error(call, self.revoked[args["token"]])
        token = args.get("token")
        if method == "apps.connections.open":
            if token != APP_TOKEN:
                return self._error(call, "invalid_auth")
        elif token != TOKEN and token not in self.workspaces:
            return self._error(call, "invalid_auth")
        elif token in self.token_expires and self.token_expires[token] <= time.time():
            return self._error(call, "token_expired")
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            self.problems.append(f"{method}: the fake does not implement it")
            return self._error(call, "unknown_method")
        result: dict[str, Any] = handler(args)
        if not result.get("ok", True):
            return self._error(call, str(result["error"]))
        result = {"ok": True, **result}
        args["_result"] = result
        return web.json_response(result, headers={"x-oauth-scopes": ",".join(sorted(self.scopes))})

    def _oauth_v2_access(self, args: dict[str, Any], call: Call) -> web.Response:
        """Code exchange and token refresh. The app's credentials come as HTTP Basic (or arguments); a code
        or refresh token works once: Slack refuses one spent before."""
        client_id, client_secret = call.basic or (args.get("client_id"), args.get("client_secret"))
        if client_id != CLIENT_ID:
            return self._error(call, "invalid_client_id")
        if client_secret != CLIENT_SECRET:
            return self._error(call, "bad_client_secret")
        if "token" in args:
            self.problems.append("oauth.v2.access: sent with a token")
            return self._error(call, "invalid_arguments")
        grant_type = args.get("grant_type") or "authorization_code"
        if grant_type == "refresh_token":
            workspace = self.refresh_tokens.pop(str(args.get("refresh_token") or ""), None)
            if workspace is None:
                return self._error(call, "invalid_refresh_token")
            token, refresh = self._issue(workspace, rotating=True, expires_in=43_200)
            result: dict[str, Any] = {
                "ok": True,
                "app_id": APP_ID,
                "access_token": token,
                "token_type": "bot",
                "scope": ",".join(sorted(self.scopes)),
                "bot_user_id": workspace.bot_user_id,
                "team": {"id": workspace.team_id, "name": workspace.name},
                "enterprise": None,
                "is_enterprise_install": workspace.is_enterprise_install,
                "refresh_token": refresh,
                "expires_in": 43_200,
            }
            args["_result"] = result
            return web.json_response(result)
        if grant_type != "authorization_code":
            return self._error(call, "invalid_grant_type")
        grant = self.grants.pop(str(args.get("code") or ""), None)
        if grant is None:
            return self._error(call, "invalid_code")
        workspace = grant.workspace
        token, refresh = self._issue(workspace, rotating=grant.rotating, expires_in=grant.expires_in)
        enterprise = {"id": workspace.enterprise_id, "name": "Org"} if workspace.enterprise_id else None
        team = {"id": workspace.team_id, "name": workspace.name}
        result = {
            "ok": True,
            "app_id": APP_ID,
            "authed_user": {"id": grant.installer},
            "scope": ",".join(sorted(self.scopes)),
            "token_type": "bot",
            "access_token": token,
            "bot_user_id": workspace.bot_user_id,
            "team": None if workspace.is_enterprise_install else team,
            "enterprise": enterprise,
            "is_enterprise_install": workspace.is_enterprise_install,
        }
        if refresh:
            result.update(refresh_token=refresh, expires_in=grant.expires_in)
        args["_result"] = result
        return web.json_response(result)

    def _issue(self, workspace: Workspace, *, rotating: bool, expires_in: int) -> tuple[str, str]:
        serial = next(self._clock)
        team = workspace.team_id
        token = f"xoxe.xoxb-1-{team}-{serial}" if rotating else f"xoxb-{team}-{serial}"
        self.workspaces[token] = workspace
        if not rotating:
            return token, ""
        self.token_expires[token] = time.time() + expires_in
        refresh = f"xoxe-1-{workspace.team_id}-{serial}"
        self.refresh_tokens[refresh] = workspace
        return token, refresh

    @staticmethod
    def _basic(request: web.Request) -> tuple[str, str] | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
        return user, password

    def _error(self, call: Call, error: str) -> web.Response:
        call.args["_result"] = {"ok": False, "error": error}
        return web.json_response({"ok": False, "error": error})

    async def _args(self, request: web.Request) -> dict[str, Any]:
        args: dict[str, Any] = dict(request.query)
        raw = await request.read()
        if raw:
            if request.content_type == "application/json":
                args.update(json.loads(raw))
            else:
                args.update(dict(parse_qsl(raw.decode(), keep_blank_values=True)))
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            args.setdefault("token", auth.removeprefix("Bearer "))
        return args

    def _check_reference(self, method: str, args: dict[str, Any]) -> str | None:
        """Required and known arguments per Slack's reference data; a miss is a bot bug."""
        reference = method_reference(method)
        if reference is None:
            self.problems.append(f"{method}: no reference data (not a documented method?)")
            return "unknown_method"
        spec = reference["args"]
        known = set(spec.get("properties", {}))
        for name in spec.get("required", []):
            if name == "markdown_text" and args.get("chunks"):
                continue  # the reference predates chunks; the SDK's ChatStream appends chunks alone
            if name not in args or args[name] in (None, ""):
                self.problems.append(f"{method}: missing required argument {name}")
                return "invalid_arguments"
        for name in args:
            if name not in known:
                self.problems.append(f"{method}: unknown argument {name}")
                return "invalid_arguments"
        return None

    # ---- methods --------------------------------------------------------------------------------
    def _m_auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        workspace = self.workspaces.get(str(args.get("token") or ""))
        if workspace is not None:
            return {
                "url": f"https://{workspace.name.lower()}.slack.com/",
                "team": workspace.name,
                "user": "kimibot",
                "team_id": workspace.team_id,
                "user_id": workspace.bot_user_id,
                "bot_id": workspace.bot_id,
                "enterprise_id": workspace.enterprise_id,
                "is_enterprise_install": workspace.is_enterprise_install,
            }
        return {
            "url": "https://fake.slack.com/",
            "team": "Fake",
            "user": "kimibot",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _m_apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"url": self.url.replace("http://", "ws://") + "/socket-mode"}

    def _content_error(self, method: str, args: dict[str, Any], *, text_limit: int) -> str | None:
        markdown, text, blocks = args.get("markdown_text"), args.get("text"), args.get("blocks")
        if markdown is not None and (text or blocks):
            self.problems.append(f"{method}: markdown_text combined with text/blocks")
            return "markdown_text_conflict"
        if not (markdown or text or blocks or args.get("attachments")):
            self.problems.append(f"{method}: no content")
            return "no_text"
        if markdown is not None and len(markdown) > MARKDOWN_TEXT_LIMIT:
            self.problems.append(f"{method}: markdown_text of {len(markdown)} chars")
            return "msg_too_long"
        if text is not None and len(text) > text_limit:
            self.problems.append(f"{method}: text of {len(text)} chars")
            return "msg_too_long"
        if blocks is not None:
            return self._blocks_error(method, blocks, MESSAGE_BLOCKS_LIMIT)
        return None

    def _blocks_error(self, method: str, blocks: Any, limit: int, *, surface: str = "message") -> str | None:
        """Slack block limits: count, section 3,000, markdown 12,000 (also in total), button value 2,000;
        input blocks only in modals and the Home tab, with their elements' own limits (input_problems)."""
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        problems = []
        if isinstance(blocks, list):
            block_ids = [b.get("block_id") for b in blocks if b.get("block_id")]
            if len(block_ids) != len(set(block_ids)):
                problems.append("duplicate block_id")
            for block in blocks:
                if block.get("type") == "input":
                    if surface == "message":
                        problems.append("input block in a message")
                    problems.extend(input_problems(block))
        if not isinstance(blocks, list) or len(blocks) > limit:
            problems.append(f"{len(blocks) if isinstance(blocks, list) else '?'} blocks")
            blocks = []
        markdown_total = 0
        for block in blocks:
            kind = block.get("type")
            if kind == "section" and len(block.get("text", {}).get("text", "")) > SECTION_TEXT_LIMIT:
                problems.append("section text over 3,000")
            if kind == "markdown":
                markdown_total += len(block.get("text", ""))
            if kind == "actions":
                if len(block.get("elements", [])) > 25:
                    problems.append("more than 25 actions")
                for element in block.get("elements", []):
                    if len(str(element.get("value", ""))) > BUTTON_VALUE_LIMIT:
                        problems.append("button value over 2,000")
                    if len(element.get("text", {}).get("text", "")) > 75:
                        problems.append("button text over 75")
            if kind == "context" and len(block.get("elements", [])) > 10:
                problems.append("more than 10 context elements")
            if kind == "header" and len(block.get("text", {}).get("text", "")) > 150:
                problems.append("header text over 150")
            if kind not in (
                "section",
                "markdown",
                "actions",
                "context",
                "divider",
                "header",
                "rich_text",
                "input",
            ):
                problems.append(f"unknown block type {kind}")
        if markdown_total > MARKDOWN_TEXT_LIMIT:
            problems.append(f"markdown blocks of {markdown_total} chars")
        if problems:
            self.problems.append(f"{method}: invalid blocks: {', '.join(problems)}")
            return "invalid_blocks"
        return None

    def _m_chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = args["channel"]
        if channel in self.not_member_of:
            return {"ok": False, "error": "not_in_channel"}
        error = self._content_error("chat.postMessage", args, text_limit=TEXT_LIMIT)
        if error:
            return {"ok": False, "error": error}
        thread_ts = args.get("thread_ts")
        if thread_ts and not any(m["ts"] == thread_ts for m in self.messages[channel]):
            self.problems.append(f"chat.postMessage: thread_ts {thread_ts} is not a message in {channel}")
        ts = self.new_ts()
        message = {
            "type": "message",
            "user": BOT_USER_ID,
            "bot_id": BOT_ID,
            "app_id": APP_ID,
            "ts": ts,
            "text": args.get("markdown_text") or args.get("text") or "",
            "blocks": _blocks(args.get("blocks")),
        }
        if thread_ts:
            message["thread_ts"] = thread_ts
        if isinstance(args.get("metadata"), dict):
            message["metadata"] = args["metadata"]
        self.messages[channel].append(message)
        return {"channel": channel, "ts": ts, "message": message}

    def _m_chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        error = self._content_error("chat.update", args, text_limit=UPDATE_TEXT_LIMIT)
        if error:
            return {"ok": False, "error": error}
        message = self.find(args["channel"], args["ts"])
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        if message.get("stream_state") == "streaming":
            self.problems.append("chat.update: on a message that is still streaming")
            return {"ok": False, "error": "streaming_state_conflict"}
        message["text"] = args.get("markdown_text") or args.get("text") or ""
        message["blocks"] = _blocks(args.get("blocks"))
        message.pop("stream_text", None)
        message["edits"] = message.get("edits", 0) + 1
        return {"channel": args["channel"], "ts": args["ts"], "text": message["text"]}

    def _m_chat_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self.find(args["channel"], args["ts"])
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        message["deleted"] = True
        return {"channel": args["channel"], "ts": args["ts"]}

    def _stream(self, args: dict[str, Any]) -> dict[str, Any] | str:
        message = self.find(args["channel"], args["ts"])
        if message is None:
            return "message_not_found"
        lifetime = self.stream_lifetime_s
        if (
            message.get("stream_state") == "streaming"
            and lifetime is not None
            and time.monotonic() - message["stream_started"] > lifetime
        ):
            message["stream_state"] = "expired"
        if message.get("stream_state") != "streaming":
            return "message_not_in_streaming_state"
        return message

    def _chunks_error(self, method: str, message: dict[str, Any], chunks: Any) -> str | None:
        """Check streaming chunks and apply them to the message (text, and each task card's latest
        state). A card is a block of the message: at most 50 of them."""
        if isinstance(chunks, str):
            chunks = json.loads(chunks)
        if not isinstance(chunks, list) or not chunks:
            self.problems.append(f"{method}: chunks is not a non-empty array")
            return "invalid_chunks"
        tasks = dict(message.get("tasks") or {})
        text = ""
        timeline = list(message.get("timeline") or [])
        for chunk in chunks:
            kind = chunk.get("type") if isinstance(chunk, dict) else None
            if kind not in CHUNK_FIELDS:
                self.problems.append(f"{method}: unknown chunk {chunk!r}")
                return "invalid_chunks"
            extra = set(chunk) - CHUNK_FIELDS[kind]
            if extra:
                self.problems.append(f"{method}: {kind} chunk with unknown fields {sorted(extra)}")
                return "invalid_chunks"
            if kind == "markdown_text":
                if not isinstance(chunk.get("text"), str) or len(chunk["text"]) > MARKDOWN_TEXT_LIMIT:
                    self.problems.append(f"{method}: markdown_text chunk missing or over 12,000 chars")
                    return "invalid_chunks"
                text += chunk["text"]
                timeline.append(("text", chunk["text"]))
            if kind == "task_update":
                problem = self._task_problem(chunk)
                if problem:
                    self.problems.append(f"{method}: {problem}")
                    return "invalid_chunks"
                if chunk["id"] not in tasks:
                    timeline.append(("card", chunk["id"]))
                tasks[chunk["id"]] = {k: v for k, v in chunk.items() if k != "type"}
                message.setdefault("task_log", []).append((chunk["id"], chunk["status"]))
        if len(tasks) > STREAM_CHUNK_BLOCKS_LIMIT:
            self.problems.append(f"{method}: {len(tasks)} task cards in one message")
            return "msg_blocks_too_many"
        message["tasks"] = tasks
        message["timeline"] = timeline  # text and cards in the order they appeared (timeline mode)
        message["stream_text"] = message.get("stream_text", "") + text
        return None

    @staticmethod
    def _task_problem(chunk: dict[str, Any]) -> str:
        if not isinstance(chunk.get("id"), str) or not chunk["id"]:
            return "task_update without an id"
        if not isinstance(chunk.get("title"), str) or not chunk["title"].strip():
            return "task_update without a title"
        if chunk.get("status") not in TASK_STATUSES:
            return f"task_update with status {chunk.get('status')!r}"
        for key in ("details", "output"):
            if key in chunk and not isinstance(chunk[key], str):
                return f"task_update {key} is not a string"
        for source in chunk.get("sources") or []:
            url = source.get("url") if isinstance(source, dict) else None
            if (
                not isinstance(source, dict)
                or source.get("type") != "url"
                or not isinstance(url, str)
                or not url.startswith(("https://", "http://"))
                or not source.get("text")
                or set(source) - {"type", "url", "text"}
            ):
                return f"task_update source is not a url element: {source!r}"
        return ""

    def timeline(self, channel: str, thread_ts: str) -> list[str]:
        """The bot's streamed thread messages as a person reads them: text pieces joined, each card as
        `[card title]`, in the order they appeared."""
        shown: list[str] = []
        for message in self.replies(channel, thread_ts):
            for kind, value in message.get("timeline") or []:
                if kind == "card":
                    shown.append(f"[{message['tasks'][value]['title']}]")
                elif shown and not shown[-1].startswith("["):
                    shown[-1] += value
                else:
                    shown.append(value)
        return shown

    def cards(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        """Every task card in the bot's thread messages (latest state), in the order they appeared."""
        return [card for m in self.replies(channel, thread_ts) for card in (m.get("tasks") or {}).values()]

    def cards_left_open(self, channel: str) -> list[str]:
        """Task cards still pending or in progress in a stream that was stopped (or is still streaming)
        and not deleted: Slack would show them spinning forever."""
        left = []
        for message in self.messages[channel]:
            if message.get("deleted") or not message.get("tasks"):
                continue
            if message.get("stream_state") == "streaming":
                left += [f"{message['ts']}:{i} (stream never stopped)" for i in message["tasks"]]
            left += [f"{message['ts']}:{i}" for i in message.get("cards_left_open") or []]
        return left

    def _m_chat_startStream(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = args["channel"]
        if not args.get("thread_ts"):
            self.problems.append("chat.startStream: without thread_ts")
            return {"ok": False, "error": "invalid_arguments"}
        if channel.startswith("C") or channel.startswith("G"):
            if not args.get("recipient_user_id"):
                return {"ok": False, "error": "missing_recipient_user_id"}
            if not args.get("recipient_team_id"):
                return {"ok": False, "error": "missing_recipient_team_id"}
        markdown = args.get("markdown_text") or ""
        if len(markdown) > MARKDOWN_TEXT_LIMIT:
            self.problems.append(f"chat.startStream: markdown_text of {len(markdown)} chars")
            return {"ok": False, "error": "msg_too_long"}
        mode = args.get("task_display_mode")
        if mode is not None and mode not in TASK_DISPLAY_MODES:
            self.problems.append(f"chat.startStream: task_display_mode {mode!r}")
            return {"ok": False, "error": "invalid_arguments"}
        started: dict[str, Any] = {"task_display_mode": mode or "timeline"}
        if args.get("chunks") is not None:
            error = self._chunks_error("chat.startStream", started, args["chunks"])
            if error:
                return {"ok": False, "error": error}
        ts = self.new_ts()
        self.messages[channel].append(
            {
                **started,
                "type": "message",
                "user": BOT_USER_ID,
                "bot_id": BOT_ID,
                "app_id": APP_ID,
                "ts": ts,
                "text": "",
                "thread_ts": args["thread_ts"],
                "stream_text": started.get("stream_text", "") + markdown,
                "timeline": [*started.get("timeline", []), *([("text", markdown)] if markdown else [])],
                "stream_state": "streaming",
                "stream_started": time.monotonic(),
                "appends": 0,
            }
        )
        return {"channel": channel, "ts": ts}

    def _m_chat_appendStream(self, args: dict[str, Any]) -> dict[str, Any]:
        markdown = args.get("markdown_text") or ""
        if len(markdown) > MARKDOWN_TEXT_LIMIT:
            self.problems.append(f"chat.appendStream: markdown_text of {len(markdown)} chars")
            return {"ok": False, "error": "msg_too_long"}
        message = self._stream(args)
        if isinstance(message, str):
            return {"ok": False, "error": message}
        if args.get("chunks") is not None:
            error = self._chunks_error("chat.appendStream", message, args["chunks"])
            if error:
                return {"ok": False, "error": error}
        message["stream_text"] += markdown
        if markdown:
            message.setdefault("timeline", []).append(("text", markdown))
        message["appends"] += 1
        return {"channel": args["channel"], "ts": args["ts"]}

    def _m_chat_stopStream(self, args: dict[str, Any]) -> dict[str, Any]:
        message = self._stream(args)
        if isinstance(message, str):
            return {"ok": False, "error": message}
        if args.get("blocks") is not None:
            error = self._blocks_error("chat.stopStream", args["blocks"], MESSAGE_BLOCKS_LIMIT)
            if error:
                return {"ok": False, "error": error}
        if args.get("chunks") is not None:
            error = self._chunks_error("chat.stopStream", message, args["chunks"])
            if error:
                return {"ok": False, "error": error}
        open_cards = [i for i, c in (message.get("tasks") or {}).items() if c["status"] in TASK_STATUSES[:2]]
        if open_cards:  # a problem unless the message is taken back (deleted): see `cards_left_open`
            message["cards_left_open"] = open_cards
        message["stream_text"] += args.get("markdown_text") or ""
        message["blocks"] = _blocks(args.get("blocks"))
        message["stream_state"] = "stopped"
        if len(message["stream_text"]) > 40_000:
            self.problems.append("chat.stopStream: streamed message over 40,000 chars")
        return {"channel": args["channel"], "ts": args["ts"], "message": {"ts": args["ts"]}}

    def _m_views_open(self, args: dict[str, Any]) -> dict[str, Any]:
        view = args["view"] if isinstance(args["view"], dict) else json.loads(args["view"])
        error = self._blocks_error("views.open", view.get("blocks", []), MODAL_BLOCKS_LIMIT, surface="modal")
        if error:
            return {"ok": False, "error": error}
        if problems := view_problems(view, "modal"):
            self.problems.extend(f"views.open: {p}" for p in problems)
            return {"ok": False, "error": "invalid_arguments"}
        self.views.append(view)
        return {
            "view": {"id": f"V{len(self.views):08d}", "team_id": TEAM_ID, "state": {"values": {}}, **view}
        }

    def _m_views_update(self, args: dict[str, Any]) -> dict[str, Any]:
        view = args["view"] if isinstance(args["view"], dict) else json.loads(args["view"])
        opened = {f"V{i:08d}" for i in range(1, len(self.views) + 1)}
        if args.get("view_id") not in opened:
            return {"ok": False, "error": "not_found"}
        error = self._blocks_error(
            "views.update", view.get("blocks", []), MODAL_BLOCKS_LIMIT, surface="modal"
        )
        if error:
            return {"ok": False, "error": error}
        if problems := view_problems(view, "modal"):
            self.problems.extend(f"views.update: {p}" for p in problems)
            return {"ok": False, "error": "invalid_arguments"}
        self.updated_views.append(view)
        return {"view": {"id": args["view_id"], "team_id": TEAM_ID, "state": {"values": {}}, **view}}

    def _m_views_publish(self, args: dict[str, Any]) -> dict[str, Any]:
        view = args["view"] if isinstance(args["view"], dict) else json.loads(args["view"])
        error = self._blocks_error(
            "views.publish", view.get("blocks", []), MODAL_BLOCKS_LIMIT, surface="home"
        )
        if error:
            return {"ok": False, "error": error}
        if problems := view_problems(view, "home"):
            self.problems.extend(f"views.publish: {p}" for p in problems)
            return {"ok": False, "error": "invalid_arguments"}
        if args["user_id"] not in self.users:
            return {"ok": False, "error": "user_not_found"}
        self.home_views[args["user_id"]] = view
        return {"view": {"id": f"VH{len(self.home_views):07d}", "team_id": TEAM_ID, **view}}

    def _m_assistant_threads_setStatus(self, args: dict[str, Any]) -> dict[str, Any]:
        for message in args.get("loading_messages") or []:
            if len(message) > 50:
                self.problems.append("assistant.threads.setStatus: loading message over 50 chars")
        return {}

    def _m_assistant_threads_setSuggestedPrompts(self, args: dict[str, Any]) -> dict[str, Any]:
        if len(args.get("prompts") or []) > 4:
            self.problems.append("assistant.threads.setSuggestedPrompts: more than 4 prompts")
        return {}

    def _m_assistant_threads_setTitle(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}

    def _m_chat_postEphemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        error = self._content_error("chat.postEphemeral", args, text_limit=TEXT_LIMIT)
        if error:
            return {"ok": False, "error": error}
        self.ephemerals.append(args)
        return {"message_ts": self.new_ts()}

    def _m_reactions_add(self, args: dict[str, Any]) -> dict[str, Any]:
        key = (args["channel"], args["timestamp"])
        if args["name"] in self.reactions[key]:
            return {"ok": False, "error": "already_reacted"}
        self.reactions[key].add(args["name"])
        return {}

    def _m_reactions_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        key = (args.get("channel", ""), args.get("timestamp", ""))
        if args["name"] not in self.reactions[key]:
            return {"ok": False, "error": "no_reaction"}
        self.reactions[key].discard(args["name"])
        return {}

    def _m_users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        user = self.users.get(args["user"])
        return {"user": user} if user else {"ok": False, "error": "user_not_found"}

    def _m_usergroups_users_list(self, args: dict[str, Any]) -> dict[str, Any]:
        members = self.usergroups.get(str(args["usergroup"]))
        return {"users": list(members)} if members is not None else {"ok": False, "error": "no_such_subteam"}

    def _m_conversations_replies(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, thread = args["channel"], str(args["ts"])
        thread_messages = sorted(
            (
                m
                for m in self.messages[channel]
                if (m["ts"] == thread or m.get("thread_ts") == thread) and not m.get("deleted")
            ),
            key=lambda m: float(m["ts"]),
        )
        if not thread_messages:
            return {"ok": False, "error": "thread_not_found"}
        if args.get("oldest"):  # like Slack: the parent always comes first, then what is newer than oldest
            oldest, inclusive = float(args["oldest"]), str(args.get("inclusive")) in ("1", "true", "True")
            thread_messages = [thread_messages[0]] + [
                m
                for m in thread_messages[1:]
                if float(m["ts"]) > oldest or (inclusive and float(m["ts"]) == oldest)
            ]
        start = int(args.get("cursor") or 0)
        limit = int(args.get("limit") or 1000)
        page = thread_messages[start : start + limit]
        more = start + limit < len(thread_messages)
        return {
            "messages": page,
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }

    # ---- the built-in tools' reads (bot/tools) ------------------------------------------------------
    def add_conversation(
        self,
        channel: str,
        name: str = "",
        *,
        kind: str = "public",
        members: tuple[str, ...] | list[str] = (),
        ext_shared: bool = False,
        im_user: str = "",
    ) -> None:
        """A conversation for conversations.info/members/history: kind public, private, im or mpim.
        The bot is a member unless `members` leaves it out on purpose (then private reads fail)."""
        info: dict[str, Any] = {
            "id": channel,
            "created": 1_700_000_000,
            "is_channel": kind in ("public", "private"),
            "is_group": kind == "private",
            "is_im": kind == "im",
            "is_mpim": kind == "mpim",
            "is_private": kind != "public",
            "is_archived": False,
            "is_ext_shared": ext_shared,
            "is_shared": ext_shared,
            "is_org_shared": False,
            "context_team_id": TEAM_ID,
        }
        if kind == "im":
            info["user"] = im_user
        else:
            info["name"] = name
            info["name_normalized"] = name
        self.conversations[channel] = info
        self.conversation_members[channel] = list(members)

    def _readable(self, channel: str) -> dict[str, Any] | None:
        """The conversation if the bot can read it (Slack: channel_not_found otherwise for private ones)."""
        info = self.conversations.get(channel)
        if info is None:
            return None
        if info["is_private"] and BOT_USER_ID not in self.conversation_members.get(channel, []):
            return None
        return info

    def _m_conversations_info(self, args: dict[str, Any]) -> dict[str, Any]:
        info = self._readable(args["channel"])
        if info and not info["is_im"]:  # Slack says whether the bot is a member of a channel (not of a DM)
            info = {**info, "is_member": args["channel"] not in self.not_member_of}
        return {"channel": dict(info)} if info else {"ok": False, "error": "channel_not_found"}

    def _m_conversations_members(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._readable(args["channel"]) is None:
            return {"ok": False, "error": "channel_not_found"}
        members = self.conversation_members.get(args["channel"], [])
        start = int(args.get("cursor") or 0)
        limit = int(args.get("limit") or 100)
        more = start + limit < len(members)
        return {
            "members": members[start : start + limit],
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }

    def _m_conversations_history(self, args: dict[str, Any]) -> dict[str, Any]:
        """Top-level messages, newest first, with reply_count on thread parents; oldest/latest exclusive
        unless inclusive; limit and a numeric cursor."""
        channel = args["channel"]
        if self._readable(channel) is None:
            return {"ok": False, "error": "channel_not_found"}
        inclusive = str(args.get("inclusive")) in ("1", "true", "True")
        oldest = float(args.get("oldest") or 0)
        latest = float(args["latest"]) if args.get("latest") else None
        live = [m for m in self.messages[channel] if not m.get("deleted")]
        top = []
        for message in live:
            if message.get("thread_ts") not in (None, message["ts"]):
                continue
            ts = float(message["ts"])
            if ts < oldest or (ts == oldest and not inclusive and oldest):
                continue
            if latest is not None and (ts > latest or (ts == latest and not inclusive)):
                continue
            replies = sum(1 for m in live if m.get("thread_ts") == message["ts"] and m["ts"] != message["ts"])
            thread = {"reply_count": replies, "thread_ts": message["ts"]} if replies else {}
            shown = {k: v for k, v in message.items() if k != "metadata" or args.get("include_all_metadata")}
            top.append({**shown, **thread})
        top.sort(key=lambda m: float(m["ts"]), reverse=True)
        start = int(args.get("cursor") or 0)
        limit = int(args.get("limit") or 100)
        more = start + limit < len(top)
        return {
            "messages": top[start : start + limit],
            "has_more": more,
            "pin_count": 0,
            "channel_actions_ts": None,
            "channel_actions_count": 0,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }

    def _m_chat_getPermalink(self, args: dict[str, Any]) -> dict[str, Any]:
        channel, ts = args["channel"], str(args["message_ts"])
        message = self.find(channel, ts)
        if message is None:
            return {"ok": False, "error": "message_not_found"}
        link = f"https://fake.slack.com/archives/{channel}/p{ts.replace('.', '')}"
        if message.get("thread_ts") and message["thread_ts"] != ts:
            link += f"?thread_ts={message['thread_ts']}&cid={channel}"
        return {"channel": channel, "permalink": link}

    def _m_assistant_search_context(self, args: dict[str, Any]) -> dict[str, Any]:
        """With a bot token: only with a valid action_token, and only public channels."""
        if args.get("action_token") not in self.action_tokens:
            return {"ok": False, "error": "invalid_action_token"}
        channel_types = str(args.get("channel_types") or "public_channel").split(",")
        if set(channel_types) - {"public_channel"}:
            self.problems.append(f"assistant.search.context: a bot token asked for {channel_types}")
            return {"ok": False, "error": "missing_scope"}
        limit = int(args.get("limit") or 20)
        return {
            "results": {"messages": self.search_results[:limit]},
            "response_metadata": {"next_cursor": ""},
        }
