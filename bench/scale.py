"""Scale in one process: 300 answers in flight at once, each streaming from Kimi for about 30 s.

Starts `kimibot serve` as its own process in OAuth mode with `KIMI_CONCURRENCY=300`, installs it in 10
workspaces through /slack/install and /slack/oauth_redirect against the fake Slack (Slack's rate limits are
per app per workspace, and the fake enforces them per workspace: the token says which), then sends 300
signed app_mention events at the same instant, 30 per workspace, one per channel. Every answer streams
from the fake Kimi for ~30 s (reasoning, then ~4,400 characters, one SSE event of 40 characters every
0.25 s).

Figures:
- event-loop lag of the bot process: the bot's own sampler (`kimibot_event_loop_lag_seconds`, a timer due
  every 0.1 s; /metrics scraped before and after the round, the histogram's difference is the round's).
  The histogram has buckets (1, 2, 5, 10, 20, 50, 100 ms, ...): p50/p99 are interpolated within their
  bucket as Prometheus' histogram_quantile does, the max is the upper bound of the highest bucket used,
  and the share of samples at most 50 ms is exact.
- peak RSS of the bot process (VmHWM, the process serves only this round).
- Slack 429s: answers with HTTP 429 the fake Slack sent (and the bot's own count of them).
- answers complete (the whole text, the placeholder gone) and exactly once each; the round's wall time.

    .venv/bin/python -m bench.scale [--answers 300] [--teams 10] [--answer-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from bench.common import REDIS_URL, start_fakes
from tests.fakes.kimi_api import Reply
from tests.fakes.slack_api import FakeSlack
from tests.slack_requests import ALICE, sign
from tests.test_interleavings import Serve
from tests.test_oauth import team_event
from tests.test_oauth_ops import OAUTH_ENV
from tests.test_startup_checks import serve_env

LAG_METRIC = "kimibot_event_loop_lag_seconds"
RATE_LIMITED_METRIC = "kimibot_slack_rate_limited_total"
CHUNK_CHARS = 40  # one SSE event of Kimi's stream carries this much text
REASONING = "Let me think this through carefully. " * 11  # ~400 characters: 10 events
PART = "Part of the answer. "
TARGET_LAG_P99_MS = 50.0
TARGET_RSS_MB = 150.0


@dataclass
class Question:
    team: str
    bot_user: str
    channel: str
    ts: str
    label: str

    def body(self) -> bytes:
        """The app_mention as Slack delivers it to an app installed in the question's workspace."""
        event = {
            "type": "app_mention",
            "user": ALICE,
            "text": f"<@{self.bot_user}> question {self.label}",
            "ts": self.ts,
            "channel": self.channel,
            "event_ts": self.ts,
            "team": self.team,
        }
        return team_event(self.team, event, bot_user=self.bot_user)


