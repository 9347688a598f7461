"""Doorbells: a NOTIFY only names a workspace; one batched read says what to deliver."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import structlog

from reinitd.backoff import backoff_delay
from reinitd.errors import PayloadError
from reinitd.server import metrics
from reinitd.server.claim import Deliver, Refuse, Verdict
from reinitd.server.database import classify
from reinitd.server.hub import Hub
from reinitd.server.throttle import LogThrottle

log = structlog.get_logger("reinitd.server.doorbell")

# The channel claims are announced on (NOTIFY prebuild_claimed, '<workspace uuid>').
CHANNEL: Final = "prebuild_claimed"
# A payload names a workspace in ~100 bytes; anything much longer is not ours.
MAX_PAYLOAD_BYTES: Final = 1024
# Doorbells remembered for connects that read before they registered (a connect takes about a
# millisecond: even a flood of 100 000 NOTIFYs a second fits many times).
RECENT: Final = 8192
# Workspaces per batched read: doorbells, and a resync's steps between them.
READ_CHUNK: Final = 5000
# Small, because a claim rung during a resync step waits for that step's read and apply
# (1 000 took tens of milliseconds on a busy worker holding 19 000 streams).
RESYNC_CHUNK: Final = 200
# The safety net waits its interval ± this share, drawn anew each time: workers forked
# together, and replicas started together, would otherwise re-read every waiting workspace in
# the same instant, every interval, for as long as they run.
RESYNC_JITTER: Final = 0.2

# What the database says about some workspaces (reinitd.server.claim.read_verdicts on a pool,
# or an in-memory fake in the unit tests).
Read = Callable[[Sequence[uuid.UUID]], Awaitable[dict[uuid.UUID, Verdict]]]

_OUTCOMES = {outcome: metrics.DOORBELLS.labels(outcome) for outcome in metrics.DOORBELL_OUTCOMES}


def _uuid(text: object) -> uuid.UUID:
    if not isinstance(text, str):
        raise PayloadError("bad_uuid", "workspace_id must be a UUID string")
    try:
        return uuid.UUID(text)
    except ValueError:
        raise PayloadError("bad_uuid", f"not a UUID: {text[:64]!r}") from None


def workspace_of(payload: str) -> uuid.UUID:
    """The workspace a payload names: a JSON object's `workspace_id`, or a bare UUID (a DBA's
    `NOTIFY prebuild_claimed, '<uuid>'`). Every other field is ignored: none is trusted."""
    if len(payload) > MAX_PAYLOAD_BYTES:  # characters: a cheap bound before any parsing
        raise PayloadError("too_long", f"payload of {len(payload)} characters")
    text = payload.strip()
    if not text.startswith("{"):
        return _uuid(text)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PayloadError("bad_json", f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PayloadError("bad_json", "payload is not a JSON object")
    return _uuid(data.get("workspace_id"))


class Doorbell:
    """What the database says about rung workspaces reaches their streams, and nothing else.

    Three triggers, one path: a NOTIFY (`on_payload`), the resync after every listener
    (re)connect (`ring_all`) and the safety-net timer. Doorbells that arrive together are read
    together, in one query per READ_CHUNK workspaces; a resync walks every waiting workspace in
    RESYNC_CHUNK steps, with the doorbells rung meanwhile read first, so that a claim never
    waits behind a long resync. A failed read keeps its work and is retried with backoff.
    The hub's `settle` applies each verdict.
    """

    def __init__(
        self,
        read: Read,
        hub: Hub,
        *,
        resync_interval: float = 30.0,
        retry_floor: float = 0.2,
    ) -> None:
        self._read_verdicts = read
        self.retry_floor = retry_floor
        self._hub = hub
        self.resync_interval = resync_interval
        # Rung workspaces and when the first NOTIFY for each arrived (for the latency metric),
        # or None for a re-read that no NOTIFY asked for (a catch-up).
        self._rung: dict[uuid.UUID, float | None] = {}
        self._resync_asked = False
        self._resync: list[uuid.UUID] = []  # what the resync under way still has to read
        self._resync_started = 0.0
        self._resync_size = 0
        self._resync_settled = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._invalid_log = LogThrottle()
        self._unconfirmed_log = LogThrottle()
        # What was heard, for `catch_up`: the latest doorbells, how many so far, and resyncs.
        self._recent: collections.deque[uuid.UUID] = collections.deque(maxlen=RECENT)
        self._heard = 0
        self._resyncs = 0

    def on_payload(self, payload: str, received_at: float) -> None:
        """The router's handler for the claim channel: synchronous, never awaits."""
        metrics.PAYLOADS_RECEIVED.value += 1
        try:
            workspace_id = workspace_of(payload)
        except PayloadError as exc:
            metrics.PAYLOADS_INVALID.labels(exc.kind).inc()
            suppressed = self._invalid_log.allow(exc.kind)
            if suppressed is not None:
                log.warning(
                    "claim_payload_invalid",
                    kind=exc.kind,
                    error=str(exc),
                    payload_bytes=len(payload.encode()),
                    suppressed=suppressed,
                )
            return
        self._heard += 1
        self._recent.append(workspace_id)
        self.ring(workspace_id, received_at)

    def ring(self, workspace_id: uuid.UUID, received_at: float | None = None) -> None:
        """Look at `workspace_id` soon, for every stream waiting on it here: for a NOTIFY the
        listener received at `received_at`, or, with None, to re-read it as a resync does (no
        doorbell is counted, and streams without `wait` get nothing from it)."""
        if workspace_id not in self._hub:
            if received_at is not None:
                _OUTCOMES["no_waiters"].inc()  # nobody here to tell: nothing to read
            return
        self._queue(workspace_id, received_at)
        self._wake_up()

    def _queue(self, workspace_id: uuid.UUID, received_at: float | None) -> None:
        # A NOTIFY's receipt wins over a re-read; of several NOTIFYs, the one queued first.
        if self._rung.get(workspace_id) is None:
            self._rung[workspace_id] = received_at

    def ring_all(self) -> None:
        """Re-read every workspace a `wait=true` stream waits on (NOTIFYs may have been lost)."""
        self._resyncs += 1
        self._resync_asked = True
        self._wake_up()

    def mark(self) -> tuple[int, int]:
        """Where the doorbells stand now, for `catch_up`."""
        return (self._heard, self._resyncs)

    def catch_up(self, mark: tuple[int, int], workspace_id: uuid.UUID) -> None:
        """Re-read `workspace_id` if a doorbell for it, or a resync, came after `mark`.

        A connect reads its workspace's builds with its token lookup (one round trip), and only
        then registers. A claim committed after that read rings after its commit: either once
        the stream is registered (the doorbell finds it), or in between — then its doorbell is
        among those heard since the mark, and this reads it again. A NOTIFY lost to a
        reconnect in between is covered by that reconnect's resync being counted. The re-read
        is no NOTIFY (that one was counted when it rang): it has a resync's semantics."""
        heard, resyncs = mark
        missed = self._heard - heard
        if (
            resyncs != self._resyncs
            or missed > len(self._recent)
            or workspace_id in itertools.islice(reversed(self._recent), missed)
        ):
            self.ring(workspace_id, None)

    def next_resync_in(self) -> float:
        """How long the safety net waits after a resync starts: the interval ± RESYNC_JITTER."""
        jitter = random.uniform(-RESYNC_JITTER, RESYNC_JITTER)  # noqa: S311 -- not cryptography
        return self.resync_interval * (1 + jitter)

    def _wake_up(self) -> None:
        self._idle.clear()
        self._wake.set()

    async def idle(self) -> None:
        """Until every doorbell rung so far, and any resync asked for, is read and applied."""
        await self._idle.wait()

    async def run(self) -> None:
        failures = 0
        next_resync = time.monotonic() + self.next_resync_in()
        while True:
            if not (self._rung or self._resync or self._resync_asked):
                self._idle.set()
                self._wake.clear()
                # asyncio.timeout, not wait_for: 3.11's wait_for can drop a cancellation that
                # lands as the wait completes, which left a stop waiting on this task forever.
                try:
                    async with asyncio.timeout_at(next_resync):
                        await self._wake.wait()
                except TimeoutError:
                    self._resync_asked = True  # the safety net
            if self._resync_asked:
                self._resync_asked = False
                # Every waiting workspace, but what the resync under way has not read yet
                # first (the list is read from its end): a listener that keeps reconnecting
                # must not keep some workspaces from ever being read.
                left = set(self._resync)
                fresh = [ws for ws in self._hub.waiting_workspaces() if ws not in left]
                self._resync = fresh + self._resync
                self._resync_size, self._resync_settled = len(self._resync), 0
                self._resync_started = time.monotonic()
                next_resync = self._resync_started + self.next_resync_in()
            try:
                await self._step()
                failures = 0
            except Exception as exc:  # an outage, or a bug: the work is kept, retried
                failures += 1
                metrics.READS.labels("failed").inc()
                delay = backoff_delay(failures, self.retry_floor, 5.0)
                outage = classify(exc)
                if outage is None:
                    log.exception("read_error")
                (log.error if outage and outage.operator_must_fix else log.warning)(
                    "read_failed",
                    error=str(exc) or type(exc).__name__,
                    kind=outage.kind if outage else "bug",
                    attempt=failures,
                    retry_in_s=round(delay, 3),
                )
                await asyncio.sleep(delay)

    async def _step(self) -> None:
        """One batched read: the doorbells rung so far, else the resync's next chunk. The work
        is taken out first, so that a doorbell rung during the read is read again after it
        (the read's snapshot may predate its commit), and put back if the read fails."""
        if self._rung:
            rung = dict(itertools.islice(self._rung.items(), READ_CHUNK))
            for workspace_id in rung:
                del self._rung[workspace_id]
            try:
                await self._read(list(rung), rung)
            except BaseException:
                for workspace_id, received_at in rung.items():
                    self._queue(workspace_id, received_at)
                raise
        elif self._resync:
            chunk = self._resync[-RESYNC_CHUNK:]
            del self._resync[-len(chunk) :]
            try:
                await self._read(chunk, {})
            except BaseException:
                self._resync.extend(chunk)
                raise
            if not self._resync:
                # Anything a resync settles is a claim whose NOTIFY was lost: worth a line.
                (log.info if self._resync_settled else log.debug)(
                    "resync_done",
                    workspaces=self._resync_size,
                    settled=self._resync_settled,
                    duration_s=round(time.monotonic() - self._resync_started, 4),
                )

    async def _read(
        self, workspace_ids: list[uuid.UUID], rung: dict[uuid.UUID, float | None]
    ) -> None:
        ids = [ws for ws in workspace_ids if ws in self._hub]  # streams may have left meanwhile
        if not ids:
            return
        started = time.monotonic()
        verdicts = await self._read_verdicts(ids)
        metrics.READS.labels("ok").inc()
        metrics.READ_SECONDS.observe(time.monotonic() - started)
        for workspace_id, verdict in verdicts.items():
            received_at = rung.get(workspace_id)
            if received_at is None:  # a resync or a catch-up, not a NOTIFY
                self._resync_settled += self._hub.apply(workspace_id, verdict, "resync")
            else:
                self._hub.apply(workspace_id, verdict, "notify", received_at)
                self._count(workspace_id, verdict)

    def _count(self, workspace_id: uuid.UUID, verdict: Verdict) -> None:
        if isinstance(verdict, Deliver):
            _OUTCOMES["claimed"].inc()
            return
        if isinstance(verdict, Refuse):
            _OUTCOMES["refused"].inc()
            return
        _OUTCOMES["unconfirmed"].inc()
        suppressed = self._unconfirmed_log.allow("unconfirmed")
        if suppressed is not None:
            # Nothing in the database backs this doorbell: a forgery, or a stray NOTIFY.
            log.warning(
                "doorbell_unconfirmed", workspace_id=str(workspace_id), suppressed=suppressed
            )
