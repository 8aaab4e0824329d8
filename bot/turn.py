"""A Turn: one user message the bot has decided to answer, whatever surface it came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any


class Source(StrEnum):
    MENTION = "mention"  # @kimibot in a channel
    THREAD = "thread"  # a follow-up in a thread the bot has answered in
    DM = "dm"  # a direct message
    COMMAND = "command"  # /kimi <question>
    REGENERATE = "regenerate"  # the Regenerate button under an answer
    SHORTCUT = "shortcut"  # a message shortcut: "Ask Kimi about this" or "Summarize thread"


# What a Turn keeps of each Slack file object: enough to name it, classify it and download it.
FILE_REF_KEYS = (
    "id",
    "name",
    "title",
    "mimetype",
    "filetype",
    "size",
    "url_private_download",
    "url_private",
    "mode",
)


def file_refs(files: Any) -> tuple[dict[str, Any], ...]:
    """The files of a message event (or of a stored Turn) as small dicts of FILE_REF_KEYS; anything that
    is not a file object with an id is left out."""
    if not isinstance(files, list | tuple):
        return ()
    return tuple(
        {k: f[k] for k in FILE_REF_KEYS if k in f}
        for f in files
        if isinstance(f, dict) and isinstance(f.get("id"), str) and f["id"]
    )


@dataclass(frozen=True)
class ThreadKey:
    """Where a conversation lives: its history is keyed by this."""

    team_id: str
    channel: str
    thread_ts: str

    def __str__(self) -> str:
        return f"{self.team_id}:{self.channel}:{self.thread_ts}"


@dataclass(frozen=True)
class Turn:
    """Who asked what, where, and how it reached us."""

    source: Source
    team_id: str
    channel: str
    user: str
    text: str
    ts: str  # the user's message (for a command: the "asked" message the bot posted)
    thread_ts: str  # the thread the answer goes into
    event_id: str = ""
    response_url: str = ""  # /kimi in a channel the bot is not in: answer through this instead
    assistant_thread: bool = False  # a thread in Slack's assistant panel: status instead of a placeholder
    action_token: str = ""  # from the message event, when Slack sends one: lets slack_search search
    # The Slack file objects attached to the question (trimmed by `file_refs`): read into its context.
    files: tuple[dict[str, Any], ...] = ()
    # "Summarize thread": the answer reads every message of the thread from Slack, not the stored history.
    reads_thread: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Turn:
        known = {f.name for f in fields(Turn)}
        values = {k: v for k, v in data.items() if k in known}
        values["files"] = file_refs(values.get("files"))
        return Turn(**{**values, "source": Source(data["source"])})

    @property
    def job_id(self) -> str:
        """One job per user message: the same id however often Slack or a crash makes us see it."""
        return f"{self.channel}:{self.ts}"

    @property
    def thread(self) -> ThreadKey:
        return ThreadKey(self.team_id, self.channel, self.thread_ts)

    @property
    def in_slack_thread(self) -> bool:
        """False when the answer can only go through response_url (no thread to write into)."""
        return not self.response_url

    @property
    def opens_thread(self) -> bool:
        """True when the message is the thread's first, so there is nothing earlier to backfill."""
        return self.thread_ts == self.ts
