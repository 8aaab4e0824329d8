"""`kimibot chat`: the real console script as a process (stdin a pipe) against FakeKimi and the test Redis,
and the pure parts of bot/chat.py."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bot.chat import (
    NEEDS_SLACK,
    AnswerState,
    Finished,
    ScriptFace,
    chat_thread,
    footer_line,
    new_thread_name,
    parse_command,
    tail_lines,
    thinking_for,
    thought_line,
    thread_name_problem,
)
from bot.kimi.events import Reasoning, Text, Usage
from bot.kimi.profiles import profile_for
from bot.settings import SettingsError, load_settings, load_settings_without_slack
from bot.store import ThreadStore
from tests.fakes.kimi_api import API_KEY, Call, FakeKimi, Reply
from tests.test_serve_process import free_port
from tests.test_settings_cli import kimibot_command

Chat = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]
MCP_FAKE = str(Path(__file__).resolve().parent / "fakes" / "mcp_server.py")


def chat_env(fake_kimi: FakeKimi, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """`kimibot chat`'s environment: only Kimi and Redis settings are set."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "USER": "alice",
        "MOONSHOT_API_KEY": API_KEY,
        "KIMI_BASE_URL": fake_kimi.base_url,
        "KIMI_MODEL": "kimi-k2.6",
        "REDIS_URL": redis_url,
        "KIMI_RETRY_BASE_DELAY": "0.01",
    }


