"""A fake Kimi (Moonshot) chat-completions API over loopback HTTP.

Streams Server-Sent Events the way Kimi does: `delta.reasoning_content` first, then `delta.content`,
then a last chunk with `finish_reason` and the usage inside `choices[0].usage` (with `cached_tokens`),
then `data: [DONE]`. Replies are scripted per request: HTTP errors with Kimi's error bodies and
Retry-After, errors inside the stream, streams cut mid-way (clean EOF or a connection reset), slow chunks.

Tool calls stream as Kimi sends them: `delta.tool_calls[i]` with `id`, `type` and `function.name` first,
then `function.arguments` fragments, and `finish_reason: "tool_calls"`. Like Kimi with thinking on, the fake
refuses (HTTP 400 invalid_request_error) a request whose assistant tool-call message lacks
`reasoning_content`, a `role: "tool"` message whose `tool_call_id` no earlier call has, a call left without
its result, a bad `tool_choice`, and tool definitions Kimi would refuse (bad or duplicated names,
parameters not an object).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

API_KEY = "sk-test-key"

# What GET /models lists when a test does not say (`known_models`): ids as Kimi's platform names them.
LISTED_MODELS = (
    "kimi-k2.6",
    "kimi-k2.5",
    "kimi-k2-thinking",
    "kimi-k2-thinking-turbo",
    "kimi-k2.7-code",
    "kimi-k2.7-code-highspeed",
    "kimi-k3",
    "kimi-k3.1-pro",
    "kimi-k3.1-pro-highspeed",
    "moonshot-v1-8k",
    "moonshot-v1-32k",
    "moonshot-v1-128k",
)


# Models that read text only (KIMI_API.md: kimi-k2-thinking is text only): an image part is refused.
TEXT_ONLY_MODELS = frozenset({"kimi-k2-thinking", "kimi-k2-thinking-turbo"})
DATA_URL = re.compile(r"^data:(image/(?:png|jpeg|gif|webp));base64,([A-Za-z0-9+/=]+)$")
IMAGE_TOKENS = 1_000  # what the fake counts an image as in `usage.prompt_tokens`

TOOL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]{2,63}$")
TOOL_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class Call:
    """One tool call a scripted reply makes (`arguments` is sent as is: it may be invalid JSON)."""

    name: str
    arguments: str = "{}"
    id: str = ""  # default: "<name>:<n>" like Kimi's ids (unique per fake)


def text_of(content: Any) -> str:
    """A message's text: its content, or the text parts of a list of parts (images as "[image]")."""
    if isinstance(content, str):
        return content
    return "\n\n".join(
        p.get("text", "") if p.get("type") == "text" else "[image]"
        for p in content or []
        if isinstance(p, dict)
    )


def default_answer(request: dict[str, Any]) -> str:
    """Echo what the model was given, so tests can see which context reached it."""
    users = [m for m in request["messages"] if m["role"] == "user"]
    last = text_of(users[-1]["content"]) if users else ""
    return f"You said: {last} (I saw {len(request['messages'])} messages)"


@dataclass
class Reply:
    """How to answer one request."""

    status: int = 200
    error_type: str = ""
    error_message: str = ""
    retry_after: float | None = None
    reasoning: str = "Let me think about this carefully."
    content: str | Callable[[dict[str, Any]], str] | None = None
    chunk_chars: int = 40
    chunk_delay: float = 0.0
    first_byte_delay: float = 0.0
    finish_reason: str = "stop"
    cut_after_chunks: int | None = None  # stop after N content chunks: clean EOF, no finish, no [DONE]
    reset_after_chunks: int | None = None  # abort the TCP connection after N content chunks
    error_in_stream: dict[str, Any] | None = None  # sent as `data: {"error": ...}` after the reasoning
    garbage_in_stream: bool = False  # a `data:` line that is not JSON, after the reasoning
    cached_tokens: int = 0
    tool_calls: list[Call] | Callable[[dict[str, Any]], list[Call]] | None = None  # finish: "tool_calls"
    args_chunk_chars: int = 8  # argument fragments this long, as Kimi streams them


