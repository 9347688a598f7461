"""Readiness that proves the whole path: a NOTIFY of our own must echo through the listener."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Final

import asyncpg

from reinitd.listener import Listener
from reinitd.query import QUERIES

PROBE_CHANNEL: Final = "reinitd_probe"


class Echoes:
    """Our own probe NOTIFYs coming back through the listener, by token; the router's
    handler for PROBE_CHANNEL. Other replicas' tokens find no waiter and are ignored."""

    def __init__(self) -> None:
        self._pending: dict[str, asyncio.Future[None]] = {}

    def expect(self, token: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        return future

    def forget(self, token: str) -> None:
        self._pending.pop(token, None)

    def on_payload(self, payload: str, _received_at: float) -> None:
        future = self._pending.pop(payload, None)
        if future is not None and not future.done():
            future.set_result(None)


class Readiness:
    """`check()` returns the list of problems (empty: ready), cached for `cache_for` seconds
    so that frequent polling costs one round trip a second; concurrent callers share it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        listener: Listener,
        echoes: Echoes,
        *,
        timeout: float = 1.0,
        cache_for: float = 1.0,
    ) -> None:
        self._pool = pool
        self._listener = listener
        self._echoes = echoes
        self.timeout = timeout
        self.cache_for = cache_for
        self._cached: tuple[float, list[str]] | None = None
        self._inflight: asyncio.Task[list[str]] | None = None

    async def check(self) -> list[str]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.cache_for:
            return self._cached[1]
        if self._inflight is None:
            self._inflight = asyncio.create_task(self.probe())
        try:
            problems = await asyncio.shield(self._inflight)
        finally:
            if self._inflight is not None and self._inflight.done():
                self._inflight = None
        self._cached = (time.monotonic(), problems)
        return problems

    async def probe(self) -> list[str]:
        """One uncached round trip: NOTIFY a fresh token and wait for its echo. Once it is back,
        every NOTIFY committed before the call has reached the listener too (commit order)."""
        if not self._listener.connected:
            return ["listener is not connected"]
        token = uuid.uuid4().hex
        future = self._echoes.expect(token)
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    await self._pool.execute(QUERIES["probe_notify"], token)
            except Exception as exc:  # any failure means not ready
                return [f"database does not answer: {type(exc).__name__}"]
            try:
                async with asyncio.timeout(self.timeout):
                    await future
            except TimeoutError:
                return [f"own NOTIFY did not come back through the listener in {self.timeout:g} s"]
            return []
        finally:
            self._echoes.forget(token)
