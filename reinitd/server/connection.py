"""Connections: a budget below the file limit, a first-byte deadline, and requests the HTTP
parser rejects answered as JSON without a byte of them in any log.

A flood of idle sockets must never silence `/healthz`, `/readyz` or the open streams: at the
budget, the connection that has been idle the longest (connected, but not in a request) is
closed to make room; with none idle, the new one is shed. Either way it is counted, cheaply.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import resource
import socket
from dataclasses import replace
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from reinitd.server import metrics
from reinitd.server.refusal import Refusals
from reinitd.server.throttle import LogThrottle
from reinitd.settings import Settings

log = structlog.get_logger("reinitd.server.connection")

# Files kept for everything that is not a client: the database pool, the listener and the
# notifier, logs, the event loop's own; plus the connections one accept burst may take
# before the budget is checked (asyncio accepts up to ACCEPT_BATCH per loop iteration).
RESERVED_FILES: Final = 128
ACCEPT_BATCH: Final = 256
# New connections admitted at once, from their first bytes until their request is answered or
# starts to wait (a stream taken over, a long-poll subscribed): the next ones' bytes wait,
# unread, until one is. Each costs ~16 KB of aiohttp objects while it waits for one of the
# pool's connections: a storm of 10 000 connects, all admitted at once, left the process that
# much larger for good (the allocator keeps what survivors pin). This smooths storms; it is not
# a cap on requests. Probes, and first bytes without a whole request head (a client that
# trickles its headers cannot hold a place), are never held back.
MAX_IN_FLIGHT: Final = 64
PROBES: Final = (b"GET /healthz", b"GET /readyz", b"GET /metrics")
HEAD_END: Final = b"\r\n\r\n"

# Marks a response made for a request the HTTP parser rejected.
_REJECTED: Final = web.ResponseKey("reinitd_rejected", bool)
_SHED = {reason: metrics.CONNECTIONS_CLOSED.labels(reason) for reason in metrics.CLOSE_REASONS}


def file_limit() -> int:
    """This process's open-file limit, raised to the hard limit first (the soft one is often
    set low by default, and a stream costs one file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_budget(pool_size: int) -> int:
    """How many client connections this process may hold at once."""
    return max(16, file_limit() - RESERVED_FILES - ACCEPT_BATCH - pool_size)


def fit(settings: Settings) -> Settings:
    """The connection budget and the stream cap made explicit. Streams may fill the budget
    but for 2 % kept for probes and new connects, so that a full server answers an agent
    with a 503 it understands rather than shedding its connection; a cap asked above that is
    lowered, and said so."""
    budget = settings.max_connections or connection_budget(settings.pool_max_size)
    cap = budget - budget // 50
    max_streams = cap if settings.max_streams is None else settings.max_streams
    if max_streams > cap:
        log.warning(
            "max_streams_lowered",
            max_streams=cap,
            asked=max_streams,
            connection_budget=budget,
            hint="raise the open-file limit (ulimit -n) to hold more streams",
        )
        max_streams = cap
    return replace(settings, max_connections=budget, max_streams=max_streams)


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, plus: whether the client sent anything yet, and
    parser errors answered as JSON, counted, and logged without the request's bytes."""

    # aiohttp's RequestHandler declares __slots__; so does its subclass.
    __slots__ = ("first_byte_due", "in_flight", "spoke")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spoke = False
        self.in_flight = False
        self.first_byte_due: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if not self.spoke:
            self.spoke = True
            if self.first_byte_due is not None:
                self.first_byte_due.cancel()
                self.first_byte_due = None
            if (server := self.server) is not None and not server.admit(self, data):
                return  # its first bytes wait for a request in flight to finish
        super().data_received(data)

    def feed(self, data: bytes) -> None:
        """The first bytes, once admitted."""
        super().data_received(data)

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        """aiohttp's call once a response is written: the connection is idle again, and the
        place to let the next one in. A request the parser rejected gets no access line: it is
        counted and logged, at most once per interval, as a refusal (a flood of garbage must
        not write a line per request)."""
        if not response.get(_REJECTED, False):
            super().log_access(request, response, time)
        if (server := self.server) is not None:
            server.answered(self)

    @property
    def server(self) -> GuardedServer | None:
        """The server this connection came in on (None once aiohttp let go of it)."""
        manager = self._manager
        return manager if isinstance(manager, GuardedServer) else None

    def let_go(self) -> asyncio.Transport | None:
        """Give this connection's transport away (to a stream whose headers are out): aiohttp
        will neither write to it nor close it when the request returns, and forgets the
        connection, whose file the server's budget still counts. None if the client is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        self.keep_alive(False)  # no keep-alive timer of aiohttp's outlives the request
        self.transport = None
        if (server := self.server) is not None:
            if self.in_flight:
                server.finished(self)
            server.stream_taken(self)
        # aiohttp breaks the handler <-> parser cycle in connection_lost, which a connection
        # given away never reaches: without this, every stream left a dozen objects for the
        # cyclic collector (a 300 ms pause after a storm of 10 000 connects).
        self._parser = None
        return transport

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's hook for requests it cannot hand to the app (a malformed request line or
        header, an oversized one): its own version logs the offending bytes, tokens included."""
        server = self.server
        kind = type(exc).__name__ if exc is not None else "unknown"
        if server is not None:
            server.refusals.refuse("bad_request" if status < 500 else "server_error", status, kind)
        if request.writer.output_size > 0:  # a response is half written: only closing is left
            raise ConnectionError("the response is already being sent")
        if status >= 500:
            text = "Internal server error."
            detail = "The request failed before it reached reinitd."
        else:
            text = "Bad request."
            detail = f"The HTTP request could not be parsed ({kind})."
        response = web.json_response({"message": text, "detail": detail}, status=status)
        response[_REJECTED] = status < 500
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's other error lines may quote request bytes: say only what kind it was."""
        exc = kwargs.get("exc_info")
        kind = type(exc).__name__ if isinstance(exc, BaseException) else "unknown"
        server = self.server
        if server is not None and server.http_errors.allow(kind) is None:
            return
        log.error("http_error", kind=kind)


