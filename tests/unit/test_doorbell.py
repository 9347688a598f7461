"""The doorbell's batching, ordering and retries, against an in-memory database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest

from reinitd.server.claim import PREBUILDS_USER_ID, Verdict, judge
from reinitd.server.doorbell import RECENT, RESYNC_CHUNK, RESYNC_JITTER, Doorbell
from reinitd.server.hub import Delivery, End, Hub, Subscription
from reinitd.wire import ReinitEvent


class FakeDatabase:
    """Workspaces and their builds, in memory; records every batched read. `fail` makes the
    next reads raise; `gate`, when set, holds every read until it is opened."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, dict[str, object]] = {}
        self.reads: list[list[uuid.UUID]] = []
        self.fail = 0
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    def prebuild(self) -> uuid.UUID:
        workspace_id = uuid.uuid4()
        self.rows[workspace_id] = {
            "workspace_id": workspace_id,
            "owner_id": PREBUILDS_USER_ID,
            "first_initiator_id": PREBUILDS_USER_ID,
            "latest_stage": "prebuild",
            "latest_status": "succeeded",
            "latest_error": None,
            "latest_build_id": None,
        }
        return workspace_id

    def claim(self, workspace_id: uuid.UUID, owner: uuid.UUID) -> None:
        row = self.rows[workspace_id]
        row.update(owner_id=owner, latest_stage="claim", latest_status="succeeded")

    async def read(self, workspace_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Verdict]:
        """Like PostgreSQL: the snapshot is taken when the read starts."""
        self.reads.append(list(workspace_ids))
        snapshot = {ws: judge(self.rows.get(ws)) for ws in workspace_ids}
        self.reading.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionResetError("the database went away")
        return snapshot


@pytest.fixture
async def world() -> AsyncIterator[tuple[FakeDatabase, Hub, Doorbell]]:
    database, hub = FakeDatabase(), Hub()
    doorbell = Doorbell(database.read, hub, resync_interval=3600, retry_floor=0.01)
    task = asyncio.create_task(doorbell.run())
    try:
        yield database, hub, doorbell
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def claims_of(sub: Subscription) -> list[uuid.UUID | None]:
    """The owners of the claims queued on `sub`, without waiting."""
    owners: list[uuid.UUID | None] = []
    while (item := sub._take()) is not None:
        if isinstance(item, Delivery):
            owners.append(item.event.owner_id)
    return owners


async def test_doorbells_that_arrive_together_are_read_together(
    world: tuple[FakeDatabase, Hub, Doorbell],
) -> None:
    """300 NOTIFYs handed over in one go (as one network read delivers them) make one read."""
    database, hub, doorbell = world
    workspaces = [database.prebuild() for _ in range(300)]
    owner = uuid.uuid4()
    with contextlib.ExitStack() as stack:
        subs = [stack.enter_context(hub.subscribe(ws, wait=True)) for ws in workspaces]
        for workspace_id in workspaces:
            database.claim(workspace_id, owner)
            doorbell.on_payload(str(workspace_id), 1.0)
        await asyncio.wait_for(doorbell.idle(), 5)
        assert len(database.reads) == 1
        assert sorted(database.reads[0]) == sorted(workspaces)
        assert all(claims_of(sub) == [owner] for sub in subs)


async def test_a_doorbell_rung_during_its_read_is_read_again(
    world: tuple[FakeDatabase, Hub, Doorbell],
) -> None:
    """A forged doorbell's read is in flight when the real claim commits and rings: the read's
    snapshot predates the claim, so the second ring must cause a second read."""
    database, hub, doorbell = world
    workspace_id = database.prebuild()
    with hub.subscribe(workspace_id, wait=True) as sub:
        database.gate = asyncio.Event()
        doorbell.ring(workspace_id)  # the forgery: its read takes a snapshot, then stalls
        await asyncio.wait_for(database.reading.wait(), 5)
        owner = uuid.uuid4()
        database.claim(workspace_id, owner)  # the real claim commits...
        doorbell.ring(workspace_id)  # ...and rings while the first read is in flight
        database.gate.set()  # the first read answers from its snapshot: no claim yet
        await asyncio.wait_for(doorbell.idle(), 5)
        assert len(database.reads) == 2
        assert claims_of(sub) == [owner]


