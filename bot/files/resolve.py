"""The files of a thread's messages -> the content the model gets, and the footer's notes. Each file is
read once (downloaded, extracted) and cached in Redis by team and file id for the thread's TTL; a file
Slack could not serve just now (429, 5xx, timeout) is tried again after BUSY_TTL_SECONDS. PDFs, Office
files and images are parsed in a child process (bot/files/sandbox), under memory, CPU and time limits."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

import aiohttp

from bot.context import CHARS_PER_TOKEN, estimate_tokens
from bot.files import sandbox
from bot.files.download import Busy, NoAccess, TooBig, download, may_send_token
from bot.files.extract import TOO_BIG, UNREADABLE, Unreadable, read_document
from bot.files.kinds import Kind, classify
from bot.files.parts import FileRead, content_with_files, cut_texts, file_name, file_notes, footer_name
from bot.settings import Settings
from bot.store import FileCache

log = logging.getLogger(__name__)

NO_ACCESS = "no access"
BUSY = "Slack was busy"
BUSY_TTL_SECONDS = 600  # a file Slack was too busy to serve is tried again after this
# Problems that may pass (kept BUSY_TTL_SECONDS, not the thread's life): Slack busy, or a parse that ran out
# of time on a host busy with other work.
PASSING_PROBLEMS = frozenset({BUSY, sandbox.TOO_LONG})
TOO_BIG_TOGETHER = "too big together with the message's other files"
UNSUPPORTED = "can't read this type yet"
FOOTER_NOTES = 8  # files named in the footer at most; the rest are counted
# Slack file modes whose bytes Slack does not serve: a Google Drive link, a deleted file.
NOT_HOSTED = {"external": "not stored in Slack", "tombstone": "deleted"}


@dataclass
class FileReader:
    """Reads files for one turn: `token` is the bot token of the workspace the turn is in."""

    settings: Settings
    cache: FileCache
    team_id: str
    token: str
    session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def read_message(self, refs: list[dict[str, Any]]) -> list[FileRead]:
        """One message's files, in order; together they may be FILES_MAX_MESSAGE_BYTES at most (the ones
        past it are not read): the same files always give the same result."""
        reads = []
        total = 0
        for ref in refs:
            read = await self.read(ref)
            size = int(ref.get("size") or 0) or read.size
            if not read.problem and total + size > self.settings.files_max_message_bytes:
                read = FileRead(read.file_id, read.name, read.kind, problem=TOO_BIG_TOGETHER)
            elif not read.problem:
                total += size
            reads.append(read)
        return reads

    async def read(self, ref: dict[str, Any]) -> FileRead:
        file_id, name, kind = str(ref["id"]), file_name(ref), classify(ref)
        cached = await self.cache.get(self.team_id, file_id)
        if cached is not None and (read := FileRead.load(cached)) is not None:
            if read.problem not in PASSING_PROBLEMS:
                await self.cache.touch(self.team_id, file_id)
            return read
        read = await self._fetch(ref, file_id, name, kind)
        # Every result is kept (a 404 or a sign-in page is not fetched again each turn); the ones that may
        # pass (Slack was busy, a parse that ran out of time on a busy host) only for a while.
        passing = read.problem in PASSING_PROBLEMS
        await self.cache.put(self.team_id, file_id, read.dump(), BUSY_TTL_SECONDS if passing else None)
        return read

    async def _fetch(self, ref: dict[str, Any], file_id: str, name: str, kind: Kind) -> FileRead:
        settings = self.settings
        if kind is Kind.UNSUPPORTED:
            return FileRead(file_id, name, kind, problem=UNSUPPORTED)
        if str(ref.get("mode") or "") in NOT_HOSTED:
            return FileRead(file_id, name, kind, problem=NOT_HOSTED[str(ref["mode"])])
        if int(ref.get("size") or 0) > settings.files_max_bytes:
            return FileRead(file_id, name, kind, problem=TOO_BIG)
        url = str(ref.get("url_private_download") or ref.get("url_private") or "")
        if not url or not self.token or not may_send_token(url, settings.slack_api_url):
            log.warning("file not downloaded: not on Slack's file host", extra={"file": file_id})
            return FileRead(file_id, name, kind, problem=NO_ACCESS)
        if self.session is None:
            self.session = aiohttp.ClientSession(trust_env=True)  # HTTPS_PROXY, like the SDKs
        html = str(ref.get("mimetype") or "").startswith("text/html")
        try:
            data = await download(
                self.session, url, self.token, max_bytes=settings.files_max_bytes, html_expected=html
            )
        except TooBig:
            return FileRead(file_id, name, kind, problem=TOO_BIG)
        except NoAccess as exc:
            log.info("file not downloaded", extra={"file": file_id, "why": str(exc)})
            return FileRead(file_id, name, kind, problem=NO_ACCESS)
        except Busy as exc:
            log.info("file not downloaded: Slack was busy", extra={"file": file_id, "why": str(exc)})
            return FileRead(file_id, name, kind, problem=BUSY)
        if kind is not Kind.TEXT:  # a parser: in a child process, bounded in memory and time
            got = await sandbox.extract(kind, data, self.limits())
            return FileRead(
                file_id, name, kind, got.text, got.image_mime, got.image_b64, got.problem, len(data)
            )
        try:
            # Decoding text is quick and bounded (FILES_MAX_BYTES), but not for the event loop itself.
            text = await asyncio.to_thread(read_document, kind, data, settings.files_max_text_chars)
        except Unreadable as exc:
            return FileRead(file_id, name, kind, problem=str(exc), size=len(data))
        except Exception:  # a bug on someone's file must not cost the answer
            log.exception("file not read: its parser failed", extra={"file": file_id, "kind": str(kind)})
            return FileRead(file_id, name, kind, problem=UNREADABLE, size=len(data))
        return FileRead(file_id, name, kind, text=text, size=len(data))

    def limits(self) -> sandbox.Limits:
        settings = self.settings
        return sandbox.Limits(
            text_chars=settings.files_max_text_chars,
            image_max_bytes=settings.files_image_max_bytes,
            image_max_pixels=settings.files_image_max_pixels,
            memory_bytes=settings.files_read_max_memory_mb * 1024 * 1024,
            seconds=settings.files_read_timeout,
        )


def over_the_cap(count: int) -> str:
    return f"only the newest {count} files are read for an answer"


def files_to_read(entries: list[dict[str, Any]], first: int, cap: int) -> dict[int, int]:
    """How many of each message's files are read (by entry index, from `first` on): the newest messages'
    first, `cap` in all. Only the entries decide: the same thread gives the same plan, cached or not."""
    plan: dict[int, int] = {}
    for index in reversed(range(max(first, 0), len(entries))):
        count = len(_refs(entries[index]))
        plan[index] = min(count, cap)
        cap -= plan[index]
    return plan


def _refs(entry: dict[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(entry.get("content"), str):
        return []
    return [f for f in entry.get("files") or [] if isinstance(f, dict) and f.get("id")]


def fit_message(
    entry: dict[str, Any],
    reads: list[FileRead],
    max_tokens: int,
    calibration: float,
    *,
    images: bool,
    model: str,
) -> tuple[list[FileRead], Any]:
    """`reads` with their texts cut so that the message they are read into fits `max_tokens` alone (as
    bot/context estimates it), and the message's content with them: a question with a long file is answered
    from part of the file rather than refused as too long. Pure; the same message, files and budget give
    the same cut on every turn."""
    content = content_with_files(entry["content"], reads, images=images, model=model)
    over = estimate_tokens({"role": entry.get("role"), "content": content}, calibration) - max_tokens
    if over <= 0:
        return reads, content
    texts = sum(len(r.text) for r in reads)
    shown = cut_texts(reads, texts - math.ceil(over / calibration * CHARS_PER_TOKEN))
    return shown, content_with_files(entry["content"], shown, images=images, model=model)


async def with_files(
    reader: FileReader,
    entries: list[dict[str, Any]],
    first: int,
    *,
    images: bool,
    model: str,
    max_message_tokens: int | None = None,
    calibration: float = 1.0,
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """`entries` with the files of those from `first` on read into their content (copies; the stored
    history keeps the refs), and footer notes naming the files not used among the messages not answered
    yet (the ones after the last answer): each unusable file is named once, in the answer to its message.
    At most FILES_MAX_PER_TURN files are read, the newest messages' first ("Summarize thread" of a long
    thread would read them all before the window drops most); the footer counts the others. With
    `max_message_tokens` (the window's room for one message), a message whose files' text would not fit
    it alone gets their texts cut to fit, and the footer says which were read in part."""
    last_answer = max((i for i, e in enumerate(entries) if e.get("role") == "assistant"), default=-1)
    cap = reader.settings.files_max_per_turn
    plan = files_to_read(entries, first, cap)
    out = list(entries)
    notes: list[str] = []
    skipped = 0
    for index in range(max(first, 0), len(entries)):
        entry = entries[index]
        refs = _refs(entry)
        if not refs:
            continue
        unread = [
            FileRead(str(f["id"]), file_name(f), classify(f), problem=over_the_cap(cap))
            for f in refs[plan[index] :]
        ]
        skipped += len(unread)
        reads = await reader.read_message(refs[: plan[index]])
        whole = reads + unread
        if max_message_tokens is None:
            content = content_with_files(entry["content"], whole, images=images, model=model)
        else:
            shown, content = fit_message(
                entry, whole, max_message_tokens, calibration, images=images, model=model
            )
            if index > last_answer:
                notes.extend(
                    f"read part of {footer_name(r.name)} (too long for the window)"
                    for r, w in zip(shown, whole, strict=True)
                    if r.text != w.text
                )
        out[index] = {**entry, "content": content}
        if index > last_answer:
            notes.extend(file_notes(reads, images=images, model=model))
    if skipped:
        notes.insert(0, f"didn't read {skipped} older files ({over_the_cap(cap)})")
    if len(notes) > FOOTER_NOTES:  # the footer is one short line (a context block: 3,000 characters)
        rest = len(notes) - FOOTER_NOTES + 1
        notes = [*notes[: FOOTER_NOTES - 1], f"couldn't use {rest} more files"]
    return out, tuple(notes)
