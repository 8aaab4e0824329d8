"""Bytes of a file -> what the model can read: text (plain, PDF, Word, Excel, PowerPoint) or an image
re-encoded to fit the caps. Pure and deterministic: the same bytes give the same result (the prompt
prefix of a thread stays byte-stable across turns)."""

from __future__ import annotations

import io
import math
import warnings
import zipfile
from dataclasses import dataclass

from bot.files.kinds import IMAGE_MIMETYPES, Kind

PDF_PAGE_CHARS = 20_000  # text read from one PDF page (a page of dense text is about 5,000)
JPEG_QUALITIES = (85, 70, 55, 40)  # tried in turn until a re-encoded image fits the byte cap
SHRINK_STEP = 0.75  # each further try also scales the image by this much
MAX_SHRINKS = 8
PDF_MAX_PAGES = 500  # pages of a PDF read at most (the text cap usually stops it far sooner)
# An image is refused before it is decoded past this many pixels (width x height): 50 MP takes 200 MB as
# RGBA, about a 48 MP phone photo; a 9400 x 9400 PNG of 370 KB would take 350 MB.
IMAGE_DECODE_MAX_PIXELS = 50_000_000
# A Word, Excel or PowerPoint file (a zip of XML parts) is refused before it is parsed when its parts
# unpack to more than this, or one part is a zip bomb (a ratio no real document part has).
OFFICE_MAX_UNPACKED_BYTES = 100_000_000
OFFICE_MAX_RATIO = 200  # unpacked / packed for a part over 1 MB (XML packs about 10:1, zeros 1000:1)
TOO_BIG = "too big"
UNREADABLE = "could not be read"  # a file the readers failed on (the footer's words)


class Unreadable(Exception):
    """The file cannot be used; the message is the reason shown to the user ("a scanned PDF without
    text")."""


@dataclass(frozen=True)
class Image:
    mime: str
    data: bytes


def cut(text: str, limit: int) -> str:
    """`text` up to `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[… cut here: {len(text) - limit:,} more characters not read]"


def read_text(data: bytes, limit: int) -> str:
    """UTF-8 with replacement characters for what is not (a log with stray bytes still reads)."""
    return cut(data.decode("utf-8", errors="replace").removeprefix("\ufeff"), limit)


def read_pdf(data: bytes, limit: int, page_limit: int = PDF_PAGE_CHARS) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = PdfReader(io.BytesIO(data))
            if reader.is_encrypted and not reader.decrypt(""):
                raise Unreadable("a password-protected PDF")
            pages, size = [], 0
            for page in reader.pages[:PDF_MAX_PAGES]:
                pages.append(cut((page.extract_text() or "").strip(), page_limit))
                size += len(pages[-1]) + 20  # with its "--- page n ---" line
                if size > limit:  # the rest would be cut anyway: not parsed (each page is CPU time)
                    break
            unread = len(reader.pages) - len(pages)
    except Unreadable:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, AssertionError) as exc:
        raise Unreadable("a PDF that could not be read") from exc
    if not any(pages):
        raise Unreadable("a scanned PDF without text")
    text = "\n\n".join(f"--- page {n} ---\n{page}" for n, page in enumerate(pages, 1) if page)
    if len(text) <= limit and unread:
        text += f"\n[… {unread:,} more pages not read]"
    return cut(text, limit)


def check_office_zip(data: bytes, what: str) -> None:
    """Refuse an Office file whose parts unpack to too much, before a parser unpacks every part. The
    sizes are the zip's own; a part that lies about its size fails its CRC when read."""
    try:
        members = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Unreadable(f"{what} that could not be read") from exc
    if sum(m.file_size for m in members) > OFFICE_MAX_UNPACKED_BYTES:
        raise Unreadable(TOO_BIG)
    for member in members:
        if member.file_size > 1_000_000 and member.file_size > OFFICE_MAX_RATIO * max(
            member.compress_size, 1
        ):
            raise Unreadable(TOO_BIG)


