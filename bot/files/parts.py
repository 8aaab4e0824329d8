"""What was read from a file, and the message content built from it (OpenAI chat format: a string, or a
list of `text` and `image_url` parts when there are images). Pure."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from bot.files.extract import cut
from bot.files.kinds import Kind

FOOTER_NAME_CHARS = 60  # a file name in the footer is cut to this
_MARKUP = re.compile(r"[<>*_~`|\[\]\n\r\t]")


@dataclass(frozen=True)
class FileRead:
    """One file as the model gets it: its text, or its (re-encoded) image, or why it cannot be used."""

    file_id: str
    name: str
    kind: Kind
    text: str = ""
    image_mime: str = ""
    image_b64: str = ""
    problem: str = ""  # "" when usable; else the reason named in the footer ("too big", "no access"...)
    size: int = 0  # bytes downloaded (0: not downloaded)

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def load(raw: str) -> FileRead | None:
        try:
            data = json.loads(raw)
            return FileRead(**{**data, "kind": Kind(data["kind"])})
        except (ValueError, TypeError, KeyError):
            return None


def file_name(ref: dict[str, Any]) -> str:
    return str(ref.get("name") or ref.get("title") or ref.get("id") or "a file")


def footer_name(name: str) -> str:
    """A file name safe in the footer's mrkdwn: no markup, links or mentions, not too long."""
    clean = _MARKUP.sub("", name).strip() or "a file"
    return clean if len(clean) <= FOOTER_NAME_CHARS else clean[: FOOTER_NAME_CHARS - 1] + "…"


def _attribute(name: str) -> str:
    return name.replace('"', "'").replace("\n", " ")


def content_with_files(text: str, reads: list[FileRead], *, images: bool, model: str) -> str | list[Any]:
    """A message's content: its text, then each file: its text wrapped with its name, its image (where
    the model reads images; else one sentence saying it was not sent), or why it was not read."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for read in reads:
        name = _attribute(read.name)
        if read.problem:
            parts.append({"type": "text", "text": f'<file name="{name}">not read: {read.problem}</file>'})
        elif read.kind is Kind.IMAGE and not images:
            sentence = f"The image {name} is attached, but {model} does not read images, so it was not sent."
            parts.append({"type": "text", "text": sentence})
        elif read.kind is Kind.IMAGE:
            parts.append({"type": "text", "text": f'<file name="{name}">an image, next</file>'})
            url = f"data:{read.image_mime};base64,{read.image_b64}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            parts.append({"type": "text", "text": f'<file name="{name}">\n{read.text}\n</file>'})
    if not any(p["type"] == "image_url" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    merged: list[dict[str, Any]] = []  # consecutive text parts as one: fewer parts, same meaning
    for part in parts:
        if part["type"] == "text" and merged and merged[-1]["type"] == "text":
            merged[-1] = {"type": "text", "text": merged[-1]["text"] + "\n\n" + part["text"]}
        else:
            merged.append(part)
    return merged


def file_notes(reads: list[FileRead], *, images: bool, model: str) -> tuple[str, ...]:
    """The footer's notes for the files that were not used, each named with the reason."""
    notes = []
    for read in reads:
        if read.problem:
            notes.append(f"couldn't use {footer_name(read.name)} ({read.problem})")
        elif read.kind is Kind.IMAGE and not images:
            notes.append(f"couldn't use {footer_name(read.name)} ({model} does not read images)")
    return tuple(notes)


CUT_NOTE_CHARS = 60  # what `cut` adds to a text it cuts ("[… cut here: 12,345 more characters not read]")


def cut_texts(reads: list[FileRead], room_chars: int) -> list[FileRead]:
    """`reads` with their texts cut so that together they take about `room_chars` characters at most: each
    text is cut to one same length (the longest are cut, the short ones kept whole), with a note saying
    how much was left out. Pure: the same reads and room give the same texts."""
    lengths = [len(r.text) for r in reads if r.text]
    if sum(lengths) <= room_chars:
        return reads
    room = max(room_chars - CUT_NOTE_CHARS * len(lengths), 0)
    share, left, pending = 0, room, sorted(lengths)
    while pending:  # the largest share each text may keep, the shorter texts' unused room given to the rest
        share = left // len(pending)
        if pending[0] > share:
            break
        left -= pending.pop(0)
    else:
        return reads
    return [replace(r, text=cut(r.text, share)) if len(r.text) > share else r for r in reads]
