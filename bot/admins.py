"""Who may change kimibot's settings and see everyone's usage: workspace admins and owners (users.info
`is_admin` / `is_owner`) and the people listed in `ADMIN_USERS`. One rule, asked by every surface."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from slack_sdk.web.async_client import AsyncWebClient

log = logging.getLogger(__name__)

ADMIN_CHECK_TTL_S = 60.0  # short: a demoted admin loses the right within a minute
ADMIN_CACHE_SIZE = 1_000
ASK_AN_ADMIN = "Only workspace admins (and the people in kimibot's `ADMIN_USERS`) can do that: ask an admin."


class Admins:
    """`is_admin(team, user)`: ADMIN_USERS first (no Slack call), else users.info, briefly remembered.
    A users.info failure counts as "not an admin" (fail closed) and is not remembered."""

    def __init__(
        self, slack: AsyncWebClient, admin_users: frozenset[str], *, ttl_s: float = ADMIN_CHECK_TTL_S
    ) -> None:
        self.slack = slack
        self.admin_users = admin_users
        self.ttl_s = ttl_s
        self._known: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()

    async def is_admin(self, team_id: str, user: str) -> bool:
        if not user:
            return False
        if user in self.admin_users:
            return True
        key = (team_id, user)
        now = time.monotonic()
        known = self._known.get(key)
        if known is not None and now - known[1] < self.ttl_s:
            return known[0]
        try:
            response = await self.slack.users_info(user=user)
        except Exception as exc:
            log.warning("admin check failed: not an admin", extra={"user": user, "error": str(exc)})
            return False
        info = response.get("user") or {}
        admin = bool(info.get("is_admin") or info.get("is_owner") or info.get("is_primary_owner"))
        self._known[key] = (admin, now)
        self._known.move_to_end(key)
        while len(self._known) > ADMIN_CACHE_SIZE:
            self._known.popitem(last=False)
        return admin

    def forget(self, team_id: str, user: str) -> None:
        self._known.pop((team_id, user), None)
