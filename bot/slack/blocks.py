"""Block Kit for kimibot's messages: the thinking view, the answer's footer and buttons, the
reasoning modal. Pure; every size stays within Slack's documented block limits."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from bot.slack.render import SECTION_TEXT_LIMIT

MODAL_MAX_BLOCKS = 100  # modals and Home tabs allow 100 blocks (messages 50)
MODAL_TITLE_LIMIT = 24
BUTTON_VALUE_LIMIT = 2_000
THOUGHT_LIMIT = 140

GREETING = "Hi! I'm Kimi. Ask me anything: I think before I answer, and you can see my reasoning."
SUGGESTED_PROMPTS = (
    {
        "title": "Explain a concept",
        "message": "Explain how Redis Streams consumer groups work, with an example.",
    },
    {"title": "Review some code", "message": "Review this function for bugs and suggest improvements:"},
    {"title": "Plan a task", "message": "Help me break this project into steps with estimates:"},
    {"title": "Summarise", "message": "Summarise the key points of the following text:"},
)

ACTION_STOP = "kimi_stop"
ACTION_REASONING = "kimi_show_reasoning"
ACTION_REGENERATE = "kimi_regenerate"
ACTION_FEEDBACK_UP = "kimi_feedback_up"
ACTION_FEEDBACK_DOWN = "kimi_feedback_down"
ACTION_RETRY = "kimi_retry"
ACTION_APPROVE = "kimi_tool_approve"
ACTION_DENY = "kimi_tool_deny"

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
_MARKUP = re.compile(r"[*_~`<>|]")


def latest_thought(reasoning: str, limit: int = THOUGHT_LIMIT) -> str:
    """The last whole sentence of the reasoning so far (or its tail), as safe one-line text."""
    text = " ".join(reasoning.split())
    if not text:
        return ""
    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    complete = [s for s in sentences if s.rstrip()[-1:] in ".!?。！？"]
    thought = (complete or sentences)[-1]
    thought = _MARKUP.sub("", thought).strip()
    if len(thought) > limit:
        thought = "…" + thought[-(limit - 1) :]
    return thought


def plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text, "emoji": True}


def button(action_id: str, label: str, value: str, style: str | None = None) -> dict[str, Any]:
    element: dict[str, Any] = {
        "type": "button",
        "action_id": action_id,
        "text": plain(label),
        "value": value[:BUTTON_VALUE_LIMIT],
    }
    if style:
        element["style"] = style
    return element


STEP_ICONS = {
    "pending": ":white_circle:",
    "in_progress": ":hourglass_flowing_sand:",
    "complete": ":white_check_mark:",
}
STEPS_SHOWN = 12  # the thinking view lists this many of the latest tool steps


def steps_text(steps: list[tuple[str, str]]) -> str:
    """The agent's tool steps as lines for the thinking view (post-and-update, without task cards)."""
    lines = [f"{STEP_ICONS.get(status, ':warning:')} {title}" for title, status in steps[-STEPS_SHOWN:]]
    if len(steps) > STEPS_SHOWN:
        lines.insert(0, f"_…and {len(steps) - STEPS_SHOWN} earlier steps_")
    return "\n".join(lines)


