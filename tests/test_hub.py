"""The hub and the durable-check rules, in memory."""

from __future__ import annotations

import asyncio
import uuid

from reinitd.claim import CLAIM_FAILED_MESSAGE, NOT_WAITING_MESSAGE, Deliver, Refuse, judge
from reinitd.event import PREBUILDS_USER_ID, ReinitEvent
from reinitd.hub import PING, End, Hub

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
    }
    return base | fields


def test_judge_rules() -> None:
    """SPEC §2's wait=true table, rule by rule."""
    assert judge(row(owner_id=PREBUILDS_USER_ID), "seeded") == judge(
        row(latest_status="running"), "seeded"
    )
    assert judge(row(first_initiator_id=OWNER), "seeded") == Refuse(
        NOT_WAITING_MESSAGE, "The workspace was not created as a prebuild."
    )
    past = judge(row(latest_stage="regular"), "seeded")
    assert isinstance(past, Refuse)
    assert past.message == NOT_WAITING_MESSAGE
    assert judge(row(latest_status="failed", latest_error="e"), "seeded") == Refuse(
        CLAIM_FAILED_MESSAGE, "e"
    )
    assert judge(row(), "seeded") == Deliver(ReinitEvent(WS, owner_id=OWNER))
    assert isinstance(judge(None, "seeded"), Refuse)


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


async def test_publish_dedupes_and_reaches_only_that_workspace() -> None:
    """Duplicate claims collapse; other workspaces hear nothing."""
    hub = Hub()
    other = uuid.uuid4()
    with hub.subscribe(WS, wait=False) as mine, hub.subscribe(other, wait=False) as theirs:
        event = ReinitEvent(WS, owner_id=OWNER)
        assert hub.publish(event) == 1
        for _ in range(1000):
            assert hub.publish(event) == 0  # a flood of duplicates does not grow anything
        assert await mine.next() == event
        assert set(hub.snapshot()) == {mine, theirs}
        for sub in hub.snapshot():
            sub.ping()
        assert await mine.next() is PING
        assert await theirs.next() is PING


async def test_overflow_ends_the_stream() -> None:
    """More distinct pending events than the bound: the stream ends, defined and counted."""
    hub = Hub(queue_limit=2)
    with hub.subscribe(WS, wait=True) as sub:
        for _ in range(3):
            hub.publish(ReinitEvent(WS, owner_id=uuid.uuid4()))
        assert isinstance(await sub.next(), ReinitEvent)
        assert isinstance(await sub.next(), ReinitEvent)
        assert await sub.next() == End("overflow")


async def test_settle_never_preseeds_legacy_streams() -> None:
    """A resync's verdict reaches wait=true streams only."""
    hub = Hub()
    with hub.subscribe(WS, wait=True) as waiting, hub.subscribe(WS, wait=False) as legacy:
        event = ReinitEvent(WS, owner_id=OWNER)
        assert hub.settle(WS, Deliver(event)) == 1
        assert await waiting.next() == event
        hub.settle(WS, Refuse("m", "d"))
        assert await waiting.next() == End("refused", Refuse("m", "d"))
        legacy.ping()
        assert await legacy.next() is PING


async def test_next_waits_until_woken() -> None:
    """A waiting subscriber is woken by an offer, not by polling."""
    hub = Hub()
    with hub.subscribe(WS, wait=True) as sub:
        task = asyncio.create_task(sub.next())
        await asyncio.sleep(0)
        assert not task.done()
        hub.end_all("shutdown")
        assert await asyncio.wait_for(task, 1) == End("shutdown")