def read_docx(data: bytes, limit: int) -> str:
    import docx

    check_office_zip(data, "a Word file")
    try:
        document = docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises a variety (zip, XML, KeyError) for a broken file
        raise Unreadable("a Word file that could not be read") from exc
    lines = [p.text for p in document.paragraphs]
    for table in document.tables:
        lines.extend("\t".join(cell.text for cell in row.cells) for row in table.rows)
    return cut("\n".join(lines).strip(), limit)


def read_xlsx(data: bytes, limit: int) -> str:
    import openpyxl  # type: ignore[import-untyped]

    check_office_zip(data, "an Excel file")
    try:
        book = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # zip, XML and value errors for a broken file
        raise Unreadable("an Excel file that could not be read") from exc
    out: list[str] = []
    size = 0
    try:
        for sheet in book.worksheets:
            out.append(f"--- sheet {sheet.title} ---")
            for row in sheet.iter_rows(values_only=True):
                line = "\t".join("" if v is None else str(v) for v in row).rstrip("\t")
                out.append(line)
                size += len(line) + 1
                if size > limit:  # a huge sheet is not read further than the cap
                    return cut("\n".join(out), limit)
    finally:
        book.close()
    return cut("\n".join(out).strip(), limit)


def read_pptx(data: bytes, limit: int) -> str:
    import pptx

    check_office_zip(data, "a PowerPoint file")
    try:
        deck = pptx.Presentation(io.BytesIO(data))
    except Exception as exc:  # zip, XML and value errors for a broken file
        raise Unreadable("a PowerPoint file that could not be read") from exc
    slides = []
    for n, slide in enumerate(deck.slides, 1):
        texts = [shape.text_frame.text for shape in slide.shapes if shape.has_text_frame]
        slides.append(f"--- slide {n} ---\n" + "\n".join(t for t in texts if t.strip()))
    return cut("\n\n".join(slides).strip(), limit)


def read_document(kind: Kind, data: bytes, limit: int) -> str:
    """The text of a text-like file of `kind`."""
    readers = {
        Kind.TEXT: read_text,
        Kind.PDF: read_pdf,
        Kind.DOCX: read_docx,
        Kind.XLSX: read_xlsx,
        Kind.PPTX: read_pptx,
    }
    if kind not in readers:
        raise Unreadable("an unsupported type")
    return readers[kind](data, limit)


def prepare_image(data: bytes, max_bytes: int, max_pixels: int) -> Image:
    """An image Kimi reads, within `max_bytes` and `max_pixels`: as it is when it fits, else scaled down
    and re-encoded (JPEG, or PNG for one with transparency). One over IMAGE_DECODE_MAX_PIXELS is refused
    from its header, before it is decoded."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        image = PILImage.open(io.BytesIO(data))
        if image.width * image.height > IMAGE_DECODE_MAX_PIXELS:
            raise Unreadable(TOO_BIG)
        image.load()
    except (UnidentifiedImageError, PILImage.DecompressionBombError) as exc:
        raise Unreadable("an image that could not be read") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise Unreadable("an image that could not be read") from exc
    mime = PILImage.MIME.get(image.format or "", "")
    width, height = image.size
    if mime in IMAGE_MIMETYPES and len(data) <= max_bytes and width * height <= max_pixels:
        return Image(mime, data)
    scale = min(1.0, math.sqrt(max_pixels / max(width * height, 1)))
    keep_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    base = image.convert("RGBA" if keep_alpha else "RGB")
    for _ in range(MAX_SHRINKS):
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        resized = base.resize(size, PILImage.Resampling.LANCZOS) if size != base.size else base
        for quality in (None,) if keep_alpha else JPEG_QUALITIES:
            out = io.BytesIO()
            if keep_alpha:
                resized.save(out, format="PNG", optimize=True)
            else:
                resized.save(out, format="JPEG", quality=quality, optimize=True)
            if out.tell() <= max_bytes:
                return Image("image/png" if keep_alpha else "image/jpeg", out.getvalue())
        scale *= SHRINK_STEP
    raise Unreadable("an image too big even scaled down")