@dataclass
class ScaleFigures:
    answers: int
    teams: int
    answer_s: float
    arrival_s: float
    lag_buckets: list[tuple[float, float]] = field(default_factory=list)  # (le, samples in the round)
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    limit_hits: int = 0
    limit_methods: str = ""  # the 429s per method, "chat.stopStream 6, ..."
    warnings: str = ""  # the bot's warning lines in the round, counted by message
    bot_rate_limited: float = 0.0
    complete: int = 0
    once: int = 0
    problems: int = 0
    acks_max_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_in_flight: int = 0  # Kimi streams open at the same moment (the fake Kimi's clock)
    refused: int = 0  # deliveries answered with other than 200 (Slack redelivers them)
    first_done_s: float = 0.0

    @property
    def samples(self) -> float:
        return self.lag_buckets[-1][1] if self.lag_buckets else 0.0

    def lag_quantile(self, q: float) -> float:
        """histogram_quantile: the bucket holding the q-th sample, linearly interpolated within it."""
        rank, lower, below = q * self.samples, 0.0, 0.0
        for le, count in self.lag_buckets:
            if count >= rank:
                if le == float("inf"):
                    return lower
                share = (rank - below) / (count - below) if count > below else 1.0
                return lower + (le - lower) * share
            lower, below = le, count
        return float("nan")

    def lag_max_bound(self) -> float:
        """The upper bound of the highest bucket any sample of the round fell in."""
        for le, count in self.lag_buckets:
            if count >= self.samples:
                return le
        return float("inf")

    def share_within(self, bound_s: float) -> float:
        for le, count in self.lag_buckets:
            if abs(le - bound_s) < 1e-9:
                return count / self.samples if self.samples else float("nan")
        return float("nan")

    def lines(self) -> list[tuple[str, str, str, bool]]:
        """(figure, measured, target, met) for the summary table."""
        p50, p99 = self.lag_quantile(0.5) * 1000, self.lag_quantile(0.99) * 1000
        within = self.share_within(TARGET_LAG_P99_MS / 1000)
        return [
            (
                "event-loop lag p50 / p99 / max",
                f"{p50:.1f} / {p99:.1f} / <= {self.lag_max_bound() * 1000:.0f} ms "
                f"({within:.1%} of {self.samples:.0f} samples <= 50 ms)",
                "p99 < 50 ms",
                within >= 0.99,
            ),
            (
                "peak RSS of the bot process",
                f"{self.peak_rss_mb:.0f} MB (idle before the round {self.idle_rss_mb:.0f} MB)",
                "< 150 MB",
                self.peak_rss_mb < TARGET_RSS_MB,
            ),
            (
                "Slack 429s",
                f"{self.limit_hits} (the bot counted {self.bot_rate_limited:.0f})"
                + (f": {self.limit_methods}" if self.limit_methods else ""),
                "0",
                self.limit_hits == 0,
            ),
            (
                "answers in flight at once (peak)",
                f"{self.peak_in_flight} Kimi streams open at the same moment",
                f"{self.answers}",
                self.peak_in_flight >= self.answers,
            ),
            (
                "answers complete, exactly once each",
                f"{self.complete}/{self.answers} complete, {self.once}/{self.answers} once",
                "all",
                self.complete == self.once == self.answers,
            ),
            (
                "all answered in",
                f"{self.wall_s:.1f} s (first done at {self.first_done_s:.1f} s; "
                f"answers stream ~{self.answer_s:.0f} s)",
                "",
                True,
            ),
        ]


def peak_open(started: list[float], finished: dict[int, float]) -> int:
    """The most requests open at one moment, from when each started and (if it did) finished."""
    moments = sorted(
        [(at, 1) for at in started] + [(at, -1) for at in finished.values()], key=lambda m: (m[0], m[1])
    )
    open_now = peak = 0
    for _, change in moments:
        open_now += change
        peak = max(peak, open_now)
    return peak


def warning_summary(log_path: Path) -> str:
    """The bot's WARNING/ERROR log lines (JSON, LOG_LEVEL=WARNING), counted by message: why 429s or reruns
    happened (e.g. "shared pacing unavailable; pacing per process")."""
    counts: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("msg"):
                counts[f"{record.get('level', '?')} {record['msg']}"] += 1
    return "; ".join(f"{message} x{n}" for message, n in counts.most_common(8))


def rss_mb(pid: int, field_name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def samples(text: str, name: str) -> list[Sample]:
    """The samples named `name` in /metrics' text, read by prometheus_client's own parser."""
    families = text_string_to_metric_families(text)
    return [sample for family in families for sample in family.samples if sample.name == name]


def lag_buckets(text: str) -> dict[float, float]:
    return {float(s.labels["le"]): s.value for s in samples(text, LAG_METRIC + "_bucket")}


class BotProcess(Serve):
    """`kimibot serve` (under cProfile with `profile`), its output in a file; its CPU time and /metrics."""

    def __init__(self, env: dict[str, str], workdir: Path, profile: str = "") -> None:
        command = None
        if profile:  # cProfile writes its figures when serve exits (SIGTERM: a graceful stop)
            command = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "bot.cli", "serve"]
        super().__init__(env, workdir, "kimibot", command)

    def cpu_s(self) -> float:
        """CPU time the process has used (user + system)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def metrics(self, session: aiohttp.ClientSession) -> str:
        async with session.get(f"{self.base}/metrics") as response:
            return await response.text()

    async def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 40)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


async def install(session: aiohttp.ClientSession, bot: BotProcess, slack: FakeSlack, team: int) -> None:
    """What an admin of workspace `team` does: /slack/install, Allow on Slack's page, back to the bot."""
    async with session.get(f"{bot.base}/slack/install", allow_redirects=False) as response:
        assert response.status == 302, response.status
        state = parse_qs(urlparse(response.headers["Location"]).query)["state"][0]
    code = slack.approve_install(
        team_id(team), bot_user_id=bot_user(team), bot_id=f"B0SCALE{team:03d}", name=f"Scale{team}"
    )
    url = f"{bot.base}/slack/oauth_redirect?" + urlencode({"code": code, "state": state})
    headers = {"Cookie": f"slack-app-oauth-state={state}"}
    async with session.get(url, headers=headers, allow_redirects=False) as response:
        await response.read()
        assert response.status == 200, response.status


