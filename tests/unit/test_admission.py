"""Admission on the in-memory database port: the read -> register -> catch-up order, the
error mapping, and what every exit gives back (docs/protocol.md §4.3)."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

import pytest

from reinitd.errors import ApiError
from reinitd.server.admission import Admission, Reads
from reinitd.server.claim import WAIT, Deliver
from reinitd.server.doorbell import Doorbell
from reinitd.server.hub import Delivery, Hub
from reinitd.server.memstore import MemoryStore
from reinitd.server.presence import Presence
from reinitd.wire import ReinitEvent
from tests.support import until

TOKEN = str(uuid.uuid4())
DIGEST = hashlib.sha256(TOKEN.encode()).digest()


def parts(max_streams: int = 4) -> tuple[MemoryStore, Hub, Doorbell, Admission]:
    store, hub = MemoryStore(), Hub()
    doorbell = Doorbell(store.verdicts, hub, resync_interval=3600, retry_floor=0.01)
    admission = Admission(
        store,
        hub,
        doorbell,
        max_streams=max_streams,
        max_streams_per_agent=2,
        presence=Presence(store, "test-replica"),
    )
    return store, hub, doorbell, admission


async def test_a_claim_committed_between_read_and_registration_is_delivered_once() -> None:
    """The read saw a prebuild; the claim's doorbell rang before the subscription existed: the
    catch-up re-reads the workspace and the stream gets the claim, once."""
    store, hub, doorbell, admission = parts()
    workspace = store.add_agent(TOKEN)
    store.hold = asyncio.Event()
    doorbells = asyncio.create_task(doorbell.run())
    try:
        admitting = asyncio.create_task(admission.admit(DIGEST, wait=True))
        await asyncio.wait_for(store.reading.wait(), 1)
        claim = Deliver(ReinitEvent(workspace, owner_id=uuid.uuid4()), uuid.uuid4())
        store.states[workspace] = claim
        doorbell.on_payload(str(workspace), 1.0)  # heard now, while nobody is registered
        await asyncio.wait_for(doorbell.idle(), 1)
        store.hold.set()
        ticket = await asyncio.wait_for(admitting, 1)
        assert ticket.verdict == WAIT  # the read came before the claim
        sub = ticket.subscription
        assert sub is not None
        item = await asyncio.wait_for(sub.next(), 1)
        assert isinstance(item, Delivery)
        assert (item.event, item.build_id) == (claim.event, claim.build_id)
        doorbell.on_payload(str(workspace), 2.0)  # the same claim again: not a second frame
        await asyncio.wait_for(doorbell.idle(), 1)
        assert sub._take() is None
        ticket.release()
    finally:
        doorbells.cancel()
    assert (admission.in_use, admission.agent_slots, len(hub)) == (0, 0, 0)


async def test_an_unknown_token_is_refused_and_gives_everything_back() -> None:
    """401 for a token the database does not know; no slot or subscription is left."""
    _store, hub, _doorbell, admission = parts()
    with pytest.raises(ApiError) as refused:
        await admission.admit(DIGEST, wait=True)
    assert refused.value.status == 401
    assert (admission.in_use, admission.agent_slots, len(hub)) == (0, 0, 0)


async def test_a_database_failure_propagates_and_gives_everything_back() -> None:
    """Whatever the port raises reaches the caller (the middleware maps it); nothing leaks."""
    store, hub, _doorbell, admission = parts()
    store.add_agent(TOKEN)
    store.fail = ConnectionRefusedError("database away")
    with pytest.raises(ConnectionRefusedError):
        await admission.admit(DIGEST, wait=True)
    assert (admission.in_use, admission.agent_slots, len(hub)) == (0, 0, 0)


async def test_a_connect_cancelled_during_its_read_gives_everything_back() -> None:
    """A client that hangs up while its read is in flight leaves no slot behind."""
    store, hub, _doorbell, admission = parts()
    store.add_agent(TOKEN)
    store.hold = asyncio.Event()
    admitting = asyncio.create_task(admission.admit(DIGEST, wait=True))
    await asyncio.wait_for(store.reading.wait(), 1)
    assert admission.in_use == 1
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    assert (admission.in_use, admission.agent_slots, len(hub)) == (0, 0, 0)


async def test_a_shutdown_during_the_read_refuses_with_503() -> None:
    """A connect whose read spans the shutdown is refused (503, Retry-After), not left open."""
    store, hub, _doorbell, admission = parts()
    store.add_agent(TOKEN)
    store.hold = asyncio.Event()
    admitting = asyncio.create_task(admission.admit(DIGEST, wait=True))
    await asyncio.wait_for(store.reading.wait(), 1)
    admission.stopping = True
    store.hold.set()
    with pytest.raises(ApiError) as refused:
        await admitting
    assert (refused.value.status, refused.value.headers) == (503, {"Retry-After": "1"})
    assert (admission.in_use, admission.agent_slots, len(hub)) == (0, 0, 0)


async def test_the_per_agent_cap_holds_and_frees() -> None:
    """A third stream of one agent is a 429; releasing one lets the next in."""
    store, _hub, _doorbell, admission = parts()
    store.add_agent(TOKEN)
    tickets = [await admission.admit(DIGEST, wait=False) for _ in range(2)]
    with pytest.raises(ApiError) as refused:
        await admission.admit(DIGEST, wait=False)
    assert refused.value.status == 429
    tickets.pop().release()
    tickets.append(await admission.admit(DIGEST, wait=False))
    for ticket in tickets:
        ticket.release()
    assert admission.agent_slots == 0


def _reads(
    agents: int, *, concurrency: int = 1, slow_after: float = 0.25
) -> tuple[MemoryStore, Reads, list[bytes]]:
    """A store with `agents` agents, reads over it, and the agents' token hashes."""
    store = MemoryStore()
    tokens = [str(uuid.uuid4()) for _ in range(agents)]
    for token in tokens:
        store.add_agent(token)
    reads = Reads(store, concurrency=concurrency, slow_after=slow_after)
    return store, reads, [hashlib.sha256(t.encode()).digest() for t in tokens]


