"""The dedicated LISTEN connection: connect, listen, prove it hears, reconnect with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import asyncpg
import structlog

from reinitd.backoff import backoff_delay
from reinitd.errors import EchoFailed
from reinitd.server import internals, metrics
from reinitd.server.database import CONNECT_TIMEOUT, Outage, classify
from reinitd.server.query import QUERIES
from reinitd.server.router import Router

log = structlog.get_logger("reinitd.server.listener")

# After this many failed attempts in a row, reconnect failures log as errors, not warnings.
WARN_ATTEMPTS = 5
# Our own NOTIFYs on this channel prove that the listener hears (readiness, deafness checks).
ECHO_CHANNEL: Final = "reinitd_probe"
# Echoes in a row that never come back before the listener is declared deaf and replaced.
DEAF_ECHOES = 2


class Notifier:
    """One dedicated connection that sends the echo NOTIFYs, so that a storm holding every
    pooled connection cannot starve readiness or the listener's checks. Connects lazily and
    starts afresh after any failure."""

    def __init__(self, dsn: str, *, timeout: float = 2.0) -> None:
        self._dsn = dsn
        self.timeout = timeout
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def notify(self, token: str) -> None:
        async with self._lock, asyncio.timeout(self.timeout):
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self._dsn,
                        timeout=self.timeout,
                        statement_cache_size=0,
                        server_settings={"application_name": "reinitd-probe"},
                    )
                await self._conn.execute(QUERIES["probe_notify"], token)
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


class Listener:
    """Holds one asyncpg connection LISTENing on the router's channels; never a pooled
    connection, since releasing one to a pool runs UNLISTEN *.

    Each NOTIFY goes to the router, synchronously (its handlers only hand off). `on_connect()`
    runs after every (re)connect once LISTEN is active, so a re-read it triggers cannot miss a
    claim committed while the connection was down. While nothing arrives for `probe_interval`,
    the connection is probed: a query proves it answers, and an echo (a NOTIFY sent through
    `send_echo`, on another connection) proves it hears; either failing replaces it.
    """

    def __init__(
        self,
        dsn: str,
        router: Router,
        on_connect: Callable[[], None],
        send_echo: Callable[[str], Awaitable[None]],
        *,
        probe_interval: float = 2.0,
        probe_timeout: float = 2.0,
        connect_timeout: float = CONNECT_TIMEOUT,
        backoff_floor: float = 0.1,
        backoff_ceiling: float = 5.0,
        fast_notify: bool = True,
    ) -> None:
        self._dsn = dsn
        # NOTIFYs straight from asyncpg's protocol (reinitd.server.internals), or through
        # add_listener's call_soon when the start-up check says that path is gone.
        self._connection_class = internals.listen_connection_class(fast_notify)
        self._router = router
        self._on_connect = on_connect
        self._send_echo = send_echo
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.connect_timeout = connect_timeout
        self.backoff_floor = backoff_floor
        self.backoff_ceiling = backoff_ceiling
        self._echoes: dict[str, asyncio.Future[None]] = {}
        self._heard_at = 0.0
        # The one record of the connection: set while it is up and listening, None otherwise.
        self._conn: asyncpg.Connection | None = None
        self._up = asyncio.Event()

    @property
    def connection(self) -> asyncpg.Connection | None:
        return self._conn

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def wait_connected(self) -> None:
        await self._up.wait()

    def _set_connection(self, conn: asyncpg.Connection | None) -> None:
        self._conn = conn
        metrics.LISTENER_CONNECTED.set(0 if conn is None else 1)
        if conn is None:
            self._up.clear()
        else:
            self._up.set()

    def _callback(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        self._heard_at = now = time.monotonic()
        try:
            if channel == ECHO_CHANNEL:
                future = self._echoes.pop(str(payload), None)  # other replicas' are ignored
                if future is not None and not future.done():
                    future.set_result(None)
            else:
                self._router(channel, str(payload), now)
        except Exception:
            # A bug in a handler must never take the listener down with it.
            log.exception("notify_dispatch_failed", channel=channel)

    @contextlib.contextmanager
    def _expecting_echo(self) -> Iterator[tuple[str, asyncio.Future[None]]]:
        token = uuid.uuid4().hex
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._echoes[token] = future
        try:
            yield token, future
        finally:
            self._echoes.pop(token, None)

    async def echo(self, within: float) -> None:
        """NOTIFY a fresh token through `send_echo` and wait until this listener hears it.
        Raises EchoFailed saying whether the database did not answer or the echo did not
        come back."""
        if self._conn is None:
            raise EchoFailed("listener is not connected", sent=False)
        with self._expecting_echo() as (token, heard):
            try:
                async with asyncio.timeout(within):
                    await self._send_echo(token)
            except Exception as exc:
                raise EchoFailed(
                    f"database does not answer: {type(exc).__name__}", sent=False
                ) from None
            try:
                async with asyncio.timeout(within):
                    await heard
            except TimeoutError:
                raise EchoFailed(
                    f"own NOTIFY did not come back through the listener in {within:g} s",
                    sent=True,
                ) from None

    async def run(self) -> None:
        """Run until cancelled; every loss is followed by a reconnect."""
        attempt = 0
        down_since: float | None = None
        while True:
            try:
                conn: asyncpg.Connection = await asyncpg.connect(
                    self._dsn,
                    timeout=self.connect_timeout,
                    server_settings={"application_name": "reinitd-listener"},
                    connection_class=self._connection_class,
                    # Its only query is the idle probe: nothing to gain from named statements,
                    # which a pooler in its way would break (it is then found deaf instead).
                    statement_cache_size=0,
                )
            except Exception as exc:
                # Whatever PostgreSQL or the network says, the listener lives on: a refusal
                # of the login is retried like a closed port (a bug too, with its traceback).
                outage = classify(exc, connecting=True)
                if outage is None:
                    log.exception("listener_connect_error")
                    outage = Outage("unreachable")
                attempt += 1
                delay = backoff_delay(attempt, self.backoff_floor, self.backoff_ceiling)
                persistent = attempt >= WARN_ATTEMPTS or outage.operator_must_fix
                (log.error if persistent else log.warning)(
                    "listener_connect_failed",
                    kind=outage.kind,
                    attempt=attempt,
                    error=str(exc) or type(exc).__name__,
                    retry_in_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
                continue
            # The attempt that succeeded: the failed ones so far, plus this one.
            reconnect_attempt, was_down_since = attempt + 1, down_since
            attempt, down_since = 0, None
            try:
                await self._serve(conn, reconnect_attempt, was_down_since)
            except Exception as exc:
                outage = classify(exc)
                if outage is None:
                    # Whatever went wrong, the listener must live on: reconnect like after a
                    # loss.
                    log.exception("listener_failed")
                else:
                    log.warning(
                        "listener_disconnected",
                        kind=outage.kind,
                        error=str(exc) or type(exc).__name__,
                    )
            finally:
                self._set_connection(None)
                conn.terminate()
            down_since = time.monotonic()
            await asyncio.sleep(backoff_delay(1, self.backoff_floor, self.backoff_ceiling))

    async def _serve(
        self, conn: asyncpg.Connection, attempt: int, down_since: float | None
    ) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        internals.route_notifications(conn, self._callback)
        for channel in (*self._router.channels, ECHO_CHANNEL):
            await conn.add_listener(channel, self._callback)
        self._heard_at = time.monotonic()
        self._set_connection(conn)
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
        unheard = 0
        while not lost.is_set():
            quiet_for = time.monotonic() - self._heard_at
            if quiet_for < self.probe_interval:  # hearing NOTIFYs proves it is alive
                # asyncio.timeout, not wait_for: 3.11's wait_for can lose a cancellation that
                # lands as the wait completes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.probe_interval - quiet_for):
                        await lost.wait()
                continue
            # A quiet connection is only found dead at its next I/O: probe it.
            async with asyncio.timeout(self.probe_timeout):
                await conn.fetchval(QUERIES["ping"])
            unheard = await self._check_hearing(unheard)
        raise ConnectionResetError("LISTEN connection terminated")

    async def _check_hearing(self, unheard: int) -> int:
        """An echo from another connection must come back; returns the echoes missed in a
        row, and raises once DEAF_ECHOES are (a deaf connection is replaced)."""
        heard_before = self._heard_at
        try:
            await self.echo(self.probe_timeout)
        except EchoFailed as exc:
            if not exc.sent or self._heard_at != heard_before:
                return unheard  # the database is away (reported elsewhere), or it does hear
            unheard += 1
            if unheard >= DEAF_ECHOES:
                log.error(
                    "listener_deaf",
                    echoes_missed=unheard,
                    hint="the LISTEN connection answers queries but hears no NOTIFY: is it "
                    "going through a transaction-pooling PgBouncer? Point the listen URL "
                    "(--listen-database-url) at PostgreSQL itself, or at a session pooler",
                )
                raise ConnectionResetError("LISTEN connection hears nothing") from None
            return unheard
        self._heard_at = time.monotonic()
        return 0
