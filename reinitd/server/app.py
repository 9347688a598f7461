"""The application factory: routes, middleware, and one cleanup context per resource."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import asyncpg
import structlog
from aiohttp import web

from reinitd.server import handler
from reinitd.server.admission import Admission
from reinitd.server.claim import Verdict, read_verdicts
from reinitd.server.connection import Runner, fit
from reinitd.server.database import (
    CONNECTION_ERRORS,
    pooled,
    statement_cache_size,
    uncancelled,
)
from reinitd.server.doorbell import CHANNEL, Doorbell
from reinitd.server.hub import Hub
from reinitd.server.keys import (
    ADMISSION,
    DOORBELL,
    HUB,
    LISTENER,
    POOL,
    READINESS,
    REFUSALS,
    SETTINGS,
)
from reinitd.server.listener import Listener, Notifier
from reinitd.server.middleware import on_prepare, request_context
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
    (QUERIES["admit"], b""),
    (QUERIES["agent_by_token_hash"], b""),
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
        except CONNECTION_ERRORS:
            raise  # the connection is gone: asyncpg discards it, as after a failed connect
        except asyncpg.PostgresError:
            # A refusal (a missing grant) is the query's own to report, with its traceback,
            # when it is used: warming up never changes what a request gets.
            continue


async def _pool(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cached = statement_cache_size(settings.database_pooler)
    app[POOL] = await asyncpg.create_pool(
        settings.dsn,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        server_settings={"application_name": "reinitd"},
        # Behind a transaction pooler, a backend warmed now is not the one of the next query.
        init=_warm if cached else None,
        reset=_no_reset,
        timeout=settings.connect_timeout,
        command_timeout=settings.query_timeout,
        statement_cache_size=cached,
    )
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
    """The listener, the router behind it, the doorbell's batched reads and the pings."""
    settings, hub = app[SETTINGS], app[HUB]
    pool = app[POOL]

    async def read(workspace_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Verdict]:
        async with pooled(pool, settings.query_timeout) as conn:
            return await read_verdicts(conn, workspace_ids)

    doorbell = Doorbell(read, hub, resync_interval=settings.resync_interval)
    router = Router({CHANNEL: doorbell.on_payload})
    notifier = Notifier(settings.dsn, timeout=settings.probe_timeout)
    listener = Listener(
        settings.listen_dsn,
        router,
        # After every (re)connect, once LISTEN is active: NOTIFYs may have been lost.
        doorbell.ring_all,
        notifier.notify,
        probe_interval=settings.probe_interval,
        probe_timeout=settings.probe_timeout,
        connect_timeout=settings.connect_timeout,
    )
    readiness = Readiness(listener)
    app[ADMISSION] = Admission(
        app[POOL],
        hub,
        doorbell,
        max_streams=settings.max_streams or 0,
        max_streams_per_agent=settings.max_streams_per_agent,
        query_timeout=settings.query_timeout,
    )
    app[DOORBELL], app[LISTENER], app[READINESS] = doorbell, listener, readiness
    tasks = {
        "listener": listener.run,
        "doorbell": doorbell.run,
        "pinger": lambda: _pinger(hub, settings.ping_interval),
    }
    try:
        async with running(tasks):
            yield
    finally:
        await notifier.close()


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
    app[SETTINGS] = settings = fit(settings)
    log.info(
        "connection_budget",
        connections=settings.max_connections,
        max_streams=settings.max_streams,
    )
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