@dataclass
class FakeKimi:
    replies: deque[Reply] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)
    done_times: list[float] = field(default_factory=list)
    finished: dict[int, float] = field(default_factory=dict)  # request index -> when its last byte was sent
    known_models: set[str] | None = None
    models_status: int = 200  # what GET /models answers: 503 while Kimi is "down", 404 on a host without it
    models_page: tuple[int, str] | None = None  # GET /models answered by a proxy's HTML page (status, body)
    models_requests: int = 0
    tokens_per_char: float = 0.25
    # Moonshot's formulas ("official tools"): uri -> the `tools` list GET .../tools answers
    formula_tools: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fiber_requests: list[dict[str, Any]] = field(default_factory=list)  # {"uri", "body"} per POST .../fibers
    fiber_replies: deque[tuple[int, dict[str, Any]]] = field(default_factory=deque)  # (status, body) scripted
    server: TestServer | None = None
    responder: Callable[[dict[str, Any]], Reply] | None = (
        None  # replies to requests the script does not cover
    )
    rejected: list[str] = field(default_factory=list)  # why requests were refused with a 400
    _call_ids: int = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/formulas/{uri:.+}/tools", self._formula_tools)
        app.router.add_post("/v1/formulas/{uri:.+}/fibers", self._fibers)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()

    def prompt_tokens(self, request: dict[str, Any]) -> int:
        chars = sum(
            len(text_of(m.get("content"))) + len(m.get("reasoning_content") or "")
            for m in request["messages"]
        )
        images = sum(len(image_parts(m)) for m in request["messages"])
        return int(chars * self.tokens_per_char) + 4 * len(request["messages"]) + IMAGE_TOKENS * images

    @staticmethod
    def _error(status: int, error_type: str, message: str, retry_after: float | None = None) -> web.Response:
        headers = {"x-request-id": "req-fake-1"}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return web.json_response(
            {"error": {"message": message, "type": error_type}}, status=status, headers=headers
        )

    async def _models(self, request: web.Request) -> web.Response:
        """GET /models as Kimi answers it: `{"object": "list", "data": [{"id", "object", "created",
        "owned_by", "context_length", ...}]}`; 401 with Kimi's error body for a wrong key."""
        self.models_requests += 1
        if self.models_page is not None:
            return web.Response(
                status=self.models_page[0], text=self.models_page[1], content_type="text/html"
            )
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._error(401, "invalid_authentication_error", "Invalid Authentication")
        if self.models_status == 404:
            return web.Response(status=404, text="404 page not found")
        if self.models_status != 200:
            return self._error(self.models_status, "server_error", "The engine is currently overloaded")
        ids = sorted(self.known_models) if self.known_models is not None else list(LISTED_MODELS)
        data = [
            {
                "id": model,
                "object": "model",
                "created": 1_760_000_000,
                "owned_by": "moonshot",
                "root": model,
                "parent": None,
                "permission": [],
                "context_length": 262_144,
                "supports_image_in": model not in TEXT_ONLY_MODELS,
                "supports_video_in": False,
                "supports_reasoning": True,
            }
            for model in ids
        ]
        return web.json_response({"object": "list", "data": data})

    async def _formula_tools(self, request: web.Request) -> web.Response:
        """GET /v1/formulas/{uri}/tools: `{"object": "list", "tools": [...]}`; 404 for an unknown formula."""
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._error(401, "invalid_authentication_error", "Invalid Authentication")
        uri = request.match_info["uri"]
        tools = self.formula_tools.get(uri)
        if tools is None and uri == "moonshot/web-search:latest":
            tools = WEB_SEARCH_TOOLS
        if tools is None:
            return self._error(404, "resource_not_found_error", "formula not found")
        return web.json_response({"object": "list", "tools": tools})

    async def _fibers(self, request: web.Request) -> web.Response:
        """POST /v1/formulas/{uri}/fibers with `{"name", "arguments": "<JSON string>"}`: a succeeded fiber
        whose `context.encrypted_output` encodes the arguments (or the next scripted `fiber_replies`)."""
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._error(401, "invalid_authentication_error", "Invalid Authentication")
        uri = request.match_info["uri"]
        body = await request.json()
        self.fiber_requests.append({"uri": uri, "body": body})
        if self.fiber_replies:
            status, reply = self.fiber_replies.popleft()
            return web.json_response(reply, status=status)
        if not isinstance(body.get("name"), str) or not isinstance(body.get("arguments"), str):
            return self._error(400, "invalid_request_error", "name and arguments (JSON text) are required")
        try:
            json.loads(body["arguments"])
        except json.JSONDecodeError:
            return self._error(400, "invalid_request_error", "arguments is not valid JSON")
        return web.json_response(
            {
                "id": f"fiber-{len(self.fiber_requests)}",
                "object": "fiber",
                "status": "succeeded",
                "context": {"encrypted_output": encrypted_output(body["arguments"])},
            }
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.request_times.append(time.monotonic())
        if request.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._error(401, "invalid_authentication_error", "Invalid Authentication")
        body = await request.json()
        self.requests.append(body)
        index = len(self.requests) - 1
        if self.known_models is not None and body.get("model") not in self.known_models:
            return self._error(404, "resource_not_found_error", f"Not found the model {body.get('model')}")
        refused = check_request(body)
        if refused:
            self.rejected.append(refused)
            return self._error(400, "invalid_request_error", refused)
        if self.replies:
            reply = self.replies.popleft()
        else:
            reply = self.responder(body) if self.responder is not None else Reply()
        if reply.status != 200:
            return self._error(reply.status, reply.error_type, reply.error_message, reply.retry_after)

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-trace-id": "trace-fake"}
        )
        await response.prepare(request)
        if reply.first_byte_delay:
            await asyncio.sleep(reply.first_byte_delay)
        model = body.get("model", "kimi")
        created = int(time.time())

        async def send(
            delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None
        ) -> None:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            if usage is not None:
                choice["usage"] = usage
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)

        await send({"role": "assistant", "content": ""})
        for piece in _pieces(reply.reasoning, reply.chunk_chars):
            await send({"reasoning_content": piece})
        if reply.garbage_in_stream:
            await response.write(b"data: {not json at all\n\n")
            return response
        if reply.error_in_stream is not None:
            await response.write(f"data: {json.dumps({'error': reply.error_in_stream})}\n\n".encode())
            return response
        calls = reply.tool_calls(body) if callable(reply.tool_calls) else reply.tool_calls
        content = reply.content if reply.content is not None else ("" if calls else default_answer)
        text = content(body) if callable(content) else content
        for n, piece in enumerate(_pieces(text, reply.chunk_chars)):
            if reply.cut_after_chunks is not None and n >= reply.cut_after_chunks:
                return response
            if reply.reset_after_chunks is not None and n >= reply.reset_after_chunks:
                assert request.transport is not None
                request.transport.abort()
                return response
            await send({"content": piece})
        finish = reply.finish_reason
        arguments = 0
        for position, call in enumerate(calls or []):
            self._call_ids += 1
            call_id = call.id or f"{call.name}:{self._call_ids}"
            first = {"index": position, "id": call_id, "type": "function"}
            await send({"tool_calls": [{**first, "function": {"name": call.name, "arguments": ""}}]})
            for piece in _pieces(call.arguments, reply.args_chunk_chars):
                await send({"tool_calls": [{"index": position, "function": {"arguments": piece}}]})
            arguments += len(call.arguments)
            finish = "tool_calls"
        prompt = self.prompt_tokens(body)
        completion = (len(text) + len(reply.reasoning) + arguments) // 4 + 1
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": reply.cached_tokens,
        }
        await send({}, finish=finish, usage=usage)
        self.done_times.append(time.monotonic())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.finished[index] = time.monotonic()
        return response


