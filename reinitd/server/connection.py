"""Connections: a budget below the file limit, a first-byte deadline, a gate in front of the
database, and requests the HTTP parser rejects answered as JSON without a byte of them in any
log.

A flood of sockets must never silence `/healthz`, `/readyz` or the open streams: at the budget,
a connection that costs nothing to lose is closed to make room (idle, or waiting at the gate,
which is answered 503); with none, the new one is shed. Either way it is counted, cheaply.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import os
import resource
import socket
from dataclasses import dataclass, replace
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from reinitd.server import internals, metrics
from reinitd.server.refusal import Refusals
from reinitd.server.throttle import LogThrottle
from reinitd.settings import Settings

log = structlog.get_logger("reinitd.server.connection")

# Files kept for everything that is not a client: the database pool, the listener and the
# notifier, logs, the event loop's own; plus the connections one accept burst may take
# before the budget is checked (asyncio accepts up to ACCEPT_BATCH per loop iteration).
RESERVED_FILES: Final = 128
ACCEPT_BATCH: Final = 256
# Requests admitted at once, from their whole request head until they are answered or start to
# wait (a stream taken over, a long-poll subscribed): the next heads wait, unread, until a place
# frees. Each admitted request costs ~7-16 KB of aiohttp and asyncpg objects while it waits for
# one of the pool's connections: 10 000 admitted at once left the process that much larger for
# good (the allocator keeps what survivors pin), and 17 000 behind a stalled database took it
# from 188 to 313 MB. The gate counts a head when it is whole, however its bytes were split;
# probes are never held back, and bytes before a head is whole take no place (a client
# trickling its headers is limited by the header timeout).
MAX_IN_FLIGHT: Final = 64
# Heads waiting at the gate, at most: beyond it, the one that waited longest is refused.
MAX_WAITING: Final = 16_384
# Every place taken and none given back for this long: the database is stalled. Heads waiting
# then, and heads that arrive until a place frees, are answered 503 from the gate at once (a
# durable check takes milliseconds; a storm gives places back hundreds of times a second).
STALL_AFTER: Final = 2.0
GATE_RETRY_AFTER: Final = 1  # seconds: a refusal from the gate costs the server nothing
PROBES: Final = (b"GET /healthz", b"GET /readyz", b"GET /metrics")
PROBE_PREFIX: Final = max(len(probe) for probe in PROBES)
# A request head ends with an empty line: CRLF CRLF, or bare LFs for a lenient parser.
HEAD_ENDS: Final = (b"\n\r\n", b"\n\n")

# Marks a response made for a request the HTTP parser rejected.
_REJECTED: Final = web.ResponseKey("reinitd_rejected", bool)
_CLOSED = {reason: metrics.CONNECTIONS_CLOSED.labels(reason) for reason in metrics.CLOSE_REASONS}
# Why the gate refused a waiting head (a `reinitd_refusals_total` reason), and what it says.
_GATE_REFUSALS: Final = {
    "database_stalled": "The database does not answer; retry shortly (open streams are kept).",
    "queued_too_long": "The server is too busy to admit this request in time; retry shortly.",
    "queue_full": "The server is too busy to admit this request; retry shortly.",
}


def head_ends(tail: bytes, data: bytes) -> bool:
    """Whether `data`, after the last bytes of a head so far (`tail`), ends the head."""
    window = tail + data
    return any(end in window for end in HEAD_ENDS)


def unavailable(reason: str) -> bytes:
    """A whole `503` response from the gate: JSON, with Retry-After, closing the connection."""
    body = json.dumps({"message": "Service unavailable.", "detail": _GATE_REFUSALS[reason]})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {GATE_RETRY_AFTER}\r\n"
        f"X-Request-ID: {os.urandom(8).hex()}\r\n"
        "Connection: close\r\n\r\n"
    )
    return (head + body).encode()


@dataclass(slots=True)
class Waiting:
    """A head held at the gate: the bytes that completed it, and since when."""

    data: bytes
    since: float


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


def budgeted(settings: Settings) -> Settings:
    """The connection budget and the stream cap made explicit. Streams may fill the budget
    but for 2 % kept for probes and new connects, so that a full server answers an agent
    with a 503 it understands rather than shedding its connection; a cap asked above that is
    lowered, and said so. Idempotent: `serve` budgets once before its workers start (a lowered
    cap is said once), and `create_app` budgets what tests build directly (a no-op for
    settings `serve` already budgeted)."""
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
    """aiohttp's per-connection protocol, plus: whether the client sent anything yet, where
    its request head stands at the gate, and parser errors answered as JSON, counted, and
    logged without the request's bytes."""

    # aiohttp's RequestHandler declares __slots__; so does its subclass.
    __slots__ = ("first_byte_due", "in_flight", "opening", "passed", "spoke", "tail")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spoke = False
        self.in_flight = False  # holds one of the gate's places
        self.passed = False  # this request's head is whole and past the gate (or held at it)
        self.opening = b""  # the first bytes of this request: is it a probe?
        self.tail = b""  # the last bytes received: a head may end across two reads
        self.first_byte_due: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if not self.spoke:
            self.spoke = True
            if self.first_byte_due is not None:
                self.first_byte_due.cancel()
                self.first_byte_due = None
        tail, self.tail = self.tail, (self.tail + data[-2:])[-2:]
        if self.passed or (server := self.server) is None:
            super().data_received(data)
            return
        if len(self.opening) < PROBE_PREFIX:
            self.opening += data[: PROBE_PREFIX - len(self.opening)]
        if not head_ends(tail, data):
            super().data_received(data)  # part of a head: the parser holds it, no place yet
            return
        self.passed = True
        if self.opening.startswith(PROBES) or server.admit(self, data):
            super().data_received(data)
        # else: the bytes that completed the head wait at the gate, or were refused there

    def next_request(self) -> None:
        """The request is answered: the next one's head goes through the gate again."""
        self.passed = False
        self.opening = b""

    @property
    def pipelined(self) -> bool:
        """A next request already parsed (sent before this one's answer): it will run at once."""
        return internals.pipelined(self)

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
        manager = internals.manager(self)
        return manager if isinstance(manager, GuardedServer) else None

    def let_go(self) -> asyncio.Transport | None:
        """Give this connection's transport away (to a stream whose headers are out): aiohttp
        will neither write to it nor close it when the request returns, and forgets the
        connection, whose file the server's budget still counts. None if the client is gone."""
        server = self.server
        transport = internals.give_away(self)
        if transport is not None and server is not None:
            if self.in_flight:
                server.finished(self)
            server.stream_taken(self)
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


