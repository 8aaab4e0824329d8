"""Extraction in a short-lived child process: a PDF, Office file or image is parsed by
`python -m bot.files.sandbox` with the file's bytes on stdin and one JSON object on stdout, under a
memory limit (RLIMIT_AS), a CPU limit (RLIMIT_CPU) and a wall-clock deadline (killed on expiry). A file
built to take gigabytes or hours to parse costs one child, not the bot: not its memory, not the event
loop's shared thread pool (aiohttp's and Redis's DNS lookups), not the other answers. At most
READERS_AT_ONCE children run at a time per process."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import resource
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from weakref import WeakKeyDictionary

from bot.files.extract import TOO_BIG, UNREADABLE
from bot.files.kinds import Kind

log = logging.getLogger(__name__)

READERS_AT_ONCE = 2  # children parsing at once (a 2-core host keeps a core for the answers)
TOO_LONG = "took too long to read"
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding `bot/`
_semaphores: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = WeakKeyDictionary()


@dataclass(frozen=True)
class Limits:
    text_chars: int
    image_max_bytes: int
    image_max_pixels: int
    memory_bytes: int
    seconds: float

    def argv(self, kind: Kind) -> list[str]:
        return [
            str(kind),
            str(self.text_chars),
            str(self.image_max_bytes),
            str(self.image_max_pixels),
            str(self.memory_bytes),
            str(max(1, math.ceil(self.seconds))),
        ]


@dataclass(frozen=True)
class Extracted:
    """What the child read: text, or an image (base64), or the problem named in the footer."""

    text: str = ""
    image_mime: str = ""
    image_b64: str = ""
    problem: str = ""


def _semaphore() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    if loop not in _semaphores:
        _semaphores[loop] = asyncio.Semaphore(READERS_AT_ONCE)
    return _semaphores[loop]


async def extract(kind: Kind, data: bytes, limits: Limits) -> Extracted:
    """`data` of `kind` read in a child process. Waiting for a free slot does not count against the
    deadline; a child still running at the deadline (or cancelled with the answer) is killed."""
    async with _semaphore():
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot.files.sandbox",
            *limits.argv(kind),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=PACKAGE_ROOT,
            # Not the bot's environment (its tokens); not a security boundary (same user, same host).
            # A fixed hash seed: the same bytes give the same output, run after run.
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "PYTHONPATH": PACKAGE_ROOT},
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(data), timeout=limits.seconds)
        except TimeoutError:
            log.warning("file not read: its parser ran out of time", extra={"kind": str(kind)})
            return Extracted(problem=TOO_LONG)
        finally:
            if proc.returncode is None:  # out of time, or the answer was cancelled (Stop, lease lost)
                proc.kill()
                await proc.wait()
    if proc.returncode == -signal.SIGXCPU:  # its CPU time ran out (RLIMIT_CPU)
        return Extracted(problem=TOO_LONG)
    if proc.returncode == -signal.SIGKILL:  # not ours (that is the deadline above): the kernel's OOM killer
        return Extracted(problem=TOO_BIG)
    try:
        return Extracted(**json.loads(out))
    except (ValueError, TypeError):
        log.warning("file not read: its parser died", extra={"kind": str(kind), "code": proc.returncode})
        return Extracted(problem=UNREADABLE)


def _limit(which: int, value: int, *, grace: int = 0) -> None:
    """The hard limit `grace` above the soft one (a parser a file exploited cannot raise it further). The CPU
    limit needs a second of grace: at the soft limit the kernel sends SIGXCPU ("took too long"), at the hard
    one SIGKILL, which reads as the OOM killer's ("too big")."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard - grace)
    resource.setrlimit(which, (value, value + grace))


def _die_first() -> None:
    """Under the host's (or the pod's) memory pressure, the kernel's OOM killer takes this child, not the bot
    beside it with every answer in flight (a process may raise its own score; best effort)."""
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as score:
        score.write("1000")


def run_child(argv: list[str]) -> dict[str, str]:
    """The child's work: limits first, then the file read from stdin."""
    from bot.files.extract import IMAGE_DECODE_MAX_PIXELS, Unreadable, prepare_image, read_document

    kind, text_chars, image_bytes, image_pixels, memory, seconds = argv
    _die_first()
    _limit(resource.RLIMIT_AS, int(memory))
    _limit(resource.RLIMIT_CPU, int(seconds), grace=1)
    _limit(resource.RLIMIT_CORE, 0)
    warnings.simplefilter("ignore")  # one thread, and stderr is not read: parsers' warnings go nowhere
    data = sys.stdin.buffer.read()
    try:
        if Kind(kind) is Kind.IMAGE:
            from PIL import Image as PILImage

            PILImage.MAX_IMAGE_PIXELS = IMAGE_DECODE_MAX_PIXELS
            image = prepare_image(data, int(image_bytes), int(image_pixels))
            return {"image_mime": image.mime, "image_b64": base64.b64encode(image.data).decode("ascii")}
        return {"text": read_document(Kind(kind), data, int(text_chars))}
    except Unreadable as exc:
        return {"problem": str(exc)}
    except MemoryError:
        return {"problem": TOO_BIG}
    except Exception:  # a parser's bug on someone's file must not cost the answer
        return {"problem": UNREADABLE}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(run_child(sys.argv[1:]), sort_keys=True))
    sys.stdout.flush()
