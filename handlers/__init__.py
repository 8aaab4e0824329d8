"""Thin Bolt listeners, grouped by Slack feature: payload -> Turn -> job. They never call Kimi."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bot.deps import Deps
from handlers import actions, assistant, commands, events, fallback


def register(app: AsyncApp, deps: Deps) -> None:
    assistant.register(app, deps)
    events.register(app, deps)
    commands.register(app, deps)
    actions.register(app, deps)
    fallback.register(app)  # last: only what nothing above took
