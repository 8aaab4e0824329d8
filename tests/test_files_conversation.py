"""Files in the conversation, end to end through the Bolt app: files attached to a question and to
earlier messages of its thread reach Kimi (images as `image_url` parts, documents as text); files that
cannot be used are named in the footer; a message with only a file is a question about it."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from bot.files.resolve import FOOTER_NOTES, TOO_BIG
from bot.kimi import profiles
from bot.kimi.profiles import profile_for
from bot.startup import check_kimi
from bot.store import FileCache
from bot.tools.base import ToolContext, ToolResult
from tests.conftest import BotHarness
from tests.fakes.kimi_api import FakeKimi, text_of
from tests.fakes.slack_api import TEAM_ID, TOKEN, FakeSlack
from tests.files_data import pdf, png
from tests.slack_requests import ALICE, BOB, CHANNEL, DM, mention, message


def last_user(request: dict[str, Any]) -> Any:
    return [m for m in request["messages"] if m["role"] == "user"][-1]["content"]


def all_text(request: dict[str, Any]) -> str:
    return "\n".join(text_of(m.get("content")) for m in request["messages"])


def images_in(request: dict[str, Any]) -> list[bytes]:
    found = []
    for m in request["messages"]:
        for part in m["content"] if isinstance(m.get("content"), list) else []:
            if part["type"] == "image_url":
                url = part["image_url"]["url"]
                assert url.startswith("data:image/png;base64,")
                found.append(base64.b64decode(url.split(",", 1)[1]))
    return found


def footer_of(fake_slack: FakeSlack, thread_ts: str, channel: str = CHANNEL) -> str:
    """The footer line under the thread's last answer."""
    body = fake_slack.bodies(channel, thread_ts)[-1]
    [line] = [line for line in body.splitlines() if line.startswith("_kimi")]
    return line


