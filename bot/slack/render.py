"""Markdown -> Slack-ready pieces within Slack's documented limits. Pure.

Pieces break at paragraph boundaries, never inside a code fence: a fence too big for one piece is
closed at the end of a piece and reopened (same info string) at the start of the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Slack's limits, as documented (SLACK_ANCHORS.md section 6; slack-api-ref method data).
MARKDOWN_TEXT_LIMIT = 12_000  # chat.postMessage / startStream markdown_text, and a markdown block
CHAT_UPDATE_TEXT_LIMIT = 4_000  # chat.update text
SECTION_TEXT_LIMIT = 3_000  # section block text
# chat.stopStream: 50 blocks in `chunks` (task cards count) plus 50 in `blocks`
STREAM_CHUNK_BLOCKS_LIMIT = 50
FOOTER_RESERVE = 400  # room kept in the last piece for the footer line

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


@dataclass(frozen=True)
class Unit:
    """A paragraph, or a whole fenced code block (opener and closer lines included)."""

    text: str
    fence: str = ""  # the fence marker (``` or ~~~...) when this unit is a code block
    info: str = ""  # the info string after the opening fence (e.g. "python")


def _closes(match: re.Match[str], marker: str) -> bool:
    """A fence line closes an open fence when it uses the same character, is as long, and has no info."""
    return (
        match.group(1)[0] == marker[0] and len(match.group(1)) >= len(marker) and not match.group(2).strip()
    )


def units(markdown: str) -> list[Unit]:
    """Cut Markdown into paragraphs and fenced blocks; an unclosed fence runs to the end."""
    result: list[Unit] = []
    paragraph: list[str] = []
    lines = markdown.replace("\r\n", "\n").split("\n")
    i = 0

    def flush() -> None:
        if paragraph and any(line.strip() for line in paragraph):
            result.append(Unit("\n".join(paragraph).strip("\n")))
        paragraph.clear()

    while i < len(lines):
        line = lines[i]
        opened = _FENCE.match(line)
        if opened:
            flush()
            marker, info = opened.group(1), opened.group(2).strip()
            block = [line]
            i += 1
            closed = False
            while i < len(lines):
                block.append(lines[i])
                closing = _FENCE.match(lines[i])
                i += 1
                if closing and _closes(closing, marker):
                    closed = True
                    break
            if not closed:
                block.append(marker)
            result.append(Unit("\n".join(block), fence=marker, info=info))
            continue
        if line.strip():
            paragraph.append(line)
        else:
            flush()
        i += 1
    flush()
    return result


def _hard_split(text: str, limit: int) -> list[str]:
    """Split text with no better boundary: at line ends, then sentence ends (in the second half), then
    spaces, then anywhere."""
    pieces: list[str] = []
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit + 1)
        if cut <= 0:
            cut = _last_end(_SENTENCE_END, text, limit // 2, limit + 1)
        if cut <= 0:
            cut = text.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        pieces.append(text[:cut].rstrip())
        text = text[cut:].lstrip("\n ")
    if text:
        pieces.append(text)
    return pieces


def _split_unit(unit: Unit, limit: int) -> list[str]:
    if len(unit.text) <= limit:
        return [unit.text]
    if not unit.fence:
        return _hard_split(unit.text, limit)
    opener = f"{unit.fence}{unit.info}"
    body = unit.text.split("\n")[1:-1]
    room = limit - len(opener) - len(unit.fence) - 2
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in body:
        for part in _hard_split(line, room) if len(line) > room else [line]:
            if current and size + len(part) + 1 > room:
                pieces.append("\n".join([opener, *current, unit.fence]))
                current, size = [], 0
            current.append(part)
            size += len(part) + 1
    pieces.append("\n".join([opener, *current, unit.fence]))
    return pieces


def split_markdown(markdown: str, limit: int = MARKDOWN_TEXT_LIMIT - FOOTER_RESERVE) -> list[str]:
    """Pack paragraphs and fences into as few pieces as fit in `limit` characters each."""
    pieces: list[str] = []
    current = ""
    for unit in units(markdown):
        for part in _split_unit(unit, limit):
            if not current:
                current = part
            elif len(current) + 2 + len(part) <= limit:
                current = f"{current}\n\n{part}"
            else:
                pieces.append(current)
                current = part
    if current:
        pieces.append(current)
    return pieces or [""]


def open_fence(markdown: str) -> Unit | None:
    """The code fence `markdown` ends inside of, if any (to close and reopen it across messages)."""
    current: Unit | None = None
    for line in markdown.split("\n"):
        match = _FENCE.match(line)
        if not match:
            continue
        marker, rest = match.group(1), match.group(2).strip()
        if current is None:
            current = Unit("", fence=marker, info=rest)
        elif _closes(match, current.fence):
            current = None
    return current


def close_fence(text: str, marker: str) -> str:
    """The characters that close an open fence at the end of `text`, on a line of their own."""
    return marker if text.endswith("\n") else f"\n{marker}"


# A sentence ends at . ! ? … followed by space (closing quotes/brackets first), or at CJK full stops, which
# take no space after them.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*\s+|[。！？][”’」』）)]*\s*")
_SPACE = re.compile(r"\s+")
# Where streamed text may break while more is coming: after whitespace, or after any CJK character
# (Chinese and Japanese put no spaces between words).
_BREAK_AFTER = re.compile(r"[\s\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")


def _last_end(pattern: re.Pattern[str], text: str, low: int, high: int) -> int:
    """The end of the last match of `pattern` lying within text[low:high] (0: none)."""
    end = 0
    for match in pattern.finditer(text, low, high):
        end = match.end()
    return end


def sentence_cut(text: str, low: int, high: int) -> int:
    """The last place in text[low:high] to break between sentences, else between words (0: none)."""
    return _last_end(_SENTENCE_END, text, low, high) or _last_end(_SPACE, text, low, high)


def fitting_cut(text: str, room: int) -> int:
    """How much of `text` to add to a message with `room` left: all of it if it fits, else up to the
    last paragraph or line end that fits, else the last sentence end, else 0 (better to start the next
    message: what it holds already ends between words)."""
    if len(text) <= room:
        return len(text)
    if room <= 0:
        return 0
    for separator in ("\n\n", "\n"):
        cut = text.rfind(separator, 0, room)
        if cut > 0:
            return cut + len(separator)
    return _last_end(_SENTENCE_END, text, 0, room)


def cut_point(text: str, room: int) -> int:
    """Where to end a message holding at most `room` characters: a paragraph end, else a line end, else
    a sentence end, else a word end (in the second half of the room); a hard cut only inside a "word"
    longer than half a message."""
    if len(text) <= room:
        return len(text)
    for separator in ("\n\n", "\n"):
        cut = text.rfind(separator, room // 2, room)
        if cut > 0:
            return cut + len(separator)
    return sentence_cut(text, room // 2, room) or room


def whole_words(text: str, hold_max: int) -> int:
    """How much of text still being written may go out now: up to its last break (whitespace, or a CJK
    character), so a message never ends inside a word that is still arriving; all of it once the tail
    is a "word" longer than `hold_max` (a long URL, a base64 blob)."""
    for start in range(len(text) - 1, max(len(text) - hold_max - 2, -1), -1):
        if _BREAK_AFTER.match(text, start):
            return start + 1
    return len(text) if len(text) > hold_max else 0


def footer(
    model: str,
    seconds: float,
    prompt_tokens: int,
    completion_tokens: int,
    left_out: int = 0,
    truncated: bool = False,
    thinking_s: float | None = None,
    extra: tuple[str, ...] = (),
) -> str:
    """The small line under an answer: model, thinking time, tokens, and what the reader should know
    (`extra`: more of that, e.g. the tool calls made and a cap that was hit)."""
    parts = [model]
    if thinking_s is not None:
        parts.append(f"thought {thinking_s:.1f}s")
    parts += [f"{seconds:.1f}s", f"{prompt_tokens:,} in / {completion_tokens:,} out tokens"]
    notes = []
    if left_out:
        notes.append(
            f"{left_out} earlier message{'s' if left_out != 1 else ''} left out to fit the context window"
        )
    if truncated:
        notes.append("answer cut off at the output limit")
    notes.extend(extra)
    line = " · ".join(parts)
    if notes:
        line += " · " + "; ".join(notes)
    return f"_{line}_"


# ---- broadcasts -------------------------------------------------------------------------------------
# Model output (or thread content injected into it) must never ping a channel. Slack notifies everyone
# for `<!channel>`, `<!here>`, `<!everyone>` (and the legacy `<!group>`), a whole user group for
# `<!subteam^ID|@handle>`, and, where names are linked, for a literal `@channel`/`@here`/`@everyone`.
# A word joiner (invisible, zero width) after the `@` keeps the text readable and pings no one.
# User mentions `<@U…>` and channel links `<#C…>` are left alone.
WORD_JOINER = "\u2060"
BROADCAST_WORDS = ("channel", "here", "everyone")
BROADCAST_TOKEN_LIMIT = 120  # longest `<!…>` held back while waiting for its `>`
_BROADCAST = re.compile(
    r"<!(?P<special>channel|here|everyone|group)(?:\|[^<>]*)?>"
    r"|<!subteam\^[^<>|]*(?:\|@?(?P<handle>[^<>]*))?>"
    r"|(?<!\w)@(?P<literal>channel|here|everyone)",
    re.IGNORECASE,
)
# Keys whose string values are text a person reads (messages, blocks, titles, statuses).
_TEXT_KEYS = frozenset({"text", "markdown_text", "title", "status", "loading_messages"})


def _harmless(match: re.Match[str]) -> str:
    word = match.group("special") or match.group("literal")
    if word:
        return f"@{WORD_JOINER}{'channel' if word.lower() == 'group' else word}"
    return f"@{WORD_JOINER}{match.group('handle') or 'group'}"


def _neutralise_from(text: str, start: int) -> str:
    """`text` with every broadcast that begins at or after `start` made harmless (what comes before
    `start` is only context for the word boundary)."""
    parts, last = [], start
    for match in _BROADCAST.finditer(text, start):
        parts += [text[last : match.start()], _harmless(match)]
        last = match.end()
    return "".join([*parts, text[last:]])


def neutralise_broadcasts(text: str) -> str:
    """Text that pings no channel, here, everyone or user group, and reads the same."""
    return _neutralise_from(text, 0)


def _may_become_broadcast(tail: str) -> bool:
    """Could `tail` (which starts with `<` or `@`) turn into a broadcast once more text follows?"""
    if tail[0] == "<":
        return len(tail) <= BROADCAST_TOKEN_LIMIT and ">" not in tail and "!".startswith(tail[1:2])
    word = tail[1:].lower()
    return any(w.startswith(word) and w != word for w in BROADCAST_WORDS)


def broadcast_safe_cut(text: str) -> int:
    """How much of `text` can go out now: all of it, except a tail that may still become a broadcast
    (`<!he`, `@every`) when the next piece arrives."""
    cut = len(text)
    for start in (text.rfind("<", max(0, len(text) - BROADCAST_TOKEN_LIMIT)), text.rfind("@")):
        if start >= 0 and _may_become_broadcast(text[start:]):
            cut = min(cut, start)
    return cut


class BroadcastGuard:
    """neutralise_broadcasts for text that arrives in pieces (Kimi's stream): a piece ending in `<!he`
    is held back until the next one shows whether `re>` follows, so no broadcast slips through a
    chunk boundary and what was let out is never changed afterwards."""

    def __init__(self) -> None:
        self._pending = ""  # held back: may be the start of a broadcast
        self._before = ""  # the last character let out: the word boundary for what follows

    def feed(self, piece: str) -> str:
        """What of the text so far can go out now, made harmless."""
        text = self._pending + piece
        cut = broadcast_safe_cut(text)
        ready, self._pending = text[:cut], text[cut:]
        if not ready:
            return ""
        out = _neutralise_from(self._before + ready, len(self._before))
        self._before = ready[-1]
        return out

    def flush(self) -> str:
        """The end of the text: whatever was held back, made harmless."""
        out = _neutralise_from(self._before + self._pending, len(self._before)) if self._pending else ""
        self._pending, self._before = "", ""
        return out


def neutralise_fields(value: Any, key: str = "") -> Any:
    """A Web API payload (or part of one) with the text people read neutralised: `text`,
    `markdown_text`, `title`, `status`, `loading_messages`, at any depth inside blocks. Ids, values,
    urls and everything else pass unchanged."""
    if isinstance(value, str):
        return neutralise_broadcasts(value) if key in _TEXT_KEYS else value
    if isinstance(value, dict):
        return {k: neutralise_fields(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [neutralise_fields(item, key) for item in value]
    return value