async def test_a_lone_connect_is_read_at_once_and_a_crowd_together() -> None:
    """A connect with no read in flight is read alone, at once; connects that arrive while a
    read is in flight (by default, one at a time) go to the database together, in one call."""
    store, reads, digests = _reads(12)
    store.hold = asyncio.Event()
    first = asyncio.create_task(reads.read(digests[0]))
    await asyncio.wait_for(store.reading.wait(), 1)
    assert store.calls["admit_many"] == 1  # alone, without waiting for company
    crowd = [asyncio.create_task(reads.read(d)) for d in digests[1:]]
    await asyncio.sleep(0)
    assert store.calls["admit_many"] == 1  # one read in flight; the crowd waits for it
    store.hold.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *crowd), 1)
    assert store.calls["admit_many"] == 2  # the eleven waiting ones in one round trip
    assert all(a is not None for a in answers)
    assert len({a.workspace_id for a in answers if a is not None}) == 12


async def test_more_reads_in_flight_when_asked() -> None:
    """With `concurrency=2`, a second connect is read at once beside the first."""
    store, reads, digests = _reads(4, concurrency=2)
    store.hold = asyncio.Event()
    tasks = [asyncio.create_task(reads.read(d)) for d in digests[:2]]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(reads.read(d)) for d in digests[2:]]
    await asyncio.sleep(0)
    assert store.calls["admit_many"] == 2  # both reads in flight; the other two wait
    store.hold.set()
    assert all(await asyncio.wait_for(asyncio.gather(*tasks), 1))
    assert store.calls["admit_many"] == 3


async def test_a_connect_that_leaves_its_batch_does_not_disturb_the_others() -> None:
    """A client that hangs up while its batch is read gets nothing; the rest of the batch gets
    its answers; a batch that fails fails each of its connects with the error."""
    store, reads, digests = _reads(3)
    first, second = asyncio.Event(), asyncio.Event()
    store.hold = first
    blocker = asyncio.create_task(reads.read(digests[0]))
    await asyncio.wait_for(store.reading.wait(), 1)
    leaving, staying = (asyncio.create_task(reads.read(d)) for d in digests[1:])
    await asyncio.sleep(0)
    store.hold = second  # the next read, of both, is held in its turn
    store.reading.clear()
    first.set()
    assert await asyncio.wait_for(blocker, 1) is not None
    await asyncio.wait_for(store.reading.wait(), 1)  # `leaving` and `staying` are being read
    assert store.calls["admit_many"] == 2
    leaving.cancel()
    second.set()
    assert await asyncio.wait_for(staying, 1) is not None
    assert leaving.cancelled()
    store.hold = None
    store.fail = ConnectionResetError("gone")
    failing = [asyncio.create_task(reads.read(d)) for d in digests]
    results = await asyncio.gather(*failing, return_exceptions=True)
    assert all(isinstance(r, ConnectionResetError) for r in results)


async def test_a_slow_read_holds_nobody_back() -> None:
    """A read still out after `slow_after` (a pooled connection gone silent) lets the next
    start beside it, without a new connect to ask; never more than `most` in flight."""
    store, reads, digests = _reads(4, slow_after=0.05)
    store.hold = asyncio.Event()
    stuck = asyncio.create_task(reads.read(digests[0]))
    await asyncio.wait_for(store.reading.wait(), 1)
    waiting = asyncio.create_task(reads.read(digests[1]))
    await asyncio.sleep(0)
    assert store.calls["admit_many"] == 1  # the read in flight is young: the connect waits
    await until(lambda: store.calls["admit_many"] == 2, what="a second read beside the slow one")
    store.hold.set()
    assert all(await asyncio.wait_for(asyncio.gather(stuck, waiting), 1))


async def test_never_more_than_most_reads_in_flight() -> None:
    """However slow the reads in flight (here: every read counts as slow at once), at most
    `most` are out; the next connect waits for one of them."""
    store, reads, digests = _reads(3, slow_after=0.0)
    store.hold = asyncio.Event()
    tasks = [asyncio.create_task(reads.read(d)) for d in digests]
    for _ in range(3):
        await asyncio.sleep(0)
    assert store.calls["admit_many"] == 2
    store.hold.set()
    assert all(await asyncio.wait_for(asyncio.gather(*tasks), 1))
    assert store.calls["admit_many"] == 3


async def test_a_connect_that_hangs_up_before_its_read_starts_is_not_read() -> None:
    """Connects waiting for a read and gone before it starts (a storm that hangs up) cost the
    database nothing: the next read leaves them out, and with nobody left there is none."""
    store, reads, digests = _reads(3, concurrency=1)
    store.hold = asyncio.Event()
    blocker = asyncio.create_task(reads.read(digests[0]))
    await asyncio.wait_for(store.reading.wait(), 1)
    gone = [asyncio.create_task(reads.read(d)) for d in digests[1:]]
    await asyncio.sleep(0)  # both wait for the read in flight
    for task in gone:
        task.cancel()
    store.hold.set()
    assert await asyncio.wait_for(blocker, 1) is not None
    await asyncio.gather(*gone, return_exceptions=True)
    assert store.calls["admit_many"] == 1
    assert reads._waiting == []