def settled(request: web.BaseRequest) -> None:
    """The request now waits (a long-poll subscribed): let the next connection in."""
    protocol = request.protocol
    if (
        isinstance(protocol, GuardedHandler)
        and protocol.in_flight
        and (server := protocol.server) is not None
    ):
        server.finished(protocol)


class GuardedServer(web.Server):
    """aiohttp's server (the protocol factory and connection registry) with a budget."""

    budget: int
    first_byte_timeout: float
    refusals: Refusals
    http_errors: LogThrottle
    streams: int
    streams_taken: int
    in_flight: int
    _waiting: collections.OrderedDict[GuardedHandler, bytes]
    _idle: collections.OrderedDict[RequestHandler, None]

    @classmethod
    def adopt(
        cls, server: web.Server, *, budget: int, first_byte_timeout: float, refusals: Refusals
    ) -> GuardedServer:
        """Turn the Server aiohttp built into a GuardedServer: AppRunner builds it in a private
        method with no hook for its class, and adopting it keeps all the rest aiohttp's."""
        server.__class__ = cls
        assert isinstance(server, GuardedServer)
        server.budget = budget
        server.first_byte_timeout = first_byte_timeout
        server.refusals = refusals
        server.http_errors = LogThrottle()
        server.streams = 0
        server.streams_taken = 0
        server.in_flight = 0
        server._waiting = collections.OrderedDict()
        # Connections not in a request right now, oldest first: the ones to close at the budget.
        server._idle = collections.OrderedDict()
        app_handler = server.request_handler

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            server._idle.pop(request.protocol, None)  # idle again once answered
            return await app_handler(request)

        server.request_handler = handle
        return server

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def __len__(self) -> int:
        """Open client connections: aiohttp's, and the streams it handed over."""
        return len(self._connections) + self.streams

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._idle[handler] = None
        if len(self) > self.budget:
            self._make_room(handler, transport)
        else:
            self._arm_first_byte(handler)
        metrics.CONNECTIONS.set(len(self))

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._idle.pop(handler, None)
        if isinstance(handler, GuardedHandler):
            if handler.first_byte_due is not None:
                handler.first_byte_due.cancel()
                handler.first_byte_due = None
            self._waiting.pop(handler, None)
            if handler.in_flight:
                self.finished(handler)
        super().connection_lost(handler, exc)
        metrics.CONNECTIONS.set(len(self))

    @property
    def waiting(self) -> int:
        """Connections whose first bytes wait for a request in flight to finish."""
        return len(self._waiting)

    def admit(self, handler: GuardedHandler, data: bytes) -> bool:
        """Whether a connection's first bytes are served now; if not, its reading pauses and
        the bytes wait for `finished` to let it in, in arrival order. A connection waiting
        here is in a request: a flood of idle sockets is closed before it."""
        if data.startswith(PROBES) or HEAD_END not in data:
            return True
        if self.in_flight < MAX_IN_FLIGHT:
            handler.in_flight = True
            self.in_flight += 1
            return True
        if handler.transport is not None:
            handler.transport.pause_reading()
        # Its head is whole: aiohttp's header timeout (its keep-alive timer, which closes a
        # connection whose request has not arrived) must not close it while it waits here.
        handler.keep_alive(False)
        self._idle.pop(handler, None)
        self._waiting[handler] = data
        return False

    def answered(self, handler: GuardedHandler) -> None:
        """A response is written: the connection is idle until its next request."""
        if handler.in_flight:
            self.finished(handler)
        if handler.transport is not None and not handler.transport.is_closing():
            self._idle[handler] = None

    def finished(self, handler: GuardedHandler) -> None:
        handler.in_flight = False
        self.in_flight -= 1
        while self._waiting and self.in_flight < MAX_IN_FLIGHT:
            waiting, data = self._waiting.popitem(last=False)
            if waiting.transport is None or waiting.transport.is_closing():
                continue
            waiting.in_flight = True
            self.in_flight += 1
            waiting.transport.resume_reading()
            waiting.feed(data)

    def stream_taken(self, handler: RequestHandler) -> None:
        """A stream took this connection over: no longer aiohttp's, still one of ours."""
        self._connections.pop(handler, None)
        self._idle.pop(handler, None)
        self.streams += 1
        self.streams_taken += 1

    def stream_closed(self) -> None:
        self.streams -= 1
        metrics.CONNECTIONS.set(len(self))

    def _arm_first_byte(self, handler: RequestHandler) -> None:
        if isinstance(handler, GuardedHandler):
            handler.first_byte_due = self._loop.call_later(
                self.first_byte_timeout, self._first_byte_due, handler
            )

    def _make_room(self, newcomer: RequestHandler, transport: asyncio.Transport) -> None:
        """At the budget: close the connection idle the longest; if the only idle one is the
        newcomer itself, shed it."""
        oldest = next(iter(self._idle))
        if oldest is newcomer:
            _SHED["shed"].inc()
            self._idle.pop(newcomer)
            transport.abort()
            return
        _SHED["evicted"].inc()
        self._idle.pop(oldest)
        if oldest.transport is not None:
            oldest.transport.abort()
        self._arm_first_byte(newcomer)

    def _first_byte_due(self, handler: RequestHandler) -> None:
        if (
            isinstance(handler, GuardedHandler)
            and not handler.spoke
            and handler.transport is not None
        ):
            _SHED["silent"].inc()
            handler.transport.abort()


