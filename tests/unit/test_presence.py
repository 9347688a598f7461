"""Presence and receipts on the in-memory port: batched, re-asserted after any failure or a
database that lost us, bounded while the database is away (docs/protocol.md §8)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import random
import uuid
from collections.abc import Sequence

import pytest
import structlog

from reinitd import log
from reinitd.server.admission import Admission, Ticket
from reinitd.server.hub import Delivery, Hub
from reinitd.server.memstore import MemoryStore
from reinitd.server.presence import PRUNE_CHUNK, RETRY_CEILING, Presence
from reinitd.server.store import Receipt
from reinitd.wire import ReinitEvent
from tests.support import sample, until

REPLICA = "host:1:abcd"


def waiting(presence: Presence, hub: Hub, *, mode: str = "sse") -> Ticket:
    """A request that began to wait, as admission leaves it."""
    admission = Admission(
        MemoryStore(),
        hub,
        None,  # type: ignore[arg-type]  # no doorbell needed here
        max_streams=100,
        max_streams_per_agent=100,
        presence=presence,
    )
    admission._take_process_slot()
    ticket = Ticket(admission)
    ticket.agent_id = uuid.uuid4()
    ticket.subscription = hub.subscribe(uuid.uuid4(), wait=True)
    ticket.open(mode, "r")
    return ticket


async def test_one_statement_reports_many_requests() -> None:
    """A hundred requests that began since the last report cost one statement, not a hundred."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA)
    tickets = [waiting(presence, hub) for _ in range(100)]
    await presence.flush()
    assert store.calls["report_presence"] == 1
    assert {row.agent_id for row in store.presence[REPLICA].values()} == {
        t.agent_id for t in tickets
    }


async def test_a_request_that_comes_and_goes_between_reports_is_never_written() -> None:
    """Joined and left within one interval: the database hears nothing of it."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA)
    await presence.flush()  # the first, full report
    ticket = waiting(presence, hub)
    ticket.release()
    await presence.flush()
    assert store.presence[REPLICA] == {}
    assert len(presence) == 0


async def test_ended_requests_leave_with_the_next_report() -> None:
    """A reported request that ends is taken away by the next report; the others stay."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA)
    staying, leaving = waiting(presence, hub, mode="json"), waiting(presence, hub)
    await presence.flush()
    leaving.release()
    await presence.flush()
    rows = list(store.presence[REPLICA].values())
    assert [(r.agent_id, r.mode, r.wait) for r in rows] == [(staying.agent_id, "json", True)]


async def test_after_a_failed_report_everything_is_reasserted() -> None:
    """An outage loses the reports made during it; the first one after carries everything."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA)
    first = waiting(presence, hub)
    await presence.flush()
    store.fail = ConnectionRefusedError("away")
    first.release()
    second = waiting(presence, hub)
    before = sample("reinitd_presence_reports_total", outcome="failed")
    await presence.flush()
    assert sample("reinitd_presence_reports_total", outcome="failed") == before + 1
    store.fail = None
    await presence.flush()
    assert [r.agent_id for r in store.presence[REPLICA].values()] == [second.agent_id]


async def test_a_database_that_lost_the_replica_gets_everything_at_once() -> None:
    """A crash or a failover emptied the tables: the next partial report is refused and a
    full one follows in the same flush."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA)
    held = [waiting(presence, hub) for _ in range(3)]
    await presence.flush()
    store.presence.clear()  # what a crash does to an unlogged table
    waiting(presence, hub)
    await presence.flush()
    assert len(store.presence[REPLICA]) == 4
    assert {t.agent_id for t in held} <= {r.agent_id for r in store.presence[REPLICA].values()}


async def test_a_listener_reconnect_reasserts() -> None:
    """After `reassert` (a listener reconnect) the next report is full even without changes."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA)
    waiting(presence, hub)
    await presence.flush()
    store.presence[REPLICA].clear()  # a promoted standby never saw them
    presence.reassert()
    await presence.flush()
    assert len(store.presence[REPLICA]) == 1


async def test_receipts_wait_for_the_database_and_are_bounded() -> None:
    """Receipts written during an outage are written after it; beyond the bound the oldest
    are dropped and counted."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA, receipt_limit=3)
    ticket = waiting(presence, hub)
    store.fail = ConnectionRefusedError("away")
    build = uuid.uuid4()
    event = ReinitEvent(ticket.subscription.workspace_id, owner_id=uuid.uuid4())  # type: ignore[union-attr]
    dropped = sample("reinitd_receipts_total", outcome="dropped")
    for path in ("seeded", "notify", "resync", "notify"):
        ticket.delivered(Delivery(event, path, build_id=build))
    await presence.flush()
    assert store.receipts == []
    assert presence.pending_receipts == 3 == sample("reinitd_receipts_pending")
    assert sample("reinitd_receipts_total", outcome="dropped") == dropped + 1
    store.fail = None
    await presence.flush()
    assert [(r.path, r.build_id, r.kind) for _, r in store.receipts] == [
        ("notify", build, "event"),
        ("resync", build, "event"),
        ("notify", build, "event"),
    ]
    assert presence.pending_receipts == 0 == sample("reinitd_receipts_pending")


