"""The dedicated LISTEN connection: connect, listen, probe while idle, reconnect with backoff."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

import asyncpg
import structlog

from reinitd import metrics
from reinitd.query import QUERIES
from reinitd.router import Router

log = structlog.get_logger("reinitd.listener")

# Failures a dead or unreachable database shows up as.
CONNECTION_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

# After this many failed attempts in a row, reconnect failures log as errors, not warnings.
WARN_ATTEMPTS = 5


def backoff_delay(attempt: int, floor: float, ceiling: float) -> float:
    """Capped exponential backoff with jitter: attempt 1 waits about `floor`."""
    delay: float = min(ceiling, floor * 2 ** (attempt - 1))
    return delay * random.uniform(0.5, 1.0)  # noqa: S311 -- jitter, not cryptography


class Listener:
    """Holds one asyncpg connection LISTENing on `channels`; never a pooled connection, since
    releasing one to a pool runs UNLISTEN *.

    Each NOTIFY goes to the router, synchronously (its handlers only hand off);
    `on_connect()` runs after every (re)connect once LISTEN is active, so a re-read it triggers
    cannot miss a claim committed while the connection was down.
    """

    def __init__(
        self,
        dsn: str,
        router: Router,
        on_connect: Callable[[], None],
        *,
        probe_interval: float = 2.0,
        probe_timeout: float = 2.0,
        backoff_floor: float = 0.1,
        backoff_ceiling: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._router = router
        self._on_connect = on_connect
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.backoff_floor = backoff_floor
        self.backoff_ceiling = backoff_ceiling
        self.connected = False
        self.connection: asyncpg.Connection | None = None
        self._connected_event = asyncio.Event()

    async def wait_connected(self) -> None:
        await self._connected_event.wait()

    def _callback(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        try:
            self._router(channel, str(payload), time.monotonic())
        except Exception:
            # A bug in dispatch must never take the listener down with it.
            log.exception("notify_dispatch_failed", channel=channel)

    async def run(self) -> None:
        """Run until cancelled; every loss is followed by a reconnect."""
        attempt = 0
        down_since: float | None = None
        while True:
            try:
                conn: asyncpg.Connection = await asyncpg.connect(
                    self._dsn,
                    timeout=max(self.probe_timeout, 5.0),
                    server_settings={"application_name": "reinitd-listener"},
                )
            except CONNECTION_ERRORS as exc:
                attempt += 1
                delay = backoff_delay(attempt, self.backoff_floor, self.backoff_ceiling)
                level = log.warning if attempt < WARN_ATTEMPTS else log.error
                level(
                    "listener_connect_failed",
                    attempt=attempt,
                    error=str(exc) or type(exc).__name__,
                    retry_in_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            reconnect_attempt, was_down_since = attempt, down_since
            attempt, down_since = 0, None
            try:
                await self._serve(conn, reconnect_attempt, was_down_since)
            except CONNECTION_ERRORS as exc:
                log.warning("listener_disconnected", error=str(exc) or type(exc).__name__)
            except Exception:
                # Whatever went wrong, the listener must live on: reconnect like after a loss.
                log.exception("listener_failed")
            finally:
                self._set_connected(False, None)
                conn.terminate()
            down_since = time.monotonic()
            attempt = 1
            await asyncio.sleep(backoff_delay(attempt, self.backoff_floor, self.backoff_ceiling))

    async def _serve(
        self, conn: asyncpg.Connection, attempt: int, down_since: float | None
    ) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        for channel in self._router.channels:
            await conn.add_listener(channel, self._callback)
        self._set_connected(True, conn)
        if down_since is None:
            log.info("listener_connected", channels=list(self._router.channels))
        else:
            metrics.LISTENER_RECONNECTS.inc()
            log.info(
                "listener_reconnected",
                attempt=attempt,
                downtime_s=round(time.monotonic() - down_since, 3),
            )
        self._on_connect()
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), self.probe_interval)
            except TimeoutError:
                # A quiet connection is only found dead at its next I/O: probe it.
                async with asyncio.timeout(self.probe_timeout):
                    await conn.fetchval(QUERIES["ping"])
        raise ConnectionResetError("LISTEN connection terminated")

    def _set_connected(self, up: bool, conn: asyncpg.Connection | None) -> None:
        self.connected = up
        self.connection = conn
        metrics.LISTENER_CONNECTED.set(1 if up else 0)
        if up:
            self._connected_event.set()
        else:
            self._connected_event.clear()
