"""Long threads: the turns that fall out of the model's window are summarised, not just dropped. Pure.

When a thread's history outgrows the window, the start index (bot/context.py) moves forward with headroom,
and the entries it passes over, together with the summary already at the head (if any), are folded into one
new summary. It sits right after the system prompt, so the prompt's prefix (system prompt, summary, kept
entries) stays byte-stable, and cached, until the next compaction. The I/O (the Kimi request, the Redis
cache) is in bot/summaries.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bot.context import (
    CHARS_PER_TOKEN,
    MESSAGE_OVERHEAD_TOKENS,
    TRIM_HEADROOM,
    Fit,
    estimate_tokens,
    to_message,
    to_messages,
)

SUMMARY_MAX_TOKENS = 2_000  # the most room a summary takes at the head of the window
SUMMARY_SHARE = 0.1  # and at most this share of the prompt budget (a small window keeps room for turns)
# The summary request's output cap, in multiples of the summary's room: an always-thinking model (no way to
# switch it off) reasons within the same max_completion_tokens.
SUMMARY_THINKING_ROOM = 4
SUMMARY_REQUEST_SLACK_TOKENS = 1_000  # the instruction and the chat template, on top of the transcript
CHARS_PER_WORD = 6  # a word and its space, conservatively (the instruction asks for words)

SUMMARY_INSTRUCTION = (
    "You compress the beginning of a Slack conversation between people and an assistant, so that the "
    "conversation can go on without it. Write a summary of at most {words} words that keeps what later "
    "messages may rely on: who said or asked what, facts, decisions, numbers, names, links, code "
    "identifiers, and questions still open. If a summary of even earlier messages is given, fold it in. "
    "Write in the conversation's language. Reply with the summary only."
)
HEAD_LABEL = "Summary of the earlier conversation (messages {first} to {end}, no longer shown):"
# The line a summary kept through a failed fold ends with (bot/summaries.py): what it does not hold.
GAP_LINE = "(Messages {first} to {end} could not be summarised and are left out.)"


@dataclass(frozen=True)
class Summary:
    """A summary of the history entries [first, end) (indexes in the whole history); `missing` of them are
    not in it (left out when a fold failed: its text says which), so the footer does not count them."""

    first: int
    end: int
    text: str
    missing: int = 0

    def message(self) -> dict[str, Any]:
        """The fixed message at the head of the window, right after the system prompt."""
        label = HEAD_LABEL.format(first=self.first + 1, end=self.end)
        return {"role": "system", "content": f"{label}\n{self.text}"}

    @property
    def covers(self) -> int:
        return self.end - self.first

    @property
    def summarised(self) -> int:
        """The entries the text stands for."""
        return self.covers - self.missing

    def dump(self) -> str:
        data: dict[str, Any] = {"first": self.first, "end": self.end, "text": self.text}
        if self.missing:
            data["missing"] = self.missing
        return json.dumps(data, ensure_ascii=False)

    @staticmethod
    def load(raw: str) -> Summary | None:
        """A stored summary, or None when it is not one (corrupted, or written by something else)."""
        try:
            data = json.loads(raw)
            first, end, text = data["first"], data["end"], data["text"]
            missing = data.get("missing", 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (first, end, missing)):
            return None
        if not isinstance(text, str) or not 0 <= first < end or not text.strip():
            return None
        if not 0 <= missing < end - first:
            return None
        return Summary(first, end, text, missing)


@dataclass(frozen=True)
class Compaction:
    """The entries to fold into a new summary of [first, end): the summary at the head so far (`previous`,
    which covers [first, where `dropped` begins)) and the entries leaving the window (`dropped`)."""

    first: int
    end: int
    previous: Summary | None
    dropped: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Plan:
    """Where the window begins (`start`, an index into the loaded entries) and what leads it: the summary
    already in place (`head`), or a new one to make first (`compaction`)."""

    start: int
    head: Summary | None
    compaction: Compaction | None = None


def summary_room(budget_tokens: int) -> int:
    """The tokens kept free for a summary at the head of a window of `budget_tokens`."""
    return max(min(SUMMARY_MAX_TOKENS, int(budget_tokens * SUMMARY_SHARE)), MESSAGE_OVERHEAD_TOKENS * 4)


def summary_output_cap(budget_tokens: int) -> int:
    """max_completion_tokens of the summary request (reasoning and summary share it)."""
    return summary_room(budget_tokens) * SUMMARY_THINKING_ROOM


def plan(
    system_prompt: str,
    entries: list[dict[str, Any]],
    *,
    start: int,
    offset: int,
    head: Summary | None,
    budget_tokens: int,
    calibration: float = 1.0,
    replays_reasoning: bool = True,
) -> Plan:
    """Keep the window as it is while it fits (the prefix stays byte-stable); once it does not, move the
    start forward until what is kept fits `budget_tokens` x TRIM_HEADROOM with room for a summary, at a
    user turn (a tool-call exchange is never cut in half), and fold what it passed over into a new summary.

    `entries` are the history from `offset` on; `start` indexes them; `head` is the summary that ended
    where the window began on the last turn (ignored unless it ends exactly at `offset + start`). Never
    moves the start backwards and never leaves out the last entry (the question). A question too long on
    its own (beside the system prompt) compacts nothing: the turn is refused, and a summary would be paid
    for nothing."""
    start = min(max(start, 0), max(len(entries) - 1, 0))
    if head is not None and head.end != offset + start:
        head = None
    costs = [
        estimate_tokens(to_message(e, replays_reasoning=replays_reasoning), calibration) for e in entries
    ]
    after = [0] * (len(costs) + 1)  # after[i]: the cost of entries[i:]
    for i in range(len(costs) - 1, -1, -1):
        after[i] = after[i + 1] + costs[i]
    system = estimate_tokens({"role": "system", "content": system_prompt}, calibration)
    head_cost = estimate_tokens(head.message(), calibration) if head is not None else 0
    if not entries or system + head_cost + after[start] <= budget_tokens:
        return Plan(start, head)
    if system + costs[-1] > budget_tokens:  # the question alone is too long: fit refuses it, so no summary
        return Plan(start, head)
    target = budget_tokens * TRIM_HEADROOM - summary_room(budget_tokens)
    last = len(entries) - 1
    end = start
    while end < last and system + after[end] > target:
        end += 1
    while end < last and entries[end].get("role") != "user":
        end += 1
    if end == start:  # nothing can leave: the question alone is (nearly) too long; fit says so
        return Plan(start, head)
    first = head.first if head is not None else offset + start
    return Plan(end, None, Compaction(first, offset + end, head, tuple(entries[start:end])))


def _content_text(content: Any) -> str:
    """A message's content as text (a list of parts, e.g. an image with a caption, gives its text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [str(p.get("text") or "") for p in content if isinstance(p, dict)]
        others = sum(1 for p in content if not (isinstance(p, dict) and p.get("type") == "text"))
        return " ".join([*filter(None, texts), *(["[attachment]"] * others)])
    return ""


