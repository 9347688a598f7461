"""An SSE stream once its headers are out: the connection taken over from aiohttp.

aiohttp serves a request with a task, its middleware and handler frames, the request and its
parsed headers, a parser and a response writer, all alive as long as the handler runs; for a
stream that waits for hours that was most of its memory. Once the headers are sent, the stream
takes the transport over (it becomes the transport's protocol) and the request returns, so
aiohttp frees all of that. Frames are then written straight from the fan-out, without waking a
task: a claim costs one `write`. Where aiohttp's internals are not as expected
(reinitd.server.internals), `stay` serves the stream from its request instead, through the
public `StreamResponse.write`: the same bytes, at the old memory cost.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

import structlog
from aiohttp import HttpVersion11, web

from reinitd.server import metrics
from reinitd.server.connection import GuardedHandler, GuardedServer
from reinitd.server.hub import Delivery, End
from reinitd.wire import PING_FRAME, error_frame

if TYPE_CHECKING:
    from reinitd.server.admission import Ticket

log = structlog.get_logger("reinitd.server.stream")

# A client that stopped reading while this much is buffered for it is cut off at once.
MAX_BUFFERED: Final = 1 << 20


def chunk(frame: bytes) -> bytes:
    """A frame as one chunk of the response's chunked body."""
    return b"%x\r\n%s\r\n" % (len(frame), frame)


PING_CHUNK: Final = chunk(PING_FRAME)
LAST_CHUNK: Final = b"0\r\n\r\n"