def team_id(team: int) -> str:
    return f"T0SCALE{team:03d}"


def bot_user(team: int) -> str:
    return f"U0SCALEB{team:03d}"


def answer_text(label: str, parts: int) -> str:
    return f"Answer to {label}. " + PART * parts + f"End of answer {label}."


def answer_for(parts: int, chunk_delay: float) -> Any:
    """The fake Kimi's reply to a question: its own text (so a thread shows whose answer it got)."""

    def reply(request: dict[str, Any]) -> Reply:
        asked = request["messages"][-1]["content"]
        label = str(asked).rsplit(" ", 1)[-1]
        return Reply(
            reasoning=REASONING,
            content=answer_text(label, parts),
            chunk_chars=CHUNK_CHARS,
            chunk_delay=chunk_delay,
        )

    return reply


def check_answers(slack: FakeSlack, questions: list[Question], parts: int) -> tuple[int, int, list[str]]:
    """(complete, once, unfinished labels): an answer is complete when its thread shows the whole text and
    no placeholder; once when its end appears exactly once in the thread."""
    complete = once = 0
    unfinished = []
    for q in questions:
        text = " ".join(slack.bodies(q.channel, q.ts))
        ends = text.count(f"End of answer {q.label}.")
        whole = ends >= 1 and text.count(PART.strip()) >= parts and "Thinking…" not in text
        complete += whole
        once += ends == 1
        if not whole:
            unfinished.append(q.label)
    return complete, once, unfinished


