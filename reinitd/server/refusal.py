"""Refused requests: every one counted, each reason logged at most once per interval."""

from __future__ import annotations

import structlog

from reinitd.server import metrics
from reinitd.server.database import Outage
from reinitd.server.throttle import LogThrottle

log = structlog.get_logger("reinitd.server.refusal")


class Refusals:
    """Every refusal is counted; each reason is logged at most once per `every` seconds,
    so that a flood cannot flood the log."""

    def __init__(self, every: float = 10.0) -> None:
        self._throttle = LogThrottle(every)
        self._outages = LogThrottle(every)

    def outage(self, outage: Outage, error: str) -> None:
        """A request refused because the database is away or turned us away (503): counted
        as a refusal and by kind, and logged as `database_unavailable` once per interval per
        cause, at ERROR when an operator must act (a login that is refused), else WARNING."""
        metrics.REFUSALS.labels("database_unavailable").inc()
        metrics.DATABASE_OUTAGES.labels(outage.kind).inc()
        # Per cause: a refusal that turns into another (55000, then 3D000) gets its own line.
        suppressed = self._outages.allow(f"{outage.kind}:{outage.sqlstate}")
        if suppressed is not None:
            (log.error if outage.operator_must_fix else log.warning)(
                "database_unavailable",
                kind=outage.kind,
                sqlstate=outage.sqlstate,
                error=error,
                suppressed=suppressed,
            )

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
