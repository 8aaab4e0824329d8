"""Counters an admin (and the benchmarks) look at: exposed on /healthz and logged."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState

log = logging.getLogger(__name__)


@dataclass
class Metrics:
    slack_429s: Counter[str] = field(default_factory=Counter)  # per Web API method

    def snapshot(self) -> dict[str, Any]:
        return {"slack_429s": sum(self.slack_429s.values()), "slack_429s_by_method": dict(self.slack_429s)}


class CountingRateLimitHandler(AsyncRateLimitErrorRetryHandler):
    """slack_sdk's 429 handler (waits Retry-After, retries), counting every 429 it sees: the goal is none."""

    def __init__(self, metrics: Metrics, max_retry_count: int = 3) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.metrics = metrics

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        limited = response is not None and response.status_code == 429
        if limited:
            method = request.url.rstrip("/").rsplit("/", 1)[-1]
            self.metrics.slack_429s[method] += 1
            log.warning(
                "slack rate limited a call",
                extra={"method": method, "count": self.metrics.slack_429s[method]},
            )
        return limited