async def run_scale(
    answers: int = 300, teams: int = 10, answer_s: float = 30.0, arrival_s: float = 10.0, profile: str = ""
) -> ScaleFigures:
    """One round of `answers` questions at once across `teams` workspaces; its figures."""
    slack, kimi = await start_fakes()
    events = 1 + len(REASONING) // CHUNK_CHARS + 1  # role, reasoning events, the finish
    parts = 220
    events += (len(answer_text("S0000", parts)) + CHUNK_CHARS - 1) // CHUNK_CHARS
    chunk_delay = answer_s / events
    kimi.responder = answer_for(parts, chunk_delay)
    per_team = -(-answers // teams)
    questions = [
        Question(
            team_id(t),
            bot_user(t),
            f"C0SC{t:03d}{c:04d}",
            f"{1700006000 + t}.{c:06d}",
            f"S{t:03d}{c:04d}",
        )
        for t in range(teams)
        for c in range(per_team)
    ][:answers]
    for q in questions:
        slack.seed(q.channel, user=ALICE, text=f"<@{q.bot_user}> question {q.label}", ts=q.ts)
    workdir = Path(tempfile.mkdtemp(prefix="kimibot-scale-"))
    env = serve_env(
        slack,
        kimi,
        REDIS_URL,
        workdir,
        **OAUTH_ENV,
        SHUTDOWN_GRACE_SECONDS="",
        KIMI_CONCURRENCY=str(answers),
        LOG_LEVEL="WARNING",
    )
    bot = BotProcess(env, workdir, profile)
    figures = ScaleFigures(answers, teams, answer_s, arrival_s)
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await bot.wait_healthy(session, limit_s=30)
            for t in range(teams):
                await install(session, bot, slack, t)
            await asyncio.sleep(1.0)
            figures.idle_rss_mb = rss_mb(bot.process.pid, "VmRSS")
            before = await bot.metrics(session)
            url = f"{bot.base}/slack/events"
            acks: list[float] = []

            async def send(q: Question) -> None:
                """Deliver the event; a non-200 is redelivered like Slack does (after ~1 s, 3 times)."""
                body = q.body()
                for attempt in range(4):
                    headers = {"Content-Type": "application/json", **sign(body)}
                    if attempt:
                        headers |= {"X-Slack-Retry-Num": str(attempt), "X-Slack-Retry-Reason": "http_error"}
                    sent = time.monotonic()
                    async with session.post(url, data=body, headers=headers) as response:
                        status = response.status
                    acks.append(time.monotonic() - sent)
                    if status == 200:
                        return
                    figures.refused += 1
                    await asyncio.sleep(1.0)

            started, cpu = time.monotonic(), bot.cpu_s()
            sends = []
            for q in questions:
                sends.append(asyncio.create_task(send(q)))
                await asyncio.sleep(arrival_s / len(questions))
            await asyncio.gather(*sends)
            figures.acks_max_s = max(acks)
            give_up = started + answer_s * 4 + 60  # then report what got done
            while time.monotonic() < give_up:
                complete, _, unfinished = check_answers(slack, questions, parts)
                if complete and not figures.first_done_s:
                    figures.first_done_s = time.monotonic() - started
                if not unfinished:
                    break
                await asyncio.sleep(1.0)
            figures.wall_s = time.monotonic() - started
            figures.cpu_s = bot.cpu_s() - cpu
            await asyncio.sleep(1.0)  # a duplicate write would land now
            after = await bot.metrics(session)
            figures.peak_rss_mb = rss_mb(bot.process.pid, "VmHWM")
        first, last = lag_buckets(before), lag_buckets(after)
        figures.lag_buckets = [(le, last[le] - first.get(le, 0.0)) for le in sorted(last)]
        figures.bot_rate_limited = sum(s.value for s in samples(after, RATE_LIMITED_METRIC))
        figures.limit_hits = len(slack.limit_hits)
        figures.limit_methods = ", ".join(f"{m} {n}" for m, n in Counter(slack.limit_hits).most_common())
        figures.warnings = warning_summary(bot.log_path)
        figures.peak_in_flight = peak_open(kimi.request_times, kimi.finished)
        figures.problems = len(slack.problems)
        figures.complete, figures.once, _ = check_answers(slack, questions, parts)
    finally:
        await bot.stop()
        await slack.stop()
        await kimi.stop()
    return figures


def print_figures(figures: ScaleFigures) -> None:
    print(
        f"{figures.answers} answers in flight at once in one process (KIMI_CONCURRENCY={figures.answers}; "
        f"{figures.teams} workspaces x {figures.answers // figures.teams} channels; each answer streams "
        f"~{figures.answer_s:.0f} s; the questions arrive over {figures.arrival_s:.0f} s)"
    )
    for name, measured, target, met in figures.lines():
        mark = "" if not target else ("  ok" if met else "  MISSED")
        print(f"  {name + ':':38s} {measured}" + (f"   (target {target}){mark}" if target else ""))
    print(
        f"  {'ack max while they arrive:':38s} {figures.acks_max_s * 1000:.0f} ms; deliveries refused "
        f"(5xx, redelivered as Slack does): {figures.refused}"
    )
    print(
        f"  {'CPU of the bot process in the round:':38s} {figures.cpu_s:.1f} s "
        f"({figures.cpu_s / figures.wall_s:.0%} of one core)"
    )
    print(f"  {'Web API call problems:':38s} {figures.problems}")
    print(f"  {'the bot logged:':38s} {figures.warnings or 'no warnings'}")


async def main(answers: int, teams: int, answer_s: float, arrival_s: float, profile: str) -> None:
    print_figures(await run_scale(answers, teams, answer_s, arrival_s, profile))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--answers", type=int, default=300)
    parser.add_argument("--teams", type=int, default=10)
    parser.add_argument("--answer-s", type=float, default=30.0)
    parser.add_argument("--arrival-s", type=float, default=10.0, help="the questions arrive over this long")
    parser.add_argument("--profile", default="", help="run the bot under cProfile, its figures to this file")
    args = parser.parse_args()
    profile = os.path.abspath(args.profile) if args.profile else ""
    sys.exit(asyncio.run(main(args.answers, args.teams, args.answer_s, args.arrival_s, profile)))
