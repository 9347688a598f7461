"""From PostgreSQL to the hub: NOTIFY dispatch, and the resync that covers what NOTIFY lost."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import asyncpg
import structlog

from reinitd import metrics
from reinitd.claim import read_verdicts
from reinitd.event import REASON_FAILED, PayloadError, parse_payload
from reinitd.hub import Hub
from reinitd.limit import LogThrottle
from reinitd.listener import CONNECTION_ERRORS, backoff_delay

log = structlog.get_logger("reinitd.delivery")

# Workspaces per batched claim_states query during a resync.
RESYNC_CHUNK = 5000


def make_dispatcher(hub: Hub, resyncer: Resyncer) -> Callable[[str, str, float], None]:
    """The listener's synchronous callback: validate, then hand off without awaiting."""

    throttle = LogThrottle()  # garbage may arrive in floods: count all, log a few

    def dispatch(channel: str, payload: str, received_at: float) -> None:
        metrics.PAYLOADS_RECEIVED.inc()
        try:
            event = parse_payload(payload, received_at)
        except PayloadError as exc:
            metrics.PAYLOADS_INVALID.labels(exc.kind).inc()
            suppressed = throttle.allow(exc.kind)
            if suppressed is not None:
                log.warning(
                    "claim_payload_invalid",
                    channel=channel,
                    kind=exc.kind,
                    error=str(exc),
                    payload_bytes=len(payload.encode()),
                    suppressed=suppressed,
                )
            return
        if event.reason == REASON_FAILED:
            # The payload has no error text: the durable read fetches it for wait=true streams.
            if hub.has_waiters(event.workspace_id):
                resyncer.request(event.workspace_id)
            return
        hub.publish(event)

    return dispatch


class Resyncer:
    """Re-reads the builds of every workspace a `wait=true` stream waits on, in batches.

    Runs after every listener (re)connect, for single workspaces on `claim_failed`, and on a
    slow timer as a safety net. Failed runs are retried with backoff; nothing is dropped.
    """

    def __init__(self, pool: asyncpg.Pool, hub: Hub, *, interval: float = 30.0) -> None:
        self._pool = pool
        self._hub = hub
        self.interval = interval
        self._full = False
        self._targets: set[uuid.UUID] = set()
        self._wake = asyncio.Event()

    def request(self, workspace_id: uuid.UUID | None = None) -> None:
        """Ask for a resync of one workspace, or of all waiting ones (None)."""
        if workspace_id is None:
            self._full = True
        else:
            self._targets.add(workspace_id)
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                self._full = True
            self._wake.clear()
            full, targets = self._full, self._targets
            self._full, self._targets = False, set()
            try:
                await self.resync(None if full else targets)
                failures = 0
            except Exception as exc:  # a database outage, or a bug: retry, never stop
                failures += 1
                metrics.RESYNC_RUNS.labels("failed").inc()
                delay = backoff_delay(failures, 0.2, 5.0)
                if not isinstance(exc, CONNECTION_ERRORS):
                    log.exception("resync_error")
                log.warning(
                    "resync_failed",
                    error=str(exc) or type(exc).__name__,
                    attempt=failures,
                    retry_in_s=round(delay, 3),
                )
                self._full |= full
                self._targets |= targets
                await asyncio.sleep(delay)
                self._wake.set()

    async def resync(self, targets: set[uuid.UUID] | None = None) -> int:
        """One resync now; returns how many streams it settled."""
        if targets is None:
            ids = self._hub.waiting_workspaces()
        else:
            ids = [ws for ws in targets if self._hub.has_waiters(ws)]
        if not ids:
            return 0
        started = time.monotonic()
        settled = 0
        for i in range(0, len(ids), RESYNC_CHUNK):
            chunk = ids[i : i + RESYNC_CHUNK]
            verdicts = await read_verdicts(self._pool, chunk, "resync")
            settled += sum(self._hub.settle(ws, verdict) for ws, verdict in verdicts.items())
        elapsed = time.monotonic() - started
        metrics.RESYNC_RUNS.labels("ok").inc()
        metrics.RESYNC_SECONDS.observe(elapsed)
        (log.info if settled else log.debug)(
            "resync_done",
            workspaces=len(ids),
            settled=settled,
            full=targets is None,
            duration_s=round(elapsed, 4),
        )
        return settled
