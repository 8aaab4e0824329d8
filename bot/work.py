"""What a worker does with each kind of job. Handlers only describe the work; this does it."""

from __future__ import annotations

import logging
from typing import Any

from bot.deps import Deps
from bot.pipeline import answer
from bot.queue import Job
from bot.slack.reply import announce_question, greet_assistant_thread
from bot.turn import Source, ThreadKey, Turn

log = logging.getLogger(__name__)


def turn_job(turn: Turn) -> dict[str, Any]:
    return {"job_id": turn.job_id, "thread": str(turn.thread), "turn": turn.to_dict()}


async def run_job(job: Job, deps: Deps) -> None:
    if job.kind == "turn":
        await answer(Turn.from_dict(job.data["turn"]), deps, job_id=job.job_id)
    elif job.kind == "command":
        await answer_command(deps, job.data["command"], job.job_id)
    elif job.kind == "greet":
        await greet(deps, job.data["team"], job.data["channel"], job.data["thread_ts"])
    else:
        log.warning("unknown job kind dropped", extra={"kind": job.kind, "job": job.job_id})


async def answer_command(deps: Deps, command: dict[str, Any], job_id: str) -> None:
    """/kimi: post the question in the channel (once, even if the job runs again) and answer in its
    thread; where the bot is not a member, answer privately through response_url."""
    channel = str(command.get("channel_id") or "")
    user = str(command.get("user_id") or "")
    team = str(command.get("team_id") or "")
    question = str(command.get("text") or "").strip()
    progress = await deps.progress.load(job_id)
    ts = progress.get("announce_ts") or await announce_question(deps.slack, channel, user, question)
    if ts is not None:
        await deps.progress.save(job_id, announce_ts=ts)
        thread = ThreadKey(team, channel, ts)
        await deps.threads.engage(thread)
        seq = int(progress.get("seq") or 0) or await deps.threads.next_seq(thread)
        await deps.progress.save(job_id, seq=str(seq))
        turn = Turn(Source.COMMAND, team, channel, user, question, ts=ts, thread_ts=ts, seq=seq)
    else:
        trigger = str(command.get("trigger_id") or job_id)
        turn = Turn(
            Source.COMMAND,
            team,
            channel,
            user,
            question,
            ts=trigger,
            thread_ts=trigger,
            response_url=str(command.get("response_url") or ""),
        )
    await answer(turn, deps, job_id=job_id)


async def greet(deps: Deps, team: str, channel: str, thread_ts: str) -> None:
    await deps.threads.start_assistant_thread(ThreadKey(team, channel, thread_ts))
    try:
        await greet_assistant_thread(deps.slack, channel, thread_ts)
    except Exception as exc:
        log.warning(
            "assistant thread greeting failed", extra={"error": type(exc).__name__, "channel": channel}
        )
