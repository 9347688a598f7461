"""Refusals counted and logged sparingly, and the throttle that keeps floods out of the log."""

from __future__ import annotations

import time
from collections import Counter

import structlog

from reinitd import metrics

log = structlog.get_logger("reinitd.limit")


class LogThrottle:
    """At most one log line per key every `every` seconds; `allow` returns how many were
    suppressed since the last one, or None while the key is quiet."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def allow(self, key: str) -> int | None:
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            self._suppressed[key] += 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)


class Refusals:
    """Every refusal is counted; each reason is logged at most once per `every` seconds,
    so that a flood cannot flood the log."""

    def __init__(self, every: float = 10.0) -> None:
        self._throttle = LogThrottle(every)

    def refuse(self, reason: str, status: int, detail: str) -> None:
        metrics.REFUSALS.labels(reason).inc()
        suppressed = self._throttle.allow(reason)
        if suppressed is not None:
            log.warning(
                "request_refused",
                reason=reason,
                status=status,
                detail=detail,
                suppressed=suppressed,
            )
