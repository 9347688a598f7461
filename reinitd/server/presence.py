"""Presence and receipts: what this replica holds and what it wrote, told to the database in
batches (docs/protocol.md §8).

Nothing here is on a request's path: a request that begins or ends to wait, or a frame that
is written, only touches a dict or a deque. One task reports every `interval` seconds what
changed since the last report, in one statement, and the receipts written meanwhile, in
another; without changes it still renews the replica every `ttl / 3` seconds. A report that
fails (the database is away, refusing or stalled) changes nothing a request sees: the next
one that succeeds carries everything this replica holds, and so does the one after the
database says it lost us (a crash or a failover empties the unlogged tables; a replica that
could not report for `ttl` seconds expired). Receipts wait in memory, up to `receipt_limit`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import secrets
import socket
import time
import uuid
from typing import TYPE_CHECKING, Final

import structlog

from reinitd.backoff import backoff_delay
from reinitd.server import metrics
from reinitd.server.database import classify, describe
from reinitd.server.store import Present, Receipt, Store
from reinitd.server.throttle import LogThrottle

if TYPE_CHECKING:
    from reinitd.server.admission import Ticket

log = structlog.get_logger("reinitd.server.presence")

# Receipts per statement, and pruned receipts per statement.
RECEIPT_CHUNK: Final = 5000
PRUNE_CHUNK: Final = 10000
# How often old receipts are pruned (the first time a minute after the start).
PRUNE_EVERY: Final = 3600.0
# Failed reports back off up to this (a report after a failure is a whole snapshot: 19 000
# rows built for every attempt, at a full process, if it were every `interval`).
RETRY_CEILING: Final = 5.0
FIRST_PRUNE: Final = 60.0

# A receipt waiting to be written: workspace, agent, build, kind, path, when (monotonic).
Pending = tuple[uuid.UUID, uuid.UUID, uuid.UUID | None, str, str, float]

_REPORTS = {o: metrics.PRESENCE_REPORTS.labels(o) for o in metrics.PRESENCE_REPORT_OUTCOMES}
_RECEIPTS = {o: metrics.RECEIPTS.labels(o) for o in metrics.RECEIPT_OUTCOMES}


def replica_name() -> str:
    """This process as presence and receipts name it: host, pid, and a random suffix, so that
    a restarted worker or a reused pid is never taken for the process that died."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class Presence:
    """The requests waiting here and the frames written, on their way to the database."""

    def __init__(
        self,
        store: Store,
        replica: str,
        *,
        interval: float = 0.5,
        ttl: float = 30.0,
        retention: float = 7 * 86400.0,
        receipt_limit: int = 100_000,
    ) -> None:
        self._store = store
        self.replica = replica
        self.interval = interval
        self.ttl = ttl
        self.retention = retention
        self.receipt_limit = receipt_limit
        self._seq = itertools.count(1)
        self._live: dict[int, Ticket] = {}
        self._joined: dict[int, None] = {}  # live, not yet reported (insertion order)
        self._left: list[int] = []  # reported, since ended
        self._full = True  # the next report is everything held (the first one is)
        self._reported = -float("inf")
        self._next_prune = time.monotonic() + FIRST_PRUNE
        self._pruned = 0  # receipts deleted by the prune run under way
        # Receipts waiting for the database: ids and the write's monotonic time, no reference
        # to the request (a long outage must not keep 100 000 finished requests alive).
        self._receipts: collections.deque[Pending] = collections.deque()
        self._writing = 0  # receipts in the write under way
        # Read when scraped, not set per receipt (a burst writes thousands at once). One
        # Presence per server process: the last one made is the one the gauge reads.
        metrics.RECEIPTS_PENDING.set_function(lambda: self.pending_receipts)
        self._failures = LogThrottle()
        self._now = asyncio.Event()  # `reassert`: flush at once, whatever the back-off

    def __len__(self) -> int:
        """Requests waiting here now."""
        return len(self._live)

    @property
    def pending_receipts(self) -> int:
        """Receipts not yet in the database: waiting, or in the write under way."""
        return len(self._receipts) + self._writing

    # --- the request side: synchronous, no I/O ------------------------------------------------

    def join(self, ticket: Ticket) -> int:
        """A request began to wait; returns its number here."""
        seq = next(self._seq)
        self._live[seq] = ticket
        self._joined[seq] = None
        return seq

    def leave(self, seq: int) -> None:
        """The request numbered `seq` stopped waiting."""
        if self._live.pop(seq, None) is None:
            return
        if seq in self._joined:
            del self._joined[seq]  # never reported: nothing to take back
        else:
            self._left.append(seq)

    def receipt(self, ticket: Ticket, build_id: uuid.UUID | None, kind: str, path: str) -> None:
        """A claim event or an error frame was written to `ticket`'s agent."""
        if len(self._receipts) >= self.receipt_limit:
            self._receipts.popleft()
            _RECEIPTS["dropped"].inc()
            if (suppressed := self._failures.allow("receipts_dropped")) is not None:
                log.error("receipts_dropped", limit=self.receipt_limit, suppressed=suppressed)
        sub = ticket.subscription
        assert sub is not None
        assert ticket.agent_id is not None
        at = time.monotonic()
        self._receipts.append((sub.workspace_id, ticket.agent_id, build_id, kind, path, at))

    def reassert(self) -> None:
        """Send everything held, now (after a listener reconnect: the database may be another
        one, a promoted standby; and it answers again, so a back-off ends)."""
        self._full = True
        self._now.set()

    # --- the database side: one task ----------------------------------------------------------

    async def run(self) -> None:
        """Flush every `interval`; after failed reports, back off (doubling, up to
        RETRY_CEILING or a third of the TTL, jittered) until one succeeds or a listener
        (re)connect asks for a report at once."""
        failures = 0
        while True:
            delay = self.retry_delay(failures)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._now.wait()
            self._now.clear()
            failures = 0 if await self.flush() else failures + 1

    def retry_delay(self, failures: int) -> float:
        """How long to wait before the next flush, after `failures` failed reports in a row;
        never over a third of the TTL, so that a back-off alone never lets the replica
        expire."""
        if not failures:
            return self.interval
        ceiling = max(self.interval, min(RETRY_CEILING, self.ttl / 3))
        return backoff_delay(failures + 1, self.interval, ceiling)

    async def flush(self) -> bool:
        """Report what changed (or, when due, renew the replica), write the receipts, and
        prune old receipts when it is time. Failures are logged and retried next time; False
        if the report failed (a failed receipt write alone does not slow the reports: its
        failure makes the next report a full one, which an outage fails too)."""
        await self._write_receipts()
        reported = True
        now = time.monotonic()
        if self._full or self._joined or self._left or now - self._reported >= self.ttl / 3:
            reported = await self._report()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            await self._prune()
        return reported

    async def _report(self) -> bool:
        full = self._full
        now = time.monotonic()
        tickets = self._live.items() if full else ((s, self._live[s]) for s in self._joined)
        present = [self._present(seq, ticket, now) for seq, ticket in tickets]
        left, self._left, self._joined, self._full = self._left, [], {}, False
        try:
            known = await self._store.report_presence(
                self.replica, self.ttl, full=full, present=present, left=[] if full else left
            )
        except Exception as exc:
            self._full = True  # whatever this report held, the next one holds all of it
            _REPORTS["failed"].inc()
            self._failed("presence_report_failed", exc)
            return False
        self._reported = now
        if known:
            _REPORTS["reasserted" if full else "ok"].inc()
            if full:
                log.info("presence_reported", replica=self.replica, requests=len(present))
            return True
        # The database lost this replica's rows: tell it everything, now.
        log.warning("presence_lost", replica=self.replica, requests=len(self._live))
        self._full = True
        return await self._report()

    @staticmethod
    def _present(seq: int, ticket: Ticket, now: float) -> Present:
        sub = ticket.subscription
        assert sub is not None
        assert ticket.agent_id is not None
        return Present(
            seq, ticket.agent_id, sub.workspace_id, ticket.mode, sub.wait, now - ticket.opened_at
        )

    async def _write_receipts(self) -> None:
        while self._receipts:
            now = time.monotonic()
            batch = [
                self._receipts.popleft() for _ in range(min(RECEIPT_CHUNK, len(self._receipts)))
            ]
            receipts = [self._receipt(item, now) for item in batch]
            self._writing = len(batch)
            try:
                await self._store.record_deliveries(self.replica, receipts)
            except Exception as exc:
                # Kept, oldest first, for the next attempt (bounded by `receipt`); and an
                # outage may have lost presence too: the next report carries everything.
                self._receipts.extendleft(reversed(batch))
                self._full = True
                self._failed("receipts_write_failed", exc, pending=len(self._receipts))
                return
            except BaseException:  # cancelled mid-write (a stop): kept for `close`
                self._receipts.extendleft(reversed(batch))
                raise
            finally:
                self._writing = 0
            _RECEIPTS["written"].inc(len(receipts))

    @staticmethod
    def _receipt(item: Pending, now: float) -> Receipt:
        workspace_id, agent_id, build_id, kind, path, at = item
        return Receipt(workspace_id, agent_id, build_id, kind, path, now - at)

    async def _prune(self) -> None:
        """One chunk of old receipts per flush, so that a long backlog (a retention just
        shortened) never holds the reports back past the TTL: a full chunk makes the next
        flush go on. The run is logged once, when it is done."""
        try:
            gone = await self._store.prune_deliveries(self.retention, PRUNE_CHUNK)
        except Exception as exc:
            self._failed("receipts_prune_failed", exc)
            return
        self._pruned += gone
        if gone >= PRUNE_CHUNK:
            self._next_prune = time.monotonic()
        elif self._pruned:
            log.info("receipts_pruned", receipts=self._pruned, retention_s=self.retention)
            self._pruned = 0

    def _failed(self, event: str, exc: Exception, **fields: object) -> None:
        """One line per kind of failure per interval: a warning for an outage (the next
        attempt will do), an error with its traceback for anything else (a bug, a grant)."""
        suppressed = self._failures.allow(event)
        if suppressed is None:
            return
        if (outage := classify(exc)) is not None:
            log.warning(
                event, error=describe(exc), kind=outage.kind, suppressed=suppressed, **fields
            )
        else:
            log.error(event, exc_info=exc, suppressed=suppressed, **fields)

    async def close(self, within: float) -> None:
        """On shutdown: write the receipts still here and take this replica's rows away, in at
        most `within` seconds (a database that is away does not hold the exit)."""
        try:
            async with asyncio.timeout(within):
                await self._write_receipts()
                await self._store.retire(self.replica)
        except Exception as exc:
            self._failed("presence_retire_failed", exc)
        if self._receipts:
            _RECEIPTS["dropped"].inc(len(self._receipts))
            log.error("receipts_dropped", receipts=len(self._receipts), reason="shutdown")
            self._receipts.clear()