async def test_close_writes_receipts_and_retires_the_replica() -> None:
    """A clean stop writes what is pending and takes the replica's rows away."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA)
    ticket = waiting(presence, hub)
    await presence.flush()
    event = ReinitEvent(uuid.uuid4(), owner_id=uuid.uuid4())
    ticket.delivered(Delivery(event, "notify"))
    await presence.close(within=1)
    assert REPLICA not in store.presence
    assert len(store.receipts) == 1


async def test_failed_flushes_back_off_until_one_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the database is away, a flush fails (and says so) and the next waits longer each
    time, doubling up to RETRY_CEILING or a third of the TTL (jittered down to half); the
    first flush that succeeds ends the back-off."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA, interval=0.5)
    waiting(presence, hub)
    store.fail = ConnectionRefusedError("away")
    assert await presence.flush() is False
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # the longest
    assert [presence.retry_delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert RETRY_CEILING == 5.0
    monkeypatch.setattr(random, "uniform", lambda low, high: low)  # the shortest
    assert presence.retry_delay(1) == 0.5
    # never long enough for a back-off alone to let the replica expire
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert Presence(store, REPLICA, interval=0.5, ttl=3.0).retry_delay(10) == 1.0
    store.fail = None
    assert await presence.flush() is True
    # The loop: each failure in a row asks for a longer wait; the first success ends it.
    asked: list[int] = []

    def record(failures: int) -> float:
        asked.append(failures)
        return 0.001

    monkeypatch.setattr(presence, "retry_delay", record)
    store.fail = ConnectionRefusedError("away")
    presence.reassert()  # something to report
    task = asyncio.create_task(presence.run())
    try:
        await until(lambda: len(asked) >= 4, what="three failed flushes")
        store.fail = None
        seen = len(asked)
        await until(lambda: len(asked) > seen and asked[-1] == 0, what="a success")
        failing = asked[: asked.index(0, 1)]
        assert failing == list(range(len(failing)))  # 0 (the first wait), 1, 2, 3, ...
        assert len(failing) >= 4
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_listener_reconnect_ends_a_back_off_at_once() -> None:
    """However long the back-off after a failed report, `reassert` (a listener reconnect: the
    database answers again) makes the full report now."""
    store, hub = MemoryStore(), Hub()
    presence = Presence(store, REPLICA, interval=3600.0)  # a back-off of up to an hour
    waiting(presence, hub)
    store.fail = ConnectionRefusedError("away")
    task = asyncio.create_task(presence.run())
    try:
        presence.reassert()
        await until(lambda: store.calls["report_presence"] == 1, what="the failed report")
        store.fail = None
        presence.reassert()
        await until(lambda: store.calls["report_presence"] == 2, what="the report, at once")
        assert len(store.presence[REPLICA]) == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class SlowStore(MemoryStore):
    """Receipt writes that wait for `release`; prunes that delete what `pruned` says."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.writing = asyncio.Event()
        self.pruned: list[int] = []

    async def record_deliveries(self, replica: str, receipts: Sequence[Receipt]) -> None:
        self.writing.set()
        await self.release.wait()
        await super().record_deliveries(replica, receipts)

    async def prune_deliveries(self, keep: float, limit: int) -> int:
        await super().prune_deliveries(keep, limit)
        return self.pruned.pop(0) if self.pruned else 0


async def test_receipts_of_a_write_cancelled_midway_are_kept() -> None:
    """A stop that cancels the presence task during a receipt write loses none of them: they
    are still pending, for the last write of `close`."""
    store, hub = SlowStore(), Hub()
    presence = Presence(store, REPLICA)
    ticket = waiting(presence, hub)
    presence.receipt(ticket, uuid.uuid4(), "event", "notify")
    flushing = asyncio.create_task(presence.flush())
    await asyncio.wait_for(store.writing.wait(), 1)
    # In the write under way, and still pending until the database has it.
    assert presence.pending_receipts == 1 == sample("reinitd_receipts_pending")
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert presence.pending_receipts == 1


async def test_a_long_prune_goes_one_chunk_per_flush() -> None:
    """Old receipts are deleted a chunk per flush while chunks come back full, so that the
    reports between them are never held back; a short chunk ends the run."""
    store, hub = SlowStore(), Hub()
    store.release.set()
    store.pruned = [PRUNE_CHUNK, PRUNE_CHUNK, 3]
    presence = Presence(store, REPLICA)
    presence._next_prune = 0.0  # due now
    for flushes, prunes in enumerate((1, 2, 3, 3), start=1):
        waiting(presence, hub)  # something to report each time
        await presence.flush()
        assert store.calls["prune_deliveries"] == prunes
        assert store.calls["report_presence"] == flushes  # a report beside every chunk


@pytest.mark.parametrize(("info", "lines"), [(False, 0), (True, 1)])
def test_a_delivery_below_info_is_counted_and_receipted_without_a_line(
    info: bool, lines: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At `--log-level warning` a delivery gathers no log fields (a burst delivers thousands
    at once); it is counted and receipted all the same. At info its line is written."""
    monkeypatch.setattr(log, "_info", info)
    presence = Presence(MemoryStore(), REPLICA)
    ticket = waiting(presence, Hub())
    event = ReinitEvent(uuid.uuid4(), owner_id=uuid.uuid4())
    before = sample("reinitd_events_delivered_total", path="notify")
    with structlog.testing.capture_logs() as logs:
        ticket.delivered(Delivery(event, "notify"))
    assert sample("reinitd_events_delivered_total", path="notify") == before + 1
    assert presence.pending_receipts == 1
    assert [e["event"] for e in logs].count("reinit_delivered") == lines


@pytest.mark.parametrize(("level", "info"), [("debug", True), ("info", True), ("warning", False)])
def test_the_log_level_says_whether_info_lines_are_written(
    level: str, info: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved, root = structlog.get_config(), logging.getLogger()
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    for logger in (root, *map(logging.getLogger, ("asyncio", "aiohttp.access", "asyncpg.pool"))):
        monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(log, "_info", log.info_enabled())  # put back at the end
    try:
        log.configure(level, "json", stream=io.StringIO())  # nothing logged meanwhile
        assert log.info_enabled() is info
    finally:
        structlog.configure(**saved)
