"""Fan-out of claims to the subscriptions waiting on each workspace."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from reinitd.server import metrics
from reinitd.server.claim import Deliver, Refuse, Verdict
from reinitd.wire import ReinitEvent

log = structlog.get_logger("reinitd.server.hub")


class Ping:
    """Time for a keep-alive frame."""


PING: Final = Ping()


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claim for one stream, with how it was found (seeded, notify, resync) and when the
    listener received the NOTIFY behind it (0 when none did)."""

    event: ReinitEvent
    source: str
    received_at: float = 0.0
    build_id: uuid.UUID | None = None  # the claim build (for the receipt)


@dataclass(frozen=True, slots=True)
class End:
    """The stream must end: `why` is shutdown, overflow or refused (then with a `refusal`, and
    how it was found: notify or resync)."""

    why: str
    refusal: Refuse | None = None
    source: str = ""


Item = Delivery | Ping | End


class Sink(Protocol):
    """Where an attached subscription's items go at once (an SSE stream's connection)."""

    def deliver(self, delivery: Delivery) -> None: ...
    def ping(self) -> None: ...
    def end(self, end: End) -> None: ...


class Subscription:
    """One request's mailbox: distinct claims, pings and an end, for one workspace.

    Producers never block and never await a client: `offer`, `ping` and `end` are synchronous.
    Until a sink is attached (a long-poll never has one; an SSE stream gets its own once its
    headers are out) items are kept, claims up to the hub's bound, for `next()`; once attached,
    the kept items and every later one go straight to the sink. Each distinct claim passes at
    most once, so the durable check, a doorbell and a resync may all see it and the agent
    still gets one frame.
    """

    # Tens of thousands are alive at once: slots, and containers only once needed.
    __slots__ = (
        "_end",
        "_events",
        "_hub",
        "_ping",
        "_seen",
        "_sink",
        "_waiter",
        "delivered",
        "ended_by",
        "wait",
        "workspace_id",
    )

    def __init__(self, hub: Hub, workspace_id: uuid.UUID, *, wait: bool) -> None:
        self._hub = hub
        self.workspace_id = workspace_id
        self.wait = wait
        self._events: list[Delivery] | None = None
        self._seen: set[tuple[uuid.UUID, str, uuid.UUID | None]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._ping = False
        self._end: End | None = None
        # Kept by whoever serves the request, for its `stream_ended` line.
        self.delivered = 0
        self.ended_by = "client_gone"

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._hub.remove(self)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def offer(self, delivery: Delivery) -> bool:
        """Pass a claim on unless already seen; on overflow the stream ends. True if taken."""
        key = delivery.event.key
        if self._end is not None or (self._seen is not None and key in self._seen):
            return False
        if self._seen is None:
            self._seen = set()
        if self._sink is not None:
            self._seen.add(key)
            self._sink.deliver(delivery)
            return True
        if self._events is None:
            self._events = []
        if len(self._events) >= self._hub.queue_limit:
            metrics.QUEUE_OVERFLOWS.inc()
            log.warning(
                "subscriber_overflow",
                workspace_id=str(self.workspace_id),
                queued=len(self._events),
            )
            self.end(End("overflow"))
            return False
        self._seen.add(key)
        self._events.append(delivery)
        self._wake()
        return True

    def ping(self) -> None:
        if self._sink is not None:
            if self._end is None:
                self._sink.ping()
            return
        self._ping = True
        self._wake()

    def end(self, end: End) -> None:
        if self._end is None:
            self._end = end
            if self._sink is not None:
                self._sink.end(end)
            self._wake()

    def refuse(self, refusal: Refuse, source: str) -> bool:
        """End a stream that can no longer wait, with the refusal as its error frame; a stream
        that already has its claim keeps it (a later build is no news). True if it ends."""
        if self._seen or self._end is not None:
            return False
        self.end(End("refused", refusal, source))
        return True

    def attach(self, sink: Sink) -> None:
        """From now on items go to `sink`: what was kept first, in order, then the end."""
        self._sink = sink
        for delivery in self._events or ():
            sink.deliver(delivery)
        self._events = None
        if self._end is not None:
            sink.end(self._end)

    def detach(self) -> None:
        """Forget the sink (its stream is gone)."""
        self._sink = None

    def _take(self) -> Item | None:
        if self._events:
            return self._events.pop(0)
        if self._end is not None:
            return self._end
        if self._ping:
            self._ping = False
            return PING
        return None

    async def next(self) -> Item:
        """The next item, for a handler without a sink: claims first, then the end, then a
        ping."""
        while (item := self._take()) is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return item


class Hub:
    """Subscriptions by workspace id; delivery to a workspace costs O(its own waiters).

    A workspace has few waiters (usually one agent), so each holds a short list.
    """

    def __init__(self, *, queue_limit: int = 16) -> None:
        self.queue_limit = queue_limit
        self._subs: dict[uuid.UUID, list[Subscription]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, workspace_id: object) -> bool:
        """Whether any stream here waits on `workspace_id`."""
        return workspace_id in self._subs

    def subscribe(self, workspace_id: uuid.UUID, *, wait: bool) -> Subscription:
        """Register a subscription now; `remove` it when its request ends (or use it as a
        context manager, which does)."""
        sub = Subscription(self, workspace_id, wait=wait)
        subs = self._subs.get(workspace_id)
        if subs is None:
            self._subs[workspace_id] = [sub]
        else:
            subs.append(sub)
        self._count += 1
        return sub

    def remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.workspace_id)
        if subs is None or sub not in subs:
            return
        subs.remove(sub)
        if not subs:
            del self._subs[sub.workspace_id]
        self._count -= 1

    def has_waiters(self, workspace_id: uuid.UUID) -> bool:
        return any(sub.wait for sub in self._subs.get(workspace_id, ()))

    def waiting_workspaces(self) -> list[uuid.UUID]:
        """Workspaces with at least one `wait=true` stream: what a resync must re-read."""
        return [ws for ws, subs in self._subs.items() if any(s.wait for s in subs)]

    def apply(
        self, workspace_id: uuid.UUID, verdict: Verdict, source: str, received_at: float = 0.0
    ) -> int:
        """Apply what the database says about a workspace to its streams; returns how many it
        changed. A claim reaches every `wait=true` stream, and streams without `wait` only when
        a NOTIFY rang for it (older agents are never pre-seeded: they would loop). A refusal
        ends the `wait=true` streams with an error frame: they cannot wait any more."""
        applied = 0
        # A copy: a sink that fails to write may end its stream, and leave, during the loop.
        for sub in tuple(self._subs.get(workspace_id, ())):
            if isinstance(verdict, Deliver):
                if sub.wait or source == "notify":
                    delivery = Delivery(verdict.event, source, received_at, verdict.build_id)
                    applied += sub.offer(delivery)
            elif isinstance(verdict, Refuse) and sub.wait:
                applied += sub.refuse(verdict, source)
        return applied

    def snapshot(self) -> list[Subscription]:
        """Every open subscription, now."""
        return [sub for subs in self._subs.values() for sub in subs]

    def end_all(self, why: str) -> None:
        for sub in self.snapshot():
            sub.end(End(why))
