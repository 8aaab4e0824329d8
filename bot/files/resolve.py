"""The files of a thread's messages -> the content the model gets, and the footer's notes. Each file is
read once (downloaded, extracted) and cached in Redis by team and file id for the thread's TTL."""

from __future__ import annotations

import asyncio
import base64
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from bot.files.download import NoAccess, TooBig, download, may_send_token
from bot.files.extract import Unreadable, prepare_image, read_document
from bot.files.kinds import Kind, classify
from bot.files.parts import FileRead, content_with_files, file_name, file_notes
from bot.settings import Settings
from bot.store import FileCache

log = logging.getLogger(__name__)

NO_ACCESS = "no access"
TOO_BIG = "too big"
TOO_BIG_TOGETHER = "too big together with the message's other files"
UNSUPPORTED = "can't read this type yet"
UNREADABLE = "could not be read"
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
            return read
        read = await self._fetch(ref, file_id, name, kind)
        if read.problem != NO_ACCESS:  # access may come back (the bot invited, a retry); the rest is final
            await self.cache.put(self.team_id, file_id, read.dump())
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
        try:
            # In a thread: parsing a big PDF or decoding an image is CPU work that must not stall the loop.
            return await asyncio.to_thread(self._extract, file_id, name, kind, data)
        except Unreadable as exc:
            return FileRead(file_id, name, kind, problem=str(exc), size=len(data))
        except Exception:  # a parser's bug on someone's file must not cost the answer
            log.exception("file not read: its parser failed", extra={"file": file_id, "kind": str(kind)})
            return FileRead(file_id, name, kind, problem=UNREADABLE, size=len(data))

    def _extract(self, file_id: str, name: str, kind: Kind, data: bytes) -> FileRead:
        settings = self.settings
        if kind is Kind.IMAGE:
            image = prepare_image(data, settings.files_image_max_bytes, settings.files_image_max_pixels)
            b64 = base64.b64encode(image.data).decode("ascii")
            return FileRead(file_id, name, kind, image_mime=image.mime, image_b64=b64, size=len(data))
        text = read_document(kind, data, settings.files_max_text_chars)
        return FileRead(file_id, name, kind, text=text, size=len(data))


async def with_files(
    reader: FileReader, entries: list[dict[str, Any]], first: int, *, images: bool, model: str
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """`entries` with the files of those from `first` on read into their content (copies; the stored
    history keeps the refs), and footer notes naming the files not used among the messages not answered
    yet (the ones after the last answer): each unusable file is named once, in the answer to its message."""
    last_answer = max((i for i, e in enumerate(entries) if e.get("role") == "assistant"), default=-1)
    out = list(entries)
    notes: list[str] = []
    for index in range(max(first, 0), len(entries)):
        entry = entries[index]
        refs = [f for f in entry.get("files") or [] if isinstance(f, dict) and f.get("id")]
        if not refs or not isinstance(entry.get("content"), str):
            continue
        reads = await reader.read_message(refs)
        out[index] = {
            **entry,
            "content": content_with_files(entry["content"], reads, images=images, model=model),
        }
        if index > last_answer:
            notes.extend(file_notes(reads, images=images, model=model))
    if len(notes) > FOOTER_NOTES:  # the footer is one short line (a context block: 3,000 characters)
        rest = len(notes) - FOOTER_NOTES + 1
        notes = [*notes[: FOOTER_NOTES - 1], f"couldn't use {rest} more files"]
    return out, tuple(notes)
