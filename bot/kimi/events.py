"""What a Kimi stream says, as plain events, and the Accumulator that builds the whole message.

Pure: no I/O. The client feeds chunks in; the pipeline reads events and the finished message out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


Event = Reasoning | Text


def _get(obj: Any, key: str) -> Any:
    """Read a field from an SDK object or a dict, including fields the SDK keeps in model_extra."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    value = getattr(obj, key, None)
    if value is None:
        extra = getattr(obj, "model_extra", None) or {}
        value = extra.get(key)
    return value


def usage_from(raw: Any) -> Usage | None:
    """Kimi's usage object (top-level cached_tokens, or OpenAI's prompt_tokens_details)."""
    if raw is None:
        return None
    prompt = int(_get(raw, "prompt_tokens") or 0)
    completion = int(_get(raw, "completion_tokens") or 0)
    cached = _get(raw, "cached_tokens")
    if cached is None:
        cached = _get(_get(raw, "prompt_tokens_details"), "cached_tokens")
    return Usage(prompt, completion, int(cached or 0))


@dataclass
class Accumulator:
    """Collects a streamed answer into one assistant message to store and replay unchanged."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: Usage | None = None
    finish_reason: str | None = None
    saw_reasoning_field: bool = False

    def feed(self, chunk: Any) -> list[Event]:
        """Take one ChatCompletionChunk (or its dict form); return what it added, in order."""
        events: list[Event] = []
        self.usage = usage_from(_get(chunk, "usage")) or self.usage
        for choice in _get(chunk, "choices") or []:
            # Kimi puts usage in choices[0].usage of the last chunk, not in chunk.usage.
            self.usage = usage_from(_get(choice, "usage")) or self.usage
            self.finish_reason = _get(choice, "finish_reason") or self.finish_reason
            delta = _get(choice, "delta")
            if delta is None:
                continue
            reasoning = _get(delta, "reasoning_content")
            if reasoning is not None:
                self.saw_reasoning_field = True
                if reasoning:
                    self.reasoning.append(reasoning)
                    events.append(Reasoning(reasoning))
            text = _get(delta, "content")
            if text:
                self.content.append(text)
                events.append(Text(text))
            for call in _get(delta, "tool_calls") or []:
                self._add_tool_call(call)
        return events

    def _add_tool_call(self, call: Any) -> None:
        index = int(_get(call, "index") or 0)
        slot = self.tool_calls.setdefault(
            index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if _get(call, "id"):
            slot["id"] = _get(call, "id")
        if _get(call, "type"):
            slot["type"] = _get(call, "type")
        function = _get(call, "function")
        if function is not None:
            if _get(function, "name"):
                slot["function"]["name"] = _get(function, "name")
            if _get(function, "arguments"):
                slot["function"]["arguments"] += _get(function, "arguments")

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    def message(self) -> dict[str, Any]:
        """The assistant message exactly as it must be replayed (reasoning kept, tool-call ids intact)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.saw_reasoning_field or self.reasoning:
            message["reasoning_content"] = self.reasoning_text
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message