async def test_an_image_a_text_file_and_a_pdf_in_a_thread_reach_kimi_in_the_right_form(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    fake_slack.add_user(BOB, "bob")
    root = "1700000500.000100"
    log = fake_slack.add_file(
        "server.log", b"ERROR disk full on db-1\n", mimetype="text/plain", filetype="text"
    )
    paper = fake_slack.add_file(
        "design.pdf", pdf("Redis streams keep the jobs"), mimetype="application/pdf", filetype="pdf"
    )
    shot = fake_slack.add_file("graph.png", png(12, 9), mimetype="image/png", filetype="png")
    fake_slack.seed(
        CHANNEL, user=BOB, text="the log from last night", ts=root, files=[log], subtype="file_share"
    )
    # Only a file, no text: kept all the same.
    fake_slack.seed(
        CHANNEL,
        user=BOB,
        text="",
        ts="1700000500.000200",
        thread_ts=root,
        files=[paper],
        subtype="file_share",
    )
    question = mention("what do these show?", "1700000500.000300", thread_ts=root)
    await bot.send_event({**question, "files": [shot]})
    await bot.settle()

    request = fake_kimi.requests[0]
    text = all_text(request)
    assert '<file name="server.log">\nERROR disk full on db-1\n\n</file>' in text
    assert "bob: the log from last night" in text
    assert "bob: (no message text: a question about the attached file)" in text
    assert '<file name="design.pdf">\n--- page 1 ---\nRedis streams keep the jobs\n</file>' in text
    question_content = last_user(request)
    assert isinstance(question_content, list)  # the image goes as an image_url part of the question
    assert question_content[0]["text"].startswith("alice: what do these show?")
    assert images_in(request) == [png(12, 9)]  # small enough: sent as it is
    assert fake_kimi.rejected == []
    footer = footer_of(fake_slack, root)
    assert "couldn't use" not in footer
    # The bot token went with each download, once per file.
    assert sorted(fake_slack.file_downloads) == sorted((f["id"], TOKEN) for f in (log, paper, shot))
    assert fake_slack.problems == []


async def test_later_turns_send_the_same_bytes_and_do_not_download_again(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000510.000100"
    shot = fake_slack.add_file("graph.png", png(30, 20), mimetype="image/png", filetype="png")
    notes = fake_slack.add_file("notes.md", b"# Plan\nship it", mimetype="text/plain", filetype="markdown")
    odd = fake_slack.add_file("x.bin", b"\x00", mimetype="application/octet-stream", filetype="binary")
    await bot.send_event({**mention("look at these", root), "files": [shot, notes, odd]})
    await bot.settle()
    await bot.send_event(message("and now?", "1700000510.000300", thread_ts=root))
    await bot.settle()
    first, second = fake_kimi.requests[0]["messages"], fake_kimi.requests[1]["messages"]
    assert first[1] == second[1]  # the first question, files and all, byte for byte (the prefix cache)
    assert len(fake_slack.file_downloads) == 2  # each file once; the second turn read Redis
    cached = await bot.deps.redis.get(FileCache.key(TEAM_ID, notes["id"]))
    assert cached is not None and "ship it" in cached
    ttl = await bot.deps.redis.ttl(FileCache.key(TEAM_ID, notes["id"]))
    assert bot.settings.thread_ttl_seconds - 60 < ttl <= bot.settings.thread_ttl_seconds
    assert second[-1]["content"] == "alice: and now?"
    answers = [
        next(line for line in body.splitlines() if line.startswith("_kimi"))
        for body in fake_slack.bodies(CHANNEL, root)
    ]
    assert "couldn't use x.bin" in answers[0] and "couldn't use" not in answers[1]  # named once


async def test_an_oversized_and_an_unsupported_file_are_named_in_the_footer(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(files_max_bytes=1_000)
    root = "1700000520.000100"
    big = fake_slack.add_file("huge.txt", b"x" * 5_000, mimetype="text/plain", filetype="text")
    lied = fake_slack.add_file("small.csv", b"a,b\n" * 1_000, mimetype="text/csv", filetype="csv", size=10)
    binary = fake_slack.add_file(
        "report.bin", b"\x00\x01", mimetype="application/octet-stream", filetype="binary"
    )
    fine = fake_slack.add_file("ok.txt", b"all good", mimetype="text/plain", filetype="text")
    await bot.send_event({**mention("what's in these?", root), "files": [big, lied, binary, fine]})
    await bot.settle()
    footer = footer_of(fake_slack, root)
    assert "couldn't use huge.txt (too big)" in footer
    assert "couldn't use small.csv (too big)" in footer  # its `size` said 10 bytes; the download was cut
    assert "couldn't use report.bin (can't read this type yet)" in footer
    assert "ok.txt" not in footer
    text = all_text(fake_kimi.requests[0])
    assert '<file name="huge.txt">not read: too big</file>' in text and "all good" in text
    downloaded = {file_id for file_id, _ in fake_slack.file_downloads}
    assert big["id"] not in downloaded and binary["id"] not in downloaded  # refused before any download
    assert TOO_BIG == "too big"


async def test_a_file_only_message_is_a_question_about_the_file(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    ts = "1700000530.000100"
    csv = fake_slack.add_file("sales.csv", b"month,total\nmay,42\n", mimetype="text/csv", filetype="csv")
    await bot.send_event(message("", ts, channel=DM, channel_type="im", subtype="file_share", files=[csv]))
    await bot.settle()
    [answer] = fake_slack.bodies(DM, ts)
    assert "Ask me anything" not in answer
    assert len(fake_kimi.requests) == 1
    question = last_user(fake_kimi.requests[0])
    assert question.startswith("alice: (no message text: a question about the attached file)")
    assert "month,total\nmay,42" in question
    assert "You said: alice: (no message text" in answer


async def test_a_file_without_access_is_named_and_the_token_never_leaves_slacks_hosts(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000540.000100"
    fake_slack.scopes.discard("files:read")  # installed before files:read: Slack answers its sign-in page
    locked = fake_slack.add_file("secret.txt", b"hidden", mimetype="text/plain", filetype="text")
    elsewhere = {
        **fake_slack.add_file("phish.txt", b"x", mimetype="text/plain", filetype="text"),
        "url_private_download": "https://evil.example.com/files-pri/x/download/phish.txt",
    }
    await bot.send_event({**mention("read these", root), "files": [locked, elsewhere]})
    await bot.settle()
    footer = footer_of(fake_slack, root)
    assert "couldn't use secret.txt (no access)" in footer and "couldn't use phish.txt (no access)" in footer
    assert [file_id for file_id, _ in fake_slack.file_downloads] == [locked["id"]]  # never to evil.example
    assert "hidden" not in all_text(fake_kimi.requests[0])
    # No access is definitive, and cached like any result: the next turn sends the same bytes, and does
    # not download the file again.
    fake_slack.scopes.add("files:read")
    await bot.send_event(message("and now?", "1700000540.000300", thread_ts=root))
    await bot.settle()
    assert "hidden" not in all_text(fake_kimi.requests[1])
    assert fake_kimi.requests[0]["messages"][1] == fake_kimi.requests[1]["messages"][1]
    assert [file_id for file_id, _ in fake_slack.file_downloads] == [locked["id"]]


async def test_a_model_without_image_input_is_told_in_one_sentence_and_no_image_is_sent(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    bot: BotHarness = await make_bot(kimi_model="kimi-k2-thinking")
    root = "1700000550.000100"
    shot = fake_slack.add_file("graph.png", png(), mimetype="image/png", filetype="png")
    await bot.send_event({**mention("what is this?", root), "files": [shot]})
    await bot.settle()
    request = fake_kimi.requests[0]
    assert fake_kimi.rejected == [] and images_in(request) == []
    assert (
        "The image graph.png is attached, but kimi-k2-thinking does not read images, so it was not sent."
        in last_user(request)
    )
    assert "couldn't use graph.png (kimi-k2-thinking does not read images)" in footer_of(fake_slack, root)


@dataclass
class Lookup:
    name: str = "lookup"
    description: str = "Look something up."
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    read_only: bool = True

    def title(self, args: dict[str, Any]) -> str:
        return "Looking up"

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        return ToolResult("nothing")


async def test_the_agent_path_gets_the_same_files_and_footer_notes(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    async def tools(ctx: ToolContext) -> list[Any]:
        return [Lookup()]

    bot.deps.tools = tools
    root = "1700000560.000100"
    shot = fake_slack.add_file("graph.png", png(), mimetype="image/png", filetype="png")
    odd = fake_slack.add_file("model.stl", b"solid", mimetype="application/octet-stream", filetype="stl")
    await bot.send_event({**mention("explain", root, user=ALICE), "files": [shot, odd]})
    await bot.settle()
    request = fake_kimi.requests[0]
    assert request.get("tools") and images_in(request) == [png()]
    assert "couldn't use model.stl (can't read this type yet)" in footer_of(fake_slack, root)


async def test_in_oauth_mode_a_file_is_fetched_with_the_token_of_the_workspace_asking(
    make_bot: Callable[..., Any], fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    from tests.test_oauth import SECOND_TEAM, install_second, oauth_settings, second_team_mention

    bot: BotHarness = await make_bot(**oauth_settings())
    await install_second(bot, fake_slack)
    installed = fake_slack.calls_of("oauth.v2.access")[0].args["_result"]["access_token"]
    notes = fake_slack.add_file("notes.txt", b"second team notes", mimetype="text/plain", filetype="text")
    ts = "1700000570.000100"
    body = json.loads(second_team_mention("summarize", ts))
    body["event"]["files"] = [notes]
    fake_slack.messages[CHANNEL].append({k: v for k, v in body["event"].items() if k != "channel"})
    status, _ = await bot.post(json.dumps(body).encode(), "application/json")
    assert status == 200
    await bot.settle()
    assert fake_slack.file_downloads == [(notes["id"], installed)]
    assert "second team notes" in all_text(fake_kimi.requests[0])
    assert await bot.deps.redis.exists(FileCache.key(SECOND_TEAM, notes["id"])) == 1


async def test_the_start_up_check_learns_image_input_from_get_models(
    make_settings: Callable[..., Any], fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profiles, "LISTED_IMAGE_IN", {})
    assert profile_for("kimi-k3").supports_image_in is False  # the table does not say K3 reads images
    assert await check_kimi(make_settings()) is True
    assert profile_for("kimi-k3").supports_image_in is True  # the fake's GET /models says it does
    assert profile_for("kimi-k2-thinking").supports_image_in is False


async def test_a_scanned_pdf_and_a_parser_that_fails_are_named_and_the_answer_still_comes(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.files import resolve

    real = resolve.read_document

    def flaky(kind: Any, data: bytes, limit: int) -> str:
        if data.startswith(b"boom"):
            raise RecursionError("a parser bug")
        return real(kind, data, limit)

    monkeypatch.setattr(resolve, "read_document", flaky)
    root = "1700000580.000100"
    scan = fake_slack.add_file("scan.pdf", pdf(""), mimetype="application/pdf", filetype="pdf")
    boom = fake_slack.add_file("boom.txt", b"boom", mimetype="text/plain", filetype="text")
    await bot.send_event({**mention("read these", root), "files": [scan, boom]})
    await bot.settle()
    footer = footer_of(fake_slack, root)
    assert "couldn't use scan.pdf (a scanned PDF without text)" in footer
    assert "couldn't use boom.txt (could not be read)" in footer
    assert len(fake_kimi.requests) == 1


async def test_forgetting_a_thread_deletes_what_was_read_from_its_files(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000590.000100"
    notes = fake_slack.add_file("notes.txt", b"private notes", mimetype="text/plain", filetype="text")
    await bot.send_event({**mention("read this", root), "files": [notes]})
    await bot.settle()
    assert await bot.deps.redis.exists(FileCache.key(TEAM_ID, notes["id"])) == 1
    await bot.send_event(mention("forget", "1700000590.000200", thread_ts=root))
    await bot.settle()
    assert fake_slack.bodies(CHANNEL, root)[-1].startswith("Done: I have forgotten")
    assert await bot.deps.redis.exists(FileCache.key(TEAM_ID, notes["id"])) == 0


async def test_many_unusable_files_are_counted_past_the_first_few_named(
    bot: BotHarness, fake_slack: FakeSlack, fake_kimi: FakeKimi
) -> None:
    root = "1700000600.000100"
    files = [
        fake_slack.add_file(f"blob{i}.bin", b"\x00", mimetype="application/octet-stream", filetype="binary")
        for i in range(12)
    ]
    await bot.send_event({**mention("what are these?", root), "files": files})
    await bot.settle()
    footer = footer_of(fake_slack, root)
    assert footer.count("couldn't use blob") == FOOTER_NOTES - 1
    assert f"couldn't use {12 - FOOTER_NOTES + 1} more files" in footer