async def test_a_failed_read_keeps_its_doorbells(
    world: tuple[FakeDatabase, Hub, Doorbell],
) -> None:
    """Reads that fail (the database is away) are retried with the same doorbells, and the
    claim is delivered once the database answers."""
    database, hub, doorbell = world
    workspace_id = database.prebuild()
    owner = uuid.uuid4()
    database.claim(workspace_id, owner)
    database.fail = 2
    with hub.subscribe(workspace_id, wait=True) as sub:
        doorbell.ring(workspace_id)
        await asyncio.wait_for(doorbell.idle(), 10)
        assert database.reads == [[workspace_id]] * 3
        assert claims_of(sub) == [owner]


async def test_doorbells_go_before_a_long_resync(
    world: tuple[FakeDatabase, Hub, Doorbell],
) -> None:
    """A resync of three and a half chunks is read chunk by chunk; a doorbell rung meanwhile is read
    right after the chunk in flight, not after the whole resync."""
    database, hub, doorbell = world
    waiting = [database.prebuild() for _ in range(3 * RESYNC_CHUNK + RESYNC_CHUNK // 2)]
    claimed = database.prebuild()
    with contextlib.ExitStack() as stack:
        for workspace_id in [*waiting, claimed]:
            stack.enter_context(hub.subscribe(workspace_id, wait=True))
        database.gate = asyncio.Event()
        doorbell.ring_all()
        await asyncio.wait_for(database.reading.wait(), 5)
        doorbell.ring(claimed)
        database.gate.set()
        await asyncio.wait_for(doorbell.idle(), 5)
        step = RESYNC_CHUNK
        assert [len(read) for read in database.reads] == [step, 1, step, step, step // 2 + 1]
        assert database.reads[1] == [claimed]


def test_the_safety_net_is_jittered_so_processes_drift_apart() -> None:
    """Processes started together (forked workers, a rollout's replicas) do not keep
    re-reading every waiting workspace in the same instant: each wait is drawn anew, within
    RESYNC_JITTER of the interval, and they differ."""
    doorbell = Doorbell(FakeDatabase().read, Hub(), resync_interval=30.0)
    waits = [doorbell.next_resync_in() for _ in range(200)]
    assert all(30.0 * (1 - RESYNC_JITTER) <= wait <= 30.0 * (1 + RESYNC_JITTER) for wait in waits)
    assert max(waits) - min(waits) > 30.0 * RESYNC_JITTER  # spread, not one value


async def test_the_safety_net_resyncs_again_after_its_interval() -> None:
    """With nothing rung, the timer alone re-reads every waiting workspace, again and again."""
    database, hub = FakeDatabase(), Hub()
    workspace_id = database.prebuild()
    doorbell = Doorbell(database.read, hub, resync_interval=0.05)
    with hub.subscribe(workspace_id, wait=True):
        task = asyncio.create_task(doorbell.run())
        try:
            async with asyncio.timeout(5):
                while len(database.reads) < 3:
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert database.reads[:3] == [[workspace_id]] * 3


async def test_only_workspaces_with_streams_here_are_read(
    world: tuple[FakeDatabase, Hub, Doorbell],
) -> None:
    """A doorbell for a workspace nobody here waits on costs no read; garbage costs nothing."""
    database, hub, doorbell = world
    for payload in (str(uuid.uuid4()), "garbage", '{"workspace_id": 7}'):
        doorbell.on_payload(payload, 0.0)
    await asyncio.wait_for(doorbell.idle(), 5)
    assert database.reads == []
    assert len(hub) == 0


async def test_a_resync_reaches_only_streams_with_wait(
    world: tuple[FakeDatabase, Hub, Doorbell],
) -> None:
    """After a reconnect the resync delivers a claim to wait=true streams; streams without wait
    are never pre-seeded (older agents would loop)."""
    database, hub, doorbell = world
    workspace_id = database.prebuild()
    owner = uuid.uuid4()
    database.claim(workspace_id, owner)
    with (
        hub.subscribe(workspace_id, wait=True) as waiting,
        hub.subscribe(workspace_id, wait=False) as legacy,
    ):
        doorbell.ring_all()
        await asyncio.wait_for(doorbell.idle(), 5)
        assert claims_of(waiting) == [owner]
        assert claims_of(legacy) == []
        legacy.end(End("test"))
        assert legacy._take() == End("test")


def test_the_fake_judges_like_the_real_rules() -> None:
    """The fake's rows go through the real rule table, so its verdicts are the server's."""
    database = FakeDatabase()
    workspace_id = database.prebuild()
    owner = uuid.uuid4()
    database.claim(workspace_id, owner)
    verdict = asyncio.run(database.read([workspace_id]))[workspace_id]
    assert verdict == judge(database.rows[workspace_id])
    assert getattr(verdict, "event", None) == ReinitEvent(workspace_id, owner_id=owner)


async def test_a_connect_catches_up_with_doorbells_heard_since_its_read(
    world: tuple[FakeDatabase, Hub, Doorbell],
) -> None:
    """A connect read its workspace, then registered: a doorbell for it heard in between (and
    dropped, nobody was waiting) is rung again; one for another workspace is not."""
    database, hub, doorbell = world
    workspace_id, other = database.prebuild(), database.prebuild()
    owner = uuid.uuid4()
    mark = doorbell.mark()
    database.claim(workspace_id, owner)
    doorbell.on_payload(str(workspace_id), 1.0)  # heard before the stream registered
    doorbell.on_payload(str(other), 1.0)
    await asyncio.wait_for(doorbell.idle(), 5)
    assert database.reads == []  # nobody waited on either
    with hub.subscribe(workspace_id, wait=True) as sub, hub.subscribe(other, wait=True):
        doorbell.catch_up(mark, workspace_id)
        doorbell.catch_up(mark, other)
        doorbell.catch_up(doorbell.mark(), workspace_id)  # nothing since: no ring
        await asyncio.wait_for(doorbell.idle(), 5)
        assert database.reads == [[workspace_id, other]]
        assert claims_of(sub) == [owner]


async def test_a_connect_catches_up_after_a_reconnect_or_too_many_doorbells(
    world: tuple[FakeDatabase, Hub, Doorbell],
) -> None:
    """A resync asked for since the read (the listener reconnected: NOTIFYs may be lost), or
    more doorbells than are remembered, ring the workspace again to be safe."""
    database, hub, doorbell = world
    workspace_id = database.prebuild()
    with hub.subscribe(workspace_id, wait=True):
        reconnect = doorbell.mark()
        doorbell.ring_all()
        await asyncio.wait_for(doorbell.idle(), 5)
        flood = doorbell.mark()
        for _ in range(RECENT + 1):
            doorbell.on_payload(str(uuid.uuid4()), 0.0)
        database.reads.clear()
        doorbell.catch_up(reconnect, workspace_id)
        await asyncio.wait_for(doorbell.idle(), 5)
        doorbell.catch_up(flood, workspace_id)
        await asyncio.wait_for(doorbell.idle(), 5)
        assert database.reads == [[workspace_id], [workspace_id]]


async def test_a_notify_queued_after_a_re_read_is_read_as_the_notify(
    world: tuple[FakeDatabase, Hub, Doorbell],
) -> None:
    """A catch-up's re-read, then a NOTIFY for the same workspace before the read: it is read
    as the NOTIFY, with its receipt time (the latency metric), so a stream without wait gets
    the claim too; a re-read alone would not reach it."""
    database, hub, doorbell = world
    workspace_id = database.prebuild()
    database.claim(workspace_id, uuid.uuid4())
    with hub.subscribe(workspace_id, wait=False) as legacy:
        doorbell.ring(workspace_id)  # a re-read: no NOTIFY
        doorbell.on_payload(str(workspace_id), 5.0)
        await asyncio.wait_for(doorbell.idle(), 5)
        item = legacy._take()
        assert isinstance(item, Delivery)
        assert (item.source, item.received_at) == ("notify", 5.0)


@pytest.mark.parametrize("turns", range(6))
async def test_a_doorbell_woken_as_it_is_cancelled_still_stops(turns: int) -> None:
    """The reader idling for its next doorbell, rung and cancelled in the same instant (at
    every offset of a few loop turns): the cancellation is never lost (3.11's wait_for lost
    it, and a stop then waited on the reader forever)."""
    doorbell = Doorbell(FakeDatabase().read, Hub())
    task = asyncio.create_task(doorbell.run())
    await asyncio.wait_for(doorbell.idle(), 5)
    doorbell.ring_all()
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    if not done:
        task.cancel()  # end it anyway: the test has failed
    assert task in done, "the reader lost its cancellation and went back to idling"
    assert task.cancelled()
