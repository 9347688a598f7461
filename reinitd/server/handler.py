"""HTTP handlers: the reinit endpoint (SSE and JSON long-poll), health, readiness, metrics."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from importlib import resources

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from reinitd.errors import ApiError
from reinitd.server import metrics
from reinitd.server.claim import Deliver, Refuse
from reinitd.server.hub import Delivery, End, Subscription
from reinitd.server.keys import ADMISSION, READINESS, SETTINGS
from reinitd.wire import PING_FRAME, TOKEN_HEADER, TOKEN_PARAM, error_frame, is_token

log = structlog.get_logger("reinitd.server.handler")

MAX_POLL_TIMEOUT = 300.0
DEFAULT_POLL_TIMEOUT = 30.0

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})

# Metric children resolved once, not per request or per frame.
_OPEN_STREAMS = {
    wait: metrics.OPEN_STREAMS.labels("true" if wait else "false") for wait in (True, False)
}
_DELIVERED_BY_PATH = {
    path: metrics.EVENTS_DELIVERED.labels(path) for path in ("notify", "seeded", "resync")
}


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
    async with request.app[ADMISSION].admit(digest, wait=wait) as ticket:
        sub, verdict = ticket.subscription, ticket.verdict
        if isinstance(verdict, Refuse):
            raise ApiError(409, verdict.message, verdict.detail, reason="not_waiting")
        if isinstance(verdict, Deliver):
            sub.offer(Delivery(verdict.event, "seeded"))
        open_streams = _OPEN_STREAMS[wait]
        open_streams.inc()
        mode = "sse" if poll_timeout is None else "json"
        log.info("agent_waiting", wait=wait, mode=mode)
        started = time.monotonic()
        try:
            if poll_timeout is not None:
                return await _long_poll(sub, poll_timeout)
            return await _stream(request, sub)
        finally:
            open_streams.dec()
            log.info(
                "stream_ended",
                reason=sub.ended_by,
                events=sub.delivered,
                duration_s=round(time.monotonic() - started, 3),
                mode=mode,
            )


def _delivered(sub: Subscription, delivery: Delivery) -> None:
    sub.delivered += 1
    _DELIVERED_BY_PATH[delivery.source].inc()
    if delivery.received_at:
        metrics.NOTIFY_TO_WRITE_SECONDS.observe(time.monotonic() - delivery.received_at)
    log.info("reinit_delivered", path=delivery.source, owner_id=str(delivery.event.owner_id))


async def _long_poll(sub: Subscription, seconds: float) -> web.Response:
    try:
        async with asyncio.timeout(seconds):
            while True:
                item = await sub.next()
                if isinstance(item, Delivery):
                    _delivered(sub, item)
                    sub.ended_by = "delivered"
                    return web.Response(text=item.event.to_json(), content_type="application/json")
                if isinstance(item, End):
                    sub.ended_by = item.why
                    if item.refusal is not None:
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


def _fits(request: web.Request, frame: bytes) -> bool:
    """True when writing `frame` cannot pause the transport, so the write cannot block."""
    transport = request.transport
    return (
        transport is not None
        and transport.get_write_buffer_size() + len(frame) < transport.get_write_buffer_limits()[1]
    )


async def _stream(request: web.Request, sub: Subscription) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.force_close()
    await response.prepare(request)  # a StreamResponse sends its headers at once
    write_timeout = request.app[SETTINGS].write_timeout
    while True:
        item = await sub.next()
        if isinstance(item, End):
            sub.ended_by = item.why
            frame = (
                None
                if item.refusal is None
                else error_frame(item.refusal.message, item.refusal.detail)
            )
        else:
            frame = item.event.frame() if isinstance(item, Delivery) else PING_FRAME
        if frame is not None:
            try:
                if _fits(request, frame):
                    await response.write(frame)  # cannot block: no timer needed
                else:
                    async with asyncio.timeout(write_timeout):
                        await response.write(frame)
            except TimeoutError:
                metrics.STALLED_CLIENTS.inc()
                sub.ended_by = "stalled"
                log.warning("client_stalled", write_timeout_s=write_timeout)
                if request.transport is not None:
                    request.transport.abort()
                return response
            except ConnectionError:
                sub.ended_by = "client_gone"
                return response  # the agent hung up; it will reconnect
        if isinstance(item, Delivery):
            _delivered(sub, item)
        elif isinstance(item, End):
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
