"""Admission: what an open stream holds, taken as one unit and always given back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import structlog

from reinitd.errors import ApiError
from reinitd.log import info_enabled
from reinitd.server import metrics
from reinitd.server.claim import WAIT, Verdict
from reinitd.server.doorbell import Doorbell
from reinitd.server.hub import Delivery, End, Hub, Subscription
from reinitd.server.presence import Presence
from reinitd.server.store import Admitted, Store

log = structlog.get_logger("reinitd.server.admission")

_OPEN_STREAMS = {
    True: metrics.OPEN_STREAMS.labels("true"),
    False: metrics.OPEN_STREAMS.labels("false"),
}
_DELIVERED_BY_PATH = {
    path: metrics.EVENTS_DELIVERED.labels(path) for path in ("notify", "seeded", "resync")
}


class Ticket:
    """An admitted request: its process slot, then its agent slot and subscription, and the
    durable check's verdict. `release()` gives everything back, once; after `hand_over`, only
    the new holder (the stream that took over the connection) may release it."""

    __slots__ = (
        "_admission",
        "_holder",
        "_released",
        "agent_id",
        "mode",
        "opened_at",
        "request_id",
        "seq",
        "subscription",
        "verdict",
    )

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._holder: object | None = None
        self._released = False
        self.opened_at = 0.0  # when it began to wait (monotonic); 0: it never did
        self.seq = 0  # its number in this replica's presence; 0: not reported
        self.agent_id: uuid.UUID | None = None
        self.subscription: Subscription | None = None
        self.verdict: Verdict = WAIT
        self.mode = ""
        self.request_id = ""

    def open(self, mode: str, request_id: str) -> None:
        """The request now waits as a stream (`sse`) or a long-poll (`json`)."""
        assert self.subscription is not None
        self.mode, self.request_id, self.opened_at = mode, request_id, time.monotonic()
        _OPEN_STREAMS[self.subscription.wait].inc()
        if (presence := self._admission.presence) is not None:
            self.seq = presence.join(self)
        if info_enabled():
            log.info("agent_waiting", wait=self.subscription.wait, mode=mode)

    def delivered(self, delivery: Delivery) -> None:
        """A claim was written to this request's agent (a stream frame, a long-poll's answer):
        counted, logged and receipted."""
        sub = self.subscription
        assert sub is not None
        sub.delivered += 1
        if info_enabled():  # a burst delivers thousands at once: no fields gathered for nothing
            log.info(
                "reinit_delivered",
                path=delivery.source,
                owner_id=str(delivery.event.owner_id),
                workspace_id=str(delivery.event.workspace_id),
                request_id=self.request_id,
            )
        _DELIVERED_BY_PATH[delivery.source].inc()
        if delivery.received_at:
            metrics.NOTIFY_TO_WRITE_SECONDS.observe(time.monotonic() - delivery.received_at)
        if (presence := self._admission.presence) is not None:
            presence.receipt(self, delivery.build_id, "event", delivery.source)

    def refused(self, end: End) -> None:
        """An error frame (or a long-poll's 409) told this request's agent to stop waiting."""
        presence = self._admission.presence
        if presence is not None and end.refusal is not None:
            presence.receipt(self, end.refusal.build_id, "error", end.source or "notify")

    def hand_over(self, holder: object) -> None:
        self._holder = holder

    def release(self, by: object | None = None) -> None:
        if self._released or by is not self._holder:
            return
        self._released = True
        self._holder = None  # no cycle left behind: a closed stream dies by reference count
        sub = self.subscription
        if sub is not None:
            sub.detach()
            self._admission._hub.remove(sub)
            if self.opened_at:
                _OPEN_STREAMS[sub.wait].dec()
                if self.seq and (presence := self._admission.presence) is not None:
                    presence.leave(self.seq)
                if info_enabled():
                    log.info(
                        "stream_ended",
                        reason=sub.ended_by,
                        events=sub.delivered,
                        duration_s=round(time.monotonic() - self.opened_at, 3),
                        mode=self.mode,
                        workspace_id=str(sub.workspace_id),
                        request_id=self.request_id,
                    )
        if self.agent_id is not None:
            self._admission._release_agent_slot(self.agent_id)
        self._admission._release_process_slot()


class Reads:
    """Connect reads that arrive together go to the database together.

    A connect's read starts at once when no read is in flight (a lone connect never waits for
    company); otherwise it waits for the next one to start, with every read asked for
    meanwhile, up to `limit` a read. A storm of thousands of connects within milliseconds thus
    costs a few hundred round trips, not thousands. One read in flight (`concurrency`), not two:
    in a storm each read then carries about twice the connects, and the server's CPU per
    connect fell by a fifth (the benchmark's storm, same run). But a read still out after
    `slow_after` seconds (a pooled connection gone silent, a lock) holds nobody back: the next
    one starts beside it, up to `most` in flight. A read runs in a task of its own: a client
    that hangs up abandons its answer, never a query half sent."""

    def __init__(
        self,
        store: Store,
        *,
        concurrency: int = 1,
        most: int = 2,
        slow_after: float = 0.25,
        limit: int = 1000,
    ) -> None:
        self.store = store
        self.concurrency = concurrency
        self.most = max(most, concurrency)
        self.slow_after = slow_after
        self.limit = limit
        self._waiting: list[tuple[bytes, asyncio.Future[Admitted | None]]] = []
        # Reads in flight: when each started, and its call to look again once it is slow.
        self._reading: dict[asyncio.Task[None], tuple[float, asyncio.TimerHandle]] = {}

    async def read(self, token_hash: bytes) -> Admitted | None:
        answer: asyncio.Future[Admitted | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((token_hash, answer))
        self._start()
        return await answer

    def _may_start(self) -> bool:
        if len(self._reading) >= self.most:
            return False
        if len(self._reading) < self.concurrency:
            return True
        since = time.monotonic() - self.slow_after
        return sum(started > since for started, _ in self._reading.values()) < self.concurrency

    def _start(self) -> None:
        if not self._may_start():
            return  # a read in flight starts the next when it ends, or once it is slow
        # A client that hung up while it waited for a read has nothing left to read for (left
        # out when a read starts: filtering at every connect cost a storm its square).
        self._waiting = [item for item in self._waiting if not item[1].done()]
        loop = asyncio.get_running_loop()
        while self._waiting and self._may_start():
            batch, self._waiting = self._waiting[: self.limit], self._waiting[self.limit :]
            task = loop.create_task(self._read(batch), name="reinitd-connect-read")
            self._reading[task] = (time.monotonic(), loop.call_later(self.slow_after, self._start))
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        _, slow = self._reading.pop(task)
        slow.cancel()
        self._start()

    async def _read(self, batch: list[tuple[bytes, asyncio.Future[Admitted | None]]]) -> None:
        metrics.CONNECT_READ_BATCH.observe(len(batch))
        try:
            found = await self.store.admit_many([token_hash for token_hash, _ in batch])
        except asyncio.CancelledError:
            for _, answer in batch:
                answer.cancel()
            raise
        except Exception as exc:
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(exc)
            return
        for (_, answer), admitted in zip(batch, found, strict=True):
            if not answer.done():  # its client hung up meanwhile
                answer.set_result(admitted)


class Admission:
    """A process slot, an agent slot and a subscription, then the durable check.

    Every cap is checked and reserved in the same step, before anything awaits, so the caps
    hold exactly under concurrent bursts; everything taken is given back when the request
    ends, whichever way it ends (a refusal, the stream's end, the client hanging up at any
    await). `in_use` and `agent_slots` are exported as gauges: at rest they equal the open
    streams, so a leak would show.
    """

    def __init__(
        self,
        store: Store,
        hub: Hub,
        doorbell: Doorbell,
        *,
        max_streams: int,
        max_streams_per_agent: int,
        presence: Presence | None = None,
    ) -> None:
        self.reads = Reads(store)
        self._hub = hub
        self._doorbell = doorbell
        self.presence = presence
        self.max_streams = max_streams
        self.max_streams_per_agent = max_streams_per_agent
        self.in_use = 0
        self.stopping = False  # the server is shutting down: no new stream
        self._per_agent: Counter[uuid.UUID] = Counter()

    @property
    def agent_slots(self) -> int:
        return self._per_agent.total()

    def _refuse_if_stopping(self) -> None:
        if self.stopping:
            raise ApiError(
                503,
                "Service unavailable.",
                "This server is shutting down; retry (another replica, or this one restarted).",
                reason="shutting_down",
                headers={"Retry-After": "1"},
            )

    def _take_process_slot(self) -> None:
        self._refuse_if_stopping()
        if self.in_use >= self.max_streams:  # before any database work
            raise ApiError(
                503,
                "Too many open streams.",
                f"This server holds its maximum of {self.max_streams} streams; retry shortly "
                "or elsewhere.",
                reason="server_full",
                headers={"Retry-After": "5"},
            )
        self.in_use += 1
        metrics.SLOTS_IN_USE.inc()

    def _release_process_slot(self) -> None:
        self.in_use -= 1
        metrics.SLOTS_IN_USE.dec()

    def _take_agent_slot(self, agent_id: uuid.UUID) -> None:
        if self._per_agent[agent_id] >= self.max_streams_per_agent:
            raise ApiError(
                429,
                "Too many streams for this agent.",
                f"An agent may hold at most {self.max_streams_per_agent} streams at once; "
                "close one first.",
                reason="agent_stream_limit",
            )
        self._per_agent[agent_id] += 1

    def _release_agent_slot(self, agent_id: uuid.UUID) -> None:
        self._per_agent[agent_id] -= 1
        if not self._per_agent[agent_id]:
            del self._per_agent[agent_id]

    async def admit(self, token_hash: bytes, *, wait: bool) -> Ticket:
        """Take a process slot, resolve the token and (with `wait`) read the workspace's builds
        in the same round trip, take an agent slot and register the subscription, then catch
        up with the doorbells heard since the read began: a claim committed at any instant is
        seen by the read, by the subscription, or by both (a stream delivers a claim once).
        The caller must `release` the ticket; whatever fails here gives back what it took."""
        self._take_process_slot()
        ticket = Ticket(self)
        try:
            mark = self._doorbell.mark()
            started = time.perf_counter()
            admitted = await self.reads.read(token_hash)
            if admitted is None:
                raise ApiError(
                    401, "Unauthorized.", "The agent token is not known.", reason="unknown_token"
                )
            metrics.DURABLE_CHECK_SECONDS.observe(time.perf_counter() - started)
            workspace_id = admitted.workspace_id
            structlog.contextvars.bind_contextvars(workspace_id=str(workspace_id))
            self._refuse_if_stopping()  # the shutdown ended every stream during the read
            self._take_agent_slot(admitted.agent_id)
            ticket.agent_id = admitted.agent_id
            ticket.subscription = self._hub.subscribe(workspace_id, wait=wait)
            if wait:  # without wait: no checks, nothing pre-seeded
                ticket.verdict = admitted.verdict
                self._doorbell.catch_up(mark, workspace_id)
        except BaseException:
            ticket.release()
            raise
        return ticket
