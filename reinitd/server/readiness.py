"""Readiness that proves the whole path: a NOTIFY of our own must echo through the listener."""

from __future__ import annotations

import asyncio
import time

from reinitd.errors import EchoFailed
from reinitd.server.listener import Listener


class Readiness:
    """`check()` returns the list of problems (empty: ready), cached for `cache_for` seconds
    so that frequent polling costs one round trip a second; concurrent callers share it."""

    def __init__(self, listener: Listener, *, timeout: float = 1.0, cache_for: float = 1.0) -> None:
        self._listener = listener
        self.stopping = False  # set once, by the app's shutdown
        self.timeout = timeout
        self.cache_for = cache_for
        self._cached: tuple[float, list[str]] | None = None
        self._inflight: asyncio.Task[list[str]] | None = None

    async def check(self) -> list[str]:
        if self.stopping:
            return ["server is stopping"]
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
        try:
            await self._listener.echo(self.timeout)
        except EchoFailed as exc:
            return [str(exc)]
        return []
