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


class Readiness:
    """`check()` returns the list of problems (empty: ready), cached for `cache_for` seconds
    so that frequent polling costs one round trip a second; concurrent callers share it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        listener: Listener,
        *,
        timeout: float = 1.0,
        cache_for: float = 1.0,
    ) -> None:
        self._pool = pool
        self._listener = listener
        self.timeout = timeout
        self.cache_for = cache_for
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._cached: tuple[float, list[str]] | None = None
        self._inflight: asyncio.Task[list[str]] | None = None

    def echo(self, payload: str) -> None:
        """The listener's callback for PROBE_CHANNEL; other replicas' tokens are ignored."""
        future = self._pending.pop(payload, None)
        if future is not None and not future.done():
            future.set_result(None)

    async def check(self) -> list[str]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.cache_for:
            return self._cached[1]
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._probe())
        try:
            problems = await asyncio.shield(self._inflight)
        finally:
            if self._inflight is not None and self._inflight.done():
                self._inflight = None
        self._cached = (time.monotonic(), problems)
        return problems

    async def _probe(self) -> list[str]:
        if not self._listener.connected:
            return ["listener is not connected"]
        token = uuid.uuid4().hex
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
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
            self._pending.pop(token, None)