def transcript_line(entry: dict[str, Any]) -> str:
    """One history entry as a line of the transcript the summary is made from (roles in words: a
    transcript, not a conversation, so tool-call messages need no matching results)."""
    role = entry.get("role")
    text = _content_text(entry.get("content")).strip()
    if role == "assistant":
        calls = [str((c.get("function") or {}).get("name") or "") for c in entry.get("tool_calls") or []]
        called = f"[used tools: {', '.join(filter(None, calls))}] " if calls else ""
        return f"Assistant: {called}{text}".rstrip()
    if role == "tool":
        return f"[tool result] {text}"
    return text  # a user turn already leads with the speaker's name


def _bounded(text: str, limit: int) -> str:
    """`text` within `limit` characters: its beginning and end, the middle marked as cut."""
    if len(text) <= limit:
        return text
    half = max(limit // 2 - 10, 0)
    return f"{text[:half]}\n[…]\n{text[len(text) - half :]}"


def summary_request(
    compaction: Compaction, *, budget_tokens: int, input_tokens: int, calibration: float = 1.0
) -> list[dict[str, Any]]:
    """The messages of the summary request: the instruction, then the summary so far and the transcript of
    the entries leaving the window, within `input_tokens` (the model's window less the output cap)."""
    words = max(int(summary_room(budget_tokens) * CHARS_PER_TOKEN / CHARS_PER_WORD), 20)
    parts = []
    previous = compaction.previous
    if previous is not None:
        parts.append(f"Summary of messages {previous.first + 1} to {previous.end}:\n{previous.text}")
    first_dropped = compaction.end - len(compaction.dropped)
    lines = "\n\n".join(filter(None, (transcript_line(e) for e in compaction.dropped)))
    parts.append(f"Messages {first_dropped + 1} to {compaction.end}:\n{lines}")
    room = max(input_tokens - SUMMARY_REQUEST_SLACK_TOKENS, 0) / max(calibration, 0.01)
    return [
        {"role": "system", "content": SUMMARY_INSTRUCTION.format(words=words)},
        {"role": "user", "content": _bounded("\n\n".join(parts), int(room * CHARS_PER_TOKEN))},
    ]


def summary_text(raw: str, *, budget_tokens: int, calibration: float = 1.0, reserve_chars: int = 0) -> str:
    """The model's summary, cut to fit the room kept for it (the window's sums count on that room), less
    `reserve_chars` for a line to add after it."""
    label = (len(HEAD_LABEL) + 24) / CHARS_PER_TOKEN  # the label with its numbers filled in
    room = summary_room(budget_tokens) / max(calibration, 0.01) - MESSAGE_OVERHEAD_TOKENS - label - 2
    limit = max(int(room * CHARS_PER_TOKEN) - reserve_chars, 0)
    text = raw.strip()
    return text if len(text) <= limit else text[: max(limit - 1, 0)].rstrip() + "…"


def kept_summary(compaction: Compaction, *, budget_tokens: int, calibration: float = 1.0) -> Summary | None:
    """When the fold of `compaction` fails: the summary at the head so far, carried to the new end with a
    line saying which messages it does not hold (so nothing summarised before is lost); None when there was
    none."""
    previous = compaction.previous
    if previous is None:
        return None
    first_dropped = compaction.end - len(compaction.dropped)
    line = GAP_LINE.format(first=first_dropped + 1, end=compaction.end)
    text = summary_text(
        previous.text, budget_tokens=budget_tokens, calibration=calibration, reserve_chars=len(line) + 1
    )
    missing = previous.missing + len(compaction.dropped)
    return Summary(compaction.first, compaction.end, f"{text}\n{line}" if text else line, missing)


def window(
    system_prompt: str,
    entries: list[dict[str, Any]],
    *,
    start: int,
    summary: Summary | None,
    budget_tokens: int,
    calibration: float = 1.0,
    replays_reasoning: bool = True,
) -> Fit:
    """The messages sent: the system prompt, the summary (if any), then the entries from `start`. A summary
    that would not fit beside the question is left out rather than the question (`too_long` only when the
    entries alone do not fit)."""
    messages = to_messages(system_prompt, entries[start:], replays_reasoning=replays_reasoning)
    cost = sum(estimate_tokens(m, calibration) for m in messages)
    if summary is not None:
        if cost + estimate_tokens(summary.message(), calibration) > budget_tokens:
            summary = None
        else:
            messages.insert(1, summary.message())
    raw_estimate = sum(estimate_tokens(m) for m in messages)
    too_long = bool(entries) and cost > budget_tokens
    if summary is None:
        return Fit(start, messages, raw_estimate, too_long)
    n = summary.summarised
    note = f"{n} earlier message{'s' if n != 1 else ''} summarised to fit the context window"
    return Fit(start, messages, raw_estimate, too_long, summarised=n, notes=(note,))


SUMMARY_FAILED_NOTE = "they could not be summarised"