class Stream(asyncio.Protocol):
    """The protocol of a stream's connection after the take-over: a sink for its
    subscription, and the owner of its ticket (released when the connection is gone)."""

    __slots__ = (
        "_chunked",
        "_server",
        "_stall",
        "_stopping",
        "_ticket",
        "_transport",
        "_write_timeout",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        ticket: Ticket,
        server: GuardedServer | None,
        write_timeout: float,
        *,
        chunked: bool = True,
    ) -> None:
        self._transport = transport
        # HTTP/1.1 bodies are chunked; an HTTP/1.0 client (a proxy without
        # `proxy_http_version 1.1`) reads raw frames until the connection closes.
        self._chunked = chunked
        self._ticket = ticket
        self._server = server
        self._write_timeout = write_timeout
        self._stall: asyncio.TimerHandle | None = None
        self._stopping = False  # ended by the process's stop: nothing to give back

    def _write(self, frame: bytes) -> bool:
        """Write one frame; False if the connection is already closing."""
        transport = self._transport
        if transport.is_closing():
            return False
        transport.write(chunk(frame) if self._chunked else frame)
        if transport.get_write_buffer_size() > MAX_BUFFERED:
            self._stalled()
        return True

    # --- the sink: what the subscription hands over -------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        if not self._write(delivery.event.frame()):
            return  # the connection is closing: the claim is not delivered here
        self._ticket.delivered(delivery)

    def ping(self) -> None:
        transport = self._transport
        if not transport.is_closing():
            transport.write(PING_CHUNK if self._chunked else PING_FRAME)

    def end(self, end: End) -> None:
        """End the body (after the refusal's error frame, if any) and close."""
        sub = self._ticket.subscription
        assert sub is not None
        sub.ended_by = end.why
        if end.refusal is not None and self._write(
            error_frame(end.refusal.message, end.refusal.detail)
        ):
            self._ticket.refused(end)
        if self._chunked and not self._transport.is_closing():
            self._transport.write(LAST_CHUNK)
        # At a stop the process is going away with every stream: its slots, gauges and
        # presence rows go with it (the replica is retired in one statement), and the stop is
        # logged once (`streams_closing`), not once per stream.
        self._stopping = end.why == "shutdown"
        self._transport.close()  # a client not reading is cut off when its stall timer fires

    # --- the protocol: what the connection reports ---------------------------------------

    def data_received(self, data: bytes) -> None:
        """An agent sends nothing after its request; whatever comes is dropped."""

    def eof_received(self) -> bool:
        return False  # the agent hung up: close our side too

    def pause_writing(self) -> None:
        """The client stopped reading: it has `write_timeout` to resume before it is cut."""
        self._stall = asyncio.get_running_loop().call_later(self._write_timeout, self._stalled)

    def resume_writing(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        """Cut a client that stopped reading; also one whose stream already ended, whose
        `close` would otherwise wait for it forever."""
        if not self._transport.is_closing():
            sub = self._ticket.subscription
            assert sub is not None
            sub.ended_by = "stalled"
            metrics.STALLED_CLIENTS.inc()
            log.warning(
                "client_stalled",
                write_timeout_s=self._write_timeout,
                workspace_id=str(sub.workspace_id),
                request_id=self._ticket.request_id,
            )
        self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.resume_writing()  # cancels a pending stall timer
        if self._stopping:
            return
        self._ticket.release(by=self)
        if self._server is not None:
            self._server.stream_closed()


def take_over(
    request: web.BaseRequest, ticket: Ticket, write_timeout: float, *, head: bytes = b""
) -> bool:
    """Take the connection of a stream away from aiohttp (which then neither writes to it nor
    closes it when the request returns): the stream writes `head` (unless aiohttp sent the
    headers already) and becomes the transport's protocol and the owner of the ticket, and
    the subscription's items flow to it from now on. False if the client is already gone or
    the connection is not ours to take (the guard is off); then nothing was written."""
    protocol = request.protocol
    if not isinstance(protocol, GuardedHandler):
        return False  # aiohttp's own server (the guard is off): the stream stays in its request
    transport = protocol.let_go()
    if transport is None:
        return False
    if head:
        transport.write(head)
    chunked = request.version >= HttpVersion11
    stream = Stream(transport, ticket, protocol.server, write_timeout, chunked=chunked)
    transport.set_protocol(stream)
    ticket.hand_over(stream)
    sub = ticket.subscription
    assert sub is not None
    sub.attach(stream)
    return True


async def stay(
    request: web.BaseRequest, response: web.StreamResponse, ticket: Ticket, write_timeout: float
) -> None:
    """The public path: serve a stream from its request, writing each frame with
    `response.write` until the stream ends or its client is gone or stalled. The request, its
    task and parser stay alive meanwhile (~16 KB per idle stream instead of ~2.4)."""
    sub = ticket.subscription
    assert sub is not None
    while True:
        item = await sub.next()
        if isinstance(item, End):
            sub.ended_by = item.why
            refusal = item.refusal
            if refusal is not None and await _send(
                request,
                response,
                ticket,
                error_frame(refusal.message, refusal.detail),
                write_timeout,
            ):
                ticket.refused(item)
            await _send(request, response, ticket, None, write_timeout)
            return
        frame = item.event.frame() if isinstance(item, Delivery) else PING_FRAME
        if not await _send(request, response, ticket, frame, write_timeout):
            return
        if isinstance(item, Delivery):
            ticket.delivered(item)


async def _send(
    request: web.BaseRequest,
    response: web.StreamResponse,
    ticket: Ticket,
    frame: bytes | None,
    write_timeout: float,
) -> bool:
    """Write a frame (None: end the body); False if the client is gone or was cut off for
    stalling longer than `write_timeout`."""
    sub = ticket.subscription
    assert sub is not None
    try:
        async with asyncio.timeout(write_timeout):
            if frame is None:
                await response.write_eof()
            else:
                await response.write(frame)
    except TimeoutError:
        sub.ended_by = "stalled"
        metrics.STALLED_CLIENTS.inc()
        log.warning(
            "client_stalled",
            write_timeout_s=write_timeout,
            workspace_id=str(sub.workspace_id),
            request_id=ticket.request_id,
        )
        if request.transport is not None:
            request.transport.abort()
        return False
    except ConnectionError:
        return False  # the agent hung up; it will reconnect
    return True
