"""Thread history -> model messages, and fitting them into the model's window. Pure.

History is append-only. When it outgrows the window, the oldest turns are left out by moving a
persisted start index forward, with headroom, so the prompt prefix stays byte-stable (and cached)
over several turns instead of shifting by one message every time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Keys of a stored entry that belong to the API message; the rest (ts, user, usage...) is ours.
MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")

CHARS_PER_TOKEN = 3.0  # conservative for chat text (measured 3.4-4.4; see KIMI_API.md section 8)
MESSAGE_OVERHEAD_TOKENS = 8  # role markers and separators the chat template adds per message
TRIM_HEADROOM = 0.8  # when trimming, leave room for a few more turns before trimming again
MIN_CALIBRATION, MAX_CALIBRATION = 0.25, 4.0


# An image part's token cost. Kimi does not document it; vision encoders of its kind cost about one token
# per 28x28-pixel patch, so an image at the default pixel cap (FILES_IMAGE_MAX_PIXELS, 1536 x 1536) is
# about 3,000. The calibration factor corrects it from the API's count like everything else.
IMAGE_TOKENS = 3_000
FILE_ONLY_TEXT = "(no message text: a question about the attached file{s})"


def user_entry(
    name: str, text: str, *, ts: str, user: str, files: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A user turn; the speaker's name leads so the model can tell people apart. `files` (Slack file
    refs) are kept with it and read into its content when it is sent (bot/files); a message with only
    files asks about them."""
    said = text
    if files and not text.strip():
        said = FILE_ONLY_TEXT.format(s="s" if len(files) > 1 else "")
    entry: dict[str, Any] = {
        "role": "user",
        "content": f"{name}: {said}",
        "ts": ts,
        "user": user,
        "text": text,
    }
    if files:
        entry["files"] = [dict(f) for f in files]
    return entry


def content_chars(content: Any) -> tuple[int, int]:
    """The text characters and the images of a message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return len(content), 0
    chars = images = 0
    for part in content or []:
        if isinstance(part, dict) and part.get("type") == "image_url":
            images += 1
        elif isinstance(part, dict):
            chars += len(str(part.get("text") or ""))
    return chars, images


def to_message(entry: dict[str, Any], *, replays_reasoning: bool = True) -> dict[str, Any]:
    """The API message of a stored entry. For a model that ignores earlier turns' reasoning
    (`replays_reasoning` False), an answer's reasoning is left out (a thread whose earlier answers came
    from a model that replays it, K3 say, would otherwise send it all again); a tool-call turn keeps it,
    since a thinking model needs the reasoning behind its own tool calls."""
    message = {k: entry[k] for k in MESSAGE_KEYS if k in entry}
    if not replays_reasoning and message.get("role") == "assistant" and not message.get("tool_calls"):
        message.pop("reasoning_content", None)
    return message


def to_messages(
    system_prompt: str, entries: list[dict[str, Any]], *, replays_reasoning: bool = True
) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": system_prompt},
        *(to_message(e, replays_reasoning=replays_reasoning) for e in entries),
    ]


def estimate_tokens(message: dict[str, Any], calibration: float = 1.0) -> int:
    """A cheap upper-leaning token estimate, scaled by what the API reported last time."""
    chars, images = content_chars(message.get("content"))
    chars += len(message.get("reasoning_content") or "")
    if message.get("tool_calls"):
        chars += len(json.dumps(message["tool_calls"]))
    return int((chars / CHARS_PER_TOKEN + images * IMAGE_TOKENS + MESSAGE_OVERHEAD_TOKENS) * calibration) + 1


def calibrate(estimated: int, actual_prompt_tokens: int) -> float:
    """The factor that turns our estimate of a prompt into the API's count of it."""
    if estimated <= 0 or actual_prompt_tokens <= 0:
        return 1.0
    return min(max(actual_prompt_tokens / estimated, MIN_CALIBRATION), MAX_CALIBRATION)


@dataclass(frozen=True)
class Fit:
    start: int  # index of the first history entry sent
    messages: list[dict[str, Any]]
    estimated_tokens: int  # uncalibrated estimate of `messages`, to calibrate against the real count
    too_long: bool = False
    summarised: int = 0  # earlier entries a summary at the head of `messages` stands for (bot/compaction.py)
    notes: tuple[str, ...] = ()  # what the footer should say about the window (a summary, or its failure)

    @property
    def left_out(self) -> int:
        return self.start


def fit(
    system_prompt: str,
    entries: list[dict[str, Any]],
    *,
    start: int,
    budget_tokens: int,
    calibration: float = 1.0,
    replays_reasoning: bool = True,
) -> Fit:
    """Choose the newest history that fits `budget_tokens` (window minus output budget), as messages for
    a model that replays earlier reasoning or not (`replays_reasoning`: its profile's).

    Never moves `start` backwards, never drops the last entry (the question being answered), and
    begins at a user turn so a tool-call exchange is never cut in half. If the last entry alone
    does not fit, `too_long` is set.
    """
    start = min(max(start, 0), max(len(entries) - 1, 0))
    system = {"role": "system", "content": system_prompt}
    costs = [
        estimate_tokens(to_message(e, replays_reasoning=replays_reasoning), calibration) for e in entries
    ]
    fixed = estimate_tokens(system, calibration)

    def total(first: int) -> int:
        return fixed + sum(costs[first:])

    if entries and total(start) > budget_tokens:
        target = budget_tokens * TRIM_HEADROOM
        last = len(entries) - 1
        while start < last and total(start) > target:
            start += 1
        while start < last and entries[start].get("role") != "user":
            start += 1
    too_long = bool(entries) and total(start) > budget_tokens
    messages = to_messages(system_prompt, entries[start:], replays_reasoning=replays_reasoning)
    raw_estimate = sum(estimate_tokens(m) for m in messages)
    return Fit(start, messages, raw_estimate, too_long)
