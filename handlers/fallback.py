"""Ack everything else Slack sends (other events, button clicks, shortcuts) so it is not redelivered.

Registered last: Bolt tries listeners in order, so these only see what no other listener took.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp

log = logging.getLogger(__name__)
ANYTHING = re.compile(".*")


def register(app: AsyncApp) -> None:
    async def ignore_event(body: dict[str, Any]) -> None:
        event = body.get("event") or {}
        log.debug("event ignored", extra={"event_type": event.get("type"), "event_id": body.get("event_id")})

    async def ack_only(ack: AsyncAck) -> None:
        await ack()

    app.event(ANYTHING)(ignore_event)
    app.action(ANYTHING)(ack_only)
    app.shortcut(ANYTHING)(ack_only)
    app.view(ANYTHING)(ack_only)