def now_waiting(request: web.BaseRequest) -> None:
    """The request now waits (a long-poll subscribed): let the next connection in."""
    protocol = request.protocol
    if (
        isinstance(protocol, GuardedHandler)
        and protocol.in_flight
        and (server := protocol.server) is not None
    ):
        server.finished(protocol)


class GuardedServer(web.Server):
    """aiohttp's server (the protocol factory and connection registry) with a budget and a
    gate in front of the database."""

    event_loop: asyncio.AbstractEventLoop
    budget: int
    first_byte_timeout: float
    queue_timeout: float
    refusals: Refusals
    http_errors: LogThrottle
    streams: int
    streams_taken: int
    in_flight: int
    _moved_at: float
    _expiry: asyncio.TimerHandle | None
    _waiting: collections.OrderedDict[GuardedHandler, Waiting]
    _idle: collections.OrderedDict[RequestHandler, None]
    _kept: collections.OrderedDict[RequestHandler, None]

    @classmethod
    def adopt(
        cls,
        server: web.Server,
        *,
        budget: int,
        first_byte_timeout: float,
        queue_timeout: float,
        refusals: Refusals,
    ) -> GuardedServer:
        """Turn the Server aiohttp built into a GuardedServer: AppRunner builds it in a private
        method with no hook for its class, and adopting it keeps all the rest aiohttp's."""
        server = internals.adopt(server, cls)
        server.event_loop = internals.server_loop(server)
        server.budget = budget
        server.first_byte_timeout = first_byte_timeout
        server.queue_timeout = queue_timeout
        server.refusals = refusals
        server.http_errors = LogThrottle()
        server.streams = 0
        server.streams_taken = 0
        server.in_flight = 0
        server._moved_at = server.event_loop.time()  # when a place was last free
        server._expiry = None
        # Heads waiting for a place, oldest first.
        server._waiting = collections.OrderedDict()
        # Connections not in a request, oldest first, the first to close at the budget: those
        # never answered yet (silent, or trickling a head), then those kept alive after one.
        server._idle = collections.OrderedDict()
        server._kept = collections.OrderedDict()
        app_handler = server.request_handler

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            server._idle.pop(request.protocol, None)  # idle again once answered
            server._kept.pop(request.protocol, None)
            return await app_handler(request)

        server.request_handler = handle
        return server

    def __call__(self) -> RequestHandler:
        return internals.new_handler(self, GuardedHandler)

    def __len__(self) -> int:
        """Open client connections: aiohttp's, and the streams it handed over."""
        return len(internals.connections(self)) + self.streams

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
        self._kept.pop(handler, None)
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
        """Heads waiting at the gate for a place."""
        return len(self._waiting)

    @property
    def stalled(self) -> bool:
        """Every place taken, and none given back for STALL_AFTER: the database is stalled."""
        return (
            self.in_flight >= MAX_IN_FLIGHT
            and self.event_loop.time() - self._moved_at >= STALL_AFTER
        )

    def admit(self, handler: GuardedHandler, data: bytes) -> bool:
        """Whether a whole request head is served now. If not, its reading pauses and the bytes
        that completed it wait for `finished` to let it in, in arrival order, for at most the
        queue timeout; while the gate is stalled it is answered 503 at once instead. A
        connection waiting here is in a request, but cheap to refuse at the budget."""
        if self.in_flight < MAX_IN_FLIGHT:
            handler.in_flight = True
            self.in_flight += 1
            self._moved_at = self.event_loop.time()
            return True
        if self.stalled:
            self._refuse(handler, "database_stalled")
            return False
        if len(self._waiting) >= MAX_WAITING:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self._refuse(oldest, "queue_full")
        if handler.transport is not None:
            handler.transport.pause_reading()
        # Its head is whole: aiohttp's header timeout (its keep-alive timer, which closes a
        # connection whose request has not arrived) must not close it while it waits here.
        handler.keep_alive(False)
        self._idle.pop(handler, None)
        self._kept.pop(handler, None)
        self._waiting[handler] = Waiting(data, self.event_loop.time())
        self._arm_expiry()
        return False

    def answered(self, handler: GuardedHandler) -> None:
        """A response is written: the connection is idle until its next request, whose head
        goes through the gate again. A request pipelined behind this one is already parsed and
        runs at once: it keeps this one's place, or, behind a probe (which took none), costs
        the client its connection."""
        if handler.pipelined:
            if not handler.in_flight:
                handler.force_close()
            return
        if handler.in_flight:
            self.finished(handler)
        handler.next_request()
        if handler.transport is not None and not handler.transport.is_closing():
            self._kept[handler] = None

    def finished(self, handler: GuardedHandler) -> None:
        handler.in_flight = False
        self.in_flight -= 1
        self._moved_at = self.event_loop.time()
        while self._waiting and self.in_flight < MAX_IN_FLIGHT:
            waiting, held = self._waiting.popitem(last=False)
            if waiting.transport is None or waiting.transport.is_closing():
                continue
            waiting.in_flight = True
            self.in_flight += 1
            waiting.transport.resume_reading()
            waiting.feed(held.data)

    def stream_taken(self, handler: RequestHandler) -> None:
        """A stream took this connection over: no longer aiohttp's, still one of ours."""
        internals.connections(self).pop(handler, None)
        self._idle.pop(handler, None)
        self._kept.pop(handler, None)
        self.streams += 1
        self.streams_taken += 1

    def stream_closed(self) -> None:
        self.streams -= 1
        metrics.CONNECTIONS.set(len(self))

    def _refuse(self, handler: GuardedHandler, reason: str) -> None:
        """Answer a waiting head 503 from the gate, without reaching the database, and close."""
        transport = handler.transport
        if transport is None or transport.is_closing():
            return
        self.refusals.refuse(reason, 503, _GATE_REFUSALS[reason])
        transport.write(unavailable(reason))
        transport.close()

    def _arm_expiry(self) -> None:
        """A timer for the next head that will have waited too long, or for the stall."""
        if self._expiry is None and self._waiting:
            oldest = next(iter(self._waiting.values()))
            due = min(oldest.since + self.queue_timeout, self._moved_at + STALL_AFTER)
            self._expiry = self.event_loop.call_at(due, self._expire)

    def _expire(self) -> None:
        """Refuse the heads that waited longer than the queue timeout; all of them once the
        gate is stalled."""
        self._expiry = None
        stalled, now = self.stalled, self.event_loop.time()
        while self._waiting:
            handler, held = next(iter(self._waiting.items()))
            if stalled:
                reason = "database_stalled"
            elif now - held.since >= self.queue_timeout:
                reason = "queued_too_long"
            else:
                break
            del self._waiting[handler]
            self._refuse(handler, reason)
        self._arm_expiry()

    def _arm_first_byte(self, handler: RequestHandler) -> None:
        if isinstance(handler, GuardedHandler):
            handler.first_byte_due = self.event_loop.call_later(
                self.first_byte_timeout, self._first_byte_due, handler
            )

    def _make_room(self, newcomer: RequestHandler, transport: asyncio.Transport) -> None:
        """At the budget, close what costs least to lose: the connection idle the longest that
        was never answered (silent, or trickling a head); else the head that waited longest at
        the gate (answered 503); else the connection kept alive the longest. With none of them
        (every other connection is a stream or a request in flight), shed the newcomer: which
        may be a probe, so the stream cap keeps room for them (`budgeted`)."""
        oldest = next(iter(self._idle))
        if oldest is not newcomer:
            self._idle.pop(oldest)
            self._evict(oldest)
        elif self._waiting:
            waiting = next(iter(self._waiting))
            del self._waiting[waiting]
            _CLOSED["evicted"].inc()
            self._refuse(waiting, "queue_full")
        elif self._kept:
            self._evict(self._kept.popitem(last=False)[0])
        else:
            _CLOSED["shed"].inc()
            self._idle.pop(newcomer)
            transport.abort()
            return
        self._arm_first_byte(newcomer)

    @staticmethod
    def _evict(handler: RequestHandler) -> None:
        _CLOSED["evicted"].inc()
        if handler.transport is not None:
            handler.transport.abort()

    def _first_byte_due(self, handler: RequestHandler) -> None:
        if (
            isinstance(handler, GuardedHandler)
            and not handler.spoke
            and handler.transport is not None
        ):
            _CLOSED["silent"].inc()
            handler.transport.abort()


class Runner(internals.GuardingRunner):
    """The AppRunner reinitd serves with (and tests run): its Server is a GuardedServer, unless
    the start-up check found aiohttp's internals changed (`guarded` False)."""

    def __init__(
        self,
        app: web.Application,
        *,
        budget: int,
        first_byte_timeout: float,
        queue_timeout: float,
        refusals: Refusals,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.budget = budget
        self.first_byte_timeout = first_byte_timeout
        self.queue_timeout = queue_timeout
        self.refusals = refusals

    @property
    def streams_taken(self) -> int:
        """Streams ever opened through this runner's server."""
        server = self.server
        return server.streams_taken if isinstance(server, GuardedServer) else 0

    def guard(self, server: web.Server) -> web.Server:
        return GuardedServer.adopt(
            server,
            budget=self.budget,
            first_byte_timeout=self.first_byte_timeout,
            queue_timeout=self.queue_timeout,
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
