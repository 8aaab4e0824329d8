"""Failures as a small set of reasons, each with one sentence a Slack user can act on.

The log carries the detail; the thread carries the sentence and a reference id to find that log line.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import StrEnum


class Reason(StrEnum):
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    QUOTA = "quota"
    AUTH = "auth"
    MODEL = "model"
    TOO_LONG = "too_long"
    FILTERED = "filtered"
    INVALID = "invalid"
    UNAVAILABLE = "unavailable"
    NO_ANSWER = "no_answer"
    THREAD_UNREADABLE = "thread_unreadable"
    INTERNAL = "internal"


USER_MESSAGES: dict[Reason, str] = {
    Reason.OVERLOADED: "Kimi is overloaded right now and did not answer after several tries. "
    "Please ask again in a few minutes.",
    Reason.RATE_LIMITED: "This workspace has hit its Kimi rate limit. Please ask again in a minute.",
    Reason.QUOTA: "The Kimi account behind this bot has run out of credit, so I can't answer. "
    "An admin needs to top it up.",
    Reason.AUTH: "The Kimi API key of this bot was refused. An admin needs to check MOONSHOT_API_KEY.",
    Reason.MODEL: "The Kimi model this bot is set to use is not available. "
    "An admin needs to check KIMI_MODEL.",
    Reason.TOO_LONG: "That message is too long for the model's context window. "
    "Please shorten it or split it into parts.",
    Reason.FILTERED: "Kimi declined to answer this request because its content filter flagged it.",
    Reason.INVALID: "Kimi rejected the request. An admin can find the details in the log.",
    Reason.UNAVAILABLE: "I couldn't reach Kimi. Please try again in a few minutes.",
    Reason.NO_ANSWER: "Kimi spent its whole output budget thinking and gave no answer. "
    "Please try a narrower question.",
    Reason.THREAD_UNREADABLE: "Slack wouldn't let me read this thread just now, so I can't summarize it. "
    "Please try again in a minute.",
    Reason.INTERNAL: "Something went wrong on my side while answering.",
}

# Reasons that may pass if the user simply asks again later: their message gets a Retry button.
RETRYABLE_REASONS = frozenset(
    {
        Reason.OVERLOADED,
        Reason.RATE_LIMITED,
        Reason.UNAVAILABLE,
        Reason.INTERNAL,
        Reason.NO_ANSWER,
        Reason.THREAD_UNREADABLE,
    }
)

# Reasons an admin must act on: logged at ERROR so they stand out.
ADMIN_REASONS = frozenset({Reason.QUOTA, Reason.AUTH, Reason.MODEL, Reason.INVALID})


def new_reference() -> str:
    """A short id shown to the user and written to the log, to match a complaint with its cause."""
    return secrets.token_hex(4)


@dataclass
class AnswerError(Exception):
    """A turn that cannot be answered, with its reason and the id the user sees."""

    reason: Reason
    detail: str = ""
    reference: str = field(default_factory=new_reference)

    def __post_init__(self) -> None:
        super().__init__(f"{self.reason}: {self.detail}")

    def user_text(self) -> str:
        return f":warning: {USER_MESSAGES[self.reason]} (ref `{self.reference}`)"
