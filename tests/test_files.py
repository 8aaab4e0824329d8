"""Files in the conversation, the pure parts: kinds, extraction, image caps, content parts, the token's
allowed hosts, token estimates, model capabilities, and what a Turn and the manifests carry."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from bot.admission import turn_from_event
from bot.context import IMAGE_TOKENS, estimate_tokens, user_entry
from bot.files.download import allowed_hosts, looks_like_html, may_send_token
from bot.files.extract import (
    PDF_PAGE_CHARS,
    Unreadable,
    cut,
    prepare_image,
    read_document,
    read_pdf,
    read_text,
)
from bot.files.kinds import Kind, classify
from bot.files.parts import FileRead, content_with_files, file_notes, footer_name
from bot.kimi import profiles
from bot.kimi.profiles import learn_models, profile_for
from bot.redis_client import build_redis
from bot.store import FileCache, forget_team
from bot.turn import Source
from tests.files_data import docx, noisy_png, pdf, png, pptx, xlsx

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        ({"name": "shot.png", "mimetype": "image/png", "filetype": "png"}, Kind.IMAGE),
        ({"name": "photo.JPG", "mimetype": "", "filetype": ""}, Kind.IMAGE),
        ({"name": "anim.webp", "mimetype": "image/webp"}, Kind.IMAGE),
        ({"name": "logo.svg", "mimetype": "image/svg+xml", "filetype": "svg"}, Kind.UNSUPPORTED),
        ({"name": "notes.md", "mimetype": "text/plain", "filetype": "markdown"}, Kind.TEXT),
        ({"name": "data.csv", "mimetype": "text/csv"}, Kind.TEXT),
        ({"name": "conf", "mimetype": "application/json"}, Kind.TEXT),
        ({"name": "main.rs", "mimetype": "application/octet-stream", "filetype": "rust"}, Kind.TEXT),
        ({"name": "Dockerfile", "mimetype": "application/octet-stream"}, Kind.TEXT),
        ({"name": "server.log", "mimetype": "application/octet-stream"}, Kind.TEXT),
        ({"name": "paper.pdf", "mimetype": "application/pdf", "filetype": "pdf"}, Kind.PDF),
        ({"name": "spec.docx", "mimetype": "application/octet-stream", "filetype": "docx"}, Kind.DOCX),
        ({"name": "costs.xlsx", "mimetype": ""}, Kind.XLSX),
        ({"name": "deck.pptx", "filetype": "pptx"}, Kind.PPTX),
        (
            {"name": "report.bin", "mimetype": "application/octet-stream", "filetype": "binary"},
            Kind.UNSUPPORTED,
        ),
        ({"name": "old.doc", "mimetype": "application/msword", "filetype": "doc"}, Kind.UNSUPPORTED),
        ({}, Kind.UNSUPPORTED),
    ],
)
def test_a_file_is_classified_by_mimetype_filetype_and_name(ref: dict[str, Any], kind: Kind) -> None:
    assert classify(ref) is kind


def test_text_is_decoded_with_replacement_and_cut_with_a_note() -> None:
    assert read_text(b"\xef\xbb\xbfok \xff\xfe bytes", 100) == "ok \ufffd\ufffd bytes"
    long = read_text(b"x" * 50, 10)
    assert long.startswith("x" * 10) and "40 more characters not read" in long
    assert cut("short", 10) == "short"


def test_pdf_text_is_read_page_by_page_and_a_page_is_capped() -> None:
    text = read_pdf(pdf("Hello PDF world", "Second page here"), 10_000)
    assert "--- page 1 ---\nHello PDF world" in text and "--- page 2 ---\nSecond page here" in text
    capped = read_pdf(pdf("A" * 100), 10_000, page_limit=20)
    assert "A" * 20 in capped and "A" * 21 not in capped and "80 more characters" in capped


def test_the_documented_caps_and_costs() -> None:
    assert PDF_PAGE_CHARS == 20_000 and IMAGE_TOKENS == 3_000


async def test_forgetting_a_workspace_deletes_what_was_read_from_its_files(redis_url: str) -> None:
    redis = build_redis(redis_url)
    try:
        cache = FileCache(redis, 60)
        await cache.put("T0FILES", "F1", "{}")
        await cache.put("T0OTHER", "F1", "{}")
        await forget_team(redis, "T0FILES")
        assert await cache.get("T0FILES", "F1") is None and await cache.get("T0OTHER", "F1") == "{}"
        assert 0 < await redis.ttl(FileCache.key("T0OTHER", "F1")) <= 60
    finally:
        await redis.aclose()


def test_a_scanned_pdf_without_text_and_a_broken_one_say_so() -> None:
    with pytest.raises(Unreadable, match="a scanned PDF without text"):
        read_pdf(pdf("", ""), 10_000)
    with pytest.raises(Unreadable, match="could not be read"):
        read_pdf(b"%PDF-1.4 garbage", 10_000)


def test_office_files_are_read_as_text() -> None:
    assert (
        read_document(Kind.DOCX, docx("First paragraph", "Second one"), 1_000)
        == "First paragraph\nSecond one"
    )
    sheet = read_document(Kind.XLSX, xlsx([["item", "cost"], ["redis", 12.5]]), 1_000)
    assert sheet == "--- sheet Costs ---\nitem\tcost\nredis\t12.5"
    deck = read_document(Kind.PPTX, pptx("Roadmap", "Q3 goals"), 1_000)
    assert "--- slide 1 ---\nRoadmap" in deck and "--- slide 2 ---\nQ3 goals" in deck
    with pytest.raises(Unreadable, match="Word file"):
        read_document(Kind.DOCX, b"not a zip", 1_000)
    with pytest.raises(Unreadable, match="unsupported"):
        read_document(Kind.UNSUPPORTED, b"x", 1_000)


def test_an_image_within_the_caps_is_sent_as_it_is() -> None:
    data = png(10, 10)
    image = prepare_image(data, 100_000, 10_000)
    assert image.mime == "image/png" and image.data == data


def test_an_image_over_the_caps_is_scaled_and_re_encoded_the_same_way_every_time() -> None:
    data = noisy_png(600, 400)
    assert len(data) > 300_000
    image = prepare_image(data, 60_000, 40_000)
    assert image.mime == "image/jpeg" and len(image.data) <= 60_000
    width, height = Image.open(io.BytesIO(image.data)).size
    assert width * height <= 40_000 and abs(width / height - 1.5) < 0.05
    assert prepare_image(data, 60_000, 40_000).data == image.data  # deterministic: a byte-stable prompt


def test_an_image_with_transparency_stays_png_and_a_non_image_is_unreadable() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(out, format="PNG")
    image = prepare_image(out.getvalue(), 1_000_000, 10_000)
    assert image.mime == "image/png" and Image.open(io.BytesIO(image.data)).size == (100, 100)
    with pytest.raises(Unreadable):
        prepare_image(b"GIF89a not really", 1_000, 1_000)


def reads() -> list[FileRead]:
    return [
        FileRead("F1", "notes.txt", Kind.TEXT, text="the notes"),
        FileRead("F2", "shot.png", Kind.IMAGE, image_mime="image/png", image_b64="aGk="),
        FileRead("F3", "report.bin", Kind.UNSUPPORTED, problem="can't read this type yet"),
    ]


def test_content_parts_carry_file_text_images_and_what_was_not_read() -> None:
    content = content_with_files("alice: look", reads(), images=True, model="kimi-k2.6")
    assert isinstance(content, list)
    assert content[0] == {
        "type": "text",
        "text": 'alice: look\n\n<file name="notes.txt">\nthe notes\n</file>\n\n'
        '<file name="shot.png">an image, next</file>',
    }
    assert content[1] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}
    assert content[2] == {
        "type": "text",
        "text": '<file name="report.bin">not read: can\'t read this type yet</file>',
    }
    assert file_notes(reads(), images=True, model="kimi-k2.6") == (
        "couldn't use report.bin (can't read this type yet)",
    )


def test_a_model_without_image_input_gets_a_sentence_instead_and_the_footer_says_so() -> None:
    content = content_with_files("alice: look", reads(), images=False, model="kimi-k2-thinking")
    assert isinstance(content, str)  # no image: plain text content, as before
    assert (
        "The image shot.png is attached, but kimi-k2-thinking does not read images, so it was not sent."
        in content
    )
    assert "base64" not in content
    assert file_notes(reads(), images=False, model="kimi-k2-thinking") == (
        "couldn't use shot.png (kimi-k2-thinking does not read images)",
        "couldn't use report.bin (can't read this type yet)",
    )


def test_a_file_name_in_the_footer_cannot_carry_markup_or_mentions() -> None:
    assert footer_name("<!channel>*bold*_x_`y`.txt") == "!channelboldxy.txt"
    assert len(footer_name("a" * 200)) == 60
    assert FileRead.load(reads()[1].dump()) == reads()[1]
    assert FileRead.load("{not json") is None


def test_the_token_goes_only_to_slacks_file_host_or_the_configured_api_host() -> None:
    assert allowed_hosts("https://slack.com/api/") == {"slack.com", "files.slack.com"}
    assert may_send_token("https://files.slack.com/files-pri/T1-F1/download/a.txt", "https://slack.com/api/")
    assert may_send_token("https://files.slack-gov.com/files-pri/T1-F1/x", "https://slack-gov.com/api/")
    assert not may_send_token("http://files.slack.com/files-pri/T1-F1/x", "https://slack.com/api/")
    assert not may_send_token("https://evil.example.com/files-pri/T1-F1/x", "https://slack.com/api/")
    assert not may_send_token("https://files.slack.com.evil.example/x", "https://slack.com/api/")
    assert not may_send_token("https://user@files.slack.com/x", "https://slack.com/api/")
    assert may_send_token("http://127.0.0.1:8123/files-pri/T-F/download/a", "http://127.0.0.1:8123/api/")
    assert not may_send_token("http://127.0.0.1:9999/files-pri/T-F/download/a", "http://127.0.0.1:8123/api/")
    assert looks_like_html(b"  <!DOCTYPE html><html>") and not looks_like_html(b"plain text")


def test_an_image_costs_a_constant_in_the_estimate_not_its_base64_length() -> None:
    big = "A" * 400_000
    parts = [{"type": "text", "text": "x" * 300}, {"type": "image_url", "image_url": {"url": big}}]
    estimate = estimate_tokens({"role": "user", "content": parts})
    assert estimate == estimate_tokens({"role": "user", "content": "x" * 300}) + IMAGE_TOKENS
    assert estimate_tokens({"role": "user", "content": parts}, 2.0) > estimate


def test_a_user_entry_keeps_its_files_and_a_file_only_message_asks_about_them() -> None:
    files = ({"id": "F1", "name": "a.txt"},)
    entry = user_entry("alice", "", ts="1.0", user="U1", files=files)
    assert entry["files"] == [{"id": "F1", "name": "a.txt"}]
    assert entry["content"] == "alice: (no message text: a question about the attached file)"
    assert "files" not in user_entry("alice", "hi", ts="1.0", user="U1")


def test_image_input_comes_from_the_table_and_from_get_models_where_listed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(profiles, "LISTED_IMAGE_IN", {})
    assert profile_for("kimi-k2.6").supports_image_in is True
    assert profile_for("kimi-k2-thinking").supports_image_in is False
    assert profile_for("kimi-k3").supports_image_in is False
    learned = learn_models(
        [
            {"id": "kimi-k3", "supports_image_in": True},
            {"id": "moonshotai/kimi-k2.6", "supports_image_in": False},
            {"id": "kimi-k2-thinking"},  # not said: the table stands
            "junk",
        ]
    )
    assert learned == {"kimi-k3": True, "kimi-k2.6": False}
    assert profile_for("kimi-k3").supports_image_in is True
    assert profile_for("kimi-k2.6").supports_image_in is False
    assert profile_for("kimi-k2-thinking").supports_image_in is False
    assert learn_models({"not": "a list"}) == {}


def test_a_message_events_files_reach_the_turn() -> None:
    event = {
        "type": "message",
        "subtype": "file_share",
        "user": "U1",
        "text": "",
        "ts": "1.000100",
        "channel": "D1",
        "files": [
            {
                "id": "F1",
                "name": "a.txt",
                "mimetype": "text/plain",
                "preview": "x",
                "url_private_download": "u",
            }
        ],
    }
    turn = turn_from_event({"team_id": "T1"}, event, Source.DM, "UBOT")
    assert turn.files == (
        {"id": "F1", "name": "a.txt", "mimetype": "text/plain", "url_private_download": "u"},
    )


@pytest.mark.parametrize("name", ["manifest-http.yml", "manifest-socket-mode.yml", "manifest-oauth.yml"])
def test_every_manifest_asks_for_files_read(name: str) -> None:
    manifest = yaml.safe_load((ROOT / "manifests" / name).read_text())
    assert "files:read" in manifest["oauth_config"]["scopes"]["bot"]


def test_base64_of_a_data_url_round_trips() -> None:
    read = FileRead(
        "F2", "shot.png", Kind.IMAGE, image_mime="image/png", image_b64=base64.b64encode(png()).decode()
    )
    content = content_with_files("bob: see", [read], images=True, model="kimi-k2.6")
    assert isinstance(content, list)
    url = content[1]["image_url"]["url"]
    assert base64.b64decode(url.split(",", 1)[1]) == png()


def test_the_fake_kimi_refuses_image_parts_kimi_would_refuse() -> None:
    from tests.fakes.kimi_api import check_request

    def body(model: str, url: str) -> dict[str, Any]:
        parts = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]
        return {"model": model, "messages": [{"role": "user", "content": parts}]}

    good = "data:image/png;base64," + base64.b64encode(png()).decode()
    assert check_request(body("kimi-k2.6", good)) == ""
    assert "does not support image input" in check_request(body("kimi-k2-thinking", good))
    assert "base64 data URL" in check_request(body("kimi-k2.6", "https://example.com/a.png"))
    assert "base64 data URL" in check_request(body("kimi-k2.6", "data:image/bmp;base64,AAAA"))
    assert "not valid base64" in check_request(body("kimi-k2.6", "data:image/png;base64,A"))
    unknown = {"model": "kimi-k2.6", "messages": [{"role": "user", "content": [{"type": "video_url"}]}]}
    assert "unknown content type" in check_request(unknown)