class Runner(web.AppRunner):
    """The AppRunner reinitd serves with (and tests run): its Server is a GuardedServer."""

    def __init__(
        self,
        app: web.Application,
        *,
        budget: int,
        first_byte_timeout: float,
        refusals: Refusals,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.budget = budget
        self.first_byte_timeout = first_byte_timeout
        self.refusals = refusals

    @property
    def streams_taken(self) -> int:
        """Streams ever opened through this runner's server."""
        server = self.server
        return server.streams_taken if isinstance(server, GuardedServer) else 0

    async def _make_server(self) -> web.Server:
        return GuardedServer.adopt(
            await super()._make_server(),
            budget=self.budget,
            first_byte_timeout=self.first_byte_timeout,
            refusals=self.refusals,
        )


class AcceptErrors:
    """Accept failures made visible on every event loop: all counted, logged once per interval.

    asyncio's own loop reports each failed accept to the loop's exception handler (an instance
    of this class) as MESSAGE, and retries a second later. uvloop reports none: at the file
    limit libuv accepts each pending connection on a descriptor it keeps in reserve, closes it
    at once and tells nobody (uvloop's handles/streamserver.pyx passes an OSError to no
    handler; libuv's uv__emfile_trick; measured at a limit of 40 files: 36 connections
    dropped, 0 handler calls). On such a loop `watch` checks every second whether the process
    can still open a file, and counts each check that cannot as a failed accept."""

    MESSAGE: Final = "socket.accept() out of system resource"
    WATCH_INTERVAL: Final = 1.0
    _OUT_OF_FILES: Final = frozenset({errno.EMFILE, errno.ENFILE})

    def __init__(self, every: float = 10.0) -> None:
        self._throttle = LogThrottle(every)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != self.MESSAGE:
            loop.default_exception_handler(context)
            return
        self.failed(context.get("exception"))

    def failed(self, error: BaseException | None) -> None:
        metrics.ACCEPT_ERRORS.inc()
        suppressed = self._throttle.allow("accept")
        if suppressed is not None:
            log.error(
                "accept_failed",
                error=str(error),
                suppressed=suppressed,
                hint="the process is at its open-file limit: raise it (ulimit -n, LimitNOFILE) "
                "or lower --max-connections",
            )

    @staticmethod
    def reported_by(loop: asyncio.AbstractEventLoop) -> bool:
        """Whether `loop` tells its exception handler about failed accepts (asyncio's does)."""
        return isinstance(loop, asyncio.BaseEventLoop)

    async def watch(self, sock: socket.socket, interval: float = WATCH_INTERVAL) -> None:
        """For a loop that drops what it cannot accept without a word: every `interval`, a
        file that cannot be opened (a dup of the listening socket) is a failed accept."""
        while True:
            await asyncio.sleep(interval)
            try:
                os.close(os.dup(sock.fileno()))
            except OSError as exc:
                if exc.errno not in self._OUT_OF_FILES:
                    raise
                self.failed(exc)
