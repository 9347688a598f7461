"""The hub and the durable-check rules, in memory."""

from __future__ import annotations

import asyncio
import uuid

from reinitd.server.claim import (
    CLAIM_FAILED_MESSAGE,
    NOT_WAITING_MESSAGE,
    PREBUILDS_USER_ID,
    WAIT,
    Deliver,
    Refuse,
    judge,
)
from reinitd.server.hub import PING, Delivery, End, Hub
from reinitd.wire import ReinitEvent

WS = uuid.uuid4()
OWNER = uuid.uuid4()


def row(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "workspace_id": WS,
        "owner_id": OWNER,
        "first_initiator_id": PREBUILDS_USER_ID,
        "latest_stage": "claim",
        "latest_status": "succeeded",
        "latest_error": None,
        "latest_build_id": None,
    }
    return base | fields


def test_judge_rules() -> None:
    """The wait=true table, rule by rule, each against the verdict it must give."""
    assert judge(row(owner_id=PREBUILDS_USER_ID, latest_stage="prebuild")) == WAIT
    assert judge(row(latest_status="running")) == WAIT
    assert judge(row(first_initiator_id=OWNER)) == Refuse(
        NOT_WAITING_MESSAGE, "The workspace was not created as a prebuild."
    )
    assert judge(row(latest_stage="regular")) == Refuse(
        NOT_WAITING_MESSAGE,
        "The workspace was claimed in the past; its latest build is a 'regular' build.",
    )
    assert judge(row(latest_status="failed", latest_error="e")) == Refuse(CLAIM_FAILED_MESSAGE, "e")
    assert judge(row()) == Deliver(ReinitEvent(WS, owner_id=OWNER))
    assert judge(None) == Refuse(NOT_WAITING_MESSAGE, "The workspace no longer exists.")


async def test_subscription_removed_on_every_exit() -> None:
    """Leaving the block, normally or by exception, unregisters the subscription."""
    hub = Hub()
    with hub.subscribe(WS, wait=True):
        assert len(hub) == 1
    try:
        with hub.subscribe(WS, wait=True):
            raise RuntimeError
    except RuntimeError:
        pass
    assert len(hub) == 0
    assert hub.waiting_workspaces() == []


CLAIM = Deliver(ReinitEvent(WS, owner_id=OWNER))


async def test_apply_dedupes_and_reaches_only_that_workspace() -> None:
    """The same claim applied many times is queued once; other workspaces hear nothing."""
    hub = Hub()
    other = uuid.uuid4()
    with hub.subscribe(WS, wait=True) as mine, hub.subscribe(other, wait=True) as theirs:
        assert hub.apply(WS, CLAIM, "notify", 1.0) == 1
        for _ in range(1000):
            assert hub.apply(WS, CLAIM, "notify") == 0  # duplicates grow nothing
        assert await mine.next() == Delivery(CLAIM.event, "notify", 1.0)
        assert set(hub.snapshot()) == {mine, theirs}
        for sub in hub.snapshot():
            sub.ping()
        assert await mine.next() is PING
        assert await theirs.next() is PING


async def test_overflow_ends_the_stream() -> None:
    """More distinct pending claims than the bound: the stream ends, defined and counted."""
    hub = Hub(queue_limit=2)
    with hub.subscribe(WS, wait=True) as sub:
        claims = [Deliver(ReinitEvent(WS, owner_id=uuid.uuid4())) for _ in range(3)]
        assert [hub.apply(WS, claim, "notify") for claim in claims] == [1, 1, 0]
        assert await sub.next() == Delivery(claims[0].event, "notify")
        assert await sub.next() == Delivery(claims[1].event, "notify")
        assert await sub.next() == End("overflow")


async def test_streams_without_wait_hear_claims_only_from_a_doorbell() -> None:
    """A resync's claim reaches wait=true streams only (older agents are never pre-seeded);
    a doorbell's claim reaches both; a refusal ends only wait=true streams."""
    hub = Hub()
    with hub.subscribe(WS, wait=True) as waiting, hub.subscribe(WS, wait=False) as legacy:
        assert hub.apply(WS, CLAIM, "resync") == 1
        assert await waiting.next() == Delivery(CLAIM.event, "resync")
        assert hub.apply(WS, CLAIM, "notify") == 1  # only legacy had not seen it
        assert await legacy.next() == Delivery(CLAIM.event, "notify")
        hub.apply(WS, Refuse("m", "d"), "notify")
        legacy.ping()
        assert await legacy.next() is PING


async def test_refusal_ends_a_waiting_stream_without_a_claim() -> None:
    """A refusal ends a wait=true stream that has no claim yet, but not one that has its claim
    (a later build is no news to an agent that was told)."""
    hub = Hub()
    with hub.subscribe(WS, wait=True) as told, hub.subscribe(WS, wait=True) as untold:
        told.offer(Delivery(CLAIM.event, "seeded"))
        assert hub.apply(WS, Refuse("m", "d"), "resync") == 1
        assert await untold.next() == End("refused", Refuse("m", "d"), "resync")
        assert await told.next() == Delivery(CLAIM.event, "seeded")
        told.ping()
        assert await told.next() is PING


async def test_next_waits_until_woken() -> None:
    """A waiting subscriber is woken by an offer, not by polling."""
    hub = Hub()
    with hub.subscribe(WS, wait=True) as sub:
        task = asyncio.create_task(sub.next())
        await asyncio.sleep(0)
        assert not task.done()
        hub.end_all("shutdown")
        assert await asyncio.wait_for(task, 1) == End("shutdown")
