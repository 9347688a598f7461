"""HTTP handlers: the reinit endpoint (SSE and JSON long-poll), health, readiness, metrics."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import time
from email.utils import formatdate
from importlib import resources

from aiohttp import HttpVersion11, web
from aiohttp.http import SERVER_SOFTWARE
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reinitd.errors import ApiError
from reinitd.server.admission import Ticket
from reinitd.server.claim import Deliver, Refuse
from reinitd.server.connection import now_waiting
from reinitd.server.hub import Delivery, End
from reinitd.server.keys import ADMISSION, INTERNALS, READINESS, REQUEST_ID, SETTINGS
from reinitd.server.middleware import count_response
from reinitd.server.stream import stay, take_over
from reinitd.wire import TOKEN_HEADER, TOKEN_PARAM, is_token

MAX_POLL_TIMEOUT = 300.0
DEFAULT_POLL_TIMEOUT = 30.0

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

# A stream taken over writes its response head itself, as aiohttp writes it for SSE_HEADERS
# (HTTP/1.1, chunked, the connection closed at the end, the request id echoed): built from
# constants, it skips StreamResponse.prepare (header dict, signal, serialisation): in a
# profiled storm, head and take-over fell from 18.7 % to 12.8 % of the server's samples.
_HEAD_START = (
    "HTTP/1.1 200 OK\r\n"
    + "".join(f"{name}: {value}\r\n" for name, value in SSE_HEADERS.items())
    + "Transfer-Encoding: chunked\r\n"
).encode()
_HEAD_END = f"Server: {SERVER_SOFTWARE}\r\nConnection: close\r\nX-Request-ID: ".encode()


@functools.lru_cache(maxsize=1)
def _date_at(second: int) -> bytes:
    return formatdate(second, usegmt=True).encode()


def http_date() -> bytes:
    """The Date header's value, formatted once a second."""
    return _date_at(int(time.time()))


def sse_head(request_id: str) -> bytes:
    """A stream's response head (the request id is one our middleware made or checked)."""
    return b"%sDate: %s\r\n%s%s\r\n\r\n" % (
        _HEAD_START,
        http_date(),
        _HEAD_END,
        request_id.encode(),
    )


class _TakenOver(web.StreamResponse):
    """What a stream's request returns once its connection is taken over with its head
    written. aiohttp has nothing to prepare; ending the response says the connection is no
    longer aiohttp's (ConnectionResetError, as its own writer says of a given-away transport),
    so aiohttp logs the access line and stops serving the connection at once: no lingering
    over a request body, no keep-alive. One instance for every stream: nothing writes to it."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        raise ConnectionResetError("the connection was taken over by its stream")


TAKEN_OVER = _TakenOver()
TAKEN_OVER.force_close()

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})


def parse_bool(value: str | None) -> bool:
    """Go's strconv.ParseBool truth values; anything else, or nothing, is false."""
    return value in _GO_TRUE


def token_hash(request: web.Request) -> bytes:
    """sha256 of the agent token's canonical text, from header, query parameter or cookie."""
    raw = (
        request.headers.get(TOKEN_HEADER)
        or request.query.get(TOKEN_PARAM)
        or request.cookies.get(TOKEN_PARAM)
    )
    if not raw:
        raise ApiError(
            401,
            "Unauthorized.",
            f"No agent token: send the {TOKEN_HEADER} header, or the {TOKEN_PARAM} "
            "query parameter or cookie.",
            reason="no_token",
        )
    raw = raw.strip()
    if not is_token(raw):
        raise ApiError(
            401,
            "Unauthorized.",
            "The agent token is malformed: it must be a UUID.",
            reason="malformed_token",
        )
    return hashlib.sha256(raw.lower().encode()).digest()


def parse_timeout(value: str | None) -> float:
    if value is None:
        return DEFAULT_POLL_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds <= MAX_POLL_TIMEOUT:  # also rejects nan
        raise ApiError(
            400,
            "Invalid query parameter.",
            f"timeout must be a number of seconds from 0 to {MAX_POLL_TIMEOUT:g}.",
            reason="bad_timeout",
        )
    return seconds


def wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/event-stream" not in accept


async def reinit(request: web.Request) -> web.StreamResponse:
    """GET /api/v2/workspaceagents/me/reinit: wait for this agent's workspace to be claimed."""
    digest = token_hash(request)
    wait = parse_bool(request.query.get("wait"))
    poll_timeout = parse_timeout(request.query.get("timeout")) if wants_json(request) else None
    ticket = await request.app[ADMISSION].admit(digest, wait=wait)
    try:
        sub, verdict = ticket.subscription, ticket.verdict
        assert sub is not None
        if isinstance(verdict, Refuse):
            raise ApiError(409, verdict.message, verdict.detail, reason="not_waiting")
        if isinstance(verdict, Deliver):
            sub.offer(Delivery(verdict.event, "seeded", build_id=verdict.build_id))
        ticket.open("sse" if poll_timeout is None else "json", request[REQUEST_ID])
        if poll_timeout is not None:
            now_waiting(request)
            return await _long_poll(ticket, poll_timeout)
        return await _stream(request, ticket)
    finally:
        ticket.release()  # nothing, once a stream took the ticket over


async def _long_poll(ticket: Ticket, seconds: float) -> web.Response:
    sub = ticket.subscription
    assert sub is not None
    try:
        async with asyncio.timeout(seconds):
            while True:
                item = await sub.next()
                if isinstance(item, Delivery):
                    sub.ended_by = "delivered"
                    ticket.delivered(item)
                    return web.Response(text=item.event.to_json(), content_type="application/json")
                if isinstance(item, End):
                    sub.ended_by = item.why
                    if item.refusal is not None:
                        ticket.refused(item)
                        raise ApiError(
                            409, item.refusal.message, item.refusal.detail, reason="not_waiting"
                        )
                    raise ApiError(
                        503,
                        "Service unavailable.",
                        f"The wait ended ({item.why}); retry.",
                        reason="wait_ended",
                        headers={"Retry-After": "1"},
                    )
    except TimeoutError:
        sub.ended_by = "timeout"
        return web.Response(status=204)


async def _stream(request: web.Request, ticket: Ticket) -> web.StreamResponse:
    """Send the stream's headers, then hand its connection to a Stream (reinitd.server.stream)
    and return: the request is over for aiohttp, the stream goes on. On the public path
    (reinitd.server.internals), the request stays and writes the frames itself."""
    write_timeout = request.app[SETTINGS].write_timeout
    takeover = request.app[INTERNALS].takeover
    if takeover and request.version == HttpVersion11:
        head = sse_head(request[REQUEST_ID])
        if take_over(request, ticket, write_timeout, head=head):
            count_response(request, 200)
            return TAKEN_OVER
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.force_close()
    await response.prepare(request)  # a StreamResponse sends its headers at once
    if not (takeover and take_over(request, ticket, write_timeout)):
        now_waiting(request)
        await stay(request, response, ticket, write_timeout)
    return response


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 only while our own NOTIFY comes back through the listener (which also proves the
    database answers); the result is cached for a second, so polling it is cheap."""
    app = request.app
    problems = await app[READINESS].check()
    if problems:
        return web.json_response(
            {"message": "Not ready.", "detail": "; ".join(problems)}, status=503
        )
    return web.json_response({"status": "ready"})


OPENAPI = resources.files("reinitd.server").joinpath("openapi.json").read_bytes()


async def openapi(_request: web.Request) -> web.Response:
    """The OpenAPI 3 document of this API (kept true by tests/integration/test_limits.py)."""
    return web.Response(body=OPENAPI, content_type="application/json")


async def metrics_handler(_request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response
