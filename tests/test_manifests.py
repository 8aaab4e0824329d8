"""The Slack app manifests ask for every scope and event the code needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
REF = Path(__file__).parent / "fakes" / "slack_api_ref"

# Every Web API method kimibot calls. The fake Slack refuses methods missing from its reference data,
# so a new call fails the other tests until it is added there, and then here.
METHODS_CALLED = [
    "auth.test",
    "chat.postMessage",
    "chat.update",
    "chat.delete",
    "chat.postEphemeral",
    "chat.startStream",
    "chat.appendStream",
    "chat.stopStream",
    "conversations.replies",
    "conversations.history",  # finding a /kimi question again after a crash; the channel-history tool
    "conversations.info",  # the tools' access rule
    "conversations.members",
    "chat.getPermalink",
    "assistant.search.context",
    "users.info",
    "usergroups.users.list",  # ALLOWED_USERS' user groups
    "reactions.add",  # the sign of life while a burst waits for the channel's posting budget
    "reactions.remove",
    "views.open",
    "views.publish",  # the Home tab (per-channel settings)
    "views.update",  # the settings form redrawn for another model
    "assistant.threads.setStatus",
    "assistant.threads.setSuggestedPrompts",
    "assistant.threads.setTitle",
]
EVENTS_HANDLED = [
    "app_mention",
    "message.channels",
    "message.groups",
    "message.im",
    "message.mpim",
    "app_home_opened",  # agent_view: the Messages tab; and the Home tab
    "assistant_thread_started",
    "assistant_thread_context_changed",
]


def bot_scopes_for(method: str) -> set[str]:
    return set((json.loads((REF / f"{method}.json").read_text()).get("scope") or {}).get("bot") or [])


def test_the_reference_data_lists_every_method_called() -> None:
    vendored = {p.stem for p in REF.glob("*.json")}
    assert set(METHODS_CALLED) <= vendored


@pytest.mark.parametrize("name", ["manifest-http.yml", "manifest-socket-mode.yml", "manifest-oauth.yml"])
def test_manifest_covers_every_method_and_event(name: str) -> None:
    manifest = yaml.safe_load((ROOT / "manifests" / name).read_text())
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    for method in METHODS_CALLED:
        needed = bot_scopes_for(method)
        assert not needed or needed & scopes, f"{name}: {method} needs one of {sorted(needed)}"
    assert set(EVENTS_HANDLED) <= set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert manifest["settings"]["interactivity"]["is_enabled"] is True
    assert manifest["features"]["app_home"]["messages_tab_enabled"] is True
    assert manifest["features"]["app_home"]["home_tab_enabled"] is True  # settings and usage at a glance
    assert "agent_view" in manifest["features"] and "assistant_view" not in manifest["features"]
    assert manifest["features"]["agent_view"]["agent_description"]
    assert [c["command"] for c in manifest["features"]["slash_commands"]] == ["/kimi"]
    assert manifest["settings"]["socket_mode_enabled"] is (name == "manifest-socket-mode.yml")


def test_the_oauth_manifest_redirects_to_the_route_and_sends_uninstalls() -> None:
    from bot.oauth import REDIRECT_PATH

    manifest = yaml.safe_load((ROOT / "manifests" / "manifest-oauth.yml").read_text())
    [redirect] = manifest["oauth_config"]["redirect_urls"]
    assert redirect.startswith("https://") and redirect.endswith(REDIRECT_PATH)
    assert {"app_uninstalled", "tokens_revoked", "team_access_revoked"} <= set(
        manifest["settings"]["event_subscriptions"]["bot_events"]
    )
    assert manifest["settings"]["socket_mode_enabled"] is False
    http = yaml.safe_load((ROOT / "manifests" / "manifest-http.yml").read_text())
    assert manifest["oauth_config"]["scopes"] == http["oauth_config"]["scopes"]


@pytest.mark.parametrize("name", ["manifest-http.yml", "manifest-socket-mode.yml", "manifest-oauth.yml"])
def test_manifest_lists_every_message_shortcut_the_app_answers(name: str) -> None:
    from handlers.shortcuts import ASK_ABOUT_MESSAGE, FORGET_THREAD, SUMMARIZE_THREAD

    manifest = yaml.safe_load((ROOT / "manifests" / name).read_text())
    shortcuts = manifest["features"]["shortcuts"]
    assert {s["callback_id"] for s in shortcuts} == {ASK_ABOUT_MESSAGE, SUMMARIZE_THREAD, FORGET_THREAD}
    for shortcut in shortcuts:  # Slack's limits: a name of at most 24 characters, a description of 150
        assert shortcut["type"] == "message"
        assert 0 < len(shortcut["name"]) <= 24 and 0 < len(shortcut["description"]) <= 150
    assert "commands" in manifest["oauth_config"]["scopes"]["bot"]  # what shortcuts need
