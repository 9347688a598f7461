"""Admission: what an open stream holds, taken as one unit and always given back."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import asyncpg
import structlog

from reinitd.errors import ApiError
from reinitd.server import metrics
from reinitd.server.claim import WAIT, Verdict, read_verdicts
from reinitd.server.database import uncancelled
from reinitd.server.hub import Hub, Subscription
from reinitd.server.query import QUERIES


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request: its agent, its subscription, and the durable check's verdict."""

    agent_id: uuid.UUID
    subscription: Subscription
    verdict: Verdict


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
        pool: asyncpg.Pool,
        hub: Hub,
        *,
        max_streams: int,
        max_streams_per_agent: int,
    ) -> None:
        self._pool = pool
        self._hub = hub
        self.max_streams = max_streams
        self.max_streams_per_agent = max_streams_per_agent
        self.in_use = 0
        self._per_agent: Counter[uuid.UUID] = Counter()
        # Test seam: awaited after the subscription is registered and before the build read.
        self.before_read: Callable[[uuid.UUID], Awaitable[None]] | None = None

    @property
    def agent_slots(self) -> int:
        return self._per_agent.total()

    @contextlib.contextmanager
    def _process_slot(self) -> Iterator[None]:
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
        try:
            yield
        finally:
            self.in_use -= 1
            metrics.SLOTS_IN_USE.dec()

    @contextlib.contextmanager
    def _agent_slot(self, agent_id: uuid.UUID) -> Iterator[None]:
        if self._per_agent[agent_id] >= self.max_streams_per_agent:
            raise ApiError(
                429,
                "Too many streams for this agent.",
                f"An agent may hold at most {self.max_streams_per_agent} streams at once; "
                "close one first.",
                reason="agent_stream_limit",
            )
        self._per_agent[agent_id] += 1
        try:
            yield
        finally:
            self._per_agent[agent_id] -= 1
            if not self._per_agent[agent_id]:
                del self._per_agent[agent_id]

    @contextlib.asynccontextmanager
    async def admit(self, token_hash: bytes, *, wait: bool) -> AsyncIterator[Ticket]:
        """Resolve the token, take the slots, register the subscription, then read the
        builds (`wait` only): a claim committed at any instant is seen by the read, by the
        subscription, or by both (a stream delivers a claim once)."""
        with self._process_slot(), contextlib.ExitStack() as held:
            async with self._pool.acquire() as conn:
                agent = await uncancelled(conn.fetchrow(QUERIES["agent_by_token_hash"], token_hash))
                if agent is None:
                    raise ApiError(
                        401,
                        "Unauthorized.",
                        "The agent token is not known.",
                        reason="unknown_token",
                    )
                agent_id: uuid.UUID = agent["agent_id"]
                workspace_id: uuid.UUID = agent["workspace_id"]
                structlog.contextvars.bind_contextvars(workspace_id=str(workspace_id))
                held.enter_context(self._agent_slot(agent_id))
                sub = held.enter_context(self._hub.subscribe(workspace_id, wait=wait))
                verdict: Verdict = WAIT  # without wait: no checks, nothing pre-seeded
                if wait:
                    if self.before_read is not None:
                        await self.before_read(workspace_id)
                    started = time.perf_counter()
                    verdicts = await uncancelled(read_verdicts(conn, [workspace_id]))
                    verdict = verdicts[workspace_id]
                    metrics.DURABLE_CHECK_SECONDS.observe(time.perf_counter() - started)
            # The pooled connection is back before the (long) stream begins.
            yield Ticket(agent_id, sub, verdict)