def thinking_on(body: dict[str, Any]) -> bool:
    """Kimi's thinking models think unless the request switches it off (k2.5/k2.6 `thinking.type`)."""
    thinking = body.get("thinking") or {}
    return not (isinstance(thinking, dict) and thinking.get("type") == "disabled")


def image_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [p for p in content if isinstance(p, dict) and p.get("type") == "image_url"]


def content_problem(body: dict[str, Any]) -> str:
    """Why Kimi would refuse a message's content parts: unknown part types, an image that is not a
    base64 data URL of PNG/JPEG/GIF/WebP, or any image for a model that reads text only."""
    for message in body.get("messages") or []:
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list) or message.get("role") != "user":
            return "Invalid request: content must be a string"
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind != "image_url":
                return f"Invalid request: unknown content type {kind!r}"
            if body.get("model") in TEXT_ONLY_MODELS:
                return f"Invalid request: the model {body.get('model')} does not support image input"
            url = str((part.get("image_url") or {}).get("url") or "")
            match = DATA_URL.match(url)
            if not match:
                return "Invalid request: image_url must be a base64 data URL"
            try:
                base64.b64decode(match.group(2), validate=True)
            except ValueError:
                return "Invalid request: image_url is not valid base64"
    return ""


def check_request(body: dict[str, Any]) -> str:
    """Why Kimi would refuse this request with a 400 (empty when it would not): Kimi's own messages."""
    problem = content_problem(body)
    if problem:
        return problem
    tools = body.get("tools") or []
    names: set[str] = set()
    for tool in tools:
        function = tool.get("function") or {}
        name = str(function.get("name") or "")
        if tool.get("type") != "function" or not TOOL_NAME.match(name):
            return f"Invalid request: invalid function name {name!r}"
        if name in names:
            return f"Invalid request: function name {name} is duplicated"
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type") != "object"
        ):
            return f"Invalid request: parameters of function {name} must be of type object"
    choice = body.get("tool_choice")
    if choice is not None and (choice not in TOOL_CHOICES or (choice == "required" and not tools)):
        return f"Invalid request: invalid tool_choice {choice!r}"
    waiting: set[str] = set()  # calls not yet answered by a role:"tool" message
    known: set[str] = set()
    for index, message in enumerate(body.get("messages") or []):
        role = message.get("role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in known:
                return f"Invalid request: tool_call_id {call_id} is not found"
            waiting.discard(call_id)
            continue
        if waiting:
            return f"Invalid request: tool call ids {sorted(waiting)} did not have response messages"
        if role == "assistant" and message.get("tool_calls"):
            if thinking_on(body) and "reasoning_content" not in message:
                return (
                    "thinking is enabled but reasoning_content is missing in assistant tool call message "
                    f"at index {index}"
                )
            for call in message["tool_calls"]:
                known.add(call.get("id"))
                waiting.add(call.get("id"))
    if waiting:
        return f"Invalid request: tool call ids {sorted(waiting)} did not have response messages"
    return ""


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# ---- formulas (Moonshot's official tools) --------------------------------------------------------------
# What GET /formulas/moonshot/web-search:latest/tools answered in 2026 (descriptions as Moonshot wrote them).
WEB_SEARCH_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "web_search",
            "description": "用于信息检索的网络搜索",
            "parameters": {
                "properties": {
                    "classes": {
                        "description": "要关注的搜索领域。如果未指定，则默认为 'all'。",
                        "items": {
                            "enum": ["all", "academic", "social", "library", "finance", "code", "ecommerce"],
                            "type": "string",
                        },
                        "type": "array",
                    },
                    "query": {"description": "要搜索的内容", "type": "string"},
                },
                "required": ["query"],
                "type": "object",
            },
        },
    }
]


def encrypted_output(arguments: str) -> str:
    """What the fake's web-search fiber answers: opaque to the bot, recognisable to tests."""
    return "ENC:" + arguments.encode().hex()
