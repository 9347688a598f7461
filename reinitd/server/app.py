"""The application factory: routes, middleware, and one cleanup context per resource."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Final

import asyncpg
import structlog
from aiohttp import web

from reinitd.errors import DatabaseUnavailableError
from reinitd.server import handler, internals
from reinitd.server.admission import Admission
from reinitd.server.connection import Runner, budgeted
from reinitd.server.database import (
    CONNECT_ERRORS,
    Outage,
    classify,
    describe,
    statement_cache_size,
    uncancelled,
)
from reinitd.server.doorbell import CHANNEL, Doorbell
from reinitd.server.hub import Hub
from reinitd.server.keys import (
    ADMISSION,
    DOORBELL,
    HUB,
    INTERNALS,
    LISTENER,
    POOL,
    PRESENCE,
    READINESS,
    REFUSALS,
    SETTINGS,
)
from reinitd.server.listener import Listener, Notifier
from reinitd.server.middleware import on_prepare, request_context
from reinitd.server.pgstore import PgStore
from reinitd.server.presence import Presence, replica_name
from reinitd.server.query import QUERIES
from reinitd.server.readiness import Readiness
from reinitd.server.refusal import Refusals
from reinitd.server.router import Router
from reinitd.server.tasks import running
from reinitd.settings import Settings
from reinitd.wire import REINIT_PATH

log = structlog.get_logger("reinitd.server.app")


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """Pooled connections only run single statements and never LISTEN: there is no session
    state to reset, and asyncpg's default reset costs a round trip on every release."""


# The statements of the hot path: a connect (either kind) and a batched claim read.
HOT_QUERIES: Final[tuple[tuple[str, object], ...]] = (
    (QUERIES["admit_one"], b""),
    (QUERIES["admit_many"], []),
    (QUERIES["claim_states"], []),
)


async def _warm(conn: asyncpg.Connection) -> None:
    """Run the hot path's statements once on a new pooled connection (matching nothing): asyncpg
    caches each by its text, and PostgreSQL's backend loads the view and the function it
    needs. Otherwise the first claims read on each connection paid for it (claim -> frame
    5 to 20 ms instead of 2)."""
    for query, argument in HOT_QUERIES:
        try:
            # Not cancelled midway (an acquire's timeout): that costs a cancel request.
            await uncancelled(conn.fetch(query, argument))
        except asyncpg.PostgresError as exc:
            if classify(exc) is not None:
                raise  # an outage: asyncpg discards the connection, as after a failed connect
            # A refusal (a missing grant) is the query's own to report, with its traceback,
            # when it is used: warming up never changes what a request gets.
            continue


