"""Thin Bolt listeners, grouped by Slack feature: payload -> Turn -> job. They never call Kimi."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.admission import Access, AccessPolicy
from bot.deps import Deps
from bot.store import AccessFacts
from handlers import actions, assistant, commands, events, fallback, installs, settings, shortcuts


def register(app: AsyncApp, deps: Deps) -> None:
    # ALLOWED_USERS / ALLOWED_CHANNELS / ALLOW_GUESTS, with one cache of the facts they need per app
    access = Access(AccessPolicy.from_settings(deps.settings), AccessFacts(deps.redis), deps.slack)
    # Messages and mentions first: Bolt tries listeners in the order they were registered, building the
    # arguments of each one's matcher, so the bulk of the traffic is matched by the first one it tries.
    events.register(app, deps, access)
    assistant.register(app, deps)
    commands.register(app, deps, access)
    actions.register(app, deps, access)
    shortcuts.register(app, deps, access)
    settings.register(app, deps)
    installs.register(app, deps)  # OAuth mode: app_uninstalled, tokens_revoked
    fallback.register(app)  # last: only what nothing above took
