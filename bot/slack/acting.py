"""Which workspace the current task acts for: its bot token and identity, in a context variable.

OAuth mode serves many workspaces through one Web API client. The token is not a client attribute (tasks
for different teams share the client) but this context variable: our Bolt `authorize` sets it for a
request, the worker sets it for a job, and tasks spawned inside inherit it. Unset: the client's own token
(single-workspace mode, SLACK_BOT_TOKEN).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TeamBot:
    """One workspace's bot: the token to call Slack with, and who the bot is there."""

    token: str = field(repr=False)  # never in a log line or a traceback's locals
    team_id: str
    user_id: str
    bot_id: str
    enterprise_id: str = ""


CURRENT: ContextVar[TeamBot | None] = ContextVar("kimibot_team_bot", default=None)


def current() -> TeamBot | None:
    return CURRENT.get()


@contextmanager
def acting_for(bot: TeamBot | None) -> Iterator[None]:
    """Calls made inside use `bot`'s token (None: the client's own)."""
    reset = CURRENT.set(bot)
    try:
        yield
    finally:
        CURRENT.reset(reset)
