"""Files in the conversation, review 3's findings: a small file built to take gigabytes or hours to parse
is refused or killed in a child process (bot/files/sandbox), never the bot's thread pool; a long thread's
files are read up to FILES_MAX_PER_TURN; a file without access is not downloaded every turn, and one
Slack was too busy to serve is tried again after a while; a file read again keeps its cache entry."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from bot.files import extract, sandbox
from bot.files.extract import Unreadable, prepare_image, read_document, read_pdf
from bot.files.kinds import Kind
from bot.files.resolve import BUSY, BUSY_TTL_SECONDS, NO_ACCESS, FileReader, files_to_read
from bot.settings import Settings
from bot.store import FileCache
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, Reply
from tests.fakes.slack_api import TEAM_ID, TOKEN, FakeSlack
from tests.files_data import assemble_pdf, docx, pdf
from tests.slack_requests import ALICE, CHANNEL, mention, message, thread_key

REPO = Path(__file__).resolve().parents[1]
LIMITS = sandbox.Limits(100_000, 3_000_000, 2_359_296, 1024 * 1024 * 1024, 30.0)


def slow_pdf(pages: int, ops: int) -> bytes:
    """A tiny PDF whose pages all share one Flate content stream of `ops` text operators (each page is
    parsed again: pypdf's per-stream budget does not stop this; 100k ops take seconds a page)."""
    stream = zlib.compress(b"BT /F1 1 Tf " + b"(a) Tj " * ops + b"ET", 9)
    kids = " ".join(f"{5 + i} 0 R" for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Length {len(stream)} /Filter /FlateDecode >>\nstream\n".encode() + stream + b"\nendstream",
    ]
    objects += [
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
        b"/Contents 4 0 R >>"
    ] * pages
    return assemble_pdf(objects)


def docx_bomb(inflated_mb: int) -> bytes:
    """A valid .docx with one extra part (an 'image' of zeros) that inflates to `inflated_mb` MB."""
    src = zipfile.ZipFile(io.BytesIO(docx("hello")))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "word/_rels/document.xml.rels":
                data = data.replace(
                    b"</Relationships>",
                    b'<Relationship Id="rIdBomb" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
                    b'relationships/image" Target="media/bomb.bin"/></Relationships>',
                )
            if item.filename == "[Content_Types].xml":
                data = data.replace(
                    b"</Types>", b'<Default Extension="bin" ContentType="application/octet-stream"/></Types>'
                )
            zf.writestr(item, data)
        info = zipfile.ZipInfo("word/media/bomb.bin", (2020, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as w:
            for _ in range(inflated_mb):
                w.write(b"\0" * (1 << 20))
    return out.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid RGBA PNG of one color, written by hand (no decoded copy in the test's memory)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\0" + b"\1\2\3\4" * width
    packer = zlib.compressobj(6)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


PEAK = """
import resource, sys
from bot.files.extract import prepare_image, read_document
from bot.files.kinds import Kind
data = sys.stdin.buffer.read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    if sys.argv[1] == "image":
        prepare_image(data, 3_000_000, 2_359_296)
    else:
        read_document(Kind(sys.argv[1]), data, 100_000)
except Exception as exc:
    print("raised", type(exc).__name__, exc, file=sys.stderr)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("kind", ["docx", "image"])
def test_a_small_file_does_not_take_gigabytes_to_read(kind: str) -> None:
    data = docx_bomb(300) if kind == "docx" else png_bomb(9400, 9400)
    assert len(data) < 1_000_000  # far under FILES_MAX_BYTES (20 MB)
    run = subprocess.run(
        [sys.executable, "-c", PEAK, kind], input=data, capture_output=True, cwd=REPO, timeout=300, check=True
    )
    grown_mb = int(run.stdout.decode().split()[-1])
    assert grown_mb < 100, f"a {len(data):,}-byte {kind} grew the process by {grown_mb} MB"
    assert "Unreadable too big" in run.stderr.decode()


def test_an_office_file_is_refused_from_its_zip_directory_before_it_is_parsed() -> None:
    with pytest.raises(Unreadable, match=r"^too big$"):
        read_document(Kind.DOCX, docx_bomb(101), 100_000)  # over OFFICE_MAX_UNPACKED_BYTES together
    with pytest.raises(Unreadable, match=r"^too big$"):
        read_document(Kind.XLSX, docx_bomb(5), 100_000)  # one part of 5 MB packed a thousand to one
    with pytest.raises(Unreadable, match="a PowerPoint file that could not be read"):
        read_document(Kind.PPTX, b"PK not a zip", 100_000)
    assert read_document(Kind.DOCX, docx("fine"), 100_000) == "fine"


def test_an_image_is_refused_from_its_header_past_the_decode_cap() -> None:
    with pytest.raises(Unreadable, match=r"^too big$"):
        prepare_image(png_bomb(10_000, 5_001), 3_000_000, 2_359_296)
    assert extract.IMAGE_DECODE_MAX_PIXELS == 50_000_000


def test_a_pdf_stops_at_the_text_cap_and_at_the_page_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    pages = [f"page {n} " + "x" * 200 for n in range(1, 11)]
    calls: list[int] = []
    from pypdf import PageObject

    real = PageObject.extract_text

    def counted(self: PageObject, *args: Any, **kwargs: Any) -> str:
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PageObject, "extract_text", counted)
    text = read_pdf(pdf(*pages), 500)
    assert len(calls) == 3  # 3 pages pass 500 characters: the other 7 are not parsed
    assert "page 3" in text and "more characters not read" in text
    monkeypatch.setattr(extract, "PDF_MAX_PAGES", 4)
    text = read_pdf(pdf(*pages), 100_000)
    assert "page 4" in text and "page 5" not in text and text.endswith("[… 6 more pages not read]")


def children() -> list[int]:
    """This process's running sandbox children."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"bot.files.sandbox" in cmdline:
            found.append(int(entry.name))
    return found


async def test_a_tiny_pdf_that_takes_hours_is_killed_at_the_deadline() -> None:
    data = slow_pdf(pages=40, ops=100_000)  # 40 pages x ~3 s each; 300 pages of 600k ops: hours
    assert len(data) < 10_000
    got = await sandbox.extract(Kind.PDF, data, sandbox.Limits(100_000, 1, 1, 1024 * 1024 * 1024, 1.5))
    assert got == sandbox.Extracted(problem="took too long to read")
    assert children() == []


async def test_a_file_that_needs_more_memory_than_allowed_is_too_big() -> None:
    data = png_bomb(6000, 6000)  # 36 MP: under the decode cap, but 144 MB decoded, more converted
    got = await sandbox.extract(
        Kind.IMAGE, data, sandbox.Limits(100_000, 3_000_000, 2_359_296, 256 << 20, 30)
    )
    assert got == sandbox.Extracted(problem="too big")
    small = await sandbox.extract(
        Kind.IMAGE, png_bomb(600, 600), sandbox.Limits(1, 3_000_000, 2_359_296, 256 << 20, 30)
    )
    assert small.image_mime == "image/png" and not small.problem  # the same limit reads a real one


async def test_a_file_that_takes_too_long_is_named_in_the_footer_and_the_answer_comes(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(files_read_timeout=1.0)
    root = "1700000930.000100"
    slow = fake_slack.add_file("slow.pdf", slow_pdf(40, 100_000), mimetype="application/pdf", filetype="pdf")
    fine = fake_slack.add_file("fine.pdf", pdf("all good"), mimetype="application/pdf", filetype="pdf")
    await bot.send_event({**mention("read these", root), "files": [slow, fine]})
    await bot.settle()
    [footer] = [
        line for line in fake_slack.bodies(CHANNEL, root)[-1].splitlines() if line.startswith("_kimi")
    ]
    assert "couldn't use slow.pdf (took too long to read)" in footer and "fine.pdf" not in footer
    sent = str(fake_kimi.requests[0]["messages"][-1]["content"])
    assert '<file name="slow.pdf">not read: took too long to read</file>' in sent and "all good" in sent
    assert children() == []
    # A parse that ran out of time may pass on a quieter host: kept only for a while, not the thread's life.
    from bot.files.resolve import BUSY_TTL_SECONDS
    from bot.store import FileCache

    ttl = await bot.deps.redis.ttl(FileCache.key(TEAM_ID, slow["id"]))
    assert 0 < ttl <= BUSY_TTL_SECONDS
    assert await bot.deps.redis.ttl(FileCache.key(TEAM_ID, fine["id"])) > BUSY_TTL_SECONDS


async def test_the_sandbox_reads_like_the_functions_it_runs() -> None:
    from tests.files_data import noisy_png

    image = noisy_png(300, 200)
    got = await sandbox.extract(Kind.IMAGE, image, sandbox.Limits(100_000, 20_000, 10_000, 1024 << 20, 30))
    direct = prepare_image(image, 20_000, 10_000)
    assert got.image_mime == direct.mime and got.image_b64 == base64.b64encode(direct.data).decode()
    again = await sandbox.extract(Kind.IMAGE, image, sandbox.Limits(100_000, 20_000, 10_000, 1024 << 20, 30))
    assert again == got  # the same bytes, the same result (the prompt cache)
    assert (await sandbox.extract(Kind.PDF, pdf("hello"), LIMITS)).text == "--- page 1 ---\nhello"
    broken = await sandbox.extract(Kind.DOCX, b"PK\x03\x04 broken", LIMITS)
    assert broken.problem == "a Word file that could not be read"


async def test_slow_extractions_do_not_stall_dns_or_run_more_than_two_at_once(
    make_settings: Callable[..., Settings], fake_slack: FakeSlack, redis: Redis
) -> None:
    """Extraction used to run in the loop's default executor, min(32, cpus + 4) threads, which aiohttp's
    ThreadedResolver (no aiodns here) and asyncio's getaddrinfo (redis) share."""
    reader = FileReader(make_settings(files_read_timeout=120), FileCache(redis, 600), TEAM_ID, TOKEN)
    workers = min(32, (os.cpu_count() or 1) + 4)
    refs = [
        fake_slack.add_file(f"slow{i}.pdf", slow_pdf(1, 300_000), mimetype="application/pdf", filetype="pdf")
        for i in range(workers)
    ]
    loop = asyncio.get_running_loop()
    parsing = [asyncio.create_task(reader.read(ref)) for ref in refs]
    try:
        started = loop.time()  # the loop's clock: 6 parsing threads would slow its sleeps, not its clock
        for _ in range(500):
            if len(children()) >= sandbox.READERS_AT_ONCE or loop.time() - started > 5:
                break
            await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(loop.getaddrinfo("localhost", 443), timeout=5.0)
        except TimeoutError:
            pytest.fail("a DNS lookup (a new Slack or Redis connection) waited behind the files' parsers")
        assert len(children()) == sandbox.READERS_AT_ONCE
    finally:
        for task in parsing:
            task.cancel()
        await asyncio.gather(*parsing, return_exceptions=True)
        await reader.close()
    assert children() == []  # a cancelled answer's parsers are killed with it


async def test_a_file_without_access_is_not_downloaded_again_on_every_later_turn(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000900.000100"
    gone = fake_slack.add_file("gone.txt", b"x", mimetype="text/plain", filetype="text")
    del fake_slack.file_bodies[gone["id"]]  # deleted after it was shared: Slack answers 404
    await bot.send_event({**mention("read this", root), "files": [gone]})
    await bot.settle()
    for i in range(3):
        await bot.send_event(message(f"and now {i}?", f"1700000900.00030{i}", thread_ts=root))
        await bot.settle()
    assert len(fake_kimi.requests) == 4
    again = [f for f, _ in fake_slack.file_downloads if f == gone["id"]]
    assert len(again) == 1, f"downloaded {len(again)} times: once per turn, for the thread's life"
    assert "couldn't use gone.txt (no access)" in fake_slack.bodies(CHANNEL, root)[0]


@pytest.fixture
async def flaky_host() -> AsyncIterator[tuple[str, list[int]]]:
    """A file host on loopback answering each request with the next status of the list (then 200)."""
    statuses: list[int] = []

    async def serve(request: web.Request) -> web.Response:
        status = statuses.pop(0) if statuses else 200
        return web.Response(status=status, body=b"the file" if status == 200 else b"nope")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", statuses
    await runner.cleanup()


@pytest.mark.parametrize(
    ("status", "problem"), [(429, BUSY), (503, BUSY), (404, NO_ACCESS), (410, NO_ACCESS)]
)
async def test_a_busy_slack_is_tried_again_after_a_while_a_refusal_is_final(
    make_settings: Callable[..., Settings],
    redis: Redis,
    flaky_host: tuple[str, list[int]],
    status: int,
    problem: str,
) -> None:
    host, statuses = flaky_host
    settings = make_settings(slack_api_url=f"{host}/api/")
    reader = FileReader(settings, FileCache(redis, settings.thread_ttl_seconds), TEAM_ID, TOKEN)
    ref = {"id": "F0BUSY", "name": "notes.txt", "mimetype": "text/plain", "url_private_download": f"{host}/f"}
    try:
        statuses.append(status)
        first = await reader.read(ref)
        assert first.problem == problem
        ttl = await redis.ttl(FileCache.key(TEAM_ID, "F0BUSY"))
        if problem == BUSY:
            assert 0 < ttl <= BUSY_TTL_SECONDS
            assert await reader.read(ref) == first  # within the while: not fetched again
            await redis.expire(FileCache.key(TEAM_ID, "F0BUSY"), 1)  # the while is over
            assert await redis.ttl(FileCache.key(TEAM_ID, "F0BUSY")) <= 1  # a cache hit did not extend it
            await redis.delete(FileCache.key(TEAM_ID, "F0BUSY"))
            assert (await reader.read(ref)).text == "the file"
        else:
            assert ttl > settings.thread_ttl_seconds - 60
            assert await reader.read(ref) == first
    finally:
        await reader.close()
    from bot.files.parts import file_notes

    assert file_notes([first], images=True, model="m") == (f"couldn't use notes.txt ({problem})",)


async def test_a_file_read_again_keeps_its_cache_entry_as_long_as_the_thread(
    make_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = make_settings()
    cache = FileCache(redis, settings.thread_ttl_seconds)
    reader = FileReader(settings, cache, TEAM_ID, TOKEN)
    ref = {"id": "F0KEEP", "name": "a.txt", "mimetype": "text/plain"}
    from bot.files.parts import FileRead

    await cache.put(TEAM_ID, "F0KEEP", FileRead("F0KEEP", "a.txt", Kind.TEXT, text="kept").dump(), 100)
    assert (await reader.read(ref)).text == "kept"
    assert await redis.ttl(FileCache.key(TEAM_ID, "F0KEEP")) > settings.thread_ttl_seconds - 60


def test_the_files_read_for_an_answer_are_the_newest_messages_first() -> None:
    def entry(*ids: str) -> dict[str, Any]:
        return {"role": "user", "content": "x", "files": [{"id": i} for i in ids]}

    entries = [entry("A", "B"), {"role": "assistant", "content": "ok"}, entry("C", "D", "E"), entry("F")]
    assert files_to_read(entries, 0, 3) == {3: 1, 2: 2, 1: 0, 0: 0}
    assert files_to_read(entries, 2, 10) == {3: 1, 2: 3}
    assert files_to_read(entries, 0, 3) == files_to_read(entries, 0, 3)


async def test_summarize_thread_reads_only_the_newest_files_of_a_long_thread(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from handlers.shortcuts import SUMMARIZE_THREAD
    from tests.test_shortcuts import shortcut_payload

    bot: BotHarness = await make_bot()
    root = "1700000910.000100"
    fake_slack.seed(CHANNEL, user=ALICE, text="logs for the incident", ts=root)
    ids = []
    for i in range(30):
        log = fake_slack.add_file(
            f"part{i}.log", f"line {i}".encode(), mimetype="text/plain", filetype="text"
        )
        ids.append(log["id"])
        fake_slack.seed(
            CHANNEL,
            user=ALICE,
            text="",
            ts=f"1700000910.{200 + i:06d}",
            thread_ts=root,
            files=[log],
            subtype="file_share",
        )
    target = fake_slack.find(CHANNEL, root)
    assert target is not None
    await bot.interact(shortcut_payload(fake_slack, SUMMARIZE_THREAD, target))
    await bot.settle()
    assert sorted(f for f, _ in fake_slack.file_downloads) == sorted(ids[10:])  # the newest 20 (the default)
    sent = "\n".join(str(m.get("content")) for m in fake_kimi.requests[-1]["messages"])
    assert "line 29" in sent and "line 10" in sent and "line 9" not in sent
    assert '<file name="part9.log">not read: only the newest 20 files are read for an answer</file>' in sent
    [footer] = [
        line for line in fake_slack.bodies(CHANNEL, root)[-1].splitlines() if line.startswith("_kimi")
    ]
    assert "didn't read 10 older files (only the newest 20 files are read for an answer)" in footer


def test_file_texts_are_cut_to_one_share_the_short_ones_kept_whole() -> None:
    from bot.files.parts import CUT_NOTE_CHARS, FileRead, cut_texts

    reads = [
        FileRead("F1", "short.txt", Kind.TEXT, text="s" * 100),
        FileRead("F2", "long.txt", Kind.TEXT, text="l" * 10_000),
        FileRead("F3", "shot.png", Kind.IMAGE, image_mime="image/png", image_b64="aGk="),
        FileRead("F4", "longer.txt", Kind.TEXT, text="m" * 20_000),
    ]
    assert cut_texts(reads, 30_100) == reads  # it all fits: nothing cut
    out = cut_texts(reads, 4_100 + 3 * CUT_NOTE_CHARS)  # room for the notes of 3 texts, then 4,100
    assert out[0] == reads[0] and out[2] == reads[2]
    assert out[1].text.startswith("l" * 2_000 + "\n[… cut here: 8,000 more")
    assert out[3].text.startswith("m" * 2_000 + "\n[… cut here: 18,000 more")
    assert sum(len(r.text) for r in out) <= 4_100 + 3 * CUT_NOTE_CHARS
    assert cut_texts(reads, 0)[1].text.startswith("\n[… cut here: 10,000 more")


async def test_a_message_whose_files_overflow_the_window_gets_them_cut_to_fit(
    make_settings: Callable[..., Settings], fake_slack: FakeSlack, redis: Redis
) -> None:
    from bot.context import estimate_tokens
    from bot.files.resolve import with_files

    settings = make_settings()
    reader = FileReader(settings, FileCache(redis, settings.thread_ttl_seconds), TEAM_ID, TOKEN)
    big = fake_slack.add_file("big.log", b"c" * 40_000, mimetype="text/plain", filetype="text")
    small = fake_slack.add_file("small.txt", b"the key line", mimetype="text/plain", filetype="text")
    entries = [
        {"role": "user", "content": "alice: old", "files": [big]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "alice: what failed?", "files": [big, small]},
    ]
    try:
        out, notes = await with_files(
            reader, entries, 0, images=True, model="m", max_message_tokens=5_000, calibration=1.2
        )
        for entry in (out[0], out[2]):
            assert estimate_tokens(entry, 1.2) <= 5_000  # each message fits alone: none is refused
        assert "the key line" in out[2]["content"] and "more characters not read]" in out[2]["content"]
        assert out[0]["content"] != entries[0]["content"]
        assert notes == ("read part of big.log (too long for the window)",)  # named for the question only
        again, _ = await with_files(
            reader, entries, 0, images=True, model="m", max_message_tokens=5_000, calibration=1.2
        )
        assert again == out  # the same cut on every turn: a byte-stable prompt
        whole, notes = await with_files(reader, entries, 0, images=True, model="m")
        assert "c" * 40_000 in whole[2]["content"] and notes == ()  # without a budget: as before
    finally:
        await reader.close()


async def test_a_question_whose_files_overflow_the_window_is_answered_with_them_cut_end_to_end(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """Through the pipeline: the question's own file is cut to fit the window (and the footer says so),
    instead of the turn being refused as too long."""
    small: BotHarness = await make_bot(kimi_model="mystery-model", kimi_max_completion_tokens=120_000)
    root = "1700000920.000100"
    big = fake_slack.add_file("big.log", b"c" * 40_000, mimetype="text/plain", filetype="text")
    await small.send_event({**mention("what failed?", root), "files": [big]})
    await small.settle()
    answer = fake_slack.bodies(CHANNEL, root)[-1]
    assert "too long" not in answer.split("\n")[0], answer
    assert "read part of big.log" in answer
    (request,) = fake_kimi.requests
    sent = str(request["messages"][-1]["content"])
    assert "big.log" in sent and 1_000 < sent.count("c") < 40_000


async def test_a_cut_file_sends_the_same_bytes_on_the_next_turn_after_the_calibration_changed(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    """The thread's calibration is rewritten after every answer; the cut of a file too long for the window
    must not follow it, or every later turn re-cuts the message and Kimi's prompt cache misses."""
    small: BotHarness = await make_bot(kimi_model="mystery-model", kimi_max_completion_tokens=120_000)
    fake_kimi.script(Reply(content="A disk filled up."), Reply(content="Logs were never rotated."))
    root = "1700000921.000100"
    big = fake_slack.add_file("big.log", b"c" * 40_000, mimetype="text/plain", filetype="text")
    await small.send_event({**mention("what failed?", root), "files": [big]})
    await small.settle()
    meta = await small.deps.redis.hgetall(small.deps.threads.meta_key(thread_key(root)))  # type: ignore[misc]
    assert float(meta["calibration"]) != 1.0  # the API's count differed from the estimate
    await small.send_event(message("and why?", "1700000921.000200", thread_ts=root))
    await small.settle()
    first, second = fake_kimi.requests  # the cut message leaves room for the follow-up: no summary
    question = next(m for m in first["messages"] if "big.log" in str(m.get("content")))
    assert question in second["messages"]  # byte for byte the same message


def test_a_parsing_child_is_the_oom_killers_first_choice_and_cannot_raise_its_limits() -> None:
    code = (
        "import resource; from bot.files import sandbox; sandbox._die_first();"
        "sandbox._limit(resource.RLIMIT_AS, 2**31); print(open('/proc/self/oom_score_adj').read().strip(),"
        "resource.getrlimit(resource.RLIMIT_AS) == (2**31, 2**31))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1000", "True"]