def thinking_view(
    elapsed_s: float,
    thought: str,
    stop_value: str,
    *,
    answering: bool = False,
    steps: list[tuple[str, str]] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The placeholder while Kimi works: what it is doing, for how long, its latest thought, the tool
    steps so far (title, status) when there are no task cards to show them, and Stop."""
    state = "Answering" if answering else "Thinking"
    head = f":thought_balloon: *{state}…* ({elapsed_s:.0f}s)"
    if steps:
        head += "\n" + steps_text(steps)
    body = f"{head}\n_{thought}_" if thought else head
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": body[:SECTION_TEXT_LIMIT]}},
        {
            "type": "actions",
            "block_id": "kimi_working",
            "elements": [button(ACTION_STOP, "Stop", stop_value, "danger")],
        },
    ]
    return f"{state}…", blocks


def waiting_view(stop_value: str) -> tuple[str, list[dict[str, Any]]]:
    """The placeholder of a question waiting for the answer before it in its thread (with Stop)."""
    text = ":hourglass_flowing_sand: Waiting for the answer above…"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {
            "type": "actions",
            "block_id": "kimi_waiting",
            "elements": [button(ACTION_STOP, "Stop", stop_value, "danger")],
        },
    ]
    return "Waiting…", blocks


# Our own caps for task cards (Slack documents none for these fields): short, readable cards.
CARD_TITLE_LIMIT = 120
CARD_DETAILS_LIMIT = 500
CARD_SOURCES_LIMIT = 5
STATUS_LIMIT = 50


def status_line(title: str) -> str:
    """The assistant panel's status for a tool step: "Searching the web" -> "is searching the web…"."""
    title = " ".join(title.split()) or "Working"
    first = title.split(" ", 1)[0]
    line = f"is {title[0].lower()}{title[1:]}" if first.lower().endswith("ing") else f"is working: {title}"
    return line[: STATUS_LIMIT - 1] + "…"


def source_label(url: str) -> str:
    """A short label for a source URL: its host and the start of its path."""
    parsed = urlparse(url)
    if parsed.hostname and parsed.hostname.endswith("slack.com") and "/archives/" in parsed.path:
        return "Slack message"
    label = (parsed.hostname or url) + (parsed.path if parsed.path not in ("", "/") else "")
    return label if len(label) <= 60 else label[:59] + "…"


def task_card(
    card_id: str, title: str, status: str, *, details: str = "", sources: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One `task_update` chunk (Slack's task card): pending / in_progress / complete / error."""
    title = " ".join(title.split()) or "Working"
    card: dict[str, Any] = {
        "type": "task_update",
        "id": card_id,
        "title": title if len(title) <= CARD_TITLE_LIMIT else title[: CARD_TITLE_LIMIT - 1] + "…",
        "status": status,
    }
    if details:
        card["details"] = (
            details if len(details) <= CARD_DETAILS_LIMIT else details[: CARD_DETAILS_LIMIT - 1] + "…"
        )
    urls = [u for u in sources if u.startswith(("https://", "http://"))][:CARD_SOURCES_LIMIT]
    if urls:
        card["sources"] = [{"type": "url", "url": u, "text": source_label(u)} for u in urls]
    return card


def bare_card(card: dict[str, Any]) -> dict[str, Any]:
    """A card reduced to what Slack cannot refuse once it took the card before: id, title, state."""
    return {key: card[key] for key in ("type", "id", "title", "status") if key in card}


def thought_summary(thinking_s: float) -> tuple[str, list[dict[str, Any]]]:
    """What the placeholder becomes once the answer streams below it."""
    text = f":thought_balloon: Thought for {thinking_s:.0f}s"
    return text, [{"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}]


@dataclass(frozen=True)
class AnswerRef:
    """What the answer's buttons need to find their turn again (kept small: it rides in button values)."""

    thread_ts: str
    question_ts: str
    model: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int

    def value(self) -> str:
        return json.dumps(
            {
                "t": self.thread_ts,
                "q": self.question_ts,
                "m": self.model,
                "l": round(self.latency_s, 2),
                "p": self.prompt_tokens,
                "c": self.completion_tokens,
            },
            separators=(",", ":"),
        )

    @staticmethod
    def parse(value: str) -> AnswerRef:
        data = json.loads(value)
        return AnswerRef(
            str(data["t"]),
            str(data["q"]),
            str(data.get("m", "")),
            float(data.get("l", 0)),
            int(data.get("p", 0)),
            int(data.get("c", 0)),
        )


def answer_blocks(footer: str, ref: AnswerRef, *, has_reasoning: bool) -> list[dict[str, Any]]:
    """Footer and controls at the bottom of an answer."""
    value = ref.value()
    elements = []
    if has_reasoning:
        elements.append(button(ACTION_REASONING, "Show reasoning", value))
    elements += [
        button(ACTION_REGENERATE, "Regenerate", value),
        button(ACTION_FEEDBACK_UP, ":+1:", value),
        button(ACTION_FEEDBACK_DOWN, ":-1:", value),
    ]
    return [
        {"type": "context", "elements": [{"type": "mrkdwn", "text": footer[:SECTION_TEXT_LIMIT]}]},
        {"type": "actions", "block_id": "kimi_answer", "elements": elements},
    ]


def failure_blocks(sentence: str, retry: AnswerRef | None) -> list[dict[str, Any]]:
    """A failure's one sentence, with a Retry button when asking again may work."""
    blocks: list[dict[str, Any]] = [{"type": "section", "text": {"type": "mrkdwn", "text": sentence}}]
    if retry is not None:
        blocks.append(
            {
                "type": "actions",
                "block_id": "kimi_failed",
                "elements": [button(ACTION_RETRY, "Retry", retry.value(), "primary")],
            }
        )
    return blocks


def _approval_body(asker: str, tool: str, arguments: str) -> tuple[str, str]:
    text = f"Kimi wants to run `{tool}` for <@{asker}>. Approve?"
    return text, f":raised_hand: {text}\n```{arguments}```"


def approval_fits(asker: str, tool: str, arguments: str) -> bool:
    """Whether the prompt can show the call's arguments whole: nobody approves what they cannot see."""
    return len(_approval_body(asker, tool, arguments)[1]) <= SECTION_TEXT_LIMIT


def approval_blocks(
    asker: str, tool: str, arguments: str, approval_id: str
) -> tuple[str, list[dict[str, Any]]]:
    """Ask the asker before a tool that changes things runs: what it is, with what (whole: check
    `approval_fits` first), Approve / Deny."""
    text, body = _approval_body(asker, tool, arguments)
    return text, [
        {"type": "section", "text": {"type": "mrkdwn", "text": body[:SECTION_TEXT_LIMIT]}},
        {
            "type": "actions",
            "block_id": "kimi_approval",
            "elements": [
                button(ACTION_APPROVE, "Approve", approval_id, "primary"),
                button(ACTION_DENY, "Deny", approval_id, "danger"),
            ],
        },
    ]


def approval_done_blocks(tool: str, outcome: str) -> tuple[str, list[dict[str, Any]]]:
    """The approval request once decided (or timed out): no buttons left to press."""
    text = f"`{tool}`: {outcome}"
    return text, [{"type": "context", "elements": [{"type": "mrkdwn", "text": text[:SECTION_TEXT_LIMIT]}]}]


def chunk_text(text: str, size: int) -> list[str]:
    """Split text into pieces of at most `size` characters, preferring line ends."""
    pieces: list[str] = []
    while len(text) > size:
        cut = text.rfind("\n", size // 2, size)
        cut = cut if cut > 0 else size
        pieces.append(text[:cut])
        text = text[cut:].lstrip("\n")
    if text:
        pieces.append(text)
    return pieces


def reasoning_modal(reasoning: str, thinking_s: float) -> dict[str, Any]:
    """A modal showing the whole reasoning, in plain-text sections within the modal block limits."""
    intro = f"Kimi thought for {thinking_s:.0f}s before answering ({len(reasoning):,} characters)."
    pieces = chunk_text(reasoning or "(no reasoning was recorded)", SECTION_TEXT_LIMIT)
    room = MODAL_MAX_BLOCKS - 2
    blocks: list[dict[str, Any]] = [{"type": "context", "elements": [{"type": "mrkdwn", "text": intro}]}]
    blocks += [{"type": "section", "text": plain(piece)} for piece in pieces[:room]]
    if len(pieces) > room:
        shown = sum(len(p) for p in pieces[:room])
        blocks.append(
            {
                "type": "context",
                "elements": [
                    {
                        "type": "mrkdwn",
                        "text": f"Showing the first {shown:,} of {len(reasoning):,} characters.",
                    }
                ],
            }
        )
    return {
        "type": "modal",
        "title": plain("Kimi's reasoning"[:MODAL_TITLE_LIMIT]),
        "close": plain("Close"),
        "blocks": blocks,
    }