@pytest.fixture
def chat(fake_kimi: FakeKimi, redis_url: str, tmp_path: Path) -> Chat:
    """Run `kimibot chat ARGS` with `lines` on its stdin (a pipe)."""

    async def run(*args: str, lines: list[str], **env: str) -> subprocess.CompletedProcess[str]:
        base = chat_env(fake_kimi, redis_url, tmp_path)
        full = {k: v for k, v in {**base, **env}.items() if v is not None and v != "<unset>"}
        # In a thread: the fake Kimi in this process must keep answering while the process runs.
        return await asyncio.to_thread(
            subprocess.run,
            [*kimibot_command(), "chat", *args],
            input="".join(f"{line}\n" for line in lines),
            env=full,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def contents(request: dict[str, Any]) -> list[str]:
    return [str(m.get("content")) for m in request["messages"]]


async def test_two_questions_get_two_answers_in_order_with_context_and_no_reasoning_on_stdout(
    chat: Chat, fake_kimi: FakeKimi
) -> None:
    fake_kimi.script(
        Reply(reasoning="SECRET-REASONING-ONE", content="Four."),
        Reply(reasoning="SECRET-REASONING-TWO", content="Sixteen.\n\nThat is 4 squared."),
    )
    result = await chat(lines=["What is 2+2?", "", "And squared?"], SYSTEM_PROMPT="You are a terse test bot.")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Four.\n\nSixteen.\n\nThat is 4 squared.\n\n"  # blank lines skipped, not asked
    assert "SECRET-REASONING" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(fake_kimi.requests) == 2
    first, second = fake_kimi.requests
    assert contents(first)[-1] == "alice: What is 2+2?"  # the OS user speaks, as a Slack name would
    assert contents(second)[1:] == ["alice: What is 2+2?", "Four.", "alice: And squared?"]
    assert first["messages"][0] == {"role": "system", "content": "You are a terse test bot."}
    # The thread's name is said on stderr, to resume it; stdout holds answers only.
    assert "New thread chat-" in result.stderr and "kimibot chat --thread chat-" in result.stderr
    # The Slack tools are not offered; the web ones are.
    offered = {t["function"]["name"] for t in first.get("tools") or []}
    assert {"web_search", "fetch_url"} <= offered
    assert not offered & NEEDS_SLACK


async def test_thread_resumes_in_a_second_process_and_is_stored_like_the_bot(
    chat: Chat, fake_kimi: FakeKimi, redis_url: str
) -> None:
    fake_kimi.script(Reply(reasoning="I will remember it.", content="Noted."))
    first = await chat("--thread", "demo", lines=["Remember: the password is swordfish"])
    assert first.returncode == 0, first.stderr
    assert "New thread demo" in first.stderr

    second = await chat("--thread", "demo", lines=["What is the password?"])
    assert second.returncode == 0, second.stderr
    assert "Resumed thread demo (2 earlier messages)" in second.stderr
    assert contents(fake_kimi.requests[1])[1:] == [
        "alice: Remember: the password is swordfish",
        "Noted.",
        "alice: What is the password?",
    ]
    assert second.stdout == "You said: alice: What is the password? (I saw 4 messages)\n\n"

    fresh = await chat(lines=["What is the password?"])  # no --thread: a new conversation
    assert fresh.returncode == 0, fresh.stderr
    assert contents(fake_kimi.requests[2])[1:] == ["alice: What is the password?"]

    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        state = await ThreadStore(redis, 3600).load(chat_thread("demo"))
        keys = await redis.keys("*")
        history_ttl = await redis.ttl(ThreadStore.history_key(chat_thread("demo")))
    finally:
        await redis.aclose()
    # Only the chat threads' own keys: no usage records, no jobs, nothing of Slack's.
    assert keys and all(key.startswith("kimibot:thread:{cli:chat:") for key in keys), keys
    assert 29 * 86_400 < history_ttl <= 30 * 86_400  # THREAD_TTL_DAYS, like a Slack thread
    roles = [e["role"] for e in state.entries]
    assert roles == ["user", "assistant", "user", "assistant"]
    answer = state.entries[1]
    assert answer["content"] == "Noted."
    assert answer["reasoning_content"] == "I will remember it."  # stored whole
    assert answer["model"] == "kimi-k2.6" and answer["usage"]["completion_tokens"] > 0
    assert state.meta["answered"] == "1"


async def test_a_failed_answer_prints_the_bots_sentence_and_exits_1_after_the_answers_before_it(
    chat: Chat, fake_kimi: FakeKimi
) -> None:
    fake_kimi.script(
        Reply(content="First answer."),
        Reply(status=429, error_type="exceeded_current_quota_error", error_message="insufficient balance"),
    )
    result = await chat(lines=["one", "two", "three"])
    assert result.returncode == 1
    assert result.stdout == "First answer.\n\n"
    assert (
        "kimibot chat: The Kimi account behind this bot has run out of credit, so I can't answer. "
        "An admin needs to top it up." in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert len(fake_kimi.requests) == 2  # the third question is not asked


async def test_overloaded_is_retried_then_answered(chat: Chat, fake_kimi: FakeKimi) -> None:
    fake_kimi.script(
        Reply(status=429, error_type="engine_overloaded_error", error_message="overloaded", retry_after=0),
        Reply(content="Made it."),
    )
    result = await chat(lines=["hello"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Made it.\n\n"
    assert len(fake_kimi.requests) == 2
    assert "kimi call failed" not in result.stderr  # a retry's warning does not interrupt the conversation

    fake_kimi.script(
        Reply(status=429, error_type="engine_overloaded_error", error_message="overloaded", retry_after=0)
    )
    debug = await chat(lines=["hello"], LOG_LEVEL="DEBUG")
    assert debug.returncode == 0 and debug.stdout.startswith("You said:")
    assert '"msg": "kimi call failed"' in debug.stderr  # JSON log lines, on stderr only


async def test_missing_api_key_exits_2_with_one_clear_line_and_slack_is_not_asked_for(chat: Chat) -> None:
    result = await chat(lines=["hello"], MOONSHOT_API_KEY="<unset>", SLACK_BOT_TOKEN="xoxb-...")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "kimibot chat cannot start:" in result.stderr
    assert "MOONSHOT_API_KEY is not set" in result.stderr
    assert "SLACK" not in result.stderr  # a placeholder Slack token does not matter to chat
    assert "Traceback" not in result.stderr


async def test_unreachable_redis_exits_2_with_a_clear_line(chat: Chat, fake_kimi: FakeKimi) -> None:
    result = await chat(lines=["hello"], REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert result.returncode == 2
    assert "Redis at REDIS_URL cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr
    assert fake_kimi.requests == []


async def test_bad_thread_name_exits_2(chat: Chat) -> None:
    result = await chat("--thread", "has spaces", lines=["hello"])
    assert result.returncode == 2
    assert "is not a thread name" in result.stderr


async def test_model_and_no_thinking(chat: Chat, fake_kimi: FakeKimi) -> None:
    result = await chat("--model", "kimi-k2.5", "--no-thinking", lines=["quick one"])
    assert result.returncode == 0, result.stderr
    request = fake_kimi.requests[-1]
    assert request["model"] == "kimi-k2.5"
    assert request["thinking"] == {"type": "disabled"}

    result = await chat("--model", "kimi-k2.7-code", "--no-thinking", lines=["quick one"])
    assert result.returncode == 0, result.stderr
    assert "kimi-k2.7-code always thinks: --no-thinking does not apply to it" in result.stderr
    request = fake_kimi.requests[-1]
    assert request["model"] == "kimi-k2.7-code" and "thinking" not in request

    await chat(lines=["thinking on"])
    assert fake_kimi.requests[-1]["thinking"] == {"type": "enabled"}


async def test_reasoning_flag_writes_reasoning_to_stderr_only(chat: Chat, fake_kimi: FakeKimi) -> None:
    fake_kimi.script(Reply(reasoning="SHOW-ME-REASONING", content="Done."))
    result = await chat("--reasoning", lines=["hi"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Done.\n\n"
    assert "SHOW-ME-REASONING" in result.stderr


async def test_mcp_tools_are_offered_and_a_write_is_declined_without_a_terminal(
    chat: Chat, fake_kimi: FakeKimi, tmp_path: Path
) -> None:
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"fake": {"command": sys.executable, "args": [MCP_FAKE]}}}))
    fake_kimi.script(
        Reply(
            tool_calls=[
                Call("mcp__fake__echo", '{"text": "hi"}'),
                Call("mcp__fake__write_note", '{"note": "x"}'),
            ]
        ),
        Reply(content="Echoed; the note was not written."),
    )
    result = await chat(lines=["echo hi and write a note"], MCP_CONFIG=str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Echoed; the note was not written.\n\n"
    assert "mcp__fake__write_note needs approval, which needs a terminal; it was not run." in result.stderr
    first, second = fake_kimi.requests
    offered = {t["function"]["name"] for t in first["tools"]}
    assert {"mcp__fake__echo", "mcp__fake__write_note", "web_search", "fetch_url"} <= offered
    results = [m["content"] for m in second["messages"] if m["role"] == "tool"]
    assert results == ["echo: hi", "The user declined this action; it was not run."]


async def test_tools_disabled_sends_no_tools(chat: Chat, fake_kimi: FakeKimi) -> None:
    result = await chat(lines=["hi"], TOOLS_ENABLED="false")
    assert result.returncode == 0, result.stderr
    assert "tools" not in fake_kimi.requests[-1]


# ---- pure parts ----------------------------------------------------------------------------------
def test_settings_for_chat_need_no_slack(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SLACK_", "MOONSHOT_", "KIMI", "REDIS_")):
            monkeypatch.delenv(name, raising=False)
    settings = load_settings_without_slack(
        _env_file=None, moonshot_api_key=API_KEY, slack_bot_token="xoxb-...", allowed_users="x"
    )
    assert settings.moonshot_api_key == API_KEY
    with pytest.raises(SettingsError) as missing:
        load_settings_without_slack(_env_file=None)
    assert missing.value.problems == [
        "MOONSHOT_API_KEY is not set. Get it from: https://platform.kimi.ai > API Keys "
        "(China accounts: platform.kimi.com)."
    ]
    with pytest.raises(SettingsError) as served:  # serve still needs its Slack settings
        load_settings(_env_file=None, moonshot_api_key=API_KEY)
    assert any(p.startswith("SLACK_BOT_TOKEN") for p in served.value.problems)


def test_thinking_switch_follows_the_profile() -> None:
    assert thinking_for("kimi-k2.6", profile_for("kimi-k2.6"), False) == (True, "")
    assert thinking_for("kimi-k2.6", profile_for("kimi-k2.6"), True) == (False, "")
    on, note = thinking_for("kimi-k3", profile_for("kimi-k3"), True)
    assert on and note == "kimi-k3 always thinks: --no-thinking does not apply to it, and is ignored."
    on, note = thinking_for("mystery-1", profile_for("mystery-1"), True)
    assert on and "does not know how to switch thinking off for mystery-1" in note


def test_commands_and_thread_names() -> None:
    assert parse_command("/exit") == "/exit"
    assert parse_command("/QUIT ") == "/exit"
    assert parse_command(" /exit") is None  # a leading space: a question
    assert parse_command("/reasoning please") == "/reasoning"
    assert parse_command("/nope") == "?"
    assert parse_command("what is /etc?") is None
    assert parse_command("") is None
    assert new_thread_name(0, "ab12") == "chat-19700101-000000-ab12"
    assert thread_name_problem(new_thread_name()) == ""
    assert thread_name_problem("demo") == ""
    for bad in ("", "a b", "-x", "x" * 65, "a:b"):
        assert thread_name_problem(bad)
    assert chat_thread("demo") == chat_thread("demo")
    assert str(chat_thread("demo")) == "cli:chat:demo"


def test_answer_state_collapses_reasoning_once_the_answer_starts() -> None:
    state = AnswerState(started=100.0)
    state.feed(Reasoning("let me "), 101.0)
    state.feed(Reasoning("think"), 102.0)
    assert not state.answering and state.thinking_s(105.0) == 5.0
    state.feed(Text("Hello"), 112.0)
    state.feed(Reasoning(" more"), 113.0)  # a later tool step's reasoning is kept too
    state.feed(Text(" world"), 114.0)
    assert state.answering and state.thinking_s(200.0) == 12.0
    assert state.answer_text == "Hello world" and state.reasoning_text == "let me think more"
    assert thought_line(state.thinking_s(200.0)) == "Thought for 12 s — /reasoning to show"
    assert thought_line(0.2) == "Thought for 1 s — /reasoning to show"
    state.restarted()
    assert not state.answering and state.answer_text == "" and state.reasoning_text == ""


def test_tail_and_footer() -> None:
    assert tail_lines("a\nb\nc\n", 2) == "b\nc"
    assert tail_lines("a", 5) == "a"
    usage = Usage(prompt_tokens=1234, completion_tokens=56)
    assert footer_line("kimi-k2.6", 3.21, usage) == "kimi-k2.6 · 3.2 s · 1,234 tokens in, 56 out"
    assert (
        footer_line("kimi-k2.6", 1.0, None, notes=("2 tool calls in 1 step",), stopped=True)
        == "kimi-k2.6 · 1.0 s · 2 tool calls in 1 step · stopped"
    )


def test_script_face_writes_answers_only_to_stdout() -> None:
    out, err = io.StringIO(), io.StringIO()
    face = ScriptFace(out, err)
    face.event(Text("partial"))  # never streamed: a retry could start over
    face.finish(Finished("  The answer.\n", "why", "footer"))
    face.failed("Kimi is down.")
    assert out.getvalue() == "The answer.\n\n"
    assert err.getvalue() == "kimibot chat: Kimi is down.\n"
    shown = ScriptFace(out := io.StringIO(), err := io.StringIO(), show_reasoning=True)
    shown.finish(Finished("A.", "because", "footer"))
    assert out.getvalue() == "A.\n\n" and "because" in err.getvalue()


# ---- a terminal (stdin and stdout a pseudo-terminal) ---------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """`kimibot chat` on a pseudo-terminal: what a person at the keyboard sees and types."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
        self.process = subprocess.Popen(
            [*kimibot_command(), "chat"], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd
        )
        os.close(slave)
        self.raw = b""

    @property
    def screen(self) -> str:
        """Everything written so far, escape codes left out."""
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self.master, 65536)
            except OSError:  # the process has exited and closed the terminal
                time.sleep(timeout)

    async def wait_for(self, text: str, after: int = 0, limit_s: float = 30.0) -> int:
        """Until `text` shows (after position `after` of the screen); returns where it ends."""
        try:
            async with asyncio.timeout(limit_s):
                while (found := self.screen.find(text, after)) < 0:
                    await asyncio.to_thread(self._read, 0.05)
        except TimeoutError:
            raise AssertionError(f"{text!r} never showed; the screen ends: {self.screen[-1500:]!r}") from None
        return found + len(text)

    async def reading(self) -> None:
        """Until the line editor reads the keyboard (it turns the terminal's line mode off): a Ctrl-D typed
        before that would be taken by the terminal's own line mode and lost."""
        async with asyncio.timeout(30):
            while termios.tcgetattr(self.master)[3] & termios.ICANON:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    async def exit_code(self) -> int:
        async def drain() -> int:
            while (code := self.process.poll()) is None:
                await asyncio.to_thread(self._read, 0.05)
            return code

        async with asyncio.timeout(30):
            return await drain()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


async def test_terminal_streams_collapses_reasoning_renders_markdown_and_ctrl_c_stops_an_answer(
    fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    story = "Once upon a time " + "there was a very long story that went on and on. " * 40
    fake_kimi.script(
        Reply(reasoning="Pondering the question deeply.", content="**Bold answer** here."),
        Reply(tool_calls=[Call("mcp__fake__write_note", '{"note": "buy milk"}')]),
        Reply(content="Written."),
        Reply(reasoning="Planning the story.", content=story, chunk_chars=20, chunk_delay=0.1),
    )
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"fake": {"command": sys.executable, "args": [MCP_FAKE]}}}))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "USER": "alice",
        "TERM": "xterm-256color",
        "MOONSHOT_API_KEY": API_KEY,
        "KIMI_BASE_URL": fake_kimi.base_url,
        "KIMI_MODEL": "kimi-k2.6",
        "REDIS_URL": redis_url,
        "MCP_CONFIG": str(config),
    }
    terminal = Terminal(env, tmp_path)
    try:
        at = await terminal.wait_for("New thread chat-")
        name = terminal.screen[at - len("chat-") :].split(";", 1)[0]
        at = await terminal.wait_for("›", at)
        terminal.type("hello\r")
        at = await terminal.wait_for("kimi-k2.6 · ", at)  # the footer: the answer is done
        shown = terminal.screen
        assert "Thought for 1 s — /reasoning to show" in shown  # the reasoning, collapsed
        assert "Bold answer here." in shown and "**" not in shown  # Markdown rendered
        assert "Traceback" not in shown

        at = await terminal.wait_for("›", at)
        terminal.type("/reasoning\r")
        at = await terminal.wait_for("Pondering the question deeply.", at)

        at = await terminal.wait_for("›", at)
        terminal.type("write a note\r")
        at = await terminal.wait_for('Allow mcp__fake__write_note with {"note": "buy milk"}? [y/N]', at)
        await terminal.reading()
        terminal.type("y\r")
        at = await terminal.wait_for("Written.", at)
        assert [m["content"] for m in fake_kimi.requests[2]["messages"] if m["role"] == "tool"] == [
            "noted: buy milk"
        ]

        at = await terminal.wait_for("›", at)
        terminal.type("tell me a long story\r")
        at = await terminal.wait_for("Once upon a time", at)
        terminal.process.send_signal(signal.SIGINT)  # Ctrl-C
        at = await terminal.wait_for("stopped", at)
        at = await terminal.wait_for("›", at)  # the conversation goes on
        terminal.type("/thread\r")
        at = await terminal.wait_for(f"Thread {name}: kimibot chat --thread {name}", at)
        at = await terminal.wait_for("›", at)
        await terminal.reading()
        terminal.type("\x04")  # Ctrl-D
        assert await terminal.exit_code() == 0
        assert "Traceback" not in terminal.screen
    finally:
        terminal.close()

    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        state = await ThreadStore(redis, 3600).load(chat_thread(name))
    finally:
        await redis.aclose()
    assert [e["role"] for e in state.entries] == ["user", "assistant"] * 3
    assert state.entries[3]["tools"] == [
        {"name": "mcp__fake__write_note", "title": "Running write_note on fake", "ok": True}
    ]
    stopped = state.entries[-1]
    assert stopped["stopped"] is True
    assert stopped["content"].startswith("Once upon a time")
    assert len(stopped["content"]) < len(story)  # what was said before Ctrl-C, not the whole story
    assert state.entries[1]["reasoning_content"] == "Pondering the question deeply."


async def test_stdin_that_is_not_utf8_is_still_asked_with_the_bad_bytes_replaced(
    fake_kimi: FakeKimi, redis_url: str, tmp_path: Path
) -> None:
    """A Latin-1 line (or any byte that is not UTF-8) on stdin is asked with U+FFFD in its place, not
    turned into a failure of the whole run."""
    fake_kimi.script(Reply(content="Bien sûr."), Reply(content="Four."))
    result = await asyncio.to_thread(
        subprocess.run,
        [*kimibot_command(), "chat"],
        input="Un café, s'il vous plaît?\nWhat is 2+2?\n".encode("latin-1"),  # bytes: not the fixture's text
        env=chat_env(fake_kimi, redis_url, tmp_path),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, stderr
    assert result.stdout.decode() == "Bien sûr.\n\nFour.\n\n"
    assert "went wrong" not in stderr and "Traceback" not in stderr
    assert [contents(r)[-1] for r in fake_kimi.requests] == [
        "alice: Un caf\ufffd, s'il vous pla\ufffdt?",
        "alice: What is 2+2?",
    ]
