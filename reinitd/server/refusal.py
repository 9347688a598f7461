"""Refused requests: every one counted, each reason logged at most once per interval."""

from __future__ import annotations

import structlog

from reinitd.server import metrics
from reinitd.server.throttle import LogThrottle

log = structlog.get_logger("reinitd.server.refusal")


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