async def _pool(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cached = statement_cache_size(settings.database_pooler)
    try:
        app[POOL] = await asyncpg.create_pool(
            settings.dsn,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            server_settings={"application_name": "reinitd"},
            # Behind a transaction pooler, a backend warmed now is not the one of the next
            # query.
            init=_warm if cached else None,
            reset=_no_reset,
            timeout=settings.connect_timeout,
            command_timeout=settings.query_timeout,
            statement_cache_size=cached,
        )
    except CONNECT_ERRORS as exc:  # refused at start: one clear line, and serve exits 1
        outage = classify(exc, connecting=True) or Outage("unreachable")
        raise DatabaseUnavailableError(
            describe(exc, settings.dsn, settings.connect_timeout), outage.kind, outage.sqlstate
        ) from None
    yield
    await app[POOL].close()


PING_SLICES = 500


async def _pinger(hub: Hub, interval: float) -> None:
    """One timer for every stream's keep-alive, instead of one per stream. Each cycle pings a
    snapshot of the streams in PING_SLICES small batches spread over the interval, so that
    thousands of pings never land in one loop iteration (a claim would wait behind them).
    A stream opened mid-cycle gets its first ping in the next cycle."""
    while True:
        streams = hub.snapshot()
        step = max(1, -(-len(streams) // PING_SLICES))
        for start in range(0, PING_SLICES * step, step):
            await asyncio.sleep(interval / PING_SLICES)
            for sub in streams[start : start + step]:
                sub.ping()


async def _delivery(app: web.Application) -> AsyncIterator[None]:
    """The listener, the router behind it, the doorbell's batched reads, the pings, and the
    presence reports."""
    settings, hub = app[SETTINGS], app[HUB]
    store = PgStore(app[POOL], settings.query_timeout)
    doorbell = Doorbell(store.verdicts, hub, resync_interval=settings.resync_interval)
    presence = None
    if settings.presence == "on":
        presence = Presence(
            store,
            replica_name(),
            interval=settings.presence_interval,
            ttl=settings.presence_ttl,
            retention=settings.delivery_retention,
        )
    router = Router({CHANNEL: doorbell.on_payload})
    notifier = Notifier(settings.dsn, timeout=settings.probe_timeout)

    def connected() -> None:
        """After every (re)connect, once LISTEN is active: NOTIFYs may have been lost, and the
        database may be another one (a promoted standby) that never heard of our agents."""
        doorbell.ring_all()
        if presence is not None:
            presence.reassert()

    listener = Listener(
        settings.listen_dsn,
        router,
        connected,
        notifier.notify,
        probe_interval=settings.probe_interval,
        probe_timeout=settings.probe_timeout,
        connect_timeout=settings.connect_timeout,
        fast_notify=app[INTERNALS].fast_notify,
    )
    readiness = Readiness(listener)
    app[ADMISSION] = Admission(
        store,
        hub,
        doorbell,
        max_streams=settings.max_streams or 0,
        max_streams_per_agent=settings.max_streams_per_agent,
        presence=presence,
    )
    app[DOORBELL], app[LISTENER], app[READINESS] = doorbell, listener, readiness
    tasks = {
        "listener": listener.run,
        "doorbell": doorbell.run,
        "pinger": lambda: _pinger(hub, settings.ping_interval),
    }
    if presence is not None:
        app[PRESENCE] = presence
        tasks["presence"] = presence.run
    try:
        async with running(tasks):
            yield
    finally:
        await notifier.close()
        if presence is not None:
            # The streams ended in on_shutdown; their receipts go out, then this replica's rows.
            await presence.close(within=settings.shutdown_timeout)


async def _on_shutdown(app: web.Application) -> None:
    """Readiness off, then end every open stream so shutdown does not wait on them."""
    app[READINESS].stopping = True
    app[ADMISSION].stopping = True
    log.info("streams_closing", open_streams=len(app[HUB]))
    app[HUB].end_all("shutdown")


def make_runner(app: web.Application, **kwargs: Any) -> Runner:
    """The runner `serve` and the tests use: aiohttp's, with the connection budget."""
    settings = app[SETTINGS]
    assert settings.max_connections is not None  # create_app fitted it
    budget = settings.max_connections
    options = {
        "handle_signals": False,
        "shutdown_timeout": settings.shutdown_timeout,
        **server_options(settings),
        **kwargs,
    }
    return Runner(
        app,
        budget=budget,
        first_byte_timeout=settings.first_byte_timeout,
        queue_timeout=settings.query_timeout,  # a head waits at the gate as long as for the pool
        refusals=app[REFUSALS],
        guarded=app[INTERNALS].guard,
        **options,
    )


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for aiohttp's server: cancellation on disconnect, request size
    limits, and the time a client has to finish its headers."""
    return {
        # An agent that hangs up ends its handler at once (its stream slot and queue freed),
        # not at the next ping.
        "handler_cancellation": True,
        "keepalive_timeout": settings.header_timeout,
        "max_line_size": settings.max_line_size,
        "max_field_size": settings.max_field_size,
        "max_headers": settings.max_headers,
    }


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[request_context])
    app[SETTINGS] = settings = budgeted(settings)
    log.info(
        "connection_budget",
        connections=settings.max_connections,
        max_streams=settings.max_streams,
    )
    app[INTERNALS] = paths = internals.choose(settings.internals)
    paths.log()
    app[HUB] = Hub(queue_limit=settings.queue_limit)
    app[REFUSALS] = Refusals()
    app.cleanup_ctx.append(_pool)
    app.cleanup_ctx.append(_delivery)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(on_prepare)
    app.router.add_get(REINIT_PATH, handler.reinit, name="reinit", allow_head=False)
    app.router.add_get("/api/v2/openapi.json", handler.openapi, allow_head=False)
    app.router.add_get("/healthz", handler.healthz, allow_head=False)
    app.router.add_get("/readyz", handler.readyz, allow_head=False)
    app.router.add_get("/metrics", handler.metrics_handler, allow_head=False)
    return app
